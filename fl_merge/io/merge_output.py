"""Where `fl-merge merge` writes: the output checked before any input is read, the base's
non-weight files beside the merged weights, and the whole output replaced at once.

`--out` has two forms (`fl_merge.core.safetensors_writer.output_paths`):

* a FOLDER (a path not ending in ``.safetensors``): a Hugging Face model folder that
  ``transformers.AutoModel.from_pretrained`` loads. It receives model.safetensors (or shards
  and model.safetensors.index.json) and, when the base is a model folder, the base's other
  top-level files: config.json, the tokenizer's files, generation_config.json, ...
  (`model_files`; never the base's weights in any format, its hidden files, its model card
  README.md, which describes the base, or its sub-folders). With `--dtype`, config.json's
  dtype entry is set to it. Everything is written into a hidden temporary sibling folder
  and renamed into place only when complete: the folder holds the old output or the new
  one, never a mix (a folder holding an earlier merge would otherwise keep stale shards and
  an index beside the new weights, which fl-merge's reader prefers).
* a FILE ``X.safetensors``: X.safetensors, or its shards X-0000i-of-0000n.safetensors and
  X.safetensors.index.json, beside whatever else the folder holds; an earlier output of
  that name (in either layout) is removed once the new one is in place.

An existing output (a non-empty folder, or any file of X's layout) is refused unless
`overwrite`; an output that would replace one of the merge's inputs, or a folder output that
is the working directory (or holds it), is refused always.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from fl_merge.core.files import remove_stale_temps, sync_directory, temp_path
from fl_merge.core.safetensors_writer import HF_WEIGHTS
from fl_merge.core.task_vectors import MergeInputError
from fl_merge.io.output_paths import unwritable_reason

# Weights in any format a model folder may hold: never copied from the base.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx",
                   ".gguf", ".ot", ".npz", ".index.json")
MODEL_CARD = "README.md"
# config.json's entry for the weights' dtype (transformers 5 writes "dtype", 4.x "torch_dtype").
CONFIG_DTYPE_KEYS = ("dtype", "torch_dtype")


def is_folder_output(out: str | os.PathLike) -> bool:
    """Whether `out` names a folder (a Hugging Face model folder), not a .safetensors file."""
    return Path(out).suffix != ".safetensors"


def file_output_layout(out: Path) -> list[Path]:
    """The files of a file-form output `out` (X.safetensors) that exist now: X.safetensors,
    X.safetensors.index.json and X's shards."""
    stem = out.name[: -len(".safetensors")]
    found = [p for p in (out, out.with_name(out.name + ".index.json")) if p.is_file()]
    return found + sorted(out.parent.glob(f"{stem}-[0-9]*-of-[0-9]*.safetensors"))


def _writable_place(out: Path) -> None:
    """`out` can be written (fl_merge.io.output_paths.unwritable_reason, the check the run's
    output-dir gets too); else one-line MergeInputError."""
    why = unwritable_reason(out, as_file=not is_folder_output(out))
    if why is not None:
        raise MergeInputError(f"--out {out} cannot be written: {why}")


def check_output(out: str | os.PathLike, overwrite: bool, inputs: Sequence[str | os.PathLike]) -> None:
    """Before any input is read: `out` can be written, holds no earlier output unless
    `overwrite`, and replacing it would delete none of `inputs`; else one-line MergeInputError."""
    out = Path(out)
    if is_folder_output(out) and out.exists() and not out.is_dir():
        raise MergeInputError(f"--out {out} is a file; a path without .safetensors names a "
                              "folder (give X.safetensors to write one file)")
    if not is_folder_output(out) and out.is_dir():
        raise MergeInputError(f"--out {out} is a folder; a path ending in .safetensors names a "
                              "file (drop the suffix to write a Hugging Face folder)")
    _writable_place(out)
    if is_folder_output(out):
        here = Path.cwd().resolve()
        if out.resolve() == here or out.resolve() in here.parents:
            raise MergeInputError(f"--out {out} is the current folder or holds it, and the merge "
                                  "puts a new folder in its place: name a folder below it "
                                  "(--out merged)")
        held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
        replaced = [out.resolve()] if held else []
    else:
        layout = file_output_layout(out)
        held = [p.name for p in layout]
        replaced = [p.resolve() for p in layout]
    if held and not overwrite:
        listed = ", ".join(held[:3]) + (f", ... ({len(held)} in all)" if len(held) > 3 else "")
        where = (f"folder {out} is not empty (it holds {listed})" if is_folder_output(out)
                 else f"an earlier output {out} exists ({listed})")
        raise MergeInputError(f"--out: {where}: give --overwrite to replace it whole, or "
                              "another --out")
    for given in inputs:
        path = Path(given).resolve()
        if any(path == r or r in path.parents for r in replaced):
            raise MergeInputError(f"--out {out} would replace the input {given}: write the merge "
                                  "elsewhere")


