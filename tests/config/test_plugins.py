"""A user's own merge methods, tasks and models by import path (fl_merge/config/plugins.py): parsed,
registered once per process, checked before training, reachable from Hydra's ``_target_``."""

from __future__ import annotations

import itertools
import re
import textwrap

import pytest
import torch

from fl_merge.config.run_config import ConfigError, RunConfig
from fl_merge.config.plugins import Plugin, PluginError, from_hydra, load_plugins, parse_plugins

_counter = itertools.count()

PLUGIN_SOURCE = '''
import torch
from torch import nn
from torch.utils.data import TensorDataset
from fl_merge.tasks.registry import TaskData


def absmax(stacked, weights, keep=1.0):
    """Per coordinate, the client value of largest magnitude, times keep."""
    idx = stacked.abs().argmax(dim=0, keepdim=True)
    return keep * stacked.gather(0, idx)[0]


def first_only(task_vectors, weights, scale=1.0):
    return {k: scale * v for k, v in task_vectors[0].items()}


def no_weights(stacked, alpha=1.0):
    return stacked.mean(0)


def needs_value(stacked, weights, alpha):
    return stacked.mean(0)


def blobs(seed, sizes):
    g = torch.Generator().manual_seed(seed)
    def split(n):
        y = torch.arange(n) % 2
        x = torch.randn(n, 1, 28, 28, generator=g) + (2 * y - 1).view(-1, 1, 1, 1).float()
        return TensorDataset(x, y)
    return TaskData("blobs", 2, split(40), split(20), split(20))


def words(seed, sizes):
    return None
words.input_kind = "text"


def not_a_task(seed):
    return None


class Tiny(nn.Module):
    feature_dim = 6

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(784, 6))

    def forward(self, x):
        return self.net(x)


def tiny():
    return Tiny()


def dimless():
    return nn.Linear(2, 2)
'''


@pytest.fixture
def plugin_module(tmp_path, monkeypatch):
    """A fresh plugin module (its own name: registrations never collide across tests) on
    sys.path, and the registries restored afterwards."""
    from fl_merge.tasks import registry as tasks
    from fl_merge.models import registry as models
    from fl_merge.merging import registry

    name = f"user_plugins_{next(_counter)}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(PLUGIN_SOURCE))
    monkeypatch.syspath_prepend(str(tmp_path))
    tables = (tasks.TASKS, tasks.TASK_KINDS, models.MODELS)
    saved = [dict(table.data) for table in tables]
    methods = dict(registry._METHODS)
    yield name
    for table, entries in zip(tables, saved):
        table.data = entries
    registry._METHODS.clear()
    registry._METHODS.update(methods)


def test_items_parse_in_every_form_and_a_bad_one_names_the_forms():
    assert parse_plugins("method:m=a.b, task:t=c.d  model:x=e.f mypkg.registrations") == [
        Plugin("method", "m", "a.b"), Plugin("task", "t", "c.d"), Plugin("model", "x", "e.f"),
        Plugin("module", "", "mypkg.registrations")]
    assert parse_plugins(["method:m=a.b", "method:m=a.b"]) == [Plugin("method", "m", "a.b")]
    assert parse_plugins("") == []
    for bad in ("task:x", "widget:x=a.b", "method:=a.b", "method:m="):
        with pytest.raises(PluginError, match=f"plugin '{bad}' is not one of method:<name>="):
            parse_plugins(bad)


def test_a_coordinatewise_plugin_method_merges_like_its_formula(plugin_module):
    from fl_merge.methods import get_method, merge

    load_plugins(f"method:absmax_{plugin_module}=" + f"{plugin_module}.absmax")
    name = f"absmax_{plugin_module}"
    assert get_method(name).coordinatewise and get_method(name).params == {"keep": 1.0}
    tvs = [{"w": torch.tensor([1.0, -5.0, 0.5])}, {"w": torch.tensor([-2.0, 3.0, 0.25])}]
    out = merge(name, tvs, keep=0.5)
    assert torch.allclose(out["w"], torch.tensor([-1.0, -2.5, 0.25]))  # hand: 0.5 * [-2, -5, 0.5]
    load_plugins(f"method:{name}={plugin_module}.absmax")  # again: nothing happens


def test_a_whole_vector_plugin_method_and_the_run_config_accepts_it(plugin_module):
    from fl_merge.methods import get_method, merge

    name = f"first_{plugin_module}"
    cfg = RunConfig(plugins=f"method:{name}={plugin_module}.first_only", method=f"fedavg,{name}",
                    method_params=f"{name}.scale=2", num_clients=2).resolve()
    assert cfg.methods == [("fedavg", {}), (name, {"scale": 2.0})]
    assert not get_method(name).coordinatewise
    out = merge(name, [{"w": torch.ones(2)}, {"w": torch.zeros(2)}], scale=3.0)
    assert torch.equal(out["w"], torch.full((2,), 3.0))
    assert cfg.task_config()["plugins"] == f"method:{name}={plugin_module}.first_only"


