"""The round's pure steps (fl_merge.round), each against hand computations."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from fl_merge.config.run_config import ConfigError, RunConfig
from fl_merge.round.base import CheckpointError, check_base_checkpoint, load_checkpoint
from fl_merge.round.keys import MergeKeysError, check_merge_keys, key_matcher, parse_merge_keys
from fl_merge.round.merging import merge_arguments, train_requests
from fl_merge.round.protocol import speaks_grid
from fl_merge.round.scoring import (
    assemble_plain,
    candidate_state,
    grid_config,
    parse_grid_reply,
    plain_answer,
    plain_requests,
    chosen_plan,
    validation_plan,
)
from fl_merge.round.selection import choose_etas
from fl_merge.round.tables import result_rows, summary_metrics
from fl_merge.round.updates import ClientUpdate, MergeRoundError, check_enough, collect_updates


def test_merge_key_patterns_are_fnmatch_globs_and_the_default_is_the_backbone_rule():
    from fl_merge.models.registry import is_merged_key

    assert parse_merge_keys(" enc.*, cls.w  lin?.b") == ("enc.*", "cls.w", "lin?.b")
    m = key_matcher(parse_merge_keys("enc.*, lin?.b"))
    assert [m(k) for k in ("enc.w", "enc.sub.b", "cls.w", "lin1.b", "lin10.b", "Enc.w")] == [
        True, True, False, True, False, False]
    default = key_matcher(parse_merge_keys(RunConfig().merge_keys))
    for k in ("backbone.0.weight", "backbone.x", "head.weight", "backbonex.w", "xbackbone.w"):
        assert default(k) == is_merged_key(k)
    with pytest.raises(MergeKeysError, match="merge-keys is empty"):
        parse_merge_keys(" , ")


def test_merge_keys_selecting_nothing_name_the_patterns_and_some_keys():
    keys = ["enc.w", "enc.b", "cls.w", "cls.b", "x.1", "x.2", "x.3"]
    assert check_merge_keys(keys, ["enc.*"]) == ["enc.w", "enc.b"]
    with pytest.raises(MergeKeysError, match=r"merge-keys \['backbone\.\*'\] match none of the base "
                                             r"model's parameters \(enc\.w, enc\.b, cls\.w, cls\.b, x\.1, "
                                             r"\.\.\. \(7 in all\)\).*e\.g\. 'enc\.\*'"):
        check_merge_keys(keys, ["backbone.*"])


def test_base_checkpoint_is_read_in_every_form_a_client_checkpoint_may_take(tmp_path):
    """One reader for the base and the fine-tuned checkpoints: a file, a Hugging Face folder,
    a sharded folder with its index (hand-written here), the index file, a torch pickle."""
    state = {"enc.w": torch.arange(6.0).reshape(2, 3), "cls.b": torch.ones(2),
             "pos": torch.arange(4, dtype=torch.int64)}
    save_file(state, str(tmp_path / "base.safetensors"))
    (tmp_path / "hf").mkdir()
    save_file(state, str(tmp_path / "hf" / "model.safetensors"))
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    save_file({"enc.w": state["enc.w"]}, str(sharded / "model-00001-of-00002.safetensors"))
    save_file({"cls.b": state["cls.b"], "pos": state["pos"]},
              str(sharded / "model-00002-of-00002.safetensors"))
    (sharded / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": 24 + 8 + 32},
         "weight_map": {"enc.w": "model-00001-of-00002.safetensors",
                        "cls.b": "model-00002-of-00002.safetensors",
                        "pos": "model-00002-of-00002.safetensors"}}))
    torch.save({"state_dict": state}, tmp_path / "base.pt")
    for path in (tmp_path / "base.safetensors", tmp_path / "hf", sharded,
                 sharded / "model.safetensors.index.json", tmp_path / "base.pt"):
        check_base_checkpoint(path)
        got = load_checkpoint(path)
        assert set(got) == set(state), path
        for k, v in state.items():
            assert got[k].dtype == v.dtype and torch.equal(got[k], v), (path, k)


def test_a_base_checkpoint_that_cannot_be_read_is_one_line_naming_it(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "w.bin").write_bytes(b"x")
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    save_file({}, str(tmp_path / "none.safetensors"))
    (tmp_path / "lost").mkdir()
    (tmp_path / "lost" / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-00001-of-00001.safetensors"}}))
    for path, message in ((tmp_path / "empty", "holds no single checkpoint"),
                          (tmp_path / "nope.safetensors", "no such file or folder"),
                          (tmp_path / "w.bin", "cannot read .* as a torch state dict"),
                          (tmp_path / "bad.safetensors", "cannot read .* as safetensors"),
                          (tmp_path / "none.safetensors", "holds no tensors"),
                          (tmp_path / "lost", r"shard file\(s\) .* are missing")):
        for read in (check_base_checkpoint, load_checkpoint):
            if read is check_base_checkpoint and path.suffix == ".bin":
                continue  # a pickle is only looked for before the run, read at its start
            with pytest.raises(CheckpointError, match=message) as e:
                read(path)
            assert str(e.value).startswith("base-checkpoint") and "\n" not in str(e.value)


def test_run_config_validates_merge_keys_and_base_checkpoint(tmp_path):
    with pytest.raises(ConfigError, match="merge-keys is empty"):
        RunConfig(merge_keys=" ").resolve()
    with pytest.raises(ConfigError, match="base-checkpoint: no such file or folder"):
        RunConfig(base_checkpoint=str(tmp_path / "x.safetensors")).resolve()
    cfg = RunConfig.from_flower({"merge-keys": "enc.*,cls.*"}).resolve()
    assert cfg.merge_keys == ("enc.*", "cls.*")


def test_load_theta0_checks_merge_keys_before_any_client_trains(tmp_path):
    from fl_merge_strategies.server_app import load_theta0

    save_file({"enc.w": torch.zeros(2), "cls.w": torch.ones(3)}, str(tmp_path / "m.safetensors"))
    good = RunConfig(base_checkpoint=str(tmp_path / "m.safetensors"), merge_keys="enc.*").resolve()
    assert set(load_theta0(good)) == {"enc.w", "cls.w"}
    bad = RunConfig(base_checkpoint=str(tmp_path / "m.safetensors")).resolve()  # default backbone.*
    with pytest.raises(ConfigError, match=r"merge-keys \['backbone\.\*'\] match none .*\(cls\.w, enc\.w\)"):
        load_theta0(bad)


def test_load_theta0_refuses_a_matrix_method_without_a_matrix_before_any_client_trains(tmp_path):
    """tsv_m and the other SVD / least-squares methods merge 2-D weights: merge-keys that
    select only vectors and convolutions would make them plain averaging, refused up front."""
    from fl_merge_strategies.server_app import load_theta0

    save_file({"enc.w": torch.zeros(2), "conv.w": torch.zeros(4, 3, 3, 3), "fc.w": torch.zeros(5, 4)},
              str(tmp_path / "m.safetensors"))
    only_vectors = dict(base_checkpoint=str(tmp_path / "m.safetensors"), merge_keys="enc.*,conv.*")
    for method in ("tsv_m", "iso_c", "iso_cts", "wudi", "regmean"):
        with pytest.raises(ConfigError, match=rf"merge method '{method}' merges 2-D weight matrices, "
                                              r"but none of the 2 merged tensors is one \(conv.w \[4, 3, 3, 3\], enc.w \[2\]\)"):
            load_theta0(RunConfig(**only_vectors, method=f"fedavg,{method}").resolve())
    assert set(load_theta0(RunConfig(**only_vectors, method="fedavg").resolve())) == {"enc.w", "conv.w", "fc.w"}
    with_fc = dict(only_vectors, merge_keys="enc.*,fc.*")
    assert set(load_theta0(RunConfig(**with_fc, method="tsv_m").resolve())) == {"enc.w", "conv.w", "fc.w"}


def test_grid_capability_is_the_announced_protocol_version():
    assert speaks_grid({"fl-merge-protocol": 1}) and speaks_grid({"fl-merge-protocol": 1.0})
    assert not any(speaks_grid(m) for m in ({}, {"fl-merge-protocol": 2}, {"fl-merge-protocol": True}))


def _client(node, pid, shift, **metrics):
    state = {"enc.w": torch.full((2,), float(shift)), "cls.w": torch.full((3,), float(node))}
    return ClientUpdate(node, {"num-examples": 10, **({"partition-id": pid} if pid is not None else {}),
                               **metrics}, state)


def test_collect_orders_by_partition_then_node_and_names_bad_updates():
    theta0 = {"enc.w": torch.zeros(2), "cls.w": torch.zeros(3)}
    bad = _client(5, 1, 0)
    bad.state["enc.w"] = torch.tensor([1.0, float("inf")])
    short = _client(6, None, 0)
    short.state["enc.w"] = torch.zeros(3)
    ups = [_client(9, None, 4), _client(8, None, 3), _client(7, 2, 2), _client(4, 0, 1), bad, short]
    clients, taus, failures = collect_updates(ups, theta0, key_matcher(["enc.*"]))
    assert [c.node_id for c in clients] == [4, 7, 8, 9]
    assert [float(t["enc.w"][0]) for t in taus] == [1.0, 2.0, 3.0, 4.0]
    assert all(set(t) == {"enc.w"} for t in taus)
    assert [set(c.per_task) for c in clients] == [{"cls.w"}] * 4
    assert failures[0] == {"client": "node 5 (partition 1)", "node_id": 5, "partition_id": 1,
                           "stage": "train", "reason": "non-finite update in enc.w"}
    assert failures[1]["client"] == "node 6" and "shape (3,)" in failures[1]["reason"]
    with pytest.raises(MergeRoundError, match="no merged parameters"):
        collect_updates(ups, theta0, key_matcher(["none.*"]))


def test_check_enough_names_every_failure():
    fails = [{"client": "node 3", "reason": "boom"}]
    check_enough(2, 2, {"fedavg": ("fedavg", {})}, fails)
    with pytest.raises(MergeRoundError, match=r"only 1 usable .* at least 2 .*node 3: boom"):
        check_enough(1, 2, {"fedavg": ("fedavg", {})}, fails)


def test_merge_arguments_read_weights_and_steps_from_the_metrics():
    a, b = _client(1, 0, 1, **{"local-steps": 5}), _client(2, 1, 1, **{"local-steps": 7})
    b.metrics["num-examples"] = 30
    args = merge_arguments([a, b], "num-examples")
    assert args == {"weights": [10.0, 30.0], "local_steps": [5.0, 7.0], "normalisers": None,
                    "names": ["partition 0", "partition 1"]}  # run-stable identities, not node ids
    a.metrics["fednova-a"] = 4.5  # b reports none: merge() falls back to its steps
    assert merge_arguments([a, b], "uniform")["normalisers"] == [4.5, None]
    del b.metrics["local-steps"]
    assert merge_arguments([a, b], "uniform")["weights"] is None
    assert merge_arguments([a, b], "uniform")["local_steps"] is None  # not every client sent it


def test_train_requests_follow_the_methods():
    assert train_requests({"f": ("fisher", {})}, False) == {"compute-fisher": True}
    assert train_requests({"t": ("ties", {})}, True) == {"compute-grad0": True}


def test_plain_requests_score_the_base_once_and_each_candidate_once():
    grids, splits = validation_plan(["a", "b"], [0.0, 1.0, 2.0], test_all_etas=False)
    assert splits == ["val"]
    assert plain_requests(grids, splits) == [(None, 0.0, "val"), ("a", 1.0, "val"), ("a", 2.0, "val"),
                                             ("b", 1.0, "val"), ("b", 2.0, "val")]
    tgrids = chosen_plan({"a": 2.0, "b": 1.0})
    assert tgrids == {"a": [0.0, 2.0], "b": [0.0, 1.0]}
    answers = {(None, 0.0, "test"): (0.1, 9.0), ("a", 2.0, "test"): (0.7, 1.0),
               ("b", 1.0, "test"): (0.6, 2.0)}
    assert assemble_plain(tgrids, ["test"], answers) == {
        "a": {"test": {"etas": [0.0, 2.0], "accuracy": [0.1, 0.7], "loss": [9.0, 1.0]}},
        "b": {"test": {"etas": [0.0, 1.0], "accuracy": [0.1, 0.6], "loss": [9.0, 2.0]}}}
    assert plain_answer({"accuracy": 0.5})[0] == 0.5 and math.isnan(plain_answer({"accuracy": 0.5})[1])
    with pytest.raises(ValueError, match="no 'accuracy' metric"):
        plain_answer({"acc": 0.5})


def test_grid_reply_lists_run_method_major():
    grids = {"a": [0.0, 1.0], "b": [0.0, 2.0, 3.0]}
    assert grid_config(grids, ["val"]) == {"etas": [0.0, 1.0, 0.0, 2.0, 3.0], "etas-per-delta": [2, 3],
                                           "splits": ["val"], "delta-methods": ["a", "b"]}
    got = parse_grid_reply({"val-accuracy": [1, 2, 3, 4, 5], "val-loss": [5, 4, 3, 2, 1]}, grids, ["val"])
    assert got["b"]["val"] == {"etas": [0.0, 2.0, 3.0], "accuracy": [3.0, 4.0, 5.0], "loss": [3.0, 2.0, 1.0]}
    with pytest.raises(ValueError, match="did not score the methods x eta grid"):
        parse_grid_reply({"val-accuracy": [1, 2]}, grids, ["val"])


def test_candidate_state_is_theta0_plus_eta_delta_with_the_clients_own_head():
    theta0 = {"enc.w": torch.tensor([1.0, 2.0]), "cls.w": torch.zeros(2)}
    state = candidate_state(theta0, {"cls.w": torch.tensor([7.0])}, {"enc.w": torch.tensor([0.5, -1.0])}, 2.0)
    assert state["enc.w"].tolist() == [2.0, 0.0] and state["cls.w"].tolist() == [7.0]
    assert candidate_state(theta0, {}, None, 0.0)["enc.w"].tolist() == [1.0, 2.0]


def _scores(val_a, val_b):
    return {"m": {"a": {"val": {"etas": [0.0, 1.0, 2.0], "accuracy": val_a}},
                  "b": {"val": {"etas": [0.0, 1.0, 2.0], "accuracy": val_b}}}}


def test_eta_is_chosen_by_normalized_accuracy_or_raw_accuracy_with_a_note():
    # normalized: a 0.4/0.5 = 0.8 at eta 1, 0.3/0.5 = 0.6 at 2; b 0.8/1.0 at 1, 0.95/1.0 at 2
    # mean: eta1 (0.8 + 0.8)/2 = 0.8, eta2 (0.6 + 0.95)/2 = 0.775 -> eta 1
    scores = _scores([0.1, 0.4, 0.3], [0.2, 0.8, 0.95])
    best, criterion, notes = choose_etas(scores, {"a": 0.5, "b": 1.0})
    assert best == {"m": 1.0} and criterion == "mean normalized validation accuracy" and notes == []
    # raw: eta1 (0.4 + 0.8)/2 = 0.6, eta2 (0.3 + 0.95)/2 = 0.625 -> eta 2
    best, criterion, notes = choose_etas(scores, {"a": 0.5, "b": None})
    assert best == {"m": 2.0} and criterion == "mean validation accuracy"
    assert notes == ["b sent no finetuned-val-accuracy: eta chosen by mean validation accuracy, "
                     "normalized accuracy not reported"]


def test_rows_without_finetuned_scores_have_nan_normalized_accuracy():
    from fl_merge.round.attacks import AttackPlan

    full = _client(1, 0, 1, **{"finetuned-val-accuracy": 0.5, "finetuned-accuracy": 0.8,
                               "finetuned-loss": 0.3})
    plain = _client(2, None, 1)
    part = {"val": {"etas": [0.0, 1.0], "accuracy": [0.2, 0.4], "loss": [1.0, 0.5]},
            "test": {"etas": [0.0, 1.0], "accuracy": [0.1, 0.6], "loss": [1.0, 0.4]}}
    rows = result_rows("m", "fedavg", {}, 1.0, {"a": part, "node-2": part}, {"a": full, "node-2": plain},
                       AttackPlan())
    a = [r for r in rows if r["task"] == "a"]
    assert [(r["model"], r["split"]) for r in a if r["model"] == "finetuned"] == [("finetuned", "val"),
                                                                                ("finetuned", "test")]
    sel = next(r for r in a if r["selected"] and r["split"] == "test")
    assert sel["normalized_accuracy"] == pytest.approx(0.6 / 0.8)
    p = [r for r in rows if r["task"] == "node-2"]
    assert len(p) == 4 and all(math.isnan(r["normalized_accuracy"]) for r in p)
    m = summary_metrics(rows, {"m": 1.0})
    assert m["m-test-accuracy"] == pytest.approx(0.6) and math.isnan(m["m-normalized-accuracy"])
    assert m["finetuned-test-accuracy"] == pytest.approx(0.8)
    assert m["base-test-accuracy"] == pytest.approx(0.1)
