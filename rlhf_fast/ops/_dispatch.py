"""Backend choice shared by every op."""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import NamedTuple

import torch

from rlhf_fast import _native

BACKENDS = ("reference", "cpp", "cuda", "triton")
ENV_VAR = "RLHF_FAST_BACKEND"
# Automatic pick, fastest first, by device type; "reference" always closes the list.
_PREFERENCE = {"cpu": ("cpp",), "cuda": ("cuda", "triton")}

# Which backends each op implements; ops register themselves here when their module loads.
IMPLEMENTED: dict[str, tuple[str, ...]] = {}


class BackendUnavailableError(RuntimeError):
    """A backend was requested (argument or RLHF_FAST_BACKEND) but cannot run these inputs."""


class BackendStatus(NamedTuple):
    available: bool
    reason: str  # why not, or which devices it serves


def _triton_missing() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    return None


def unavailable_reason(backend: str, device: torch.device) -> str | None:
    """None if `backend` can run tensors on `device`, else a short reason."""
    if backend == "reference":
        return None
    if backend == "cpp":
        if device.type != "cpu":
            return f"the C++ kernels run on CPU tensors, not {device.type}"
        if _native.cpp is None:
            return f"C++ extension not loaded ({_native.cpp_error})"
        return None
    if backend in ("cuda", "triton") and device.type == "cuda" and not torch.cuda.is_available():
        return "torch sees no CUDA device"
    if backend == "cuda":
        if device.type != "cuda":
            return f"the CUDA kernels run on CUDA tensors, not {device.type}"
        return None if _native.cuda is not None else f"CUDA extension: {_native.cuda_error}"
    if backend == "triton":
        missing = _triton_missing()
        if missing:
            return missing
        if device.type == "cuda":
            return None
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
            return None
        return f"Triton runs on CUDA tensors (CPU ones with TRITON_INTERPRET=1), not {device.type}"
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def candidates(op: str, device_type: str) -> tuple[str, ...]:
    """The backends of `op` that target `device_type`, fastest first, "reference" last."""
    preferred = _PREFERENCE.get(device_type, ())
    return tuple(b for b in preferred if b in IMPLEMENTED[op]) + ("reference",)


def choose(op: str, device: torch.device, requested: str | None) -> str:
    """The backend that runs `op` on `device`: the requested one, or the fastest available."""
    implemented = IMPLEMENTED[op]
    source = "backend"
    if requested is None:
        from_env = os.environ.get(ENV_VAR) or None
        # The variable is a global preference: ops without that backend pick automatically.
        if from_env is not None and (from_env not in BACKENDS or from_env in implemented):
            requested, source = from_env, ENV_VAR
    if requested is not None:
        if requested not in BACKENDS:
            prefix = f"{ENV_VAR}: " if source == ENV_VAR else ""
            raise ValueError(f"{prefix}backend must be one of {BACKENDS}, got {requested!r}")
        if requested not in implemented:
            raise BackendUnavailableError(
                f"{op} has no {requested!r} backend (it has: {', '.join(implemented)})"
            )
        reason = unavailable_reason(requested, device)
        if reason is not None:
            # Without the variable's name, an error for a call that asked for no backend is
            # a riddle.
            via = f" (set by {ENV_VAR}={requested!r})" if source == ENV_VAR else ""
            raise BackendUnavailableError(
                f"{op}: backend {requested!r} is unavailable: {reason}{via}"
            )
        return requested
    return _automatic_pick(op, device.type)


def forget_automatic_picks() -> None:
    """Called when an op gains a backend at run time (its kernels registered late)."""
    _automatic_pick.cache_clear()


@functools.cache
def _automatic_pick(op: str, device_type: str) -> str:
    # Cached: what is installed does not change while the process runs, and the pick sits on
    # the path of every op call (small calls are dominated by such overheads).
    for backend in candidates(op, device_type):
        if unavailable_reason(backend, torch.device(device_type)) is None:
            return backend
    return "reference"


def backends(device: str | torch.device = "cpu") -> dict[str, dict[str, BackendStatus]]:
    """For each op, for each backend it implements: can it run on `device`, and if not, why."""
    device = torch.device(device)
    report: dict[str, dict[str, BackendStatus]] = {}
    for op, implemented in IMPLEMENTED.items():
        report[op] = {}
        for backend in implemented:
            reason = unavailable_reason(backend, device)
            report[op][backend] = BackendStatus(reason is None, reason or f"runs on {device.type}")
    return report
