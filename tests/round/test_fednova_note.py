"""The run's note that fednova is fedavg by construction when every client's normaliser is equal."""

import numpy as np
import torch

from fl_merge.methods import merge
from fl_merge.round.merging import fednova_note


def test_equal_normalisers_make_fednova_fedavg_and_the_run_says_so():
    rng = np.random.default_rng(0)
    tvs = [{"w": torch.from_numpy(rng.normal(size=(3, 4)))} for _ in range(4)]
    w = [1.0, 2.0, 3.0, 4.0]
    # the claim the note makes, checked: with equal a_i fednova's Delta is the weighted mean
    mean = sum(wi * tv["w"].numpy() for wi, tv in zip(w, tvs)) / sum(w)
    np.testing.assert_allclose(merge("fednova", tvs, w, normalisers=[1910.0] * 4)["w"].numpy(), mean,
                               rtol=1e-12, atol=1e-12)
    notes = fednova_note(["fedavg", "fednova"], [{"fednova-a": 1910.0, "local-steps": 200}] * 4)
    assert len(notes) == 1 and "by construction" in notes[0] and "1910" in notes[0]
    # local steps stand in for a missing normaliser, as in merge()
    assert fednova_note(["fednova"], [{"local-steps": 100}] * 3)


def test_no_note_when_the_normalisers_differ_or_fednova_did_not_run():
    assert fednova_note(["fednova"], [{"fednova-a": 410.0}, {"fednova-a": 7910.0}]) == []
    assert fednova_note(["fednova"], [{"local-steps": 50}, {"local-steps": 800}]) == []
    assert fednova_note(["fedavg", "ties"], [{"local-steps": 200}] * 4) == []
    assert fednova_note(["fednova"], [{"local-steps": 200}, {}]) == []  # one reported neither
    assert fednova_note(["fednova"], []) == []
