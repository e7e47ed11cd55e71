"""The server's side of chunked messages (strategies/chunked.py) through a fake Grid whose
nodes answer with fl-merge's real chunk handlers (clients/chunked.py, node-local files under
a test folder): a round with one chunk-capable node and one that refuses chunks (a ClientApp
without the handlers) gives the same Deltas and rows as the whole-message round; the
refusing node gets whole models; no message to the chunked node holds more than the limit;
its update replies hold at most the reply limit (chunk-reply-bytes), or the chunk limit from
a client that ignores it, with the same round either way."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.app.error import Error

from fl_merge.core.task_vectors import apply_update
from fl_merge.round.chunks import REPLY_LIMIT_KEY, THETA0_GROUPS
from fl_merge_clients import chunked
from fl_merge_strategies import OneShotMerge
from fl_merge_strategies.merge_round import run_round

pytestmark = pytest.mark.usefixtures("message_identity")
LIMIT = 32  # bytes: theta0 is backbone.w (24) | backbone.b (12); no update group holds two tensors


def _theta0() -> dict[str, torch.Tensor]:
    return {"backbone.w": torch.zeros(3, 2), "backbone.b": torch.zeros(3)}


def _reply(seed: int) -> RecordDict:
    g = torch.Generator().manual_seed(seed)
    state = {"backbone.w": torch.randn(3, 2, generator=g), "backbone.b": torch.randn(3, generator=g),
             "head.weight": torch.randn(4, 2, generator=g), "head.bias": torch.randn(4, generator=g),
             "extra.fisher.backbone.w": torch.rand(3, 2, generator=g)}
    metrics = {"num-examples": 10, "partition-id": seed, "finetuned-val-accuracy": 0.8,
               "finetuned-accuracy": 0.8, "finetuned-loss": 0.1, "fl-merge-protocol": 1}
    return RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord(metrics)})


def _accuracy(state) -> float:
    """A score that identifies the model a node was asked to score (weights and head)."""
    return float(torch.sigmoid(state["backbone.w"].sum() - state["backbone.b"].sum() + state["head.bias"][0]))


def _tensor_bytes(m: Message) -> int:
    return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize
               for r in m.content.array_records.values() for a in r.values())


class ChunkGrid:
    """Node 0 runs the chunk handlers on its own folder; node 1 has none (errors on them)."""

    def __init__(self, folder):
        self.asked: list[Message] = []
        self.ready: dict[str, Message] = {}
        self.nodes = {n: Context(run_id=1, node_id=n, node_config={"cache-dir": str(folder)},
                                 state=RecordDict(), run_config={}) for n in (0, 1)}

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, timeout=None):
        return [self.ready.pop(i) for i in self.push_messages(messages) if i in self.ready]

    def push_messages(self, messages):
        ids = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = f"m{len(self.asked)}"
            self.asked.append(m)
            ids.append(m.metadata.message_id)
            self.ready[m.metadata.message_id] = Message(self._answer(m), reply_to=m)
        return ids

    def pull_messages(self, message_ids):
        return [self.ready.pop(i) for i in message_ids if i in self.ready]

    def _answer(self, m):
        node, kind, cfg = m.metadata.dst_node_id, m.metadata.message_type, m.content["config"]
        ctx = self.nodes[node]
        if kind.startswith("query."):
            if node == 1:
                return Error(code=0, reason=f"No query function registered with name '{kind[6:]}'")
            return getattr(chunked, kind[len("query.chunk_"):])(m, ctx).content
        if kind == MessageType.TRAIN:
            reply = _reply(node)
            if THETA0_GROUPS not in cfg:
                return reply
            theta0 = chunked.theta0(cfg, ctx)
            assert set(theta0) == set(_theta0())
            assert all(torch.equal(theta0[k], v) for k, v in _theta0().items())
            state, metrics = reply["arrays"].to_torch_state_dict(), dict(reply["metrics"])
            metrics = chunked.keep_update(cfg, ctx, state, metrics)
            return RecordDict({"metrics": MetricRecord(metrics)})
        if THETA0_GROUPS in cfg:
            state, loaders = chunked.scoring_inputs(cfg, ctx)
            deltas = [load() for load in loaders]
        else:
            state = m.content["arrays"].to_torch_state_dict()
            deltas = [m.content[k].to_torch_state_dict()
                      for k in m.content.array_records if k.startswith("delta")]
        etas = [float(e) for e in cfg["etas"]]
        counts = list(cfg["etas-per-delta"])
        pairs = [(d, etas[sum(counts[:i]) + j]) for i, d in enumerate(deltas) for j in range(counts[i])]
        metrics = {"num-examples": 10}
        for split in cfg["splits"]:
            metrics[f"{split}-accuracy"] = [_accuracy(apply_update(state, d, eta)) for d, eta in pairs]
            metrics[f"{split}-loss"] = [0.0] * len(pairs)
        return RecordDict({"metrics": MetricRecord(metrics)})


def _round(chunk_bytes: int, folder):
    grid = ChunkGrid(folder)
    strategy = OneShotMerge(methods=["fedavg", "ties"], etas=[0.5, 1.0, 2.0], chunk_bytes=chunk_bytes)
    return run_round(strategy, grid, _theta0(), {}, {"model": "m"}, 10.0), grid


def test_a_chunked_round_equals_the_whole_message_round_and_a_refusing_node_gets_whole_models(tmp_path):
    whole, _ = _round(0, tmp_path / "whole")
    r, grid = _round(LIMIT, tmp_path / "chunked")
    assert not r.failures and [c.chunked for c in r.clients] == [True, False]
    for label in whole.deltas:
        assert all(torch.equal(r.deltas[label][k], whole.deltas[label][k]) for k in whole.deltas[label])
    assert r.rows == whole.rows and r.best_etas == whole.best_etas
    to = {n: [m for m in grid.asked if m.metadata.dst_node_id == n] for n in (0, 1)}
    assert max(_tensor_bytes(m) for m in to[0]) <= LIMIT
    assert not any(m.content.array_records for m in to[0] if m.metadata.message_type in ("train", "evaluate"))
    # node 1 refused the first group, then got today's messages: theta0 whole, then a grid message
    assert [m.metadata.message_type for m in to[1]] == ["query.chunk_put", "train", "evaluate", "evaluate"]
    assert _tensor_bytes(to[1][1]) == sum(v.numel() * 4 for v in _theta0().values())
    # theta0: node 0's two groups and node 1's refused first one; node 0's update in 5 groups
    assert r.chunking["messages"]["theta0"] == 3 and r.chunking["messages"]["get"] == 5
    assert r.chunking["messages"]["drop"] == 1  # node 0 only: node 1 holds nothing
    assert list(tmp_path.joinpath("chunked").iterdir()) == []  # node 0's folder is gone


def test_a_node_lost_while_its_update_is_fetched_is_named_and_its_files_are_dropped(tmp_path):
    class LosingGrid(ChunkGrid):
        def _answer(self, m):
            if m.metadata.message_type == "query.chunk_get" and m.content["config"]["chunk-index"] == 2:
                return Error(code=0, reason="node 0 went away")
            return super()._answer(m)

    grid = LosingGrid(tmp_path)
    r = run_round(OneShotMerge(method="fedavg", etas=[1.0], chunk_bytes=LIMIT), grid, _theta0(), {},
                  {"model": "m"}, 10.0)
    assert [c.node_id for c in r.clients] == [1]
    assert [(f["node_id"], f["stage"], f["reason"]) for f in r.failures] == [
        (0, "train", "group 2 of its update: node 0 went away")]
    assert list(tmp_path.iterdir()) == []  # told to drop what it still held


class TwoChunkNodes(ChunkGrid):
    """Nodes 0 and 2 both run the chunk handlers; each push is recorded as one batch of
    (message type, node, chunk index): what is in flight in the SuperLink together."""

    def __init__(self, folder):
        super().__init__(folder)
        self.nodes = {n: Context(run_id=1, node_id=n, node_config={"cache-dir": str(folder)},
                                 state=RecordDict(), run_config={}) for n in (0, 2)}
        self.batches: list[list[tuple[str, int, int]]] = []

    def push_messages(self, messages):
        messages = list(messages)
        self.batches.append([(m.metadata.message_type, m.metadata.dst_node_id,
                              m.content["config"].get("chunk-index", -1)) for m in messages])
        return super().push_messages(messages)


def test_one_update_group_is_in_flight_at_a_time_and_a_shared_theta0_group_goes_to_every_node_at_once(tmp_path):
    def round_(chunk_bytes, grid):
        strategy = OneShotMerge(methods=["fedavg", "ties"], etas=[0.5, 1.0, 2.0], chunk_bytes=chunk_bytes)
        return run_round(strategy, grid, _theta0(), {}, {"model": "m"}, 10.0)

    grid = TwoChunkNodes(tmp_path / "two")
    r, whole = round_(LIMIT, grid), round_(0, TwoChunkNodes(tmp_path / "whole"))
    assert not r.failures and [c.node_id for c in r.clients] == [0, 2]
    gets = [b for b in grid.batches if b[0][0] == "query.chunk_get"]
    # each node's update: 5 groups (LIMIT holds one tensor), asked one node at a time, group by
    # group (the nodes in Flower's sampling order)
    assert all(len(b) == 1 for b in gets)
    assert [(i, {n for _, n, j in sum(gets, []) if j == i}) for i in range(5)] == [(i, {0, 2}) for i in range(5)]
    assert [b[0][2] for b in gets] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    puts = [b for b in grid.batches if b[0][0] == "query.chunk_put"]
    # theta0's 2 groups, the Deltas' and the own groups: every batch is one group to both nodes
    # (the same payload for fedavg and ties; each node's own head is its own payload, one node at a time)
    assert [sorted(b) for b in puts[:2]] == [[("query.chunk_put", 0, 0), ("query.chunk_put", 2, 0)],
                                             [("query.chunk_put", 0, 1), ("query.chunk_put", 2, 1)]]
    assert all(len({i for _, _, i in b}) == 1 for b in puts)
    # theta0 (2 groups); validation and test each: the fedavg and the ties Delta (2 groups each,
    # to both nodes at once), then each node's own head (2 groups, its own payload: alone)
    assert [len(b) for b in puts] == [2, 2] + 2 * ([2, 2, 2, 2] + [1, 1, 1, 1])
    assert r.rows == whole.rows and r.best_etas == whole.best_etas  # the same round as whole messages


class ReplyGrid(ChunkGrid):
    """ChunkGrid that keeps the tensor bytes of node 0's chunk_get replies; with `old_client`
    node 0 ignores the train config's chunk-reply-bytes (a client from before it)."""

    def __init__(self, folder, old_client: bool):
        super().__init__(folder)
        self.old_client, self.update_replies = old_client, []

    def _answer(self, m):
        chunked_train = m.metadata.message_type == MessageType.TRAIN and THETA0_GROUPS in m.content["config"]
        if chunked_train and self.old_client:
            del m.content["config"][REPLY_LIMIT_KEY]
        answer = super()._answer(m)
        if m.metadata.message_type == "query.chunk_get":
            self.update_replies.append(_tensor_bytes(Message(answer, reply_to=m)))
        return answer


