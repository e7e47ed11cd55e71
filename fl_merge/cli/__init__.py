"""`fl-merge` (also `python -m fl_merge`): Hydra runs and sweeps of one-shot merging.

    fl-merge method=ties method.density=0.3                     # one run
    fl-merge method.name=[fedavg,ties,median] eval.etas=[0.5,1,2]   # 3 methods, one training pass
    fl-merge -m method=fedavg,ties data=dirichlet data.alpha=0.1,1.0 seed=0,1   # 8 jobs
    fl-merge report multirun/2026-01-01/12-00-00              # best settings + plots
    fl-merge merge --base B --models M1 M2 --method ties --lambda 0.6 --out merged.safetensors

The package by concern:

* `fl_merge.cli.mapping`: the config tree (``configs/``) -> Flower run config -> a
  validated job (`to_flower`, `build_job`, `plan`);
* `fl_merge.cli.hydra_app`: Hydra's app; each job runs through `fl_merge.engine.run.run`, the one
  run path shared with `fl-merge-run`, the experiments and the benchmarks;
* `fl_merge.cli.report_cli`: `fl-merge report`;
* `fl_merge.cli.merge`: `fl-merge merge`, checkpoint files merged without Flower;
* `fl_merge.cli.launch`: `fl-merge-run`, one run through `flwr run`.

May import: every package of fl_merge (it is the top).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from fl_merge.cli.mapping import (  # noqa: F401  (the names tests and scripts use)
    CLI_OPTIONS,
    CONFIG_DIR,
    CONFIG_NAME,
    GROUP_FIELDS,
    Job,
    build_job,
    expand,
    plan,
    run_config_fields,
    to_flower,
)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "report":
        from fl_merge.cli.report_cli import main as report_main

        return report_main(argv[1:])
    if argv and argv[0] == "merge":
        from fl_merge.cli.merge import main as merge_main

        return merge_main(argv[1:])
    from fl_merge.cli.hydra_app import main as hydra_main

    return hydra_main(argv)
