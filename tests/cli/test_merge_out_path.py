"""`fl-merge merge --out` that cannot be written is one line, exit 2, before any checkpoint is
read or anything is written (a file where a folder should be; a folder given as the file)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from fl_merge.cli.merge import main


@pytest.mark.parametrize("out, why", [("a-file/merged.safetensors", "{t}/a-file is a file, not a folder"),
                                      ("a-file/merged", "{t}/a-file is a file, not a folder"),
                                      ("folder.safetensors", "{t}/folder.safetensors is a folder")])
def test_an_unwritable_out_is_one_line_before_anything_is_read(tmp_path, capsys, out, why):
    for name in ("base", "m1", "m2"):
        save_file({"w": torch.randn(2, 2)}, str(tmp_path / f"{name}.safetensors"))
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "folder.safetensors").mkdir()
    before = sorted(tmp_path.rglob("*"))
    code = main(["--base", str(tmp_path / "base.safetensors"), "--models", str(tmp_path / "m1.safetensors"),
                 str(tmp_path / "m2.safetensors"), "--method", "fedavg", "--eta", "1", "--out", str(tmp_path / out)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err == f"fl-merge merge: error: --out {tmp_path / out} cannot be written: {why.format(t=tmp_path)}\n"
    assert sorted(tmp_path.rglob("*")) == before