@pytest.mark.parametrize("old_client, replies", [
    # chunk 64 bytes, theta0's largest tensor 24: the server asks for max(64 / 2, 24) = 32; the
    # update's largest (head.weight, 32) fits. Node 0's update, packed by hand at 32:
    # backbone.w 24 | backbone.b 12 | head.weight 32 | head.bias 16 | fisher 24
    (False, [24, 12, 32, 16, 24]),
    # a client that ignores it cuts at the chunk, 64: w + b 36 | head.weight + head.bias 48 | fisher 24
    (True, [36, 48, 24]),
])
def test_update_replies_are_cut_at_the_reply_limit_and_the_round_is_unchanged(tmp_path, old_client, replies):
    grid = ReplyGrid(tmp_path / "chunked", old_client)
    strategy = OneShotMerge(methods=["fedavg", "ties"], etas=[0.5, 1.0, 2.0], chunk_bytes=64)
    r = run_round(strategy, grid, _theta0(), {}, {"model": "m"}, 10.0)
    whole, _ = _round(0, tmp_path / "whole")
    assert not r.failures and [c.chunked for c in r.clients] == [True, False]
    train = next(m for m in grid.asked if m.metadata.message_type == "train" and m.metadata.dst_node_id == 0)
    assert r.chunking["reply-bytes"] == 32
    if not old_client:
        assert train.content["config"][REPLY_LIMIT_KEY] == 32
    assert grid.update_replies == replies  # the server accepts the chunk-sized replies too
    assert r.chunking["chunk-bytes"] == 64 and r.chunking["messages"]["get"] == len(replies)
    for label in whole.deltas:
        assert all(torch.equal(r.deltas[label][k], whole.deltas[label][k]) for k in whole.deltas[label])
    assert r.rows == whole.rows and r.best_etas == whole.best_etas
