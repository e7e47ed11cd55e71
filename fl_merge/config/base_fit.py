"""Does a resolved config fit its base model theta0? The checks that need theta0's names and
shapes: `merge-keys` select some of its parameters, LiNeS's pattern finds its layers, the
SVD / least-squares methods find a 2-D weight, every tensor (and RegMean's Gram matrices)
fits one chunked message (`chunk-mib`), and run-config `client-checkpoints` have its names and shapes (and step
information where a method needs it).

One function, `check_fits_base`, run before any process starts (so a mistake is one line,
exit 2, no SuperLink): by `fl_merge.engine.run.run` on the base it pretrains or loads anyway
(`fl-merge-run`), by `fl_merge.cli.mapping.plan` for every job of a Hydra command; and again
by the ServerApp on the theta0 it loads (a run started with a bare `flwr run .` has no
earlier check). Only names, shapes and dtypes are read: `base_layout` gives them for a
`base-checkpoint` from its safetensors headers, as tensors on the ``meta`` device, without
reading any weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fl_merge.config.parsing import ConfigError
from fl_merge.core.safetensors_writer import DTYPES
from fl_merge.core.task_vectors import MergeInputError, vector_dtype
from fl_merge.io.checkpoints import Checkpoint
from fl_merge.io.client_checkpoints import CheckpointClientError, check_client_checkpoints
from fl_merge.merging.registry import check_model_fits, get_method
from fl_merge.round.base import ROLE
from fl_merge.round.candidates import check_lines_layers
from fl_merge.round.chunks import ChunkSizeError, check_grams_fit, chunk_groups, chunk_limit
from fl_merge.round.keys import MergeKeysError, check_merge_keys, key_matcher

if TYPE_CHECKING:
    from fl_merge.config.run_config import ResolvedConfig


def base_layout(path: str) -> dict[str, torch.Tensor]:
    """base-checkpoint's tensors as ``meta`` tensors (name, shape, dtype; no data): from the
    safetensors headers, never the weights. A torch pickle cannot be read in part, so the
    reader holds it once here and lets it go. ConfigError when it cannot be read."""
    try:
        with Checkpoint(Path(path).expanduser(), ROLE, pickles=True) as ck:
            infos = {k: ck.info(k) for k in ck.keys}
    except MergeInputError as e:
        raise ConfigError(str(e)) from None
    return {k: torch.empty(i.shape, dtype=DTYPES.get(i.dtype, torch.float32), device="meta")
            for k, i in infos.items()}


def as_layout(theta0: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """theta0's names, shapes and dtypes only (``meta`` tensors): what the checks read, kept
    without the weights (e.g. across a sweep's jobs)."""
    return {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in theta0.items()}


def launch_layout(base_checkpoint: str, theta0: Mapping[str, torch.Tensor] | None
                  ) -> Mapping[str, torch.Tensor] | None:
    """What the launcher checks before any process starts: base-checkpoint's headers when set,
    else the registry's theta0 it already holds. None for a ``python:<module>:<function>``
    base: the app's code is importable in the ServerApp, not here, so the ServerApp checks it."""
    from fl_merge.round.base import PYTHON_PREFIX

    if base_checkpoint.startswith(PYTHON_PREFIX):
        return None
    return base_layout(base_checkpoint) if base_checkpoint else theta0


def theta0_layout(cfg: ResolvedConfig, progress: bool = True) -> dict[str, torch.Tensor] | None:
    """The layout (`as_layout`) of the run's theta0: base-checkpoint's headers, else the
    model registry's base (pretrained once and cached, as the run itself would). None for a
    hub model (published weights, possibly a download): the run checks it when it loads it."""
    run = cfg.run
    if run.base_checkpoint:
        return launch_layout(run.base_checkpoint, None)
    from fl_merge.models.registry import PretrainConfig, get_model_spec, pretrained_backbone

    if get_model_spec(run.model).load_pretrained is not None:
        return None
    return as_layout(pretrained_backbone(run.model, PretrainConfig(steps=run.pretrain_steps,
                                                                   seed=run.pretrain_seed), progress=progress))


def check_fits_base(cfg: ResolvedConfig, theta0: Mapping[str, torch.Tensor]) -> list[str]:
    """The merged parameter names of theta0 under `cfg` (a ResolvedConfig); ConfigError (one
    line) when merge-keys, lines, a matrix method or a client checkpoint does not fit theta0.
    theta0 may be ``meta`` tensors: only names, shapes and dtypes are read."""
    try:
        merged = check_merge_keys(theta0, cfg.merge_keys)
        check_lines_layers(cfg.run.lines, cfg.run.search, merged)  # LiNeS's pattern finds its layers
        for method, _ in cfg.methods:  # the SVD / least-squares methods find a 2-D weight
            check_model_fits(method, {k: tuple(theta0[k].shape) for k in merged})
        check_client_checkpoints(cfg.client_checkpoints, cfg.checkpoint_steps, theta0,
                                 key_matcher(cfg.merge_keys), [m for m, _ in cfg.methods], cfg.tasks)
        if cfg.run.chunk_mib:  # every tensor must fit one chunked message, a Gram matrix too
            chunk_groups(theta0, chunk_limit(cfg.run.chunk_mib))
            # a Delta travels in its task vectors' dtype: float32 for an fp16/bf16 model
            chunk_groups({k: torch.empty(theta0[k].shape, dtype=vector_dtype(theta0[k].dtype), device="meta")
                          for k in merged if theta0[k].is_floating_point()},
                         chunk_limit(cfg.run.chunk_mib), "the float32 merged update")
            if any("gram" in get_method(m).needs_extras for m, _ in cfg.methods):
                check_grams_fit(theta0, merged, chunk_limit(cfg.run.chunk_mib))
    except (MergeKeysError, CheckpointClientError, MergeInputError, ChunkSizeError) as e:
        raise ConfigError(str(e)) from None
    return merged
