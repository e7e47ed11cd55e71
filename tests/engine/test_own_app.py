"""A user's own Flower app, run as a user runs it: `fl-merge-run --app examples/tiny-app` on
both engines (docs/own_app.md). The app's own config (3 clients, two methods, its own key
sgd-steps), its own ClientApp, its task names lo/mid/hi and its model name come out in the
summary, run.json, run.log and the merged file; the merged weights are checked against the
app's own training code, independently of fl-merge."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from fl_merge.cli.launch import main as launch_main
from fl_merge.io import results
from fl_merge.io.merged import merged_metadata_of

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "tiny-app"
TASKS = ["lo", "mid", "hi"]


def _check(out: Path, stdout: str) -> dict[str, torch.Tensor]:
    run = json.loads((out / results.RUN_FILE).read_text())
    assert run["tasks"] == TASKS and sorted(c["task"] for c in run["clients"]) == sorted(TASKS)
    assert sorted(run["methods"]) == ["task_arithmetic", "ties"] and run["failures"] == []
    assert not any(c["grid-eval"] for c in run["clients"])  # the app's ClientApp, not fl-merge's
    assert {c["local-steps"] for c in run["clients"]} == {25}  # its own key, overridden, reached it
    assert "3 clients (lo, mid, hi); method=task_arithmetic,ties" in stdout
    summary = stdout[stdout.index("fl-merge: test accuracy per task"):]
    assert [line.split()[0] for line in summary.splitlines()[2:5]] == TASKS
    sys.path.insert(0, str(EXAMPLE))
    from tiny_app.task import base_weights, fit

    theta0 = base_weights()
    eta = run["methods"]["task_arithmetic"]["eta"]
    fitted = [fit(theta0, i, 25, 0.3) for i in range(3)]
    saved = load_file(str(out / results.MODEL_FILE))
    for k in ("enc.w", "enc.b"):  # Task Arithmetic, uniform: theta0 + eta * mean task vector
        delta = sum(f[k] - theta0[k] for f in fitted) / 3
        torch.testing.assert_close(saved[k], theta0[k] + eta * delta, rtol=1e-5, atol=1e-6)
    for i, task in enumerate(TASKS):  # each task's own classifier, under its name
        torch.testing.assert_close(saved[f"heads.{task}.cls.w"], fitted[i]["cls.w"])
    meta = merged_metadata_of(out / results.MODEL_FILE)
    assert meta["model"] == "tiny-mlp" and meta["tasks"] == ",".join(TASKS)
    assert "fl-merge results:" in (out / results.LOG_FILE).read_text()
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return saved


def test_an_own_app_runs_on_both_engines_with_its_names_and_settings(tmp_path, capsys):
    merged = {}
    for engine in ("superlink", "simulation"):
        out = tmp_path / engine
        code = launch_main(["--app", str(EXAMPLE), "--engine", engine,
                            "--run-config", f'sgd-steps=25 output-dir="{out}"'])
        captured = capsys.readouterr()
        assert code == 0, captured.err[-2000:]
        merged[engine] = _check(out, captured.out)
    for k, v in merged["superlink"].items():  # one app, one config: the same merge on both
        torch.testing.assert_close(merged["simulation"][k], v)

