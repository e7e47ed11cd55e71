"""The clients' training seeds: independent streams per client and per replicate.

A run's `seed` is the root of its clients' training randomness (batch order, the probe head's
initialisation, dropout, the Fisher and Gram samples). How client i's own seed comes from it:

* "spawn" (the default): the 63 low bits of the first 64-bit word of numpy's
  `SeedSequence(seed).spawn(K)[i]` (the child with spawn key (i,); it does not depend on K).
  SeedSequence hashes the root and the spawn key together (O'Neill's seed_seq design,
  numpy.random.SeedSequence), so roots 0, 1, 2, ... (one per replicate) and clients 0..K-1
  give streams that share no seed: replicates are independent of each other.
* "offset": client i trains with `seed + i`, what fl-merge did before December 2026; kept so
  the numbers measured that way (docs name the key in their commands) come out the same.
  Its replicates are NOT independent: root 0's client 1 and root 1's client 0 both train
  with seed 1.

The data seed (`data-seed`: the clients' splits and partitions) is a different key, hashed
with each task's name where it is used (fl_merge/tasks/), so data and training are varied
separately: replicates vary `seed`, and with --data-seeds `data-seed` too.
"""

from __future__ import annotations

import numpy as np

SCHEMES = ("spawn", "offset")
DEFAULT_SCHEME = "spawn"
_MASK63 = (1 << 63) - 1  # torch.manual_seed and numpy take any value of 0..2**63-1


def check_scheme(scheme: str) -> str:
    """`scheme` when known; ValueError naming the known ones otherwise."""
    if scheme not in SCHEMES:
        raise ValueError(f"client-seeds must be one of {', '.join(SCHEMES)} (spawn: independent "
                         f"streams per client and replicate; offset: seed + i), got '{scheme}'")
    return scheme


def client_seeds(seed: int, k: int, scheme: str = DEFAULT_SCHEME) -> list[int]:
    """The K clients' training seeds of a run with root `seed` (module docstring)."""
    if check_scheme(scheme) == "offset":
        return [int(seed) + i for i in range(k)]
    children = np.random.SeedSequence(int(seed)).spawn(k)
    return [int(c.generate_state(1, np.uint64)[0]) & _MASK63 for c in children]
