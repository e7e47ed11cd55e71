"""Where a client trains and scores: the run's one device default and how a requested device
resolves on this machine.

`DEFAULT_DEVICE` is the run config's ``device`` default and what a client uses when its
messages carry no ``device`` entry (a server that is not fl-merge's, an older config), so a
client told nothing runs where one told the run config's default runs.
"""

from __future__ import annotations

import torch

DEVICES = ("auto", "cpu", "cuda")
DEFAULT_DEVICE = "auto"  # cuda when torch sees one, else the CPU


def client_device(requested: str | None = None) -> torch.device:
    """The torch device for a requested ``device`` value (None: `DEFAULT_DEVICE`): 'cuda'
    (an error without a GPU), 'auto' (cuda when torch sees one, else cpu) or 'cpu'."""
    requested = DEFAULT_DEVICE if requested is None else str(requested)
    if requested not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got '{requested}'")
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda but this client's torch sees no CUDA GPU")
    use_cuda = requested in ("cuda", "auto") and torch.cuda.is_available()
    return torch.device("cuda" if use_cuda else "cpu")
