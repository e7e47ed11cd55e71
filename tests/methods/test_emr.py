"""EMR-Merging (Huang et al., NeurIPS 2024) against numpy: the paper's elect, mask and rescale
written out with loops over tasks, tensors and coordinates (the authors' conventions: a zero
sum elects the negative sign; the rescaler is a ratio of sums of per-tensor mean magnitudes),
a tiny example by hand, one model per client, and its refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fl_merge.core.task_vectors import MergeInputError, apply_update
from fl_merge.merging.personal import PersonalDeltas, own_delta
from fl_merge.merging.registry import get_method
from fl_merge.methods import merge
from methods.helpers import SHAPES, make_tvs


def ref_emr(tvs):
    """(unified, masks, rescalers) per the paper, tensor by tensor, coordinate by coordinate."""
    k = len(tvs)
    unified, masks = {}, [{} for _ in range(k)]
    num, den = [0.0] * k, [0.0] * k
    for key in tvs[0]:
        x = [tv[key].double().numpy().reshape(-1) for tv in tvs]
        n = x[0].size
        u = np.zeros(n)
        for i in range(k):
            masks[i][key] = np.zeros(n, dtype=bool)
        for j in range(n):
            total = sum(x[i][j] for i in range(k))
            s = 1.0 if total > 0 else -1.0  # exactly 0 -> negative, as the authors' code
            agree = [i for i in range(k) if x[i][j] * s > 0]
            u[j] = s * max([abs(x[i][j]) for i in agree], default=0.0)
            for i in range(k):
                masks[i][key][j] = x[i][j] * u[j] > 0
        for i in range(k):
            if n:
                num[i] += sum(abs(v) for v in x[i]) / n
                den[i] += sum(abs(u[j]) for j in range(n) if masks[i][key][j]) / n
        unified[key] = u.reshape(tvs[0][key].shape)
        for i in range(k):
            masks[i][key] = masks[i][key].reshape(tvs[0][key].shape)
    scales = [num[i] / den[i] if den[i] > 0 else 0.0 for i in range(k)]
    return unified, masks, scales


def check(got: PersonalDeltas, tvs, rtol=1e-6):
    unified, masks, scales = ref_emr(tvs)
    for key in tvs[0]:
        np.testing.assert_allclose(got.unified[key].double().numpy(), unified[key], rtol=rtol, atol=1e-7)
        for i in range(len(tvs)):
            assert got.masks[i][key].dtype == torch.bool
            np.testing.assert_array_equal(got.masks[i][key].numpy(), masks[i][key])
    np.testing.assert_allclose(got.scales, scales, rtol=rtol)
    for i in range(len(tvs)):  # client i's own update: lambda_i * m_i * tau_uni
        d = got.delta(i)
        for key in tvs[0]:
            np.testing.assert_allclose(d[key].double().numpy(), scales[i] * masks[i][key] * unified[key],
                                       rtol=rtol, atol=1e-7)


@pytest.mark.parametrize("k,seed", [(2, 0), (3, 1), (6, 2), (8, 3)])
def test_emr_is_the_papers_elect_mask_rescale(k, seed):
    tvs = make_tvs(k, seed)
    check(merge("emr", tvs), tvs)


def test_by_hand_with_a_zero_sum_coordinate():
    # w: coordinate 0: 1 - 1 = 0 -> the NEGATIVE sign: unified -1, only client b agrees;
    #    coordinate 1: -2 + 1 < 0: unified -2 (client a); coordinate 2: both positive, max 3;
    #    coordinate 3: both 0 -> unified -0, nobody's mask.
    # b (one coordinate): 1 - 2 < 0: unified -2, client b.
    a = {"w": torch.tensor([1.0, -2.0, 3.0, 0.0]), "b": torch.tensor([1.0])}
    b = {"w": torch.tensor([-1.0, 1.0, 1.0, 0.0]), "b": torch.tensor([-2.0])}
    got = merge("emr", [a, b], names=["a", "b"])
    assert got.unified["w"].tolist() == [-1.0, -2.0, 3.0, 0.0] and got.unified["b"].tolist() == [-2.0]
    assert got.masks[0]["w"].tolist() == [False, True, True, False] and not got.masks[0]["b"].item()
    assert got.masks[1]["w"].tolist() == [True, False, True, False] and got.masks[1]["b"].item()
    # a: (mean|w| 6/4 + mean|b| 1) / (mean|[0,-2,3,0]| 5/4 + 0) = 2.5 / 1.25 = 2
    # b: (3/4 + 2) / (mean|[-1,0,3,0]| 4/4 + 2) = 2.75 / 3
    assert got.scales == pytest.approx([2.0, 2.75 / 3])
    assert got.delta("a")["w"].tolist() == pytest.approx([0.0, -4.0, 6.0, 0.0])
    assert got.delta("b")["b"].tolist() == pytest.approx([-2.0 * 2.75 / 3])
    check(got, [a, b])


def test_one_client_gets_its_own_model_exactly():
    tv = make_tvs(1, 5)[0]
    tv["fc.bias"][2] = 0.0  # a zero coordinate stays 0
    got = merge("emr", [tv])
    assert got.scales == [1.0]
    theta0 = {k: torch.randn(v.shape) for k, v in tv.items()}
    model = got.model(theta0, 0)
    for key in tv:
        torch.testing.assert_close(got.delta(0)[key], tv[key])
        torch.testing.assert_close(model[key], theta0[key] + tv[key])


def test_identical_clients_each_get_the_common_vector_and_permutation_moves_the_models():
    common = make_tvs(1, 6)[0]
    got = merge("emr", [{k: v.clone() for k, v in common.items()} for _ in range(5)])
    for i in range(5):
        for key in SHAPES:
            torch.testing.assert_close(got.delta(i)[key], common[key])
    tvs, perm = make_tvs(5, 7), [3, 0, 4, 2, 1]
    names = [f"t{i}" for i in range(5)]
    a = merge("emr", tvs, names=names)
    b = merge("emr", [tvs[i] for i in perm], names=[names[i] for i in perm])
    for n in names:  # the same client gets the same model, whatever the order
        for key in SHAPES:
            torch.testing.assert_close(a.delta(n)[key], b.delta(n)[key])


def test_a_client_that_disagrees_everywhere_gets_theta0():
    # b = -0.5 a: the sum has a's sign everywhere, so b's mask is empty; the authors divide
    # by 0 there, here its rescaler is 0 and its model is theta0.
    a = make_tvs(1, 8)[0]
    b = {k: -0.5 * v for k, v in a.items()}
    got = merge("emr", [a, b])
    assert got.scales[1] == 0.0 and got.scales[0] == pytest.approx(1.0)
    assert all(not bool(m.any()) for m in got.masks[1].values())
    assert all(float(v.abs().max()) == 0.0 for v in got.delta(1).values() if v.numel())


def test_result_types_dtype_and_client_lookup():
    tvs = make_tvs(3, 9, dtype=torch.float16)
    got = merge("emr", tvs, names=["x", "y", "z"])
    assert isinstance(got, PersonalDeltas) and len(got) == 3 and got.names == ["x", "y", "z"]
    assert all(v.dtype == torch.float16 for v in got.unified.values())
    assert all(v.dtype == torch.float16 for v in got.delta("y").values())
    assert got.delta(1).keys() == got.delta("y").keys()
    assert own_delta(got, "z")["fc.bias"].tolist() == got.delta(2)["fc.bias"].tolist()
    with pytest.raises(MergeInputError, match="no client named 'w'; clients: x, y, z"):
        got.delta("w")
    with pytest.raises(MergeInputError, match="out of range"):
        got.delta(3)
    with pytest.raises(MergeInputError, match=r"client names must be unique, \['x'\] repeat"):
        merge("emr", tvs, names=["x", "y", "x"])
    assert not hasattr(got, "items")  # not a Delta: nothing can use it as one shared model
    theta0 = {k: torch.zeros(v.shape) for k, v in tvs[0].items()}
    m = got.model(theta0, "x", eta=0.5)
    ref = apply_update(theta0, got.delta("x"), 0.5)
    assert all(torch.equal(m[k], ref[k]) for k in m)


def test_declarations():
    m = get_method("emr")
    assert m.personal and not m.coordinatewise and m.lambda_scale == "delta"
    assert m.space == {} and m.params == {} and not m.per_tensor_exact


def test_unequal_weights_are_refused_equal_ones_are_not():
    tvs = make_tvs(3, 10)
    with pytest.raises(MergeInputError, match="merge method 'emr' takes no client weights"):
        merge("emr", tvs, [1.0, 2.0, 1.0])
    check(merge("emr", tvs, [2.0, 2.0, 2.0]), tvs)


def test_zero_size_tensors_add_nothing():
    tvs = make_tvs(3, 11, shapes={"w": (4,), "empty": (0, 3)})
    got = merge("emr", tvs)
    assert got.unified["empty"].shape == (0, 3)
    check(got, tvs)


def test_a_rescaled_update_beyond_the_dtype_is_a_clear_error():
    # b disagrees with the elected sign at w[0]: lambda_b = mean(3e4, 6e4) / mean(0, 6e4) = 1.5,
    # and 1.5 * 6e4 = 9e4 is beyond float16's 65504
    a = {"w": torch.tensor([6e4, 6e4], dtype=torch.float16)}
    b = {"w": torch.tensor([-3e4, 6e4], dtype=torch.float16)}
    with pytest.raises(MergeInputError, match=r"^merge method 'emr': the update of 1 overflows torch.float16 at 'w'"):
        merge("emr", [a, b])
    got = merge("emr", [{"w": a["w"].float()}, {"w": b["w"].float()}])
    assert got.scales[1] == pytest.approx(1.5) and float(got.delta(1)["w"].abs().max()) == pytest.approx(9e4, rel=1e-3)
