"""The pure decisions a round makes for a personal method (EMR: one model per client): which
Delta a client gets, what a message carries, which options are refused, how its rows and
headings are labelled."""

from __future__ import annotations

import pytest
import torch

from fl_merge.io.results import OWN_MODEL, format_summary, method_heading, own_model_methods
from fl_merge.merging.personal import PersonalDeltas, delta_nbytes, own_delta
from fl_merge.round.attacks import AttackPlan
from fl_merge.round.candidates import check_weighting, personal_method
from fl_merge.round.tables import result_rows
from fl_merge.round.updates import ClientUpdate


def _pd():
    unified = {"w": torch.tensor([1.0, -2.0, 3.0], dtype=torch.float16)}
    masks = [{"w": torch.tensor([True, False, True])}, {"w": torch.tensor([False, True, False])}]
    return PersonalDeltas(unified, masks, [2.0, 0.5], ["a", "b"])


def test_each_client_gets_its_own_delta_and_shared_ones_pass_through():
    pd = _pd()
    assert own_delta(pd, "a")["w"].tolist() == [2.0, 0.0, 6.0]
    assert own_delta(pd, "b")["w"].tolist() == [0.0, -1.0, 0.0]
    shared = {"w": torch.ones(3)}
    assert own_delta(shared, "a")["w"].tolist() == [1.0, 1.0, 1.0]
    assert delta_nbytes(pd) == 6 == delta_nbytes({"w": torch.ones(3, dtype=torch.float16)})
    with pytest.raises(ValueError, match="2 masks and 1 scales for 2 clients"):
        PersonalDeltas(pd.unified, pd.masks, [1.0], ["a", "b"])


def test_weighting_and_personal_methods():
    assert personal_method("emr") and not personal_method("ties") and not personal_method("greedy_soup")
    assert check_weighting("uniform", ["emr", "ties"]) == "uniform"
    assert check_weighting("num-examples", ["ties"]) == "num-examples"
    with pytest.raises(ValueError, match="^weighting=num-examples cannot apply to emr: .*weighting=uniform"):
        check_weighting("num-examples", ["ties", "emr"])
    with pytest.raises(ValueError, match="weighting must be 'uniform' or 'num-examples', got 'x'"):
        check_weighting("x", [])


def test_rows_and_headings_say_each_task_had_its_own_model():
    c = ClientUpdate(7, {"partition-id": 0, "finetuned-accuracy": 0.9, "finetuned-val-accuracy": 0.9},
                     {"w": torch.zeros(1)})
    scores = {"t": {"val": {"etas": [0.0, 1.0], "accuracy": [0.5, 0.8], "loss": [0.0, 0.0]},
                    "test": {"etas": [0.0, 1.0], "accuracy": [0.5, 0.7], "loss": [0.0, 0.0]}}}
    rows = result_rows("emr", "emr", {}, 1.0, scores, {"t": c}, AttackPlan(), own_model=True)
    rows += result_rows("ties", "ties", {}, 1.0, scores, {"t": c}, AttackPlan(), finetuned=False)
    assert {r[OWN_MODEL] for r in rows if r["method"] == "emr"} == {True}
    assert {r[OWN_MODEL] for r in rows if r["method"] == "ties"} == {False}
    assert own_model_methods(rows) == {"emr"}
    head = format_summary(rows).splitlines()[0]
    assert "emr (eta=1, own model per task)" in head and "ties (eta=1)" in head
    assert own_model_methods([{**r, OWN_MODEL: "True"} for r in rows if r["method"] == "ties"]) == {"ties"}
    assert method_heading("m", None, False) == "m"
