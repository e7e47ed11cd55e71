"""Benchmark (issue 28 item 2): the ServerApp's peak memory for theta0 and for writing the
merged model of a large fp16 causal LM, as multiples of the model's bytes.

Each step runs in a fresh child process that first imports what the ServerApp imports
(fl_merge_strategies.server_app: flwr, torch), then measures its resident set (sampled, and
the kernel's ru_maxrss for the whole process):

* ``old``: theta0 as before, through transformers (`load_theta0(cfg)`: AutoModel.from_pretrained,
  a whole state dict), then `new_round` writes it to the round's store;
* ``new``: `load_theta0(cfg, mapped=True)`, as a spilling/chunked round now loads it: the hf:
  folder's own safetensors files memory-mapped (fl_merge/io/mapped_base.py), kept by `new_round`;
* ``write``: theta0 mapped, a float32 Delta memory-mapped from a spill file (as the round holds
  it), then `write_merged_model` (merged.safetensors) and `write_hf_model` (merged-hf/), each
  measured above the RSS it started from.

Printed: per step the RSS after the imports, the peak, the peak / model bytes (idle counted
as 0, as benchmarks/deployment_1gb.py counts the ServerApp), (peak - start) / model bytes, and
the anonymous memory above the start (RSS counts a memory-mapped file's pages once read, which
the kernel can drop; anonymous pages it cannot), from /proc/self/status sampled every 5 ms.

    flock /tmp/bigmem.lock .venv/bin/python benchmarks/theta0_memory.py --size-gib 1.25

The model (benchmarks/deployment_lm.py: Llama, random fp16 weights, MiniLM's tokenizer), two
CSV tasks and the Delta are built in --work (kept and reused). A script, not a test.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MIB = 2**20

CHILD = r'''
import gc, json, resource, sys, threading, time
from pathlib import Path
import fl_merge_strategies.server_app as sa  # what the ServerApp imports (flwr, torch)
from fl_merge.config.run_config import RunConfig
from fl_merge.io.spill import MappedState, release_freed_memory
from fl_merge.round.outcome import new_round

step, work, lm, tasks, chunk = sys.argv[2], Path(sys.argv[3]), sys.argv[4], sys.argv[5], float(sys.argv[6])
peak, stop = {}, [False]

def status():  # MiB: VmRSS (all resident pages) and RssAnon (not file-backed: cannot be dropped)
    out = {}
    for line in open("/proc/self/status"):
        if line.startswith(("VmRSS:", "RssAnon:")):
            name, value = line.split(":")
            out[name] = int(value.split()[0]) / 1024
    return out

def sample():
    while not stop[0]:
        for name, v in status().items():
            peak[name] = max(peak.get(name, 0.0), v)
        time.sleep(0.005)

def measure(fn):
    gc.collect(); release_freed_memory(); time.sleep(0.05)
    start = status()
    peak.update(start)
    t = time.perf_counter()
    out = fn()
    time.sleep(0.02)
    return out, {"start_mib": start["VmRSS"], "peak_mib": peak["VmRSS"], "seconds": time.perf_counter() - t,
                 "anon_above_mib": peak["RssAnon"] - start["RssAnon"]}

threading.Thread(target=sample, daemon=True).start()

cfg = RunConfig(model=f"hf:{lm}", tasks=tasks, num_clients=2, chunk_mib=chunk, spill=True,
                method="task_arithmetic", etas="1", search="off", measure_heterogeneity=False,
                output_dir=str(work / f"out-{step}")).resolve()
settings = cfg.round_settings(Path(cfg.run.output_dir))
rows = {}
if step in ("old", "new"):
    def load():
        theta0 = sa.load_theta0(cfg, mapped=step == "new")
        r = new_round(settings, theta0)
        del theta0
        release_freed_memory()
        return r
    r, rows["theta0"] = measure(load)
    rows["theta0"]["kind"] = type(r.theta0).__name__
    r.close()
else:
    from fl_merge.io.merged_writer import write_hf_model, write_merged_model
    r = new_round(settings, sa.load_theta0(cfg, mapped=True))
    delta = MappedState(work / "delta.safetensors")
    meta = {"method": "task_arithmetic", "eta": 1.0, "tasks": "a,b"}
    out = work / "out-write"
    _, rows["merged.safetensors"] = measure(lambda: write_merged_model(out / "merged.safetensors", r.theta0,
                                                                      delta, 0.5, {}, meta))
    _, rows["merged-hf"] = measure(lambda: write_hf_model(out / "merged-hf", lm, r.theta0, delta, 0.5, meta))
    r.close()
stop[0] = True
rows["maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(rows))
'''

PREPARE = r'''
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import torch
from deployment_lm import build_lm, write_tasks
from fl_merge.core.safetensors_writer import ONE_FILE, write_checkpoint
from fl_merge.io.mapped_base import mapped_hf_backbone
work, dims = Path(sys.argv[2]), json.loads(sys.argv[3])
size = build_lm(work / "lm", dims)
tasks = write_tasks(work, 2, 40, 20, 20)
delta = work / "delta.safetensors"
if not delta.exists():  # a float32 Delta on every backbone tensor, as a round spills it
    theta0, how = mapped_hf_backbone(f"hf:{work / 'lm'}")
    assert theta0 is not None, how
    specs = [(k, torch.float32, tuple(theta0[k].shape)) for k in theta0]
    write_checkpoint(delta, specs, ((k, torch.full(s, 1e-3)) for k, _, s in specs), ONE_FILE)
print(json.dumps({"bytes": size, "tasks": ",".join(tasks)}))
'''


def child(code: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise SystemExit(f"child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gib", type=float, default=1.25,
                        help="the LM's fp16 size (nearest layer count)")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--chunk-mib", type=float, default=256)
    parser.add_argument("--steps", default="old,new,write")
    parser.add_argument("--work", type=Path, help="folder for the model, tasks and Delta (kept)")
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    from deployment_lm import dims_for, largest_tensor_bytes

    dims = dims_for(args.size_gib, args.hidden)
    work = (args.work or Path(tempfile.gettempdir()) / f"fl-merge-bench-theta0-{args.size_gib:g}").resolve()
    work.mkdir(parents=True, exist_ok=True)
    inputs = child(PREPARE, str(HERE), str(work), json.dumps(dims))
    model = inputs["bytes"]
    big = largest_tensor_bytes(dims) / MIB
    print(f"LM: {dims['num_hidden_layers']} layers, hidden {args.hidden}, {model / MIB:.0f} MiB fp16, "
          f"largest tensor {big:.0f} MiB (fp32 {2 * big:.0f}); chunk {args.chunk_mib:g} MiB; work {work}",
          flush=True)
    print(f"{'step':<26}{'start MiB':>10}{'peak MiB':>10}{'peak/model':>12}{'(peak-start)/model':>20}"
          f"{'anon above MiB':>16}{'seconds':>9}  theta0")
    for step in args.steps.split(","):
        rows = child(CHILD, str(ROOT), step, str(work), str(work / "lm"), inputs["tasks"],
                     f"{args.chunk_mib:g}")
        for name, row in rows.items():
            if not isinstance(row, dict):
                continue
            print(f"{step + ' ' + name:<26}{row['start_mib']:>10.0f}{row['peak_mib']:>10.0f}"
                  f"{row['peak_mib'] * MIB / model:>12.3f}"
                  f"{(row['peak_mib'] - row['start_mib']) * MIB / model:>20.3f}"
                  f"{row['anon_above_mib']:>16.0f}{row['seconds']:>9.1f}  {row.get('kind', '')}", flush=True)
        top = rows["maxrss_mib"]
        print(f"{step:<26}maxrss {top:.0f} MiB = {top * MIB / model:.3f}x", flush=True)


if __name__ == "__main__":
    main()
