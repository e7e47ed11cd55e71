"""How a node (simulated or a deployed SuperNode) finds its task and its cache from --node-config."""

from pathlib import Path
from types import SimpleNamespace

import pytest
from flwr.app import ConfigRecord

from fl_merge_clients.client_app import _cache_dir, _partition_id

RUN = ConfigRecord({"tasks": ["mnist-rot15", "mnist-inv", "digits"]})


def node(**cfg):
    return SimpleNamespace(node_config=cfg)


def test_partition_id_from_node_config():
    assert _partition_id(node(**{"partition-id": 2, "num-partitions": 3}), RUN) == 2


def test_task_name_picks_its_position_in_the_run():
    assert _partition_id(node(task="mnist-inv"), RUN) == 1


def test_task_not_in_run_is_named():
    with pytest.raises(ValueError, match="'mnist-far' is not one of this run's tasks"):
        _partition_id(node(task="mnist-far"), RUN)


def test_num_partitions_must_match_the_run():
    with pytest.raises(ValueError, match="num-partitions=2 but the run has 3 clients"):
        _partition_id(node(**{"partition-id": 0, "num-partitions": 2}), RUN)


def test_missing_partition_id_says_how_to_set_it():
    with pytest.raises(ValueError, match="--node-config 'partition-id=<i> num-partitions=<K>'"):
        _partition_id(node(), RUN)


def test_cache_dir_is_node_local(tmp_path):
    assert _cache_dir(node(**{"cache-dir": str(tmp_path)})) == tmp_path
    assert _cache_dir(node()) is None
    assert _cache_dir(node(**{"cache-dir": "~/c"})) == Path("~/c").expanduser()


def test_eta_grids_per_delta():
    from fl_merge_clients.grid_scoring import eta_grids

    assert eta_grids(ConfigRecord({"etas": [0.0, 1.0]}), 2) == [[0.0, 1.0], [0.0, 1.0]]
    cfg = ConfigRecord({"etas": [0.0, 1.0, 0.0, 2.5, 3.0], "etas-per-delta": [2, 3]})
    assert eta_grids(cfg, 2) == [[0.0, 1.0], [0.0, 2.5, 3.0]]
    with pytest.raises(ValueError, match=r"etas-per-delta \[2, 2\] does not split 5 etas over 2 deltas"):
        eta_grids(ConfigRecord({"etas": [0.0, 1.0, 0.0, 2.5, 3.0], "etas-per-delta": [2, 2]}), 2)
