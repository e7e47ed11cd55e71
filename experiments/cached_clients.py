"""Before a long run: which of its clients' updates are already in the client-update cache
(those will not train). Same run-config items as fl-merge-run; exit 0 when every client is
cached, 1 otherwise.

    python experiments/cached_clients.py model=minilm-l6 suite=text num-clients=5 \\
        local-steps=100 lr=0.002 batch-size=32 seed=0 method=task_arithmetic,ties,fisher

The training message carries the extras the methods ask for (a fisher method: the clients'
Fisher), and those are part of the cache key: a run without such a method trains again.
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    from fl_merge_clients.client_app import cached_clients
    from fl_merge.config.run_config import RunConfig
    from fl_merge.cli.launch import _parse_run_config
    from fl_merge.round.merging import label_methods, train_requests
    from fl_merge_strategies.server_app import load_theta0

    cfg = RunConfig.from_flower(_parse_run_config(argv)).resolve()
    config = {**cfg.train_config(), **train_requests(label_methods(cfg.methods), True)}
    cached = cached_clients(config, load_theta0(cfg))
    for task, hit in zip(config["tasks"], cached):
        print(f"{task}: {'cached' if hit else 'would train'}")
    return 0 if all(cached) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
