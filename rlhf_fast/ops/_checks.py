"""Argument checks shared by the op wrappers: each error names the argument and what was
expected (TypeError for a wrong type or dtype, ValueError for a wrong shape or device)."""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def tensor(value: object, name: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def float_tensor(value: object, name: str, ndim: int) -> torch.Tensor:
    t = tensor(value, name)
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    return t


def same_shape(t: torch.Tensor, name: str, like: torch.Tensor, like_name: str) -> None:
    if t.shape != like.shape:
        raise ValueError(
            f"{name} must have the shape of {like_name} {tuple(like.shape)}, got {tuple(t.shape)}"
        )


def same_device(t: torch.Tensor, name: str, like: torch.Tensor, like_name: str) -> None:
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but {like_name} is on {like.device}")


def optional_mask(mask: object, like: torch.Tensor, like_name: str) -> torch.Tensor | None:
    """A bool mask of like's shape; integer 0/1 masks (as tokenizers return) are converted."""
    if mask is None:
        return None
    m = tensor(mask, "mask")
    if m.dtype.is_floating_point or m.dtype.is_complex:
        raise TypeError(f"mask must be bool (or an integer 0/1 tensor), got {m.dtype}")
    same_shape(m, "mask", like, like_name)
    same_device(m, "mask", like, like_name)
    return m if m.dtype == torch.bool else m != 0


def finite_float(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def temperature(value: object) -> float:
    """A softmax temperature: a finite float > 0 (greedy decoding is argmax, not 0)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"temperature must be a float, got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"temperature must be finite and > 0, got {value}")
    return float(value)


def first_order_backward(op: str) -> None:
    """Called at the top of a fused backward whose C++ op has no autograd formula. Under
    create_graph=True (grad mode is on inside backward only then) its result would carry no
    dependence on the inputs, and a second derivative through it would silently be zero or
    missing: refuse, and say how to get one."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"{op}: the fused backward is first-order only (create_graph=True / double "
            "backward); use backend='reference'"
        )
