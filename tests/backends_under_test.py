"""The CPU backends this machine can run, each C++ ISA separately, as pytest parameters."""

from __future__ import annotations

import contextlib

import pytest

from rlhf_fast import _native

CPU_ISAS = ("scalar", "avx2", "avx512")


def cpu_backend_params():
    params = [pytest.param(("reference", None), id="reference")]
    for isa in CPU_ISAS:
        runnable = _native.cpp is not None and _native.cpp.cpu_supports(isa)
        marks = () if runnable else pytest.mark.skip(reason=f"C++ {isa} kernels cannot run here")
        params.append(pytest.param(("cpp", isa), id=f"cpp-{isa}", marks=marks))
    return params


def single_isa_backend_params():
    """reference and cpp, for ops whose C++ code has no per-ISA variants (compiled once, at the
    baseline ISA): cpp runs under the active ISA."""
    cpp_marks = pytest.mark.skipif(_native.cpp is None, reason="C++ extension not loaded")
    return [pytest.param(("reference", None), id="reference"),
            pytest.param(("cpp", "active"), id="cpp", marks=cpp_marks)]  # fmt: skip


@contextlib.contextmanager
def using(backend_and_isa):
    """Selects the C++ ISA (if any; "active": the one in use) and poisons outputs for the
    duration of a test."""
    backend, isa = backend_and_isa
    if backend != "cpp":
        yield backend
        return
    previous = _native.cpp.cpu_isa()
    isa = previous if isa == "active" else isa
    assert _native.cpp.set_cpu_isa(isa)
    _native.cpp.set_poison_outputs(True)
    try:
        yield backend
    finally:
        _native.cpp.set_poison_outputs(False)
        _native.cpp.set_cpu_isa(previous)
