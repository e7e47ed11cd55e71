"""Issue 15's done-when test for checkpoint clients: three MiniLM models, each fine-tuned a
few steps on its own CSV text task and saved by this test as a Hugging Face folder of the
bare encoder (save_pretrained: one safetensors file, sharded safetensors with an index,
pytorch_model.bin), merged through checkpoint clients with two methods in ONE Flower
simulation, selected on validation and evaluated on the CSV tasks' test splits.

The references are computed here, independently of the round: the task vectors from the
models this test fine-tuned (not from what the clients sent), Task Arithmetic's and the
coordinate-wise median's merged backbones in closed form at the eta the run chose.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

TASKS = ("bbc", "airline", "apple")
STEPS = {"bbc": 2, "airline": 4, "apple": 3}  # local steps each checkpoint was fine-tuned for
LR = 0.002  # configs/experiment/text.yaml: 0.01 already wrecks MiniLM on BBC News
METHODS = "task_arithmetic,median"  # both checked in closed form below; each method adds MiniLM scoring


def _write_csv(path: Path, texts: list[str], labels: list[str]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(zip(texts, labels))


def _csv_tasks(root: Path) -> dict[str, str]:
    """Three small CSV text tasks from the offline corpora: BBC topics (5 classes, 12 per
    class, each article's first 200 characters) and two tweet-sentiment domains (3 classes,
    15 per class). Small on purpose: every example costs a MiniLM forward pass per candidate
    on 2 shared cores (400 characters per article made this module's round twice as long)."""
    from fl_merge.data.offline import SENTIMENTS, load_bbc_news, load_tweets

    specs = {}
    texts, labels, topics = load_bbc_news()
    rows = [(t[:200], topics[y]) for c in range(len(topics))
            for t, y in [(t, y) for t, y in zip(texts, labels) if y == c][:12]]
    _write_csv(root / "bbc.csv", *map(list, zip(*rows)))
    specs["bbc"] = f"csv:{root / 'bbc.csv'}"
    tweets = load_tweets()
    for domain in ("airline", "apple"):
        t, y = tweets[domain]
        rows = [(a, SENTIMENTS[b]) for c in range(3)
                for a, b in [(a, b) for a, b in zip(t, y) if b == c][:15]]
        _write_csv(root / f"{domain}.csv", *map(list, zip(*rows)))
        specs[domain] = f"csv:{root / f'{domain}.csv'}"
    return specs


def _save_hf(encoder, folder: Path, name: str) -> None:
    """The three Hugging Face folder layouts: bbc one model.safetensors, airline sharded
    safetensors with model.safetensors.index.json, apple config.json + pytorch_model.bin (a
    torch state dict, as older save_pretrained wrote it)."""
    if name == "apple":
        encoder.config.save_pretrained(folder)
        torch.save(encoder.state_dict(), folder / "pytorch_model.bin")
    else:
        encoder.save_pretrained(folder, **({"max_shard_size": "20MB"} if name == "airline" else {}))


@pytest.fixture(scope="module")
def merged_run(tmp_path_factory):
    """Fine-tune, save as HF folders, run the round; returns what the checks need."""
    from fl_merge.tasks.registry import load_task
    from fl_merge_clients.training import LocalTrainConfig, fine_tune, model_for_task
    from fl_merge.config.run_config import RunConfig
    from fl_merge.models.registry import pretrained_backbone
    from simulate import simulate_round

    root = tmp_path_factory.mktemp("ckpt-clients")
    specs = _csv_tasks(root)
    theta0 = pretrained_backbone("minilm-l6")
    tuned, scores, folders, classes, n_test = {}, {}, [], {}, {}
    for i, name in enumerate(TASKS):
        task = load_task(specs[name], 0)  # data-seed 0: the clients' own splits
        classes[name], n_test[name] = task.num_classes, len(task.test)
        model = model_for_task("minilm-l6", task, theta0, seed=i)
        cfg = LocalTrainConfig(steps=STEPS[name], lr=LR, batch_size=8, seed=i)
        scores[name] = fine_tune(model, task, cfg)
        tuned[name] = {f"backbone.{k}": v.detach().clone() for k, v in model.backbone.state_dict().items()}
        folder = root / f"{name}-model"
        _save_hf(model.backbone.encoder, folder, name)  # the bare encoder: no 'backbone.' in its names
        folders.append(str(folder))
    out = root / "out"
    cfg = RunConfig.from_flower({
        "num-clients": 3, "model": "minilm-l6", "tasks": ",".join(specs[t] for t in TASKS),
        "client-checkpoints": ",".join(folders), "checkpoint-steps": ",".join(str(STEPS[t]) for t in TASKS),
        "method": METHODS, "search": "off", "etas": "0.5,1", "cache": False, "output-dir": str(out),
    }).resolve()
    return {"round": simulate_round(cfg, 3), "out": out, "theta0": theta0, "tuned": tuned, "scores": scores,
            "specs": specs, "classes": classes, "folders": folders, "n_test": n_test}


def test_the_folders_are_the_three_hugging_face_layouts(merged_run):
    bbc, airline, apple = (Path(f) for f in merged_run["folders"])
    assert (bbc / "model.safetensors").is_file()
    assert (airline / "model.safetensors.index.json").is_file()
    assert len(list(airline.glob("*.safetensors"))) > 1
    assert (apple / "pytorch_model.bin").is_file() and not list(apple.glob("*.safetensors"))


def test_each_checkpoint_client_sent_its_checkpoint_without_training(merged_run):
    r, tuned = merged_run["round"], merged_run["tuned"]
    by_task = {r.task_name(c): c for c in r.clients}
    assert len(r.clients) == 3 and not r.failures
    for name in TASKS:
        c = by_task[merged_run["specs"][name]]
        assert c.metrics["checkpoint"] == 1 and c.metrics["local-steps"] == STEPS[name]
        for k, v in tuned[name].items():  # exactly the fine-tuned weights, under TaskModel's names
            torch.testing.assert_close(c.state[k], v, rtol=0, atol=0)
        # its own scores, measured by the client in another process, match this test's
        mine = merged_run["scores"][name]["finetuned-accuracy"]
        assert abs(c.metrics["finetuned-accuracy"] - mine) <= 1 / merged_run["n_test"][name]
        assert c.per_task["head.weight"].shape[0] == merged_run["classes"][name]  # a probe head: none saved


def test_task_arithmetic_and_median_merge_the_tests_own_task_vectors(merged_run):
    theta0, tuned, out = merged_run["theta0"], merged_run["tuned"], merged_run["out"]
    run = json.loads((out / "run.json").read_text())
    taus = {k: torch.stack([tuned[t][k] - theta0[k] for t in TASKS]) for k in theta0}
    assert any(float(t.abs().max()) > 0 for t in taus.values())
    files = {"task_arithmetic": out / "merged.safetensors", "median": out / "merged-median.safetensors"}
    for method, reference in (("task_arithmetic", lambda t: t.mean(0)),
                              ("median", lambda t: t.median(0).values)):  # K = 3: the middle value
        eta = run["methods"][method]["eta"]
        merged = load_file(str(files[method]))
        for k in theta0:
            torch.testing.assert_close(merged[k], theta0[k] + eta * reference(taus[k]), rtol=1e-5, atol=1e-6)
        assert {f"heads.{merged_run['specs'][t]}.weight" for t in TASKS} <= set(merged)
    assert set(run["methods"]) == set(METHODS.split(","))


def test_merged_models_score_above_chance_on_the_csv_tasks(merged_run):
    r, classes, specs = merged_run["round"], merged_run["classes"], merged_run["specs"]
    for method in METHODS.split(","):
        rows = [row for row in r.rows if row["method"] == method and row["split"] == "test"
                and row["selected"]]
        acc = {row["task"]: row["accuracy"] for row in rows}
        assert set(acc) == {specs[t] for t in TASKS}, method
        margin = sum(acc[specs[t]] - 1 / classes[t] for t in TASKS) / 3
        assert margin > 0.15, (method, acc)
        assert acc[specs["bbc"]] > 0.6, (method, acc)  # 5 topics: chance 0.2
