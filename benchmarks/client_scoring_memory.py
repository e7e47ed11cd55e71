"""Peak memory of fl-merge's own client with chunked messages (run-config chunk-mib > 0), side
by side in one run: today's path vs the in-place path, on the same node-local files.

The setup (its own child process) builds an fp16 causal LM from a transformers LlamaConfig
(LlamaModel, sized by --size-gb; the tokenizer files copied from the offline MiniLM) as an
``hf:`` folder, and writes what a chunked round leaves on a node (clients/chunked.py
layout, groups of --chunk-mib): theta0 (the server's theta0, `pretrained_backbone`), the
client's own head, --deltas float32 Deltas (task vectors are float32 for an fp16 base), and
a fine-tuned checkpoint file (theta0 + noise, fp16) for a checkpoint client. Then each leg
runs in its own child process:

* score-today: the scoring of a score message before issue 28's change, written out here
  (the code this replaced): theta0 read as a dict of memory-mapped tensors, and for every
  candidate `apply_update` (a new state dict) loaded into a NEW model with load_state_dict,
  through the same `score_grid` loop;
* score-inplace: the client's code now (clients/client_app.py evaluate_model): lazy
  `chunked.scoring_inputs` and one `CandidateModel`, its weights set in place per candidate;
* checkpoint-today / checkpoint-inplace: a checkpoint client's train message (theta0 from
  its groups, the checkpoint read, a probe head fitted on theta0 features, the fine-tuned
  model scored on val and test, the update kept as groups): before (written out here:
  read_client_checkpoint's whole state + a model loaded with load_state_dict) and now
  (`checkpoint_update`, the checkpoint copied into the model tensor by tensor).

Each child reports its idle RSS (imports done, task data made, before the message's work)
and its peak (getrusage's ru_maxrss); the parent samples the child's RSS and anonymous
memory (RSS - file-backed, psutil) every 20 ms. Printed: peaks above idle as ratios to the
model's bytes, time per leg, and whether the two scoring legs' scores are identical.
Issue 28's target for a SuperNode tree (supernode + its ClientApp) is <= 2.5x the model;
the ClientApp's own share should stay within ~2x. Usage (runs > 4 GiB under the lock):

    flock /tmp/bigmem.lock .venv/bin/python benchmarks/client_scoring_memory.py --size-gb 1.0
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LEGS = ("score-today", "score-inplace", "checkpoint-today", "checkpoint-inplace")
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
RUN, NODE = 1, 1  # the Context's run and node id: the chunk folder's name


def llama_config(size_gb: float, hidden: int):
    """A LlamaConfig of about size_gb * 1e9 bytes in fp16 (MiniLM's vocabulary)."""
    import transformers

    inter = int(hidden * 2.75) // 64 * 64
    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    embed = 30522 * hidden
    layers = max(1, round((size_gb * 1e9 / 2 - embed) / per_layer))
    return transformers.LlamaConfig(vocab_size=30522, hidden_size=hidden, intermediate_size=inter,
                                    num_hidden_layers=layers, num_attention_heads=hidden // 128,
                                    num_key_value_heads=hidden // 128, max_position_embeddings=128)


def context(work: Path):
    from flwr.app import Context, RecordDict

    return Context(run_id=RUN, node_id=NODE, node_config={"cache-dir": str(work)}, state=RecordDict(),
                   run_config={})


def toy_task():
    """Two classes, 4 short texts per split: the forward passes of a 1 GB fp16 model on CPU
    are slow (about a GFLOP/s in fp16 here); memory is what is measured."""
    import torch
    from torch.utils.data import TensorDataset

    from fl_merge.data.offline import encode_texts
    from fl_merge.tasks.registry import TaskData

    def split(words):
        return TensorDataset(encode_texts([f"a {w} day" for w in words]), torch.tensor([0, 1, 0, 1]))

    return TaskData("toy", 2, split(["good", "bad", "fine", "grim"]), split(["nice", "poor", "great", "awful"]),
                    split(["lovely", "sad", "happy", "dull"]))


def setup(work: Path, size_gb: float, hidden: int, chunk_mib: int, n_deltas: int) -> dict:
    """The model folder and the node-local files; returns what the legs need (setup.json)."""
    import torch
    import transformers

    from fl_merge.core.safetensors_writer import ONE_FILE, write_checkpoint
    from fl_merge.models.hub import minilm_path
    from fl_merge.models.registry import pretrained_backbone
    from fl_merge.round.chunks import chunk_groups
    from fl_merge_clients import chunked

    folder = work / "llama"
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(llama_config(size_gb, hidden), dtype=torch.float16)
    model.save_pretrained(folder)
    del model
    for name in TOKENIZER_FILES:
        shutil.copy(minilm_path() / name, folder / name)
    name = f"hf:{folder}"
    theta0 = pretrained_backbone(name)  # what the server sends: fp16
    limit = chunk_mib << 20
    chunks = chunked.chunk_folder(context(work))
    groups = chunk_groups(theta0, limit)
    for i, names in enumerate(groups):
        chunked._write(chunked._path(chunks, "theta0", i), {k: theta0[k] for k in names})
    g = torch.Generator().manual_seed(1)
    chunked._write(chunked._path(chunks, "own", 0), {"head.weight": 0.1 * torch.randn(2, hidden, generator=g),
                                                     "head.bias": torch.zeros(2)})
    delta_groups = []
    for d in range(n_deltas):  # float32, one group in memory at a time
        dgroups = chunk_groups({k: torch.empty(v.shape, dtype=torch.float32, device="meta")
                                for k, v in theta0.items()}, limit, "a Delta")
        for i, names in enumerate(dgroups):
            chunked._write(chunked._path(chunks, f"delta-{d}", i),
                           {k: 1e-3 * torch.randn(theta0[k].shape, generator=g) for k in names})
        delta_groups.append(len(dgroups))
    specs = [(k, v.dtype, tuple(v.shape)) for k, v in theta0.items()]
    fine_tuned = ((k, (v.float() + 1e-3 * torch.randn(v.shape, generator=g)).half()) for k, v in theta0.items())
    write_checkpoint(work / "checkpoint.safetensors", specs, fine_tuned, max_shard_bytes=ONE_FILE)
    model_bytes = sum(v.numel() * v.element_size() for v in theta0.values())
    return {"model": name, "model_bytes": model_bytes, "params": sum(v.numel() for v in theta0.values()),
            "theta0_groups": len(groups), "delta_groups": delta_groups, "chunk_bytes": limit,
            "checkpoint": str(work / "checkpoint.safetensors")}


def today_model_for_task(model_name, task, state, seed):
    """clients/training.py model_for_task before issue 28: a new model, load_state_dict."""
    from fl_merge.models.registry import build_model
    from fl_merge_clients.training import fit_probe_head

    model = build_model(model_name, task.num_classes)
    model.backbone.load_state_dict({k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")})
    head = {k[len("head."):]: v for k, v in state.items() if k.startswith("head.")}
    if head and tuple(head["weight"].shape) == tuple(model.head.weight.shape):
        model.head.load_state_dict(head)
    else:
        fit_probe_head(model, task, seed)
    return model


def run_leg(leg: str, work: Path, info: dict, etas: list[float]) -> dict:
    """One leg in this (child) process: idle RSS, the work, peak RSS, its result."""
    import psutil
    import torch

    from fl_merge.core.task_vectors import apply_update
    from fl_merge.io.spill import release_freed_memory
    from fl_merge.round.chunks import DELTA_GROUPS, LIMIT_KEY, OWN_GROUPS, THETA0_GROUPS
    from fl_merge_clients import chunked
    from fl_merge_clients.grid_scoring import score_grid
    from fl_merge_clients.training import CandidateModel

    torch.set_num_threads(1)  # as the client does (_limit_threads)
    ctx, task, name = context(work), toy_task(), info["model"]
    config = {THETA0_GROUPS: info["theta0_groups"], DELTA_GROUPS: info["delta_groups"], OWN_GROUPS: 1,
              LIMIT_KEY: info["chunk_bytes"], "etas": etas, "splits": ["test"], "model": name}
    from fl_merge.models.hf import _tokenizer, hf_source  # loaded by both legs alike: not the model
    _tokenizer(hf_source(name, name[len("hf:"):]))
    gc.collect()
    release_freed_memory()
    mem = psutil.Process().memory_info()
    idle, idle_anon = mem.rss, mem.rss - mem.shared
    print("IDLE", flush=True)  # the parent's samples count from here
    t0 = time.perf_counter()
    result: dict = {}
    if leg == "score-today":
        state, loaders = chunked.scoring_inputs(config, ctx)
        state = dict(state)  # as the old scoring_inputs: {**theta0, **own} of mapped tensors
        result = score_grid(config, task, loaders,
                            lambda delta, eta: today_model_for_task(name, task, apply_update(state, delta, eta), 0))
    elif leg == "score-inplace":
        state, loaders = chunked.scoring_inputs(config, ctx)
        result = score_grid(config, task, loaders, CandidateModel(name, task, state, 0))
    else:
        from fl_merge.io.client_checkpoints import read_client_checkpoint
        from fl_merge.models.evaluation import evaluate
        from fl_merge.round.keys import DEFAULT_MERGE_KEYS, key_matcher
        from fl_merge_clients.checkpoint_client import checkpoint_update

        if leg == "checkpoint-today":
            theta0 = dict(chunked.theta0(config, ctx))  # the old chunked.theta0: a dict
            state, _, _ = read_client_checkpoint(info["checkpoint"], theta0, key_matcher(DEFAULT_MERGE_KEYS),
                                                 task.name, "checkpoint")
            model = today_model_for_task(name, task, theta0, 0)
            model.backbone.load_state_dict({k[len("backbone."):]: v for k, v in state.items()})
            result = {"val": evaluate(model, task.val)[0], "test": evaluate(model, task.test)}
            out = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        else:
            out, metrics = checkpoint_update(config, 0, chunked.theta0(config, ctx), info["checkpoint"], task, 0)
            result = {"val": metrics["finetuned-val-accuracy"],
                      "test": [metrics["finetuned-accuracy"], metrics["finetuned-loss"]]}
        result["groups"] = chunked.keep_update(config, ctx, out, {})
    return {"leg": leg, "idle": idle, "idle_anon": idle_anon, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "seconds": time.perf_counter() - t0, "result": result}


def sample(pid: int, started: threading.Event, peaks: dict, stop: threading.Event) -> None:
    """The child's (and its children's) RSS and anonymous memory every 20 ms once it is idle."""
    import psutil

    proc = psutil.Process(pid)
    while not stop.is_set():
        if started.is_set():
            try:
                procs = [proc, *proc.children(recursive=True)]
                infos = [p.memory_info() for p in procs]
            except psutil.Error:
                break
            rss = sum(i.rss for i in infos)
            peaks["rss"] = max(peaks.get("rss", 0), rss)
            peaks["anon"] = max(peaks.get("anon", 0), rss - sum(i.shared for i in infos))
        time.sleep(0.02)


def child(args: list[str]) -> tuple[dict, dict]:
    """Run this script with `args` in a child; (its JSON report, the parent's sampled peaks)."""
    proc = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    started, stop, peaks = threading.Event(), threading.Event(), {}
    watcher = threading.Thread(target=sample, args=(proc.pid, started, peaks, stop), daemon=True)
    watcher.start()
    report = None
    for line in proc.stdout:
        if line.strip() == "IDLE":
            started.set()
        elif line.startswith("REPORT "):
            report = json.loads(line[len("REPORT "):])
    stop.set()
    if proc.wait() != 0 or report is None:
        raise SystemExit(f"child {args} failed (exit {proc.returncode})")
    return report, peaks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gb", type=float, default=1.0, help="model size in 1e9 bytes (fp16)")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--chunk-mib", type=int, default=256)
    ap.add_argument("--deltas", type=int, default=2)
    ap.add_argument("--etas", default="0.5,1.0")
    ap.add_argument("--legs", default=",".join(LEGS))
    ap.add_argument("--work", help="folder for the files (default: a temporary one, removed)")
    ap.add_argument("--leg", help=argparse.SUPPRESS)
    ap.add_argument("--setup", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    etas = [float(e) for e in a.etas.split(",")]
    if a.leg or a.setup:  # a child
        work = Path(a.work)
        if a.setup:
            info = setup(work, a.size_gb, a.hidden, a.chunk_mib, a.deltas)
            (work / "setup.json").write_text(json.dumps(info))
            print("REPORT " + json.dumps(info), flush=True)
        else:
            info = json.loads((work / "setup.json").read_text())
            print("REPORT " + json.dumps(run_leg(a.leg, work, info, etas)), flush=True)
        return
    legs = [leg for leg in a.legs.split(",") if leg]
    if bad := [leg for leg in legs if leg not in LEGS]:
        raise SystemExit(f"--legs: unknown {bad}; known: {', '.join(LEGS)}")
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="client-scoring-"))
    try:
        common = ["--work", str(work), "--size-gb", str(a.size_gb), "--hidden", str(a.hidden),
                  "--chunk-mib", str(a.chunk_mib), "--deltas", str(a.deltas), "--etas", a.etas]
        t = time.perf_counter()
        info, _ = child(["--setup", *common])
        gb = info["model_bytes"] / 1e9
        print(f"model: {info['params'] / 1e6:.0f}M parameters, {gb:.3f} GB fp16 ({info['model']}); "
              f"{a.deltas} float32 Deltas x etas {etas}; chunks of {a.chunk_mib} MiB; setup {time.perf_counter() - t:.0f} s")
        print(f"{'leg':20s} {'peak-idle (rusage)':>19s} {'RSS (sampled)':>14s} {'anon (sampled)':>15s} {'seconds':>8s}")
        reports = {}
        for leg in legs:
            report, peaks = child(["--leg", leg, *common])
            reports[leg] = report
            base = report["idle"]
            ratios = [(report["peak"] - base) / info["model_bytes"], (peaks.get("rss", base) - base) / info["model_bytes"],
                      (peaks.get("anon", 0) - report["idle_anon"]) / info["model_bytes"]]
            print(f"{leg:20s} {ratios[0]:18.2f}x {ratios[1]:13.2f}x {ratios[2]:14.2f}x {report['seconds']:8.0f}", flush=True)
        for a_leg, b_leg in (("score-today", "score-inplace"), ("checkpoint-today", "checkpoint-inplace")):
            if a_leg in reports and b_leg in reports:
                same = reports[a_leg]["result"] == reports[b_leg]["result"]
                print(f"{a_leg} and {b_leg} results identical: {same}")
        print("(ratios: peak above the child's idle value / the model's bytes; anon = RSS - file-backed "
              "pages, above the idle anon)")
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
