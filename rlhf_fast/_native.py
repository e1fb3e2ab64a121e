"""Loads the compiled extensions once and remembers why one is missing.

rlhf_fast._C holds the C++ CPU kernels and the op schemas (torch.ops.rlhf_fast.*);
rlhf_fast._cuda adds CUDA kernels to the same ops and is only built where torch has CUDA.
A missing or broken extension never stops the package from importing: the dispatcher falls
back to the reference backend and `rlhf-fast doctor` reports the reason.
"""

from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType

import torch  # noqa: F401  (must be imported before the extensions: they link libc10)


def _try_import(name: str) -> tuple[ModuleType | None, str | None]:
    try:
        return importlib.import_module(name), None
    except ImportError as error:  # not built, or built against another torch
        return None, f"{type(error).__name__}: {error}"
    except OSError as error:  # a shared library it needs is missing
        return None, f"{type(error).__name__}: {error}"


cpp, cpp_error = _try_import("rlhf_fast._C")
if cpp_error is not None:
    warnings.warn(
        f"rlhf_fast: C++ kernels could not be loaded ({cpp_error}); CPU ops run on the "
        "reference backend. Reinstall with the README's command to build them.",
        RuntimeWarning,
        stacklevel=2,
    )

cuda: ModuleType | None = None
cuda_error: str | None
if torch.version.cuda is None:
    cuda_error = "this torch build has no CUDA"
elif cpp is None:
    cuda_error = "the CUDA kernels register into the C++ extension, which did not load"
else:
    cuda, cuda_error = _try_import("rlhf_fast._cuda")
    if cuda_error is not None and "No module named" in cuda_error:
        cuda_error = "not built (install with a CUDA toolkit and a CUDA build of torch)"

ISA_ENV = "RLHF_FAST_CPU_ISA"
ISA_LEVELS = ("avx512", "avx2", "scalar")


def _check_forced_isa() -> None:
    """$RLHF_FAST_CPU_ISA names a SIMD level for the C++ kernels; a typo or a level this CPU
    lacks falls back to the best one (the kernels must run), so say so instead of silently."""
    forced = os.environ.get(ISA_ENV)
    if cpp is None or forced is None:
        return
    if forced not in ISA_LEVELS:
        problem = f"is not one of {', '.join(ISA_LEVELS)}"
    elif not cpp.cpu_supports(forced):
        problem = "is not supported by this CPU"
    else:
        return
    warnings.warn(
        f"rlhf_fast: ${ISA_ENV}={forced!r} {problem}; the C++ kernels use {cpp.cpu_isa()}",
        RuntimeWarning,
        stacklevel=2,
    )


_check_forced_isa()

OUTPUT_POOL_ENV = "RLHF_FAST_OUTPUT_POOL_MB"
OUTPUT_POOL_MAX_MB = 1 << 20  # as csrc/cpu/output_pool.cpp: larger is a typo


def _check_output_pool_size() -> None:
    """$RLHF_FAST_OUTPUT_POOL_MB sizes the C++ ops' output pool in MiB; anything but a whole
    number up to 1 TiB keeps the default (the C++ side applies the same rule), so say so."""
    value = os.environ.get(OUTPUT_POOL_ENV)
    if cpp is None or value is None:
        return
    if value.isascii() and value.isdigit() and int(value) <= OUTPUT_POOL_MAX_MB:
        return
    warnings.warn(
        f"rlhf_fast: ${OUTPUT_POOL_ENV}={value!r} is not a whole number of MiB (0 turns the "
        f"pool off, at most {OUTPUT_POOL_MAX_MB}); the C++ ops' output pool keeps its default 256",
        RuntimeWarning,
        stacklevel=2,
    )


_check_output_pool_size()
