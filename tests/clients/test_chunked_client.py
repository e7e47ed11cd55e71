"""fl-merge's client's side of chunked messages (clients/chunked.py), handler by handler as
the SuperNode calls them: each group the server puts is a node-local file under node-config
cache-dir, keyed by run and node; theta0 and the score inputs are read back from them; the
update is cut into groups the server gets one by one; drop leaves nothing."""

from __future__ import annotations

import os
import socket

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fl_merge.round.chunks import (DELTA_GROUPS, GET, INDEX_KEY, LIMIT_KEY, OWN_GROUPS, PUT, REPLY_GROUPS,
                                   REPLY_LIMIT_KEY, SLOT_KEY, THETA0_GROUPS, chunk_groups)
from fl_merge_clients import chunked


def _put(ctx: Context, slot: str, index: int, tensors: dict) -> None:
    msg = Message(RecordDict({"config": ConfigRecord({SLOT_KEY: slot, INDEX_KEY: index}),
                              "arrays": ArrayRecord(tensors)}),
                  dst_node_id=ctx.node_id, message_type=f"query.{PUT}")
    chunked.put(msg, ctx)


@pytest.fixture
def node(tmp_path):
    return Context(run_id=7, node_id=3, node_config={"cache-dir": str(tmp_path)}, state=RecordDict(),
                   run_config={})


def test_groups_put_become_theta0_and_the_score_inputs(node, tmp_path, message_identity):
    g = torch.Generator().manual_seed(0)
    theta0 = {"a": torch.randn(3, 4, generator=g), "b": torch.randn(5, generator=g),
              "c": torch.randn(2, 2, generator=g).half()}
    groups = chunk_groups(theta0, 60)
    assert len(groups) >= 2
    for i, names in enumerate(groups):
        _put(node, "theta0", i, {k: theta0[k] for k in names})
    folder = tmp_path / "fl-merge-chunks" / "run-7-node-3"
    want = ["owner.json"] + [f"theta0-{i:05d}.safetensors" for i in range(len(groups))]
    assert sorted(p.name for p in folder.iterdir()) == want
    got = chunked.theta0({THETA0_GROUPS: len(groups)}, node)
    assert list(got) == list(theta0) and all(torch.equal(got[k], theta0[k]) for k in theta0)
    delta = {"a": torch.ones(3, 4), "b": torch.full((5,), 2.0)}
    _put(node, "delta-0", 0, {"a": delta["a"]})
    _put(node, "delta-0", 1, {"b": delta["b"]})
    _put(node, "own", 0, {"c": torch.zeros(2, 2).half()})
    config = {THETA0_GROUPS: len(groups), DELTA_GROUPS: [2], OWN_GROUPS: 1}
    state, loaders = chunked.scoring_inputs(config, node)
    assert torch.equal(state["c"], torch.zeros(2, 2).half()) and torch.equal(state["a"], theta0["a"])
    (load,) = loaders
    assert {k: v.tolist() for k, v in load().items()} == {k: v.tolist() for k, v in delta.items()}
    with pytest.raises(ValueError, match=r"chunk file .*delta-0-00002.safetensors is missing: "
                                         r"this node did not receive delta-0 group 2 of 3"):
        chunked.scoring_inputs({THETA0_GROUPS: len(groups), DELTA_GROUPS: [3]}, node)[1][0]()


def test_the_update_is_kept_in_groups_got_one_by_one_then_dropped(node, tmp_path, message_identity):
    state = {"w": torch.arange(12.0).reshape(3, 4), "extra.fisher.w": torch.ones(3, 4), "h": torch.zeros(2)}
    metrics = chunked.keep_update({LIMIT_KEY: 56}, node, state, {"num-examples": 5})
    assert metrics == {"num-examples": 5, REPLY_GROUPS: 2}  # w (48) | fisher (48) + h (8) = 56
    back = {}
    for i in range(2):
        msg = Message(RecordDict({"config": ConfigRecord({INDEX_KEY: i})}), dst_node_id=3,
                      message_type=f"query.{GET}")
        back.update(chunked.get(msg, node).content["arrays"].to_torch_state_dict())
    assert list(back) == list(state) and all(torch.equal(back[k], state[k]) for k in state)
    folder = tmp_path / "fl-merge-chunks" / "run-7-node-3"
    assert not list(folder.glob("update-*"))  # each group's file goes once the server has it
    _put(node, "theta0", 0, {"w": state["w"]})
    done = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=3, message_type="query.chunk_drop")
    chunked.drop(done, node)
    assert list(tmp_path.iterdir()) == []  # the run's folder and the emptied parent are gone