@pytest.mark.parametrize("item, message", [
    ("method:bad={m}.no_weights", r"a merge function takes \(stacked, weights, \*\*params\).*got \(stacked, alpha=1.0\)"),
    ("method:bad={m}.needs_value", r"every hyper-parameter with a default; got \(stacked, weights, alpha\)"),
    ("method:fedavg={m}.absmax", "merge method 'fedavg' is already registered"),
    ("method:bad={m}.nothing_here", r"cannot import '{m}.nothing_here' \(.*\); give an import path"),
    ("method:bad=no_such_pkg_xyz.fn", r"cannot import 'no_such_pkg_xyz.fn' \(No module named 'no_such_pkg_xyz'\)"),
    ("task:bad={m}.not_a_task", r"a task builder takes \(seed, sizes\).*got \(seed\)"),
    ("task:rotate90={m}.blobs", "task 'rotate90' is already registered"),
    ("model:bad={m}.dimless", "positive int feature_dim.*got Linear with feature_dim=None"),
    ("model:bad={m}.blobs", r"a model builder takes no arguments.*got \(seed, sizes\)"),
    ("model:bad={m}.Tiny.feature_dim", r"'{m}.Tiny.feature_dim' is not a function \(it is int 6\)"),
])
def test_bad_plugins_are_one_line_before_training(plugin_module, item, message):
    item = item.format(m=plugin_module)
    with pytest.raises(ConfigError, match=f"^plugin '{re.escape(item)}': .*" + message.format(m=plugin_module)) as e:
        RunConfig(plugins=item).resolve()
    assert "\n" not in str(e.value)


def test_plugin_task_and_model_register_with_their_input_kinds(plugin_module):
    from fl_merge.tasks.registry import TASK_KINDS, load_task
    from fl_merge.models.registry import build_model, get_model_spec

    m = plugin_module
    cfg = RunConfig(plugins=f"task:blobs_{m}={m}.blobs model:tiny_{m}={m}.tiny", model=f"tiny_{m}",
                    tasks=f"blobs_{m},rotate90", num_clients=2).resolve()
    assert cfg.tasks == [f"blobs_{m}", "rotate90"]
    spec = get_model_spec(f"tiny_{m}")
    assert (spec.feature_dim, spec.input_kind) == (6, "image")
    task = load_task(f"blobs_{m}", 3)
    assert task.num_classes == 2 and len(task.train) == 40
    assert build_model(f"tiny_{m}", 2)(task.train.tensors[0]).shape == (40, 2)
    # a text task (input_kind on the builder) does not fit an image model, before training
    with pytest.raises(ConfigError, match=f"model 'tiny_{m}' reads image inputs but task.*words_{m}.*text"):
        RunConfig(plugins=f"task:words_{m}={m}.words model:tiny_{m}={m}.tiny", model=f"tiny_{m}",
                  tasks=f"words_{m}", num_clients=1).resolve()
    assert TASK_KINDS[f"words_{m}"] == "text"
    with pytest.raises(TypeError, match=f"task 'words_{m}' .*returned a NoneType, not fl_merge.tasks.registry.TaskData"):
        load_task(f"words_{m}", 0)


def test_hydra_targets_become_plugin_items():
    data = {"method": {"_target_": "pkg.merges.my_merge", "name": "mine", "alpha": 0.5},
            "model": {"_target_": "pkg.models.tiny", "name": None, "pretrain_steps": None},
            "data": {"name": "tasks", "tasks": ["rotate90", {"_target_": "pkg.tasks.blobs"},
                                                {"_target_": "pkg.tasks.blobs", "name": "b2"}]}}
    out, items = from_hydra(data)
    assert items == ["method:mine=pkg.merges.my_merge", "model:tiny=pkg.models.tiny",
                     "task:blobs=pkg.tasks.blobs", "task:b2=pkg.tasks.blobs"]
    assert out["method"] == {"name": "mine", "alpha": 0.5}
    assert out["model"] == {"name": "tiny", "pretrain_steps": None}
    assert out["data"]["tasks"] == ["rotate90", "blobs", "b2"]
    assert "_target_" in data["method"]  # the input is left as it was
    # a mapping without _target_ is a task from data (docs/data.md), left for its own parser
    csv = {"format": "csv", "path": "/d/bbc.csv", "input": "text", "label": "category"}
    out, items = from_hydra({"data": {"tasks": [csv, {"_target_": "pkg.tasks.blobs"}]}})
    assert out["data"]["tasks"] == [csv, "blobs"] and items == ["task:blobs=pkg.tasks.blobs"]
    with pytest.raises(PluginError, match="a task plugin takes _target_ and name only"):
        from_hydra({"data": {"tasks": [{"_target_": "pkg.tasks.blobs", "size": 3}]}})
    # several methods: the plugin registers under its own name, which must be listed
    _, items = from_hydra({"method": {"_target_": "pkg.my_merge", "name": ["fedavg", "my_merge"]}})
    assert items == ["method:my_merge=pkg.my_merge"]
    with pytest.raises(PluginError, match="registers 'my_merge', which method.name .* does not list"):
        from_hydra({"method": {"_target_": "pkg.my_merge", "name": ["fedavg", "ties"]}})
    with pytest.raises(PluginError, match="method._target_ must be an import path"):
        from_hydra({"method": {"_target_": 3, "name": "x"}})


