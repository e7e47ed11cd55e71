"""Mistakes found before anything starts, in both run CLIs as a user types them: merge-keys
that select nothing of the base, a client checkpoint whose shapes or names disagree with the
base, an output folder that cannot be written, a chunk-mib below the base's largest tensor.
Each is one line on stderr, exit 2, no SuperLink or simulation started (no run.log, no
temporary SuperLink folder), nothing written."""

from __future__ import annotations

import tempfile

import pytest
import torch
from safetensors.torch import save_file

from fl_merge import cli
from fl_merge.cli.launch import main as launch_main


@pytest.fixture
def files(tmp_path, monkeypatch):
    """A base checkpoint, a client checkpoint of the wrong shape and a file where a folder
    should be; the working directory and the temporary folder are the test's own."""
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    save_file({"enc.w": torch.zeros(2, 3), "cls.w": torch.zeros(4)}, str(inputs / "base.safetensors"))
    save_file({"enc.w": torch.zeros(3, 3)}, str(inputs / "client.safetensors"))
    (inputs / "a-file").write_text("not a folder")
    work, temp = tmp_path / "work", tmp_path / "temp"
    work.mkdir(), temp.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(tempfile, "tempdir", str(temp))  # where a SuperLink's FLWR_HOME would go
    return inputs, work, temp


MISTAKES = {  # what the user set -> what the one line says
    "merge-keys": ({"merge-keys": "nope.*"},
                   "merge-keys ['nope.*'] match none of the base model's parameters (backbone."),
    "client-checkpoint": ({"base-checkpoint": "{i}/base.safetensors", "merge-keys": "enc.*",
                           "num-clients": 2, "client-checkpoints": "{i}/client.safetensors,"},
                          "client 0 (rotate90) checkpoint {i}/client.safetensors: tensor 'enc.w' has "
                          "shape [3, 3] but the model's 'enc.w' has [2, 3]"),
    "output-dir": ({"output-dir": "{i}/a-file/run"}, "{i}/a-file is a file, not a folder"),
    "chunk-mib": ({"chunk-mib": 0.5},
                  "chunk-mib=0.5 is smaller than the base model's tensor 'backbone.7.weight' "
                  "(802816 bytes, 0.765625 MiB): set chunk-mib to at least 0.766"),
}
HYDRA_KEYS = {"merge-keys": "merge_keys", "base-checkpoint": "base_checkpoint", "num-clients": "num_clients",
              "client-checkpoints": "client_checkpoints", "output-dir": "runtime.output_dir",
              "chunk-mib": "chunk_mib"}


@pytest.mark.parametrize("prog", ["fl-merge-run", "fl-merge"])
@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_a_mistake_is_one_line_before_anything_starts(prog, mistake, files, capsys):
    inputs, work, temp = files
    keys, message = MISTAKES[mistake]
    keys = {k: str(v).format(i=inputs) for k, v in keys.items()}
    if prog == "fl-merge-run":
        code = launch_main(["--run-config", " ".join(f"{k}='{v}'" for k, v in keys.items())])
    else:
        code = cli.main([f"{HYDRA_KEYS[k]}='{v}'" for k, v in keys.items()])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith(f"{prog}: error: ") and err.count("\n") == 1, err
    assert message.format(i=inputs) in err
    assert list(work.iterdir()) == []  # no run folder, no Hydra job folder
    assert list(temp.glob("fl-merge-flwr-*")) == []  # no SuperLink's FLWR_HOME
    assert not list(inputs.rglob("run.log"))
