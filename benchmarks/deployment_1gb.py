"""Benchmark (issue 28 item 2): one real Flower deployment round with a large fp16 causal LM,
fl-merge's ServerApp against Flower's own FedAvg, memory per process as a ratio of the model.

For each app, in the same script run, a fresh deployment on loopback (benchmarks/
deployment_procs.py: flower-superlink + K flower-supernode processes, each SuperNode started
with node-config checkpoint=<its fine-tuned checkpoint>) runs one round:

* fl-merge: its ServerApp with checkpoint clients (no training), chunked messages
  (`chunk-mib`), spill, task_arithmetic at one eta, scoring on tiny CSV text tasks; the model
  is `hf:<the LM's folder>` (fp16 kept: fl_merge/models/hf.py pools its features in float32
  for the task head);
* fedavg: Flower's `flwr.serverapp.strategy.FedAvg`, one round, sending the same model to K
  plain ClientApps that return their checkpoint and evaluate the averaged model
  (benchmarks/deployment_fedavg_app), the baseline a Flower user has.

Every process's RSS is sampled (psutil, every --interval s); each process's idle RSS is the
median over 3 s after the deployment started and before the run is submitted (the ServerApp
and ClientApps exist only during a run: their idle is 0). Printed per process: peak RSS above
idle / the model's bytes (fp16 weights), against the issue's targets: ServerApp <= 1.5x,
SuperLink <= 0.5x, each SuperNode tree (flower-supernode + its superexec + flwr-clientapp)
<= 2.5x. A watchdog kills a run when the summed RSS of its processes passes --limit-gib; its
row then says so and in which phase.

    flock /tmp/flower.lock python benchmarks/deployment_1gb.py --size-gib 1.25 --json out.json

The model (Llama architecture, random weights, MiniLM's tokenizer), checkpoints (base +
noise) and tasks are built in --work first (kept and reused). This is a script, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from deployment_large import BIN, ROOT, phase_peaks  # noqa: E402
from deployment_lm import dims_for, largest_tensor_bytes, lm_params  # noqa: E402
from deployment_procs import LoopbackDeployment  # noqa: E402

APPS = {"fl-merge": ROOT, "fedavg": Path(__file__).resolve().parent / "deployment_fedavg_app"}
TARGETS = {"ServerApp": 1.5, "SuperLink": 0.5, "SuperNode": 2.5}


def above_idle(peak_mb: float, idle_mb: float) -> float:
    """Peak RSS above idle (MB), never below 0 (a process can shrink below its idle RSS)."""
    return max(0.0, peak_mb - idle_mb)


def process_rows(peaks: dict[str, dict[str, tuple[float, float]]], idle: dict[str, dict[str, float]],
                 k: int) -> list[dict]:
    """The benchmark's rows from phase -> "group/role" -> peak (rss, anon) MB and group ->
    role -> idle MB: ServerApp (serverapp role, idle 0), SuperLink (flower-superlink alone),
    SuperNode i tree (every process of the group). Each: name, peak, idle, above, the phase
    of its peak."""
    wanted = [("ServerApp", "superlink/serverapp", 0.0),
              ("SuperLink", "superlink/superlink", idle.get("superlink", {}).get("superlink", 0.0))]
    wanted += [(f"SuperNode {i}", f"supernode{i}/total", sum(idle.get(f"supernode{i}", {}).values()))
               for i in range(k)]
    rows = []
    for name, key, idle_mb in wanted:
        peak = peaks.get("whole run", {}).get(key, (0.0, 0.0))[0]
        phases = [(v[key][0], p) for p, v in peaks.items() if p != "whole run" and key in v]
        where = max(phases)[1] if phases else "-"
        rows.append({"process": name, "peak_mb": peak, "idle_mb": idle_mb,
                     "above_mb": above_idle(peak, idle_mb), "phase": where})
    return rows


def peak_step(samples: list, group: str, role: str, steps: list[tuple[float, str]]
              ) -> tuple[float, float, str]:
    """(peak RSS MB of `group`/`role`, its wall time, the last ServerApp step line logged
    before it, "" if none): which wave of group messages the process peaked in (the log
    line reaches the benchmark a moment after the ServerApp sends the wave)."""
    rows = [(rss, t) for t, g, r, rss, _ in samples if g == group and r == role]
    if not rows:
        return 0.0, 0.0, ""
    rss, t = max(rows)
    return rss, t, max([(ts, line) for ts, line in steps if ts <= t], default=(0.0, ""))[1]


def target_of(process: str) -> float:
    return TARGETS[process.split()[0]]


def ratio_cells(row: dict, model_mb: float) -> tuple[str, bool]:
    """('1.23x', within target) for a row."""
    ratio = row["above_mb"] / model_mb
    return f"{ratio:.2f}x", ratio <= target_of(row["process"])


def markdown(results: dict[str, dict], model_mb: float) -> str:
    """One table: a row per process, for each app its ratio (peak above idle / model) and
    the phase of its peak; a failed or stopped app's cells say so."""
    apps = list(results)
    head = "| process | target | " + " | ".join(f"{a} | {a} peak phase" for a in apps) + " |"
    lines = [head, "|" + "---|" * (2 + 2 * len(apps))]
    names = [r["process"] for r in next(iter(results.values()))["rows"]]
    for i, name in enumerate(names):
        cells = []
        for a in apps:
            row = results[a]["rows"][i]
            text, ok = ratio_cells(row, model_mb)
            cells += [f"{text}{'' if ok else ' (over)'}", row["phase"]]
        lines.append(f"| {name} | <= {target_of(name):g}x | " + " | ".join(cells) + " |")
    status = []
    for a in apps:
        r = results[a]
        status.append(f"{r['seconds']:.0f} s, " + ("finished" if r["ok"] else
                      f"stopped: {r['stopped']}" if r["stopped"] else "FAILED"))
    lines.append("| run | | " + " | ".join(f"{s} | " for s in status) + "|")
    return "\n".join(lines)


