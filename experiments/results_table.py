"""The paper's table on our suites: base, individual fine-tuned and every merge method's test
accuracy (absolute and normalized) at the setting each method chose on validation (search=
paper, each method in its own units), with 95% paired-bootstrap CIs over test examples and
the difference against Task Arithmetic (fedavg), for vision8 and text. One seed.

    .venv/bin/python experiments/results_table.py                 # both suites
    .venv/bin/python experiments/results_table.py --suites vision8

Each suite is one run (SUITE_CONFIGS: the run config of configs/experiment/<suite>.yaml, with
the smaller search grid SEARCH) through the one run path; it trains every client once and
scores all methods on the same updates. Client updates come from the client-update cache when
they exist; a suite whose run directory already holds results is not rerun unless --rerun is
given. Writes docs/results_<suite>.csv, the plot docs/results_<suite>.png and the tables between the markers in docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUITES = ("vision8", "text")
# fedavg is Task Arithmetic (eta = K * lambda); hetero is our heterogeneity-aware weighting.
METHODS = ("fedavg", "fednova", "fedgma", "median", "cclip", "ties", "dare", "fisher", "hetero")
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


# Each suite's run config (the Flower keys of configs/experiment/<suite>.yaml) with a smaller
# validation search than the preset, so one run fits a shared 2-core machine: 7 lambdas in each
# method's own units instead of 9, FedGMA's rho over 0.3/0.5/0.7 instead of 0.1..0.9. The other
# knobs keep the literature grids (fl_merge/merging/search.py). Selection stays on validation.
SUITE_CONFIGS: dict[str, dict[str, object]] = {
    "vision8": {"model": "efficientnet-lite0", "suite": "vision8", "num-clients": 8,
                "local-steps": "200", "lr": "0.0005", "batch-size": "64"},
    "text": {"model": "minilm-l6", "suite": "text", "num-clients": 5,
             "local-steps": "100", "lr": "0.002", "batch-size": "32"},
}
SEARCH = {"search": "paper", "lambdas": "0.01,0.02,0.03,0.05,0.1,0.3,1",
          "method-params": "fedgma.rho=0.3|0.5|0.7"}


def suite_overrides(suite: str, seed: int = 0, prescreen: float = 0.0,
                    methods: tuple[str, ...] = METHODS) -> dict[str, object]:
    """The run-config overrides of one suite's table run: its preset, the search above,
    every method of METHODS, the seed; with `prescreen`, two-stage validation scoring
    (3 finalists per method; fl_merge/round/prescreen.py)."""
    two_stage = {"prescreen": prescreen, "finalists": 3} if prescreen else {}
    search = dict(SEARCH)
    if "fedgma" not in methods:  # its rho grid names it, and names only the methods run
        search.pop("method-params")
    return {**SUITE_CONFIGS[suite], **search, **two_stage, "method": ",".join(methods), "seed": seed}


def run_suite(suite: str, out: Path, rerun: bool, prescreen: float = 0.0,
              methods: tuple[str, ...] = METHODS) -> Path:
    """Run one suite into out/<suite> (unless its results exist and not `rerun`); the
    run's wall time goes to out/<suite>/wall.json."""
    sys.path.insert(0, str(ROOT / "experiments"))
    from _runner import run_point

    from fl_merge.io.results import write_json

    run_dir = out / suite
    if not rerun and (run_dir / "results.csv").exists() and (run_dir / "run.json").exists():
        print(f"[reuse] {run_dir}", flush=True)
        return run_dir
    if rerun and run_dir.exists():  # run_point would reuse the old results otherwise
        import shutil

        shutil.rmtree(run_dir)
    start = time.perf_counter()
    run_point(run_dir, suite_overrides(suite, prescreen=prescreen, methods=methods))
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
    from fl_merge.io.results import RESULTS_FILE, read_rows

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
        missing = [t for t in tasks if t not in entry]
        if missing:  # a client lost mid-run (run.log names it): no mean over fewer tasks
            raise SystemExit(f"{run_dir}: {label} has no test score for {', '.join(missing)} "
                             f"(a client was lost; see {run_dir / 'run.log'}): rerun with --rerun")
        entry["absolute"] = sum(float(entry[t]) for t in tasks) / len(tasks)  # type: ignore[arg-type]
        entry["normalized"] = sum(normalized[label]) / len(normalized[label])
    return tasks, list(by_model.values())