def base_model_folder(base: str | os.PathLike) -> Path | None:
    """The Hugging Face model folder the base comes from: the base itself when a folder, the
    folder of a base given as its model.safetensors or index file, else None (a lone file)."""
    base = Path(base)
    if base.is_dir():
        return base
    if base.name == HF_WEIGHTS or base.name.endswith(".safetensors.index.json"):
        return base.parent
    return None


def model_files(folder: Path) -> list[Path]:
    """The folder's top-level files a merged model takes over: every regular file that is not
    weights (WEIGHT_SUFFIXES), hidden, or the model card."""
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                  and p.name != MODEL_CARD and not p.name.endswith(WEIGHT_SUFFIXES))


def copy_model_files(base: str | os.PathLike, into: Path, dtype: torch.dtype | None) -> list[Path]:
    """Copy the base folder's `model_files` into `into` (symlinks, as in the Hugging Face
    cache, copied as their content); with `dtype`, config.json's dtype entry says it. Returns
    the files written."""
    folder = base_model_folder(base)
    if folder is None:
        return []
    written = []
    for src in model_files(folder):
        dst = into / src.name
        shutil.copyfile(src, dst)
        written.append(dst)
    config = into / "config.json"
    if dtype is not None and config.is_file():
        try:
            body = json.loads(config.read_text(encoding="utf-8"))
        except ValueError:
            return written  # not JSON: copied as it is
        if isinstance(body, dict):
            name = str(dtype).removeprefix("torch.")
            for key in CONFIG_DTYPE_KEYS:
                if key in body:
                    body[key] = name
            config.write_text(json.dumps(body, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return written


def _swap_in(stage: Path, out: Path) -> None:
    """Put the complete folder `stage` at `out`, replacing what `out` held: `out` is the old
    folder or the new one at every moment (two renames; the old one is then deleted)."""
    if out.is_dir() and any(out.iterdir()):
        old = temp_path(out)
        os.rename(out, old)
        os.rename(stage, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(stage, out)  # onto nothing or an empty folder
    sync_directory(out.parent)


def write_output(out: str | os.PathLike, write_weights: Callable[[Path], list[Path]],
                 base: str | os.PathLike, dtype: torch.dtype | None = None) -> list[Path]:
    """Write the merge's output at `out` (checked by `check_output` before): `write_weights
    (path)` writes the weights at `path` and returns their files. A folder output is built
    whole in a temporary sibling folder (weights + the base's model files) and swapped in;
    a file output's earlier files that the new one did not replace are removed. Returns the
    files of the output, weights first."""
    out = Path(out)
    if not is_folder_output(out):
        earlier = file_output_layout(out)
        written = write_weights(out)
        for stale in set(earlier) - set(written):
            stale.unlink(missing_ok=True)
        return written
    place = Path(os.path.abspath(out))  # `--out .` too has a parent and a name
    place.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(place.parent)  # a killed merge's staging folder
    stage = temp_path(place)
    stage.mkdir()
    try:
        files = write_weights(stage) + copy_model_files(base, stage, dtype)
        sync_directory(stage)
        _swap_in(stage, place)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return [out / f.name for f in files]
