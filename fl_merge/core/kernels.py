"""CPU kernels pinned to one instruction set, so that a run's numbers are the same bits on
every x86-64 machine (issue 29 item 9).

PyTorch picks its CPU kernels by the instruction set it finds: ATen's vectorised kernels
(AVX2 or AVX-512), MKL's BLAS and oneDNN's convolutions each have a code path per
instruction set, and the paths sum in different orders. The same seed and code then give
other bits on an AVX-512 machine than on an AVX2 one: the README demo printed base 0.758 /
merged 0.821 on an AMD EPYC with AVX-512 and 0.761 / 0.818 on one without. Measured on the
AVX-512 machine (8 Dec, the demo with an empty model cache): ATEN_CPU_CAPABILITY=avx2 alone
gave a third table (0.758 / 0.810), MKL_CBWR=AVX2 with ONEDNN_MAX_CPU_ISA=AVX2 a fourth
(0.758 / 0.822), all three together the AVX2 machine's table digit for digit.

`pin_cpu_kernels` sets those three variables (each only where the environment does not set
it already) before any kernel runs: `import fl_merge` calls it, so every fl-merge process
and every process it starts (SuperLink, SuperNodes, Ray workers, ClientApps inherit the
environment) computes with the AVX2 paths. Each library reads its variable when it first
computes, not when it is imported, so a process that imported torch but has not computed
yet is still pinned. Cost: AVX-512 machines lose their wider vector paths (the demo took
about as long here). A machine that is not x86-64 is left alone (these are x86 paths).

Opt out with FL_MERGE_NATIVE_KERNELS=1 (then numbers are the machine's own). `kernel_tag`
names what is in effect; the base-model and client-update caches key on it, so a cache
filled with other kernels is not reused.
"""

from __future__ import annotations

import os
import platform
import sys
import warnings
from collections.abc import MutableMapping

# variable -> value: the AVX2 path of ATen, MKL (conditional numerical reproducibility) and oneDNN
PINNED = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
OPT_OUT = "FL_MERGE_NATIVE_KERNELS"
X86_64 = ("x86_64", "amd64")


def pins_kernels(environ: MutableMapping[str, str] | None = None, machine: str | None = None) -> bool:
    """Whether fl-merge pins the kernels here: an x86-64 machine and no opt-out."""
    env = os.environ if environ is None else environ
    arch = (platform.machine() if machine is None else machine).lower()
    return arch in X86_64 and env.get(OPT_OUT, "").strip() not in ("1", "true", "yes")


def pin_cpu_kernels(environ: MutableMapping[str, str] | None = None, machine: str | None = None
                    ) -> dict[str, str]:
    """Set PINNED's variables in `environ` (default os.environ) where unset, if
    `pins_kernels`; returns the variables set now (none when left alone). In this process
    (`environ` None) with torch already imported, warns when torch has computed already
    with wider kernels (`late_pin_warning`)."""
    env = os.environ if environ is None else environ
    if not pins_kernels(env, machine):
        return {}
    added = {k: v for k, v in PINNED.items() if k not in env}
    env.update(added)
    if environ is None and added and "torch" in sys.modules:
        import torch

        why = late_pin_warning(torch.backends.cpu.get_cpu_capability())
        if why:
            warnings.warn(why, RuntimeWarning, stacklevel=2)
    return added


def late_pin_warning(capability: str) -> str:
    """Why numbers may differ ('' if not): torch reports `capability` after the pin, which is
    not AVX2 (or below) when it computed before fl_merge was imported."""
    if capability in ("AVX2", "DEFAULT", "NO AVX"):
        return ""
    return (f"fl-merge: torch computed with its {capability} kernels before fl_merge was imported, "
            "so this process's numbers may differ from other machines'; import fl_merge first, or set "
            "ATEN_CPU_CAPABILITY=avx2 MKL_CBWR=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 before Python starts")


def kernel_tag(environ: MutableMapping[str, str] | None = None) -> str:
    """What decides the kernels' bits, for cache keys: the three variables as set, or
    'native' where none is."""
    env = os.environ if environ is None else environ
    set_ = [f"{k}={env[k]}" for k in PINNED if k in env]
    return ",".join(set_) if set_ else "native"


def cache_key_part(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """What a cache key adds for the kernels: nothing under native kernels (keys made before
    the pin stay valid there), else {"kernels": kernel_tag()}."""
    tag = kernel_tag(environ)
    return {} if tag == "native" else {"kernels": tag}