def test_fl_merge_cli_maps_target_overrides_to_the_run_config(plugin_module):
    from fl_merge.cli.mapping import plan

    m = plugin_module
    (job,) = plan([f"+method._target_={m}.absmax", f"method.name=am_{m}", "+method.keep=0.25",
                   f"model._target_={m}.tiny", f"model.name=tiny_{m}"], False)
    assert job.run.method == f"am_{m}" and job.run.method_params == f"am_{m}.keep=0.25"
    assert job.run.model == f"tiny_{m}"
    assert sorted(job.run.plugins.split(",")) == sorted([f"method:am_{m}={m}.absmax",
                                                         f"model:tiny_{m}={m}.tiny"])
    with pytest.raises(ConfigError, match=r"plugin 'model:mnist-cnn=.*': model 'mnist-cnn' is already registered"):
        plan([f"model._target_={m}.tiny"], False)


def test_a_plugin_model_and_task_learn_coefficients_through_the_client_handler(plugin_module,
                                                                              message_identity):
    """A client process that has not registered the run's plugins (a Ray worker, a SuperNode)
    answers the learned-coefficient message for a plugin model on a plugin task: the handler
    registers them from the message's config, and its gradient and score are the ones
    written out here by hand (aTLAS: d/d lambda of the cross-entropy of theta0 + sum lambda_i
    tau_i on the even half of validation; accuracy on the odd half)."""
    import importlib

    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

    import fl_merge_clients.client_app as client_app
    from fl_merge.models.registry import MODELS
    from fl_merge.round import coefficients as coef
    from fl_merge.tasks.registry import TASKS

    m = plugin_module
    assert f"tiny_{m}" not in MODELS and f"blobs_{m}" not in TASKS  # this process knows neither
    g = torch.Generator().manual_seed(0)
    keys = ("backbone.net.1.weight", "backbone.net.1.bias")
    theta0 = {keys[0]: 0.05 * torch.randn(6, 784, generator=g), keys[1]: 0.1 * torch.randn(6, generator=g),
              "head.weight": torch.randn(2, 6, generator=g), "head.bias": torch.randn(2, generator=g)}
    taus = [{k: 0.05 * torch.randn(theta0[k].shape, generator=g) for k in keys} for _ in range(2)]
    lam = torch.tensor([[0.3, 0.7], [0.5, -0.2]], dtype=torch.float64)  # K=2 vectors x B=2 blocks (tensors)
    config = {"model": f"tiny_{m}", "tasks": [f"blobs_{m}", "rotate90"], "data-seed": 3, "data": "tasks",
              "plugins": f"task:blobs_{m}={m}.blobs model:tiny_{m}={m}.tiny", "seed": [0, 1],
              **coef.request_config(lam, [(keys[0],), (keys[1],)], "supervised", with_vectors=True)}
    msg = Message(RecordDict({"config": ConfigRecord(config), coef.BASE: ArrayRecord(theta0),
                              **{f"{coef.VECTOR_PREFIX}{i}": ArrayRecord(t) for i, t in enumerate(taus)}}),
                  dst_node_id=1, message_type="query")
    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    reply = client_app.coefficients(msg, ctx).content["metrics"]

    # the reference: the plugin's own data, theta(lambda) and the model's formula in float64
    x, y = importlib.import_module(m).blobs(3, None).val.tensors
    x = x.reshape(len(x), -1).double()
    lam_leaf = lam.clone().requires_grad_(True)
    w, b = (theta0[k].double() + sum(lam_leaf[i, j] * taus[i][k].double() for i in range(2))
            for j, k in enumerate(keys))

    def logits(rows):
        return (rows @ w.T + b) @ theta0["head.weight"].double().T + theta0["head.bias"].double()

    torch.nn.functional.cross_entropy(logits(x[0::2]), y[0::2]).backward()
    expected_acc = float((logits(x[1::2]).argmax(1) == y[1::2]).double().mean())
    assert reply[coef.GRAD] == pytest.approx(lam_leaf.grad.reshape(-1).tolist(), rel=1e-4, abs=1e-6)
    assert reply[coef.SCORE] == pytest.approx(expected_acc)
    assert reply["num-examples"] == 10 and reply["partition-id"] == 0
