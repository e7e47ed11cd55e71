"""benchmarks/gpu_check.sh: its own errors on a machine without a GPU, and its report from
the same code run on the CPU (the GPU numbers themselves come from running it on a GPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=str(ROOT))
    return subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out"), *args], env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_it_stops_with_one_line_and_writes_nothing(tmp_path):
    res = _run(tmp_path)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "sees no CUDA GPU on this machine" in lines[0], res.stderr
    assert not (tmp_path / "out").exists()


def test_bad_parts_are_refused(tmp_path):
    res = _run(tmp_path, "--parts", "aggregation,warp")
    assert res.returncode == 2 and "--parts only aggregation, chunked, minilm, vision8 (got warp)" in res.stderr
    res = _run(tmp_path, "--devices", "cpu,cpu", "--parts", "vision8")
    assert res.returncode == 2 and "vision8 part runs on cuda only" in res.stderr


def test_the_report_from_the_cpu_path(tmp_path):
    res = _run(tmp_path, "--devices", "cpu,cpu", "--parts", "aggregation,chunked", "--params", "20000",
               "--chunked-params", str(4 * 128 * 128), "--chunk-mib", "0.13")  # 128 x 128 layers, 2 per group
    assert res.returncode == 0, res.stderr
    rows = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    big = [r for r in rows if r["part"] == "chunked"]
    assert [r["method"] for r in big] == ["fedavg", "median", "ties", "tsv_m", "iso_c"]
    for r in big:  # the same code on the same device: identical Deltas
        assert r["params"] == 4 * 128 * 128 and r["max_abs_diff"] == 0.0
        assert r["seconds_0"] > 0 and r["seconds_1"] > 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["gpu_check.json", "gpu_check.md"]
    rows = [r for r in rows if r["part"] == "aggregation"]
    assert [r["method"] for r in rows] == ["fedavg", "median", "trimmed_mean", "ties",
                                           "geometric_median", "fisher", "tsv_m", "iso_c",
                                           "iso_cts", "wudi", "consensus", "pcb", "della",
                                           "sce", "karcher"]
    assert next(r for r in rows if r["method"] == "wudi")["method_params"] == {"iters": 20}
    for r in rows:
        assert r["seconds_0"] > 0 and r["seconds_1"] > 0
        assert r["ratio"] == pytest.approx(r["seconds_0"] / r["seconds_1"])
    report = (tmp_path / "out" / "gpu_check.md").read_text()
    assert report.startswith("# GPU check (cpu against cpu)") and "| ties |" in report
    assert "group by group" in report

