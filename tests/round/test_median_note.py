"""The run's note that median is fedavg by construction at K=2 (the median of two values is
their mean), and what it says when the weights are not equal."""

import numpy as np
import torch

from fl_merge.methods import merge
from fl_merge.round.merging import median_note


def test_median_of_two_is_fedavgs_uniform_mean_and_the_run_says_so():
    rng = np.random.default_rng(0)
    tvs = [{"w": torch.from_numpy(rng.normal(size=(3, 4)))} for _ in range(2)]
    # the claim the note makes, checked: at K=2 median's Delta is fedavg's with uniform weights
    torch.testing.assert_close(merge("median", tvs)["w"], merge("fedavg", tvs)["w"], rtol=1e-12, atol=1e-12)
    notes = median_note(["task_arithmetic", "median"], 2, None)
    assert len(notes) == 1 and "by construction at K=2" in notes[0]
    assert "differ from task_arithmetic's only by their eta grids" in notes[0]
    alone = median_note(["median"], 2, [5.0, 5.0])  # equal num-examples weights: the same mean
    assert len(alone) == 1 and "by construction" in alone[0] and "eta grids" not in alone[0]


def test_unequal_weights_make_median_the_unweighted_mean_not_this_runs_fedavg():
    tvs = [{"w": torch.tensor([0.0, 2.0])}, {"w": torch.tensor([4.0, 6.0])}]
    weighted = merge("fedavg", tvs, [1.0, 3.0])["w"]
    assert not torch.allclose(merge("median", tvs, [1.0, 3.0])["w"], weighted)  # weights ignored
    notes = median_note(["fedavg", "median"], 2, [100.0, 300.0])
    assert len(notes) == 1 and "unweighted mean" in notes[0] and "not this run's weighted fedavg" in notes[0]


def test_no_note_without_median_or_at_another_k():
    assert median_note(["fedavg", "ties"], 2, None) == []
    assert median_note(["median"], 3, None) == []
    assert median_note(["median", "fedavg"], 4, [1.0] * 4) == []
