"""Shared plumbing of the tests that compile native code themselves: nvcc compile checks of
the CUDA sources and g++ builds of the kernels' CPU emulations (tests/*_emulator.cpp)."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from rlhf_fast import _native

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
NVCC = shutil.which("nvcc")
GXX = shutil.which("g++")
# The defines torch's CUDAExtension passes to nvcc: the kernels must build under them.
TORCH_NVCC_DEFINES = [
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
]
DTYPE_INDEX = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
needs_gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or _native.cuda is None,
    reason=f"needs a GPU and the CUDA extension ({_native.cuda_error or 'no GPU visible'})",
)


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, **kwargs)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout}\n{result.stderr}"
    return result


def build_emulator(directory: Path, source: str) -> ctypes.CDLL:
    """Compiles tests/<source> (a CUDA kernel's lane program, emulated) into a shared library."""
    if GXX is None:
        pytest.skip("g++ is not on PATH")
    library = directory / f"lib{Path(source).stem}.so"
    run(
        [GXX, "-std=c++17", "-O2", "-shared", "-fPIC", "-Wall", "-Wextra", "-Werror",
         "-Wno-unknown-pragmas", "-I", str(CSRC), "-o", str(library),
         str(ROOT / "tests" / source)]
    )  # fmt: skip
    return ctypes.CDLL(str(library))