def prepare(work: Path, args: argparse.Namespace) -> dict:
    """Model, checkpoints and tasks in `work`, built in a child process (this one stays small)."""
    dims = dims_for(args.size_gib, args.hidden)
    # fl-merge sends each Delta in float32 (twice the fp16 bytes) and refuses a chunk below
    # its largest tensor only when the validation phase starts: checked here, before anything.
    if largest_tensor_bytes(dims, 4) > args.chunk_mib * 2**20:
        raise SystemExit(f"--chunk-mib {args.chunk_mib:g} is below the largest tensor of the model's "
                         f"float32 Delta ({largest_tensor_bytes(dims, 4) / 2**20:.0f} MiB): give a larger "
                         "--chunk-mib or a smaller --hidden")
    train, val, test = (int(x) for x in args.rows.split(","))
    code = ("import sys, json; from pathlib import Path; sys.path.insert(0, sys.argv[1]); "
            "from deployment_lm import build_lm, write_checkpoints, write_tasks; "
            "w = Path(sys.argv[2]); d = json.loads(sys.argv[3]); k, tr, va, te = map(int, sys.argv[4:8]); "
            "b = build_lm(w / 'lm', d); c = write_checkpoints(w / 'lm' / 'model.safetensors', w, k); "
            "print(json.dumps({'bytes': b, 'checkpoints': [str(p) for p in c], "
            "'tasks': write_tasks(w, k, tr, va, te)}))")
    out = subprocess.run([sys.executable, "-c", code, str(Path(__file__).resolve().parent), str(work),
                          json.dumps(dims), str(args.clients), str(train), str(val), str(test)],
                         capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"preparing the model failed:\n{out.stderr[-3000:]}")
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "dims": dims}


def run_config(app: str, inputs: dict, out: Path, args: argparse.Namespace) -> str:
    lm = Path(inputs["checkpoints"][0]).parent / "lm"
    if app == "fedavg":
        return f'base="{lm / "model.safetensors"}" output="{out / "fedavg.safetensors"}"'
    return (f'num-clients={args.clients} model="hf:{lm}" tasks="{",".join(inputs["tasks"])}" '
            f'spill=true chunk-mib={args.chunk_mib:g} measure-heterogeneity=false '
            f'method="task_arithmetic" etas="1" cache=false output-dir="{out}" {args.run_config}')


