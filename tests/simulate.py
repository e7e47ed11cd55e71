"""One fl-merge round in Flower's in-process simulation engine, for the tests that need a
real round: the ServerApp runs `run_one_shot` on a resolved config with our ClientApp."""

from __future__ import annotations

from typing import Any


def simulate_round(cfg: Any, num_supernodes: int, client_app: Any = None) -> Any:
    """Run `cfg` (a ResolvedConfig) on `num_supernodes` simulated clients (one CPU each), with
    fl-merge's ClientApp or `client_app` (a flwr ClientApp of the test's own); returns the
    round's MergeRound. Fails the test when the ServerApp did not finish."""
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from fl_merge_strategies.server_app import run_one_shot

    if client_app is None:
        from fl_merge_clients.client_app import app as client_app

    holder: dict[str, Any] = {}
    app = ServerApp()

    @app.main()
    def main(grid, context) -> None:
        holder["round"] = run_one_shot(grid, cfg, run_id=context.run_id)

    run_simulation(app, client_app, num_supernodes=num_supernodes,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    assert "round" in holder, "the ServerApp did not finish"
    return holder["round"]
