"""The config checked against theta0 before any process starts (fl_merge/config/base_fit.py):
a base-checkpoint's layout comes from its headers, and merge-keys or a client checkpoint that
does not fit it is one line."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from fl_merge.config.base_fit import base_layout, check_fits_base, theta0_layout
from fl_merge.config.run_config import ConfigError, RunConfig


@pytest.fixture
def base(tmp_path):
    path = tmp_path / "base.safetensors"
    save_file({"enc.w": torch.randn(2, 3).half(), "enc.b": torch.zeros(2), "cls.w": torch.ones(4),
               "step": torch.zeros((), dtype=torch.int64)}, str(path))
    return path


def test_a_base_checkpoints_layout_is_its_names_shapes_and_dtypes_without_its_weights(base):
    layout = base_layout(str(base))
    assert {k: (tuple(v.shape), v.dtype) for k, v in layout.items()} == {
        "enc.w": ((2, 3), torch.float16), "enc.b": ((2,), torch.float32),
        "cls.w": ((4,), torch.float32), "step": ((), torch.int64)}
    assert {v.device.type for v in layout.values()} == {"meta"}  # no data was read
    cfg = RunConfig(base_checkpoint=str(base), merge_keys="enc.*").resolve()
    assert theta0_layout(cfg).keys() == layout.keys()


def test_merge_keys_that_select_nothing_of_the_base_are_one_line(base):
    cfg = RunConfig(base_checkpoint=str(base), merge_keys="backbone.*").resolve()
    with pytest.raises(ConfigError) as e:
        check_fits_base(cfg, base_layout(str(base)))
    assert str(e.value).startswith("merge-keys ['backbone.*'] match none of the base model's parameters")
    assert "(step, cls.w, enc.b, enc.w)" in str(e.value) and "\n" not in str(e.value)
    ok = RunConfig(base_checkpoint=str(base), merge_keys="enc.*").resolve()
    assert set(check_fits_base(ok, base_layout(str(base)))) == {"enc.w", "enc.b"}


def test_a_client_checkpoint_whose_shapes_or_names_disagree_with_the_base_is_one_line(base, tmp_path):
    wrong_shape, wrong_names = tmp_path / "shape.safetensors", tmp_path / "names.safetensors"
    save_file({"enc.w": torch.zeros(3, 3), "enc.b": torch.zeros(2)}, str(wrong_shape))
    save_file({"other.w": torch.zeros(2, 3)}, str(wrong_names))
    common = dict(base_checkpoint=str(base), merge_keys="enc.*", num_clients=2)
    cfg = RunConfig(**common, client_checkpoints=f"{wrong_shape},").resolve()
    with pytest.raises(ConfigError, match=r"^client 0 \(rotate90\) checkpoint .*shape.safetensors: tensor "
                                          r"'enc.w' has shape \[3, 3\] but the model's 'enc.w' has \[2, 3\]"):
        check_fits_base(cfg, base_layout(str(base)))
    cfg = RunConfig(**common, client_checkpoints=f",{wrong_names}").resolve()
    with pytest.raises(ConfigError, match=r"^client 1 \(.*\) checkpoint .*names.safetensors: its tensor "
                                          r"names do not fit the model") as e:
        check_fits_base(cfg, base_layout(str(base)))
    assert "\n" not in str(e.value)


def test_the_registry_base_is_checked_by_its_layout(theta0):
    """Without base-checkpoint the layout is the registry's pretrained base (the session's
    cached one): the default merge-keys fit it, others are refused with its own names."""
    cfg = RunConfig().resolve()
    layout = theta0_layout(cfg, progress=False)
    assert {k: tuple(v.shape) for k, v in layout.items()} == {k: tuple(v.shape) for k, v in theta0.items()}
    assert set(check_fits_base(cfg, layout)) == set(theta0)  # every backbone.* parameter
    with pytest.raises(ConfigError, match=r"merge-keys \['encoder\.\*'\] match none .*\(backbone\."):
        check_fits_base(RunConfig(merge_keys="encoder.*").resolve(), layout)