def comparison_cells(run_dir: Path) -> dict[str, tuple[str, str]]:
    """model -> (its test accuracy's 95% paired-bootstrap CI over test examples, its
    difference vs the reference with that CI; no significance mark: one seed, and the CI
    ignores training-seed and selection noise), from run.json `comparison`; labels as in `table` (base -> "base (linear probe)")."""
    meta = json.loads((run_dir / "run.json").read_text())
    out = {}
    for c in meta.get("comparison", []):
        label = "base (linear probe)" if c["model"] == "base" else str(c["model"])
        ci = f"[{100 * c['ci_low']:.1f}, {100 * c['ci_high']:.1f}]"
        if "diff" not in c:
            diff = ""
        elif c["model"] == c.get("reference"):
            diff = "(reference)"
        else:
            diff = f"{100 * c['diff']:+.1f} [{100 * c['diff_low']:+.1f}, {100 * c['diff_high']:+.1f}]"
        out[label] = (ci, diff)
    return out


def plot(suite: str, run_dir: Path, path: Path) -> None:
    """Two panels from run.json `comparison`: each model's mean test accuracy with its 95%
    paired-bootstrap CI over test examples, and each method's difference vs the reference
    (Task Arithmetic) with its CI. One seed, so no difference is marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    comp = json.loads((run_dir / "run.json").read_text())["comparison"]
    ref = comp[0].get("reference", "")
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 0.45 * len(comp) + 1.6))
    for ax, key in ((left, "accuracy"), (right, "diff")):
        lo, hi = (("ci_low", "ci_high") if key == "accuracy" else ("diff_low", "diff_high"))
        shown = [c for c in comp if key in c and (key == "accuracy" or c["model"] != ref)]
        ys = range(len(shown))
        vals = [100 * c[key] for c in shown]
        err = [[v - 100 * c[lo] for v, c in zip(vals, shown)], [100 * c[hi] - v for v, c in zip(vals, shown)]]
        ax.errorbar(vals, list(ys), xerr=err, fmt="o", capsize=3)
        ax.set_yticks(list(ys), [str(c["model"]) for c in shown])
        ax.invert_yaxis()
        ax.grid(alpha=0.3)
        if key == "diff":
            ax.axvline(0.0, color="grey", lw=0.8)
    left.set_xlabel("mean test accuracy over tasks (%), 95% CI")
    right.set_xlabel(f"accuracy - {ref} (points), paired 95% CI over test examples")
    fig.suptitle(f"{suite}: every method at its validation choice; one seed: no significance "
                 "marks", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(suite: str, tasks: list[str], rows: list[dict[str, object]], wall: str,
             cis: dict[str, tuple[str, str]] | None = None) -> str:
    """One suite's section; with `cis` (comparison_cells) two more columns: the CI of the
    absolute mean and the paired difference vs the reference."""
    cis = cis or {}
    ref = next((m for m, (_, d) in cis.items() if d == "(reference)"), "reference")
    head = ["model", "eta", *tasks, "absolute", "normalized"]
    if cis:
        head += ["absolute 95% CI", f"vs {ref} [95% CI]"]
    lines = [f"### {suite}", "", wall, ""]
    if cis:
        lines += ["One seed: no difference is marked. The CIs are paired bootstraps over test "
                  "examples only; they ignore training-seed and selection noise.", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r["model"]), str(r["eta"])]
        cells += [f"{100 * float(r[t]):.1f}" for t in tasks]  # type: ignore[arg-type]
        cells += [f"{100 * float(r[k]):.1f}" for k in ("absolute", "normalized")]  # type: ignore[arg-type]
        if cis:
            cells += list(cis.get(str(r["model"]), ("", "")))
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
    parser.add_argument("--prescreen", type=float, default=0.0,
                        help="score every candidate on this fraction of validation first (e.g. 0.25)")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="comma-separated methods (default: %(default)s)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from fl_merge.core.files import atomic_write_text
    from fl_merge.io.results import write_rows

    sections = []
    for suite in args.suites:
        run_dir = run_suite(suite, args.out.resolve(), args.rerun, args.prescreen,
                            tuple(args.methods.split(",")))
        tasks, rows = table(run_dir)
        csv_path = args.docs / f"results_{suite}.csv"
        write_rows(csv_path, rows, columns=["model", "eta", *tasks, "absolute", "normalized"])
        plot(suite, run_dir, args.docs / f"results_{suite}.png")
        sections.append(markdown(suite, tasks, rows, timing_line(run_dir), comparison_cells(run_dir))
                        + f"\n\n![{suite}: methods against Task Arithmetic](results_{suite}.png)")
        print(sections[-1], flush=True)
    doc = args.docs / "results.md"
    atomic_write_text(doc, update_doc(doc.read_text(), sections))
    print(f"wrote {doc}")


if __name__ == "__main__":
    main()
