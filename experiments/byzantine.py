"""Experiment (c): normalized accuracy of the honest clients vs the number of Byzantine
clients f = 0..3 of K = 8, for two attacks and seven aggregators.

One task (rotate90) split IID over K=8 clients (the setting robust aggregators were built
for); the last f clients attack after honest training: `sign_flip` with scale 4 (each sends
-4 tau_i) and `alie` (colluding, mu - z sigma of their own updates, Baruch et al. 2019).
Every point reuses the same honest client updates from the client-update cache (attacks are
applied after training), so only the first point trains. Accuracy is the mean over the
honest clients of test accuracy / fine-tuned accuracy at the eta chosen on validation.
Writes docs/byzantine.png and docs/byzantine.csv.

    .venv/bin/python experiments/byzantine.py [--out outputs/byzantine]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from _runner import ROOT, run_point

from fl_merge.io.results import write_rows

METHODS = "fedavg,median,trimmed_mean,cclip,krum,geometric_median,ties"
# Robust settings for up to f=3 of 8: trim 3 per side, Krum tolerating 2 (K > 2f+2 needs
# f <= 2 at K=8), clipping around the coordinate-wise median.
PARAMS = "trimmed_mean.beta=0.375 krum.f=2 cclip.center=median"
ATTACKS = {"sign_flip": "scale=4", "alie": ""}
FS = [0, 1, 2, 3]
K = 8


def honest_scores(run_dir: Path) -> dict[str, float]:
    """method -> mean normalized test accuracy over honest clients at the chosen eta."""
    from fl_merge.io.results import RESULTS_FILE, read_rows

    out: dict[str, list[float]] = {}
    for r in read_rows(run_dir / RESULTS_FILE):
        if (r["split"] == "test" and r["model"] == "merged" and r["selected"] is True
                and r["attacker"] is not True):
            out.setdefault(str(r["method"]), []).append(float(r["normalized_accuracy"]))
    return {m: sum(v) / len(v) for m, v in out.items()}


def base_score(run_dir: Path) -> float:
    """Mean normalized test accuracy of the pretrained base (eta 0) over honest clients."""
    from fl_merge.io.results import RESULTS_FILE, read_rows

    rows = [r for r in read_rows(run_dir / RESULTS_FILE) if r["split"] == "test"
            and r["model"] == "base" and r["attacker"] is not True]
    first = rows[0]["method"]
    vals = [float(r["normalized_accuracy"]) for r in rows if r["method"] == first]
    return sum(vals) / len(vals)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "byzantine")
    args = parser.parse_args()
    common = {"data": "iid", "partition-task": "rotate90", "num-clients": K, "method": METHODS,
              "method-params": PARAMS, "etas": "0.25,0.5,1,1.5,2,3"}
    points = []  # (attack, f, method, score)
    clean = run_point(args.out.resolve() / "f0", common)
    for attack, params in ATTACKS.items():
        for f in FS:
            run = clean if f == 0 else run_point(
                args.out.resolve() / f"{attack}-f{f}",
                {**common, "attack": attack, "attackers": f"last:{f}", "attack-params": params})
            points += [(attack, f, m, s) for m, s in honest_scores(run).items()]
    csv_path = ROOT / "docs" / "byzantine.csv"
    write_rows(csv_path, [{"attack": a, "f": f, "method": m, "honest_normalized_accuracy": f"{s:.4f}"}
                          for a, f, m, s in points])
    base = base_score(clean)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(ATTACKS), figsize=(11, 4.2), sharey=True)
    for ax, (attack, params) in zip(axes, ATTACKS.items()):
        for i, method in enumerate(METHODS.split(",")):
            pts = sorted((f, s) for a, f, m, s in points if a == attack and m == method)
            ax.plot([f for f, _ in pts], [s for _, s in pts], marker="o", color=f"C{i}", label=method)
        ax.set_title(f"{attack} {params}".strip() + f" (last f of K={K} clients)")
        ax.set_xlabel("Byzantine clients f")
        ax.set_xticks(FS)
        ax.axhline(1.0, color="gray", lw=0.8, ls=":")
        ax.axhline(base, color="black", lw=1, ls="--", label="base (no merge)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("normalized test accuracy (honest clients)")
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    png = ROOT / "docs" / "byzantine.png"
    fig.savefig(png, dpi=110)
    print(f"wrote {png} and {csv_path}")
    print(f"base (eta 0) {base:.3f}")
    for a, f, m, s in points:
        print(f"{a:10s} f={f} {m:17s} {s:.3f}")


if __name__ == "__main__":
    main()
