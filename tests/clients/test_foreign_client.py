"""A ClientApp written only against flwr (tests/foreign_client.py: no fl_merge import, its own
parameter names and data) completes a round with the fl-merge ServerApp in Flower's
simulation engine; the scores it reports for the chosen model are those of the saved model,
and its clients are named by the task names they reply. (A user's own app through `flwr
run` and `fl-merge-run --app`, on both engines, is tests/engine/test_own_app.py; the same
checks through `flwr run` here proved nothing more and cost a SuperLink and an app install.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import foreign_client as foreign
from fl_merge.io import results



@pytest.fixture
def base_checkpoint(tmp_path) -> Path:
    path = tmp_path / "base" / "model.safetensors"
    path.parent.mkdir()
    save_file(foreign.initial_weights(), str(path))
    return path.parent  # a Hugging Face style directory holding model.safetensors


def _check_outputs(out: Path) -> None:
    """Independent of fl-merge: the merged model is theta0 + eta * mean task vector over enc.*,
    and the reported test accuracy at the chosen eta is the test's own evaluation of it."""
    run = json.loads((out / results.RUN_FILE).read_text())
    seeds = {c["task"]: int(c["data-seed"]) for c in run["clients"]}
    # each client named its task in its reply (no partition-id, no tasks=): those names
    assert seeds == {"blobs-0": 0, "blobs-1": 1} and not any(c["grid-eval"] for c in run["clients"])
    assert run["selection"] == "mean validation accuracy"  # no fine-tuned accuracies reported
    assert any("sent no finetuned-val-accuracy" in n for n in run["notes"])
    assert run["failures"] == []
    (method,) = run["methods"].values()
    eta = method["eta"]
    theta0 = foreign.initial_weights()
    fitted = {t: foreign.local_fit(theta0, s) for t, s in seeds.items()}
    saved = load_file(str(out / results.MODEL_FILE))
    for k in ("enc.w", "enc.b"):  # task_arithmetic, uniform: Delta = mean of the task vectors
        delta = sum(f[k] - theta0[k] for f in fitted.values()) / len(fitted)
        torch.testing.assert_close(saved[k], theta0[k] + eta * delta, rtol=1e-5, atol=1e-6)
    rows = results.read_rows(out / results.RESULTS_FILE)
    chosen = [r for r in rows if r["selected"] and r["split"] == "test"]
    assert sorted(r["task"] for r in chosen) == sorted(seeds)
    for r in chosen:
        model = {"enc.w": saved["enc.w"], "enc.b": saved["enc.b"],
                 **{k: saved[f"heads.{r['task']}.{k}"] for k in ("cls.w", "cls.b")}}
        torch.testing.assert_close(model["cls.w"], fitted[r["task"]]["cls.w"])  # its own head
        acc, loss = foreign.score(model, seeds[r["task"]], "test")
        assert r["accuracy"] == pytest.approx(acc) and r["loss"] == pytest.approx(loss, rel=1e-5)
        assert r["accuracy"] > 0.6  # 3 classes: far above chance
    val = [r for r in rows if r["split"] == "val" and r["model"] == "merged"]
    # search=paper (the default): Task Arithmetic over the 40 lambdas 0.05..2.0, eta = K * lambda
    # (it was the 6 shared etas of the old protocol)
    assert len(val) == 2 * 40 and all(r["normalized_accuracy"] != r["normalized_accuracy"] for r in val)
    assert sorted({r["lambda"] for r in val}) == pytest.approx([0.05 * i for i in range(1, 41)])
    assert all(r["eta"] == pytest.approx(2 * r["lambda"]) for r in val)
    assert run["search"]["candidates"] == 40 and method["lambda"] == pytest.approx(eta / 2)
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_foreign_client_completes_a_round(tmp_path, base_checkpoint):
    """fl-merge's ServerApp with the foreign module as the ClientApp, as a Flower app whose
    pyproject names it would run them."""
    from fl_merge.config.run_config import RunConfig
    from simulate import simulate_round

    out = tmp_path / "out"
    cfg = RunConfig.from_flower({"num-clients": 2, "merge-keys": "enc.*",
                                 "base-checkpoint": str(base_checkpoint), "output-dir": str(out)}).resolve()
    simulate_round(cfg, 2, foreign.app)
    _check_outputs(out)
