"""Shared by the experiment scripts: run one fl-merge point per configuration, each in its
own `fl-merge-run` process (a fresh SuperLink and Ray per point), skipping points whose
results already exist so an interrupted experiment resumes where it stopped."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _toml(value: object) -> str:
    return f'"{value}"' if isinstance(value, str) else str(value)


def run_point(out_dir: Path, overrides: dict[str, object]) -> Path:
    """Run fl-merge with these run-config overrides into out_dir (unless already done)."""
    if (out_dir / "results.csv").exists() and (out_dir / "run.json").exists():
        print(f"[cached] {out_dir}", flush=True)
        return out_dir
    items = " ".join(f"{k}={_toml(v)}" for k, v in {**overrides, "output-dir": str(out_dir)}.items())
    print(f"[run] {items}", flush=True)
    cmd = [sys.executable, "-m", "fl_merge.launch", "--app", str(ROOT), "--run-config", items]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"point failed: {items}")
    return out_dir
