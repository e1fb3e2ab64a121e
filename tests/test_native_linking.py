"""How the native extensions are linked: each must use the process's shared libstdc++. A copy
linked into an extension (seen once on a GPU machine's prebuilt Python) crashed the process on
the first C++ error message instead of raising it; setup.py now forces the shared library."""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys

import pytest

from rlhf_fast import _native

READELF = shutil.which("readelf")


def _built(module: str) -> str:
    try:
        return importlib.import_module(f"rlhf_fast.{module}").__file__
    except ImportError as error:
        pytest.skip(f"rlhf_fast.{module} is not built: {error}")


@pytest.mark.skipif(READELF is None, reason="readelf is not on PATH")
@pytest.mark.parametrize("module", ["_C", "_cuda"])
def test_extension_needs_the_shared_libstdcxx(module):
    path = _built(module)
    dynamic = subprocess.run([READELF, "-d", path], capture_output=True, text=True, check=True)
    needed = [line for line in dynamic.stdout.splitlines() if "(NEEDED)" in line]
    assert any("libstdc++.so" in line for line in needed), "\n".join(needed)


@pytest.mark.skipif(_native.cpp is None, reason="C++ extension not loaded")
def test_a_cpp_check_that_formats_a_shape_raises_instead_of_crashing():
    # In a child process: the failure this guards against is a segfault.
    code = (
        "import torch, rlhf_fast\n"
        "r = torch.randn(4, 9)\n"
        "try:\n"
        "    torch.ops.rlhf_fast.gae(r, r[:, :5], None, 1.0, 0.95)\n"
        "except ValueError as error:\n"
        "    print('raised:', error)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "raised:" in result.stdout and "[4, 5]" in result.stdout
