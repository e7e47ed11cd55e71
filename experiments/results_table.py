"""The paper's table on our suites: base, individual fine-tuned and every merge method's test
accuracy (absolute and normalized), eta chosen on validation, for vision8 and text.

    .venv/bin/python experiments/results_table.py                 # both suites
    .venv/bin/python experiments/results_table.py --suites vision8

Each suite is one `fl-merge +experiment=<suite>` run (configs/experiment/<suite>.yaml) that
trains every client once and scores all methods on the same updates. Client updates come
from the client-update cache when they exist (a rerun takes minutes: only the merging and
scoring run again); a suite whose run directory already holds results is not rerun unless
--rerun is given. Writes docs/results_<suite>.csv and the tables between the markers in
docs/results.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUITES = ("vision8", "text")
# fedavg is Task Arithmetic (eta = K * lambda); hetero is our heterogeneity-aware weighting.
METHODS = ("fedavg", "fednova", "fedgma", "median", "cclip", "ties", "dare", "fisher", "hetero")
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def run_suite(suite: str, out: Path, rerun: bool) -> Path:
    """Run one suite into out/<suite> (unless its results exist and not `rerun`); the
    command's wall time goes to out/<suite>/wall.json."""
    from fl_merge.results import write_json

    run_dir = out / suite
    if not rerun and (run_dir / "results.csv").exists() and (run_dir / "run.json").exists():
        print(f"[reuse] {run_dir}", flush=True)
        return run_dir
    cmd = [sys.executable, "-m", "fl_merge", f"+experiment={suite}",
           f"method.name=[{','.join(METHODS)}]", f"runtime.output_dir={run_dir}"]
    print("[run]", " ".join(cmd), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    write_json(run_dir / "wall.json", {"seconds": time.perf_counter() - start})
    return run_dir


def timing_line(run_dir: Path) -> str:
    """How long the run took and whether its clients trained (cold) or came from the cache."""
    meta = json.loads((run_dir / "run.json").read_text())
    clients = meta.get("clients", [])
    cached = sum(int(c.get("cached", 0)) for c in clients)
    wall = run_dir / "wall.json"
    took = (f"{json.loads(wall.read_text())['seconds'] / 60:.1f} min wall"
            if wall.exists() else "wall time not recorded")
    state = ("cold: every client trained" if cached == 0
             else f"{cached} of {len(clients)} client updates from the cache")
    return f"Run: {took} on 2 CPU cores, {state}."


def table(run_dir: Path) -> tuple[list[str], list[dict[str, object]]]:
    """(tasks, rows): one row per model (base, individual, each method) with per-task test
    accuracy, their mean (absolute) and the mean of accuracy / individual accuracy."""
    from fl_merge.results import RESULTS_FILE, read_rows

    rows = [r for r in read_rows(run_dir / RESULTS_FILE) if r["split"] == "test"]
    tasks = list(dict.fromkeys(str(r["task"]) for r in rows))
    first = str(rows[0]["method"])
    by_model: dict[str, dict[str, object]] = {}
    normalized: dict[str, list[float]] = {}

    def put(label: str, r: dict, eta: object = "") -> None:
        by_model.setdefault(label, {"model": label, "eta": eta})[str(r["task"])] = float(r["accuracy"])
        normalized.setdefault(label, []).append(float(r["normalized_accuracy"]))

    for r in rows:
        if r["method"] == first and r["model"] in ("base", "finetuned"):
            put("base (linear probe)" if r["model"] == "base" else "individual", r)
        elif r["model"] == "merged" and r["selected"] is True:
            put(str(r["method"]), r, f"{float(r['eta']):g}")
    for label, entry in by_model.items():
        entry["absolute"] = sum(float(entry[t]) for t in tasks) / len(tasks)  # type: ignore[arg-type]
        entry["normalized"] = sum(normalized[label]) / len(normalized[label])
    return tasks, list(by_model.values())


def markdown(suite: str, tasks: list[str], rows: list[dict[str, object]], wall: str) -> str:
    head = ["model", "eta", *tasks, "absolute", "normalized"]
    lines = [f"### {suite}", "", wall, "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r["model"]), str(r["eta"])]
        cells += [f"{100 * float(r[t]):.1f}" for t in tasks]  # type: ignore[arg-type]
        cells += [f"{100 * float(r[k]):.1f}" for k in ("absolute", "normalized")]  # type: ignore[arg-type]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def update_doc(text: str, sections: list[str]) -> str:
    """Replace the "### <suite>" sections between the markers; a suite not in `sections`
    keeps its old section. Suites are ordered as in SUITES."""
    if BEGIN not in text or END not in text:
        raise ValueError(f"results.md lacks the {BEGIN} ... {END} markers")
    before, rest = text.split(BEGIN, 1)
    old, after = rest.split(END, 1)
    kept = {piece.split("\n", 1)[0].strip(): "### " + piece.strip()
            for piece in re.split(r"(?m)^### ", old) if piece.strip()}
    for s in sections:
        kept[s.split("\n", 1)[0].removeprefix("### ").strip()] = s
    body = "\n\n".join(kept[k] for k in SUITES if k in kept)
    return f"{before}{BEGIN}\n{body}\n{END}{after}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--suites", nargs="+", choices=SUITES, default=list(SUITES))
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "results_table")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs")
    parser.add_argument("--rerun", action="store_true", help="run suites whose results exist")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from fl_merge.results import atomic_write, atomic_write_text

    sections = []
    for suite in args.suites:
        run_dir = run_suite(suite, args.out.resolve(), args.rerun)
        tasks, rows = table(run_dir)
        csv_path = args.docs / f"results_{suite}.csv"
        fields = ["model", "eta", *tasks, "absolute", "normalized"]

        def write(tmp: Path, rows: list = rows, fields: list = fields) -> None:
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=fields)
                w.writeheader()
                w.writerows(rows)

        atomic_write(csv_path, write)
        sections.append(markdown(suite, tasks, rows, timing_line(run_dir)))
        print(sections[-1], flush=True)
    doc = args.docs / "results.md"
    atomic_write_text(doc, update_doc(doc.read_text(), sections))
    print(f"wrote {doc}")


if __name__ == "__main__":
    main()
