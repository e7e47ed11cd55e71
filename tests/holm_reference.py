"""Holm's step-down adjusted p-values written out by hand (Holm 1979), the independent
reference the tests of the experiments' marks compare with: sort ascending, multiply the
i-th smallest (0-based) by (m - i), carry the running maximum, cap at 1."""

from __future__ import annotations


def holm_by_hand(p: list[float]) -> list[float]:
    order = sorted(range(len(p)), key=lambda i: p[i])
    out, running = [0.0] * len(p), 0.0
    for rank, i in enumerate(order):
        running = max(running, (len(p) - rank) * p[i])
        out[i] = min(1.0, running)
    return out