def run_app(app: str, inputs: dict, work: Path, env: dict, args: argparse.Namespace) -> dict:
    out = work / f"{app}-out"
    shutil.rmtree(out, ignore_errors=True)  # no earlier run's files (merged model, failure.json)
    out.mkdir(parents=True)
    nodes = [f'partition-id={i} num-partitions={args.clients} checkpoint="{c}" cache-dir="{work / f"node{i}"}"'
             for i, c in enumerate(inputs["checkpoints"])]
    dep = LoopbackDeployment(work / f"{app}-deploy", env, args.limit_gib, args.interval)
    try:
        dep.start(nodes, database=(work / f"{app}-state.db") if args.database == "sqlite" else None)
        idle = dep.idle()
        print(f"{app}: idle RSS MB {json.dumps({g: {r: round(v) for r, v in d.items()} for g, d in idle.items()})}",
              flush=True)
        outcome = dep.run(APPS[app], run_config(app, inputs, out, args), echo=args.verbose)
    finally:
        dep.close()
    written = out / ("fedavg.safetensors" if app == "fedavg" else "merged.safetensors")
    ok = outcome.ok and written.exists()
    peaks = phase_peaks(dep.samples, outcome.marks)
    stopped = ""
    if outcome.watchdog:
        last = max(t for t, *_ in dep.samples)
        phase = max([(t, p) for t, p in outcome.marks if t <= last], default=(0, "start"))[1]
        totals: dict[float, float] = {}
        for t, _, _, rss, _ in dep.samples:
            totals[t] = totals.get(t, 0.0) + rss
        total = max(totals.values())
        stopped = f"watchdog at {total / 1024:.1f} GiB in phase {phase}"
    if not ok:
        sys.stderr.write("".join(outcome.lines)[-3000:])
        print(f"{app}: run {'stopped' if stopped else 'FAILED'}; logs in {dep.work}", flush=True)
    link_mb, link_t, link_step = peak_step(dep.samples, "superlink", "superlink", outcome.steps)
    if link_step:
        print(f"{app}: SuperLink peak {link_mb:.0f} MB (idle {idle.get('superlink', {}).get('superlink', 0):.0f}) "
              f"after '{link_step}'", flush=True)
    return {"ok": ok, "seconds": outcome.seconds, "stopped": stopped, "idle": idle,
            "rows": process_rows(peaks, idle, args.clients), "marks": outcome.marks, "steps": outcome.steps,
            "superlink_peak": {"mb": link_mb, "time": link_t, "after": link_step},
            "peaks": peaks, "samples": dep.samples if args.samples else []}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gib", type=float, default=1.25, help="the LM's fp16 size (nearest layer count)")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--chunk-mib", type=float, default=256.0)
    parser.add_argument("--rows", default="16,8,8", help="train,val,test rows per task")
    parser.add_argument("--apps", default="fl-merge,fedavg")
    parser.add_argument("--limit-gib", type=float, default=16.0, help="watchdog: summed RSS limit")
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between samples")
    parser.add_argument("--database", choices=("memory", "sqlite"), default="memory")
    parser.add_argument("--mmap-threshold", type=int, default=1048576,
                        help="MALLOC_MMAP_THRESHOLD_ for every process (0: glibc's default)")
    parser.add_argument("--run-config", default="", help="extra fl-merge run-config items")
    parser.add_argument("--work", type=Path, help="folder for model, checkpoints, tasks (kept)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--samples", action="store_true", help="put every RSS sample in --json")
    parser.add_argument("--verbose", action="store_true", help="echo the runs' logs")
    args = parser.parse_args()
    apps = [a.strip() for a in args.apps.split(",") if a.strip()]
    if not apps or any(a not in APPS for a in apps):
        raise SystemExit(f"--apps '{args.apps}': give a comma list of {', '.join(APPS)}")
    work = (args.work or Path(tempfile.gettempdir()) / f"fl-merge-bench-lm-{args.size_gib:g}").resolve()
    work.mkdir(parents=True, exist_ok=True)
    inputs = prepare(work, args)
    model_mb = inputs["bytes"] / 2**20
    print(f"LM: {inputs['dims']['num_hidden_layers']} layers, hidden {args.hidden}, "
          f"{lm_params(inputs['dims']) / 1e6:.0f}M params, {model_mb:.0f} MiB fp16; K={args.clients}; "
          f"chunk {args.chunk_mib:g} MiB; work {work}", flush=True)
    env = {**os.environ, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "HF_HUB_OFFLINE": "1",
           "FL_MERGE_CACHE": str(work / "cache"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), str(Path(__file__).resolve().parent),
                                                       os.environ.get("PYTHONPATH")])),
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           **({"MALLOC_MMAP_THRESHOLD_": str(args.mmap_threshold)} if args.mmap_threshold else {})}
    results = {app: run_app(app, inputs, work, env, args) for app in apps}
    print(f"\npeak RSS above idle / model ({model_mb:.0f} MiB fp16), K={args.clients}:\n")
    print(markdown(results, model_mb))
    if args.json:
        args.json.write_text(json.dumps({"model_mib": model_mb, "dims": inputs["dims"], "clients": args.clients,
                                         "chunk_mib": args.chunk_mib, "results": results}))


if __name__ == "__main__":
    main()
