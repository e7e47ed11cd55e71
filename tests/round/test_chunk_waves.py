"""Which group messages of a chunked round are in flight together (fl_merge/round/chunks.py
plan_waves): a wave's distinct payloads stay within the budget, so the SuperLink holds about
one group at a time; a payload every node gets is one wave, payloads that differ per node go
one node at a time. Expected waves are written out by hand."""

from __future__ import annotations

import random

import pytest

from fl_merge.round.chunks import Transfer, plan_waves

G = 100  # one group's bytes (the chunk limit)


def plan(transfers: list[Transfer], budget: int) -> list[list[tuple[int, int]]]:
    return [[(t.node, t.index) for t in wave] for wave in plan_waves(transfers, budget)]


def test_a_group_every_node_gets_is_one_wave_per_group():
    # theta0: 3 groups to nodes 7, 8, 9, one state: content (state, index)
    theta0 = [Transfer(n, i, ("theta0", i), G) for i in range(3) for n in (7, 8, 9)]
    assert plan(theta0, G) == [[(7, 0), (8, 0), (9, 0)], [(7, 1), (8, 1), (9, 1)], [(7, 2), (8, 2), (9, 2)]]


def test_payloads_that_differ_per_node_go_one_node_at_a_time():
    # update groups: node 7 has 2, node 8 has 3, each reply its own payload
    updates = [Transfer(n, i, (n, i), G) for i in range(3) for n, k in ((7, 2), (8, 3)) if i < k]
    assert plan(updates, G) == [[(7, 0)], [(8, 0)], [(7, 1)], [(8, 1)], [(8, 2)]]
    # a budget of two groups: two replies at a time, in the same order
    assert plan(updates, 2 * G) == [[(7, 0), (8, 0)], [(7, 1), (8, 1)], [(8, 2)]]


def test_nodes_that_share_a_state_travel_together_and_the_others_alone():
    # nodes 1 and 3 get the shared Delta S, node 2 its own T (a personal method)
    delta = [Transfer(n, i, (s, i), G) for i in range(2) for n, s in ((1, "S"), (2, "T"), (3, "S"))]
    assert plan(delta, G) == [[(1, 0), (3, 0)], [(2, 0)], [(1, 1), (3, 1)], [(2, 1)]]


def test_exact_bytes_fill_a_wave_and_a_payload_above_the_budget_travels_alone():
    sizes = [60, 30, 20, 250, 10, 90]
    transfers = [Transfer(n, 0, n, s) for n, s in enumerate(sizes)]
    # 60 + 30 = 90 (+20 = 110 > 100) | 20 (+250) | 250 alone | 10 + 90 = 100
    assert plan(transfers, 100) == [[(0, 0), (1, 0)], [(2, 0)], [(3, 0)], [(4, 0), (5, 0)]]


def test_no_transfers_no_waves_and_a_budget_must_be_positive():
    assert plan_waves([], G) == []
    with pytest.raises(ValueError, match="budget must be positive, got 0 bytes"):
        plan_waves([Transfer(1, 0, 1, G)], 0)


@pytest.mark.parametrize("seed", range(20))
def test_random_plans_keep_every_transfer_once_and_each_wave_within_the_budget(seed):
    rng = random.Random(seed)
    contents = [f"c{j}" for j in range(rng.randint(1, 6))]
    size = {c: rng.randint(1, 120) for c in contents}
    transfers = [Transfer(n, i, c, size[c]) for i in range(rng.randint(0, 5)) for n in range(rng.randint(1, 5))
                 for c in [rng.choice(contents)]]
    budget = rng.randint(50, 300)
    waves = plan_waves(transfers, budget)
    assert sorted((t.node, t.index, t.content) for w in waves for t in w) == sorted(
        (t.node, t.index, t.content) for t in transfers)
    for w in waves:
        distinct = {t.content: t.nbytes for t in w}
        assert len(distinct) == 1 or sum(distinct.values()) <= budget
    waves_of = {t.content: {j for j, w in enumerate(waves) for u in w if u.content == t.content} for t in transfers}
    assert all(len(js) == 1 for js in waves_of.values())  # equal payloads travel in one wave
