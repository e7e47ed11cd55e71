"""docs/extending.md runs as written: its `my_plugins.py` blocks make the module, its Python
blocks run in order (one Flower simulation in all, with the plugin method, task and model
together), its commands and its Hydra snippet resolve."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "extending.md"
FENCE = re.compile(r"^```(\S*)[ \t]*(\S*)\n(.*?)^```", re.S | re.M)


def blocks() -> list[tuple[str, str, str]]:
    """(language, file tag, code) of every fenced block, in order."""
    return [(m.group(1), m.group(2), m.group(3)) for m in FENCE.finditer(DOC.read_text())]


def test_the_page_has_one_worked_example_of_each_kind():
    code = "".join(c for lang, tag, c in blocks() if tag == "my_plugins.py")
    for name in ("def sign_mean(stacked, weights", "def stripes(seed", "def tiny_cnn()"):
        assert name in code
    runs = [c for lang, tag, c in blocks() if lang == "python" and not tag]
    assert sum("run(cfg" in c for c in runs) == 1  # one Flower simulation in all


@pytest.fixture
def registries():
    """Registrations the page makes stay in the test."""
    from fl_merge.tasks import registry as tasks
    from fl_merge.models import registry as models
    from fl_merge.merging import registry

    tables = (tasks.TASKS, tasks.TASK_KINDS, models.MODELS)
    saved = [dict(t.data) for t in tables]
    methods = dict(registry._METHODS)
    yield
    for t, entries in zip(tables, saved):
        t.data = entries
    registry._METHODS.clear()
    registry._METHODS.update(methods)


def _resolve(line: str) -> None:
    """A documented command resolved as its CLI would before running anything."""
    from fl_merge import cli
    from fl_merge.cli.launch import resolve_args

    argv = shlex.split(line)
    assert argv[0] == "PYTHONPATH=.", line
    prog, args = argv[1], argv[2:]
    if prog == "fl-merge-run":
        resolve_args(args)
    else:
        assert prog == "fl-merge", line
        (job,) = cli.plan(args, False)
        assert "method:sign_mean=my_plugins.sign_mean" in job.run.plugins
        assert job.run.tasks == "stripes,rotate90" and job.run.model == "tiny-cnn"


def test_the_examples_run(tmp_path, monkeypatch, registries):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from fl_merge.cli.mapping import CONFIG_DIR, CONFIG_NAME, build_job

    all_blocks = blocks()
    (tmp_path / "my_plugins.py").write_text(
        "".join(code for _, tag, code in all_blocks if tag == "my_plugins.py"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    # the run's child process and its Ray workers import my_plugins too
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    namespace: dict = {}
    for lang, tag, code in all_blocks:
        if lang == "python" and not tag:
            exec(compile(code, f"{DOC.name} block", "exec"), namespace)  # noqa: S102
    outcome = namespace["outcome"]
    chosen = [r for r in outcome.rows if r["model"] == "merged" and r["split"] == "test" and r["selected"] is True]
    assert {(r["method"], r["task"]) for r in chosen} == {
        (m, t) for m in ("task_arithmetic", "sign_mean") for t in ("stripes", "rotate90")}
    # the plugin model learnt the plugin task and the built-in one (chance: 0.5 and 0.1) ...
    tuned = {r["task"]: r["accuracy"] for r in outcome.rows if r["model"] == "finetuned" and r["split"] == "test"}
    assert tuned["stripes"] > 0.9 and tuned["rotate90"] > 0.5, tuned
    # ... and each method's merge, at its validation choice, beats theta0 on mean test accuracy
    base = [r["accuracy"] for r in outcome.rows if r["model"] == "base" and r["split"] == "test"
            and r["method"] == "sign_mean"]
    for method in ("task_arithmetic", "sign_mean"):
        merged = [r["accuracy"] for r in chosen if r["method"] == method]
        assert sum(merged) / 2 > sum(base) / 2, (method, merged, base)
    assert outcome.meta["config"]["plugins"].startswith("method:sign_mean=my_plugins.sign_mean")
    # both commands and the Hydra snippet resolve (no second run)
    commands = [line for lang, _, code in all_blocks if lang == "bash" for line in code.splitlines() if line]
    assert len(commands) == 2
    for line in commands:
        _resolve(line)
    (snippet,) = [code for lang, _, code in all_blocks if lang == "yaml"]
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3", job_name="extending"):
        cfg = compose(CONFIG_NAME, overrides=["model._target_=my_plugins.tiny_cnn", "model.name=tiny-cnn",
                                              "data.tasks=[stripes,rotate90]", "num_clients=2",
                                              "plugins='task:stripes=my_plugins.stripes'"])
    OmegaConf.set_struct(cfg, False)
    cfg.method = OmegaConf.create(snippet).method
    job = build_job(cfg)
    assert job.run.method == "sign_mean"
    assert set(job.run.plugins.split(",")) == {"task:stripes=my_plugins.stripes",
                                               "method:sign_mean=my_plugins.sign_mean",
                                               "model:tiny-cnn=my_plugins.tiny_cnn"}


def _method_file_blocks() -> tuple[str, str]:
    """(the method file, its test) of the section "Add a method"."""
    (method,) = [c for lang, tag, c in blocks() if tag == "fl_merge/methods/steps_mean.py"]
    (test,) = [c for lang, tag, c in blocks() if tag == "tests/methods/test_steps_mean.py"]
    return method, test


def test_a_method_file_on_the_path_is_seen_everywhere(tmp_path, monkeypatch, registries):
    """The page's method file, put on the path and imported (which registers it), is searched
    with its declared space, scoped by `fl-merge merge`, has a Hydra method config and a row in
    the docs' table, and its test passes: no other file touched."""
    import torch

    from fl_merge.cli.schema import method_configs
    from fl_merge.config.plugins import load_plugins
    from fl_merge.core.task_vectors import MergeInputError
    from fl_merge.io.file_merge import check_merge_inputs, method_scope
    from fl_merge.merging.method_table import method_table
    from fl_merge.merging.search import expand, knob_grids
    from fl_merge.round.merging import train_requests

    method, test = _method_file_blocks()
    (tmp_path / "steps_mean_method.py").write_text(method)
    monkeypatch.syspath_prepend(str(tmp_path))
    load_plugins("steps_mean_method")  # a bare module item: its register(...) runs at import
    assert knob_grids("steps_mean", {}) == {"power": (0.0, 0.5, 1.0)}
    taus = [{"w": torch.ones(2)}, {"w": torch.zeros(2)}]
    settings = expand("steps_mean", {}, knob_grids("steps_mean", {}), taus)
    assert [s["power"] for s in settings] == [0.0, 0.5, 1.0]
    assert method_scope("steps_mean") == "exact"
    with pytest.raises(MergeInputError, match="needs each model's local step count"):
        check_merge_inputs("steps_mean", {}, 2)
    # fl-merge merge runs it on files: theta0 + eta * sum_i t_i tau_i / sum_i t_i (power 1)
    from safetensors.torch import load_file, save_file

    from fl_merge.io.file_merge import merge_files

    base, models = torch.tensor([1.0, 2.0]), [torch.tensor([2.0, 2.0]), torch.tensor([1.0, 6.0])]
    save_file({"w": base}, str(tmp_path / "base.safetensors"))
    for i, m in enumerate(models):
        save_file({"w": m}, str(tmp_path / f"m{i}.safetensors"))
    merge_files(tmp_path / "base.safetensors", [tmp_path / "m0.safetensors", tmp_path / "m1.safetensors"],
                "steps_mean", 0.5, tmp_path / "out.safetensors", local_steps=[1, 3])
    # taus (1, 0) and (0, 4) weighted 1/4 and 3/4: Delta (0.25, 3), theta0 + 0.5 Delta
    assert load_file(str(tmp_path / "out.safetensors"))["w"].tolist() == [1.125, 3.5]
    assert method_configs()["steps_mean"] == {"name": "steps_mean", "power": 1.0}
    assert train_requests({"s": ("steps_mean", {})}, False) == {}
    row = next(line for line in method_table().splitlines() if line.startswith("| `steps_mean`"))
    assert "power in 0.0, 0.5, 1.0" in row and "local steps" in row and "ours (an example)" in row
    namespace: dict = {}
    exec(compile(test, "test_steps_mean.py", "exec"), namespace)  # noqa: S102
    for power in (0.0, 0.5, 1.0):
        namespace["test_steps_mean_is_the_step_weighted_mean"](power)
    namespace["test_steps_mean_needs_local_steps"]()
    # named as a plugin function under another name, it keeps every declaration
    load_plugins("method:weighted_by_steps=steps_mean_method.steps_mean")
    assert knob_grids("weighted_by_steps", {}) == {"power": (0.0, 0.5, 1.0)}
    assert method_configs()["weighted_by_steps"] == {"name": "weighted_by_steps", "power": 1.0}
    assert "| `weighted_by_steps`" in method_table()
