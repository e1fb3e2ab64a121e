"""$RLHF_FAST_CPU_ISA: a valid level is used; a typo, or a level this CPU lacks, is a warning
naming the variable (the kernels then run at the best level), never a silent fallback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from rlhf_fast import _native

pytestmark = pytest.mark.skipif(_native.cpp is None, reason="C++ kernels not built")

REPORT = "import rlhf_fast._native as n; print(n.cpp.cpu_isa())"


def _import_with(value: str) -> subprocess.CompletedProcess:
    env = {**os.environ, _native.ISA_ENV: value}
    return subprocess.run(
        [sys.executable, "-W", "always", "-c", REPORT],
        env=env, capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip


def test_a_supported_level_is_used_without_a_warning():
    result = _import_with("scalar")
    assert result.stdout.strip() == "scalar"
    assert _native.ISA_ENV not in result.stderr


@pytest.mark.parametrize("value", ["AVX2", "avx-512", "sse"])
def test_an_unknown_level_is_a_warning_naming_it(value):
    result = _import_with(value)
    best = next(isa for isa in _native.ISA_LEVELS if _native.cpp.cpu_supports(isa))
    assert result.stdout.strip() == best
    assert f"${_native.ISA_ENV}={value!r} is not one of avx512, avx2, scalar" in result.stderr


def test_a_level_this_cpu_lacks_is_a_warning():
    missing = [isa for isa in _native.ISA_LEVELS if not _native.cpp.cpu_supports(isa)]
    if not missing:
        pytest.skip("this CPU runs every level")
    result = _import_with(missing[0])
    assert "is not supported by this CPU" in result.stderr
