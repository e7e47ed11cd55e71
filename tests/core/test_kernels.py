"""CPU kernels pinned to the AVX2 paths (fl_merge/core/kernels.py): which variables are set
where, and, in fresh processes, what torch then reports it computes with."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from fl_merge.core.kernels import OPT_OUT, PINNED, cache_key_part, kernel_tag, late_pin_warning, pin_cpu_kernels

X86 = platform.machine().lower() in ("x86_64", "amd64")
CAPABILITY = ("import torch{pre}; x = torch.randn(1000); (x * x).sum(); "
              "print(torch.backends.cpu.get_cpu_capability())")


def test_an_x86_machine_gets_the_three_variables_and_a_users_own_value_is_kept():
    env = {"MKL_CBWR": "COMPATIBLE"}
    assert pin_cpu_kernels(env, "x86_64") == {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    assert env == {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "COMPATIBLE", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    assert kernel_tag(env) == "ATEN_CPU_CAPABILITY=avx2,MKL_CBWR=COMPATIBLE,ONEDNN_MAX_CPU_ISA=AVX2"
    assert cache_key_part(env) == {"kernels": kernel_tag(env)}


@pytest.mark.parametrize("env, machine", [({OPT_OUT: "1"}, "x86_64"), ({}, "aarch64"), ({}, "arm64")])
def test_an_opt_out_or_another_architecture_is_left_alone(env, machine):
    before = dict(env)
    assert pin_cpu_kernels(env, machine) == {} and env == before
    assert kernel_tag(env) == "native" and cache_key_part(env) == {}


def _capability(env: dict[str, str], pre: str) -> str:
    out = subprocess.run([sys.executable, "-c", CAPABILITY.format(pre=pre)], env=env,
                         capture_output=True, text=True, timeout=120, check=True)
    return out.stdout.strip()


@pytest.mark.skipif(not X86, reason="the pinned paths are x86-64's")
def test_a_process_that_imports_fl_merge_computes_with_avx2_even_after_importing_torch():
    clean = {k: v for k, v in os.environ.items() if k not in PINNED and k != OPT_OUT}
    native = _capability(clean, "")  # torch alone: the machine's own (AVX2 or AVX512)
    assert native in ("AVX2", "AVX512")
    assert _capability(clean, "; import fl_merge") == "AVX2"
    assert _capability({**clean, OPT_OUT: "1"}, "; import fl_merge") == native


@pytest.mark.skipif(not X86, reason="the pinned paths are x86-64's")
def test_torch_computing_before_fl_merge_is_imported_is_warned_about_where_it_matters():
    clean = {k: v for k, v in os.environ.items() if k not in PINNED and k != OPT_OUT}
    native = _capability(clean, "")
    late = subprocess.run([sys.executable, "-W", "always", "-c",
                           "import torch; x = torch.randn(1000); (x * x).sum(); import fl_merge"],
                          env=clean, capture_output=True, text=True, timeout=120, check=True)
    assert ("computed with its AVX512 kernels before fl_merge was imported" in late.stderr) == (native == "AVX512")
    assert late_pin_warning("AVX2") == "" and "import fl_merge first" in late_pin_warning("AVX512")