def _got(node: Context, count: int) -> list[dict[str, torch.Tensor]]:
    """The update's groups as the server's chunk_get replies carry them."""
    return [chunked.get(Message(RecordDict({"config": ConfigRecord({INDEX_KEY: i})}), dst_node_id=3,
                                message_type=f"query.{GET}"), node).content["arrays"].to_torch_state_dict()
            for i in range(count)]


@pytest.mark.parametrize("config, groups", [
    # w 48 bytes, fisher 48, h 8 (float32); chunk-bytes 112 holds all 104 in one group
    ({LIMIT_KEY: 112}, [["w", "extra.fisher.w", "h"]]),  # a server without a reply limit: the chunk
    ({LIMIT_KEY: 112, REPLY_LIMIT_KEY: 56}, [["w"], ["extra.fisher.w", "h"]]),  # 48 | 48 + 8 = 56
    ({LIMIT_KEY: 112, REPLY_LIMIT_KEY: 20}, [["w"], ["extra.fisher.w"], ["h"]]),  # raised to w's 48
    ({LIMIT_KEY: 50, REPLY_LIMIT_KEY: 500}, [["w"], ["extra.fisher.w"], ["h"]]),  # capped at the chunk, 50
])
def test_the_update_is_cut_at_the_reply_limit_raised_to_its_largest_tensor(node, message_identity, config,
                                                                           groups):
    state = {"w": torch.arange(12.0).reshape(3, 4), "extra.fisher.w": torch.ones(3, 4), "h": torch.zeros(2)}
    metrics = chunked.keep_update(config, node, state, {"num-examples": 5})
    assert metrics == {"num-examples": 5, REPLY_GROUPS: len(groups)}
    got = _got(node, len(groups))
    assert [sorted(g) for g in got] == [sorted(g) for g in groups]  # a file's names come back sorted
    assert all(torch.equal(g[k], state[k]) for g in got for k in g)


def test_a_bad_reply_limit_is_one_line(node):
    with pytest.raises(ValueError, match="^chunk-reply-bytes must be a positive number of bytes, got 0$"):
        chunked.keep_update({LIMIT_KEY: 112, REPLY_LIMIT_KEY: 0}, node, {"w": torch.ones(3)}, {})


def test_a_run_s_first_group_removes_folders_whose_owner_on_this_host_is_gone(node, tmp_path, message_identity):
    """A node killed mid-round never gets chunk_drop: its folder is removed by the next run's
    first group on this host, once its owner process is gone; nothing else is touched."""
    import json
    import subprocess
    import sys

    root = tmp_path / "fl-merge-chunks"
    gone = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    records = {"run-1-node-9": chunked.owner(gone.pid),  # killed below
               "run-2-node-9": chunked.owner(os.getpid()),  # alive: a run still going
               "run-3-node-9": {**chunked.owner(gone.pid), "host": "another-host"},  # not ours to judge
               "run-4-node-9": None}  # no owner record (written by an older version)
    gone.kill()
    gone.wait()
    for name, record in records.items():
        (root / name).mkdir(parents=True)
        (root / name / "theta0-00000.safetensors").write_bytes(b"x")
        if record is not None:
            (root / name / "owner.json").write_text(json.dumps(record))
    _put(node, "theta0", 0, {"w": torch.ones(2)})
    assert sorted(p.name for p in root.iterdir()) == ["run-2-node-9", "run-3-node-9", "run-4-node-9",
                                                      "run-7-node-3"]
    mine = json.loads((root / "run-7-node-3" / "owner.json").read_text())
    assert mine["pid"] == os.getppid() and mine["host"] == socket.gethostname()
    _put(node, "theta0", 1, {"v": torch.ones(2)})  # later groups do not sweep again
    assert (root / "run-2-node-9").exists()
