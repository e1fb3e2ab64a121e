"""`rlhf-fast doctor`: what this installation can run, and why a backend is missing."""

from __future__ import annotations

import os
import platform
import sys

import torch

import rlhf_fast
from rlhf_fast import _native
from rlhf_fast.ops import _dispatch

# CPU flags worth knowing for our kernels (as /proc/cpuinfo spells them).
_INTERESTING_FLAGS = (
    "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq",
    "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile",
)  # fmt: skip


def cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    present = set(line.split(":", 1)[1].split())
                    return [flag for flag in _INTERESTING_FLAGS if flag in present]
    except OSError:
        pass
    return []


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def report() -> list[str]:
    lines = [
        f"rlhf-fast {rlhf_fast.__version__}",
        f"python    {sys.version.split()[0]} ({platform.platform()})",
        f"torch     {torch.__version__} (CUDA {torch.version.cuda or 'none'}), "
        f"{torch.get_num_threads()} CPU threads",
        f"cpu       {cpu_model()}",
        f"features  {' '.join(cpu_flags()) or 'unknown'}",
    ]
    if _native.cpp is not None:
        levels = [isa for isa in _native.ISA_LEVELS if _native.cpp.cpu_supports(isa)]
        using = _native.cpp.cpu_isa()
        forced = os.environ.get(_native.ISA_ENV)
        if forced is not None:  # why the level is not the best runnable one, or is despite it
            using += f" ({_native.ISA_ENV}={forced}{'' if forced == using else ' ignored'})"
        lines.append(f"C++ kernels: loaded, using {using} (runnable: {', '.join(levels)})")
    else:
        lines.append(f"C++ kernels: NOT loaded: {_native.cpp_error}")
    lines.append(f"CUDA kernels: {'loaded' if _native.cuda is not None else _native.cuda_error}")
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        lines.append(f"devices   cpu, {', '.join(f'cuda:{i} {n}' for i, n in enumerate(names))}")
    else:
        lines.append("devices   cpu (no CUDA device)")
    forced = os.environ.get(_dispatch.ENV_VAR)
    if forced and forced not in _dispatch.BACKENDS:
        lines.append(bad_backend_variable(forced))
    elif forced:
        lines.append(f"{_dispatch.ENV_VAR}={forced} overrides the automatic choice")

    lines.append("")
    width = max(len("op"), *(len(op) for op in _dispatch.IMPLEMENTED))
    lines.append(f"{'op':<{width}} {'device':<7} {'uses':<10} other backends for that device")
    for op in _dispatch.IMPLEMENTED:
        for device in ("cpu", "cuda"):
            try:
                chosen = _dispatch.choose(op, torch.device(device), None)
            except (_dispatch.BackendUnavailableError, ValueError) as error:
                lines.append(f"{op:<{width}} {device:<7} ERROR: {error}")
                continue
            others = []
            for backend in _dispatch.candidates(op, device):
                if backend == chosen:
                    continue
                reason = _dispatch.unavailable_reason(backend, torch.device(device))
                others.append(f"{backend}: " + ("available" if reason is None else reason))
            # an op with no other backend for the device said nothing there, as if cut off
            lines.append(f"{op:<{width}} {device:<7} {chosen:<10} " + ("; ".join(others) or "none"))
    return lines


def bad_backend_variable(value: str) -> str:
    return (
        f"{_dispatch.ENV_VAR}={value} is not a backend ({', '.join(_dispatch.BACKENDS)}): "
        "every op call raises ValueError"
    )


def run() -> int:
    """Print the report; 1 when RLHF_FAST_BACKEND names no backend (every op call fails)."""
    print("\n".join(report()))
    forced = os.environ.get(_dispatch.ENV_VAR)
    return 1 if forced and forced not in _dispatch.BACKENDS else 0
