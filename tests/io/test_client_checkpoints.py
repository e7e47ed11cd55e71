"""Checkpoint clients' decisions (fl_merge/io/client_checkpoints.py) and the client's reply,
Flower-free: where a checkpoint comes from, how its names map onto the model, which step
information counts, the formats it may be in, and what a checkpoint client sends."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fl_merge.io.checkpoints import Checkpoint
from fl_merge.io.client_checkpoints import (
    CheckpointClientError,
    check_client_checkpoints,
    check_step_info,
    checkpoint_for,
    head_keys,
    map_names,
    parse_checkpoint_steps,
    parse_client_checkpoints,
    read_client_checkpoint,
    steps_for,
)
from fl_merge.config.run_config import ConfigError, RunConfig
from fl_merge.core.task_vectors import MergeInputError

# A MiniLM-like TaskModel naming: TaskModel.backbone (SentenceEncoder) .encoder (HF BertModel)
MODEL = ["backbone.encoder.embeddings.word_embeddings.weight",
         "backbone.encoder.encoder.layer.0.attention.self.query.weight",
         "backbone.encoder.encoder.layer.0.output.dense.bias", "backbone.encoder.pooler.dense.weight"]
BARE = [k[len("backbone.encoder."):] for k in MODEL]  # what BertModel.save_pretrained writes


def test_names_are_taken_as_they_are_when_they_match():
    assert map_names(MODEL + ["head.weight"], MODEL, MODEL) == {k: k for k in MODEL}


def test_a_bare_backbone_checkpoint_gets_the_models_prefix():
    mapping = map_names(BARE, MODEL, MODEL)
    assert mapping == dict(zip(MODEL, BARE))


def test_a_foreign_prefix_is_replaced_and_an_outer_one_stripped():
    # a BertForSequenceClassification checkpoint: bert.* and its own classifier
    bert = ["bert." + k for k in BARE] + ["classifier.weight", "classifier.bias"]
    assert map_names(bert, MODEL, MODEL) == dict(zip(MODEL, bert))
    wrapped = ["model." + k for k in MODEL]  # e.g. a Lightning module holding our TaskModel
    assert map_names(wrapped, MODEL, MODEL) == dict(zip(MODEL, wrapped))


def test_only_the_required_keys_must_match_and_the_rest_is_mapped_when_found():
    required = MODEL[1:3]  # merge-keys select the encoder layers only
    mapping = map_names(BARE[1:], MODEL, required)
    assert mapping == dict(zip(MODEL[1:], BARE[1:]))


def test_names_that_do_not_fit_are_one_error_naming_some_of_them():
    ckpt = BARE[:2] + ["other.weight"]  # two of the four model tensors missing
    with pytest.raises(CheckpointClientError) as e:
        map_names(ckpt, MODEL, MODEL, role="client 1 checkpoint /x")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("client 1 checkpoint /x")
    assert "2 of 4 merged parameters have no match" in msg
    assert "backbone.encoder.encoder.layer.0.output.dense.bias" in msg and "other.weight" in msg


def test_the_head_is_the_tasks_merged_file_head_or_a_plain_head():
    keys = ["heads.a.weight", "heads.a.bias", "heads.b.weight", "head.weight", "head.bias"]
    assert head_keys(keys, "a") == {"head.weight": "heads.a.weight", "head.bias": "heads.a.bias"}
    assert head_keys(keys, "c") == {"head.weight": "head.weight", "head.bias": "head.bias"}
    assert head_keys(BARE, "a") == {}


def test_client_checkpoints_are_one_absolute_path_per_client(tmp_path):
    assert parse_client_checkpoints("", 3) == ["", "", ""]
    got = parse_client_checkpoints("a.safetensors, ,/abs/b.pt", 3, cwd=tmp_path)
    assert got == [str(tmp_path / "a.safetensors"), "", "/abs/b.pt"]
    with pytest.raises(CheckpointClientError, match="client-checkpoints lists 2 paths for num-clients=3"):
        parse_client_checkpoints("a,b", 3)


def test_checkpoint_steps_are_one_value_or_one_per_client():
    assert parse_checkpoint_steps("", 2) == [0, 0]
    assert parse_checkpoint_steps("50", 3) == [50, 50, 50]
    assert parse_checkpoint_steps("10,,30", 3) == [10, 0, 30]
    with pytest.raises(CheckpointClientError, match="checkpoint-steps lists 2 values for num-clients=3"):
        parse_checkpoint_steps("1,2", 3)
    with pytest.raises(CheckpointClientError, match="checkpoint-steps must be a positive whole number"):
        parse_checkpoint_steps("2.5", 1)


def test_node_config_checkpoint_wins_over_run_config(tmp_path):
    paths = ["/run/a", "/run/b"]
    assert checkpoint_for({}, paths, 1) == "/run/b"
    assert checkpoint_for({"checkpoint": str(tmp_path / "n")}, paths, 1) == str(tmp_path / "n")
    assert checkpoint_for({}, [], 0) == "" and checkpoint_for({"checkpoint": " "}, ["", ""], 0) == ""


def test_steps_come_from_node_config_then_run_config_then_metadata():
    meta = {"local-steps": "30", "fednova-a": "12.5"}
    assert steps_for({}, [0, 0], 1, meta) == {"local-steps": 30, "fednova-a": 12.5}
    assert steps_for({}, [0, 20], 1, meta)["local-steps"] == 20
    assert steps_for({"checkpoint-steps": "7"}, [0, 20], 1, meta)["local-steps"] == 7
    assert steps_for({}, [0, 0], 0, {}) == {}
    with pytest.raises(CheckpointClientError, match="checkpoint metadata 'local-steps' must be a positive"):
        steps_for({}, [0], 0, {"local-steps": "many"})
    with pytest.raises(CheckpointClientError, match="'fednova-a' must be a positive number"):
        steps_for({}, [0], 0, {"fednova-a": "-1"})


def test_a_method_needing_steps_names_the_checkpoint_clients_lacking_them():
    check_step_info(["task_arithmetic", "ties", "hetero"], [("client 0", False)])  # none needs steps
    check_step_info(["fednova"], [("client 0", True)])
    with pytest.raises(CheckpointClientError) as e:
        check_step_info(["ties", "fednova"], [("client 0", True), ("client 1 (/x.pt)", False)])
    msg = str(e.value)
    assert "fednova" in msg and "client 1 (/x.pt)" in msg and "checkpoint-steps" in msg and "ties" not in msg


def test_the_round_names_a_node_config_checkpoint_client_without_steps():
    """A node-config checkpoint is first seen in the train reply: the round stops before
    merging, naming the client; trained clients and clients with steps pass."""
    from fl_merge.round.updates import ClientUpdate, MergeRoundError, check_checkpoint_steps

    trained = ClientUpdate(1, {"partition-id": 0, "local-steps": 10}, {})
    given = ClientUpdate(2, {"partition-id": 1, "checkpoint": 1, "fednova-a": 3.0}, {})
    bare = ClientUpdate(3, {"partition-id": 2, "checkpoint": 1}, {})
    check_checkpoint_steps(["fednova"], [trained, given])
    check_checkpoint_steps(["task_arithmetic", "median"], [trained, given, bare])
    with pytest.raises(MergeRoundError, match=r"fednova need every client's local steps, but checkpoint "
                       r"client\(s\) node 3 \(partition 2\) have none: set run-config checkpoint-steps"):
        check_checkpoint_steps(["fednova"], [trained, given, bare])


# --------------------------------------------------------------------------- formats

def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"enc.w": torch.randn(3, 4, generator=g), "enc.b": torch.randn(3, generator=g),
            "enc.steps": torch.tensor(5)}


def test_torch_state_dicts_load_with_weights_only_in_every_layout(tmp_path):
    state = _state()
    torch.save(state, tmp_path / "plain.pt")
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "lightning.ckpt")
    (tmp_path / "hf").mkdir()
    torch.save(state, tmp_path / "hf" / "pytorch_model.bin")
    for path in ("plain.pt", "lightning.ckpt", "hf"):
        with Checkpoint(tmp_path / path, pickles=True) as ck:
            assert set(ck.keys) == set(state)
            for k, v in state.items():
                assert torch.equal(ck.get(k), v) and ck.info(k).shape == tuple(v.shape)
            assert torch.equal(ck.read_flat("enc.w", 2, 7), state["enc.w"].reshape(-1)[2:7])
    with pytest.raises(MergeInputError, match="is a torch pickle"):  # fl-merge merge still refuses it
        Checkpoint(tmp_path / "plain.pt")


def test_a_pickle_with_objects_or_no_tensors_is_refused(tmp_path):
    torch.save({"w": torch.ones(2), "cfg": Path("x")}, tmp_path / "obj.pt")  # not weights-only
    with pytest.raises(MergeInputError, match="weights_only=True"):
        Checkpoint(tmp_path / "obj.pt", "m", pickles=True)
    torch.save({"w": torch.ones(2), "n": 3}, tmp_path / "mixed.pt")
    with pytest.raises(MergeInputError, match=r"not a state dict: entries \['n'\]"):
        Checkpoint(tmp_path / "mixed.pt", "m", pickles=True)
    torch.save([torch.ones(2)], tmp_path / "list.pt")
    with pytest.raises(MergeInputError, match="holds no state dict"):
        Checkpoint(tmp_path / "list.pt", "m", pickles=True)


def test_a_checkpoint_is_read_into_theta0s_names_and_dtypes(tmp_path):
    theta0 = {"backbone." + k: v for k, v in _state(0).items()}
    fine = {k: v.half() if v.is_floating_point() else v for k, v in _state(1).items()}
    save_file({**{k: v for k, v in fine.items() if k != "enc.steps"}, "head.weight": torch.ones(2, 4),
               "head.bias": torch.zeros(2)}, str(tmp_path / "m.safetensors"), metadata={"local-steps": "9"})
    is_merged = lambda k: k.endswith((".w", ".b"))  # noqa: E731 (merge-keys *.w, *.b)
    state, head, meta = read_client_checkpoint(str(tmp_path / "m.safetensors"), theta0, is_merged, "t", "c")
    assert state["backbone.enc.w"].dtype == torch.float32
    assert torch.equal(state["backbone.enc.w"], fine["enc.w"].float())
    # not merged and absent from the checkpoint: theta0's
    assert torch.equal(state["backbone.enc.steps"], theta0["backbone.enc.steps"])
    assert set(head) == {"head.weight", "head.bias"} and meta["local-steps"] == "9"


def test_a_checkpoint_of_another_shape_names_the_tensor(tmp_path):
    theta0 = {"backbone." + k: v for k, v in _state(0).items()}
    bad = {**_state(1), "enc.w": torch.zeros(4, 4)}
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointClientError, match=r"tensor 'enc.w' has shape \[4, 4\] but the model's "
                       r"'backbone.enc.w' has \[3, 4\]"):
        check_client_checkpoints([str(tmp_path / "bad.safetensors")], [0], theta0, lambda k: True,
                                 ["task_arithmetic"], ["t"])


def test_the_servers_check_wants_steps_only_where_a_method_needs_them(tmp_path):
    theta0 = {"backbone." + k: v for k, v in _state(0).items()}
    save_file(_state(1), str(tmp_path / "a.safetensors"))
    save_file(_state(2), str(tmp_path / "b.safetensors"), metadata={"local-steps": "40"})
    paths = [str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), ""]
    check_client_checkpoints(paths, [0, 0, 0], theta0, lambda k: True, ["ties"], list("xyz"))
    check_client_checkpoints(paths, [25, 0, 0], theta0, lambda k: True, ["fednova"], list("xyz"))
    with pytest.raises(CheckpointClientError, match=r"need every client's local steps, but checkpoint "
                       r"client\(s\) 0 \(.*a.safetensors\) have none"):
        check_client_checkpoints(paths, [0, 0, 0], theta0, lambda k: True, ["fednova"], list("xyz"))


def test_run_config_names_a_bad_client_checkpoint_before_anything_runs(tmp_path):
    save_file(_state(1), str(tmp_path / "a.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    ok = RunConfig(num_clients=2, client_checkpoints=f"{tmp_path / 'a.safetensors'},",
                   checkpoint_steps="5").resolve()
    assert ok.client_checkpoints == [str(tmp_path / "a.safetensors"), ""] and ok.checkpoint_steps == [5, 5]
    sent = ok.train_config()
    assert sent["client-checkpoints"] == ok.client_checkpoints and sent["checkpoint-steps"] == [5, 5]
    assert "client-checkpoints" not in RunConfig(num_clients=2).resolve().train_config()
    with pytest.raises(ConfigError, match="client-checkpoints entry 1: no such file or folder"):
        RunConfig(num_clients=2,
                  client_checkpoints=f"{tmp_path / 'a.safetensors'},{tmp_path / 'no'}").resolve()
    with pytest.raises(ConfigError, match="client-checkpoints entry 0: cannot read"):
        RunConfig(num_clients=1, client_checkpoints=str(tmp_path / "junk.safetensors")).resolve()
    with pytest.raises(ConfigError, match="client-checkpoints lists 1 paths for num-clients=2"):
        RunConfig(num_clients=2, client_checkpoints=str(tmp_path / "a.safetensors")).resolve()


def test_the_hydra_cli_takes_checkpoints_as_a_list(tmp_path):
    from fl_merge.cli.mapping import plan

    for n in "ab":
        save_file(_state(1), str(tmp_path / f"{n}.safetensors"))
    save_file(_state(0), str(tmp_path / "base.safetensors"))  # plan checks the checkpoints against it
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    job = plan(["num_clients=2", f"client_checkpoints=[{a},{b}]", "checkpoint_steps=[10,20]",
                f"base_checkpoint={tmp_path / 'base.safetensors'}", "merge_keys='enc.*'"], False)[0]
    assert job.flower["client-checkpoints"] == f"{a},{b}" and job.flower["checkpoint-steps"] == "10,20"
    resolved = job.run.resolve()
    assert resolved.client_checkpoints == [str(a), str(b)] and resolved.checkpoint_steps == [10, 20]


# --------------------------------------------------------------------------- the client's reply

def test_a_checkpoint_client_replies_with_its_weights_and_its_own_scores(tmp_path, theta0):
    """mnist-cnn (cheap): a bare-backbone checkpoint (names without 'backbone.'), steps in its
    metadata; the client does not train, sends exactly those weights, a probe head, its
    fine-tuned scores; node-config's checkpoint wins over the run config's."""
    from fl_merge_clients.client_app import local_train

    g = torch.Generator().manual_seed(0)
    fine = {k[len("backbone."):]: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in theta0.items()}
    save_file(fine, str(tmp_path / "fine.safetensors"), metadata={"local-steps": "33", "fednova-a": "20"})
    torch.save({k: v * 0 for k, v in fine.items()}, tmp_path / "zero.pt")
    config = {"model": "mnist-cnn", "tasks": ["rotate90"], "data": "tasks", "data-seed": 0,
              "local-steps": 150, "lr": 0.01, "batch-size": 64, "seed": [0], "cache": False,
              "client-checkpoints": [str(tmp_path / "zero.pt")], "checkpoint-steps": [0]}
    state, m = local_train(config, 0, theta0, node_config={"checkpoint": str(tmp_path / "fine.safetensors")})
    for k, v in fine.items():
        assert torch.equal(state["backbone." + k], v), k
    assert state["head.weight"].shape[0] == 10  # rotate90: rotated digits, a probe head of 10 classes
    assert m["checkpoint"] == 1 and m["local-steps"] == 33 and m["fednova-a"] == 20.0
    assert m["num-examples"] == 2000 and m["partition-id"] == 0
    assert m["finetuned-val-accuracy"] > 0.4 and m["finetuned-accuracy"] > 0.4  # chance 0.1
    assert json.dumps(m)  # plain numbers only (a Flower MetricRecord)
