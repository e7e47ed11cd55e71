"""Client training seeds (fl_merge/core/seeds.py): replicates and clients share no seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fl_merge.core.seeds import client_seeds


def test_spawned_seeds_are_numpys_seed_sequence_children_independent_of_k():
    # numpy's documented construction, written out: child i of SeedSequence(root) is the
    # SeedSequence with the same entropy and spawn_key (i,).
    for root in (0, 7, 2**40):
        got = client_seeds(root, 5)
        for i, s in enumerate(got):
            word = np.random.SeedSequence(entropy=root, spawn_key=(i,)).generate_state(1, np.uint64)[0]
            assert s == int(word) % 2**63
        assert client_seeds(root, 3) == got[:3]  # adding clients does not reseed the others
        assert client_seeds(root, 5) == got  # deterministic


def test_no_two_clients_of_any_replicates_share_a_seed():
    roots, k = range(100), 8  # replicates 0..99 of an 8-client run
    spawn = [s for r in roots for s in client_seeds(r, k)]
    assert len(set(spawn)) == len(spawn)
    assert all(0 <= s < 2**63 for s in spawn)
    # the old scheme's defect this replaces: replicate 0's client 1 is replicate 1's client 0
    assert client_seeds(0, k, "offset")[1] == client_seeds(1, k, "offset")[0] == 1


def test_replicates_draw_uncorrelated_torch_streams():
    # what a seed is for: the first draws of the torch generators of replicate 0's client 1
    # and replicate 1's client 0, the pair the offset scheme made identical
    def draws(seed):
        return torch.randn(20_000, generator=torch.Generator().manual_seed(seed))

    a, b = draws(client_seeds(0, 2)[1]), draws(client_seeds(1, 2)[0])
    assert abs(float(torch.corrcoef(torch.stack([a, b]))[0, 1])) < 0.05  # ~0.007 sd
    same = [draws(s) for s in (client_seeds(0, 2, "offset")[1], client_seeds(1, 2, "offset")[0])]
    assert torch.equal(*same)


def test_an_unknown_scheme_is_named():
    with pytest.raises(ValueError, match="client-seeds must be one of spawn, offset.*got 'seq'"):
        client_seeds(0, 2, "seq")
