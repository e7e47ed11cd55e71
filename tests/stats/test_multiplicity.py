"""Multiple-comparison control against independent references: Holm's step-down procedure
written out (Holm 1979), scipy's Benjamini-Hochberg, and the paired t test by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from fl_merge.stats.intervals import over_seed_table
from fl_merge.stats.multiplicity import adjust, caption, check_correction, paired_p_value


def holm_by_hand(p):
    """Holm 1979: sort ascending, p_(j) * (m - j) for j = 0..m-1, running maximum, cap 1."""
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    out, running = [0.0] * m, 0.0
    for j, i in enumerate(order):
        running = max(running, min(1.0, (m - j) * p[i]))
        out[i] = running
    return out


@pytest.mark.parametrize("p", [[0.01, 0.04, 0.03, 0.005], [0.2, 0.01], [0.5], [0.001] * 4,
                               list(np.random.default_rng(3).uniform(0, 0.2, 9))])
def test_holm_is_the_step_down_procedure(p):
    assert adjust(p, "holm") == pytest.approx(holm_by_hand(p), abs=1e-12)


def test_bh_is_scipys_false_discovery_control():
    p = list(np.random.default_rng(4).uniform(0, 0.1, 12))
    assert adjust(p, "bh") == pytest.approx(list(sps.false_discovery_control(p)), abs=1e-12)


def test_nan_is_not_part_of_the_family():
    got = adjust([0.01, math.nan, 0.04], "holm")
    assert math.isnan(got[1]) and got[0] == pytest.approx(0.02) and got[2] == pytest.approx(0.04)
    assert adjust([0.01, 0.04], "none") == [0.01, 0.04]


def test_eighteen_comparisons_lose_a_raw_p_of_0_01():
    # the situation of docs/experiments.md (c): a raw 0.01 is not significant among 18
    p = [0.01] + [0.3] * 17
    assert adjust(p, "holm")[0] == pytest.approx(0.18)


def test_paired_p_value_is_the_t_test_by_hand():
    d = [0.02, 0.05, -0.01, 0.03]
    t = np.mean(d) / (np.std(d, ddof=1) / math.sqrt(4))
    assert paired_p_value(d) == pytest.approx(2 * sps.t.sf(abs(t), 3), rel=1e-9)
    assert math.isnan(paired_p_value([0.1]))  # one seed: no test
    assert math.isnan(paired_p_value([0.0, 0.0, 0.0]))  # identical to the reference
    assert paired_p_value([0.03, 0.03, 0.03]) == 0.0  # the same gap in every replicate


def test_over_seed_table_marks_only_what_survives_holm():
    # two methods, each +0.02 on average over 4 seeds: one consistent, one noisy
    ref = [0.80, 0.82, 0.81, 0.83]
    per_seed = {"ta": ref,
                "steady": [r + d for r, d in zip(ref, [0.019, 0.021, 0.020, 0.022])],
                "noisy": [r + d for r, d in zip(ref, [0.06, -0.03, 0.05, 0.0])]}
    table = over_seed_table(per_seed, "ta")
    raw = [table[m]["p_value"] for m in ("steady", "noisy")]
    assert [table[m]["p_adjusted"] for m in ("steady", "noisy")] == pytest.approx(holm_by_hand(raw))
    assert table["steady"]["significant"] and not table["noisy"]["significant"]
    assert not table["ta"]["significant"] and table["ta"]["correction"] == "holm"
    bh = over_seed_table(per_seed, "ta", correction="bh")
    assert bh["noisy"]["correction"] == "bh"


def test_caption_and_unknown_correction():
    assert "Holm-adjusted p < 0.05 over the family of 5 comparisons vs fedavg" in caption("holm", 5, "fedavg")
    assert "NOT corrected" in caption("none", 3, "fedavg")
    with pytest.raises(ValueError, match="unknown multiple-comparison correction 'bonf'.*holm"):
        check_correction("bonf")


@pytest.mark.parametrize("n", [2, 3, 5, 10])
def test_p_recovered_from_a_t_interval_is_scipys_t_test(n):
    from fl_merge.stats.multiplicity import p_from_t_interval

    rng = np.random.default_rng(n)
    for _ in range(5):
        d = rng.normal(0.01, 0.02, n)
        half = sps.t.ppf(0.975, n - 1) * np.std(d, ddof=1) / math.sqrt(n)  # the t CI, by hand
        mean = float(np.mean(d))
        want = sps.ttest_1samp(d, 0.0).pvalue
        assert p_from_t_interval(mean, mean - half, mean + half, n) == pytest.approx(want, rel=1e-9)


def test_p_from_a_degenerate_t_interval():
    from fl_merge.stats.multiplicity import p_from_t_interval

    assert math.isnan(p_from_t_interval(0.0, 0.0, 0.0, 3))  # identical to the reference
    assert p_from_t_interval(0.03, 0.03, 0.03, 3) == 0.0  # the same gap in every seed
    assert math.isnan(p_from_t_interval(0.1, math.nan, math.nan, 1))  # one seed
