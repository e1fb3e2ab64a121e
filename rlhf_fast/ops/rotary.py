"""Llama's rotary position embedding (HF's apply_rotary_pos_emb) of q or k, forward and backward.

HF rotates q and k with rotate_half (two slices, a negation, a cat) and three elementwise ops,
each a pass over the tensor, and as many again backward; the C++ backend is one pass each way
(csrc/cpu/rotary_op.cpp). Layout: x [B, T, H, D] as the projections produce it (before HF's
transpose to [B, H, T, D]), cos and sin [B or 1, T, D] as the model's rotary module returns them.
"""

from __future__ import annotations

import torch

from rlhf_fast.ops import _checks, _dispatch

_dispatch.IMPLEMENTED["rotary_embedding"] = ("reference", "cpp")


def rotary_embedding_reference(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    """The definition of `rotary_embedding`: HF's x * cos + rotate_half(x) * sin, with cos and
    sin broadcast over the heads; rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2])."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.unsqueeze(2) + rotated * sin.unsqueeze(2)


class _FusedRotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return torch.ops.rlhf_fast.rotary_embedding(x, cos, sin, False)

    @staticmethod
    def backward(ctx, grad):
        _checks.first_order_backward("rotary_embedding")
        cos, sin = ctx.saved_tensors
        if grad.stride(-1) != 1:
            grad = grad.contiguous()
        return torch.ops.rlhf_fast.rotary_embedding(grad, cos, sin, True), None, None


def rotary_embedding(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, backend: str | None = None
) -> torch.Tensor:
    """x [B, T, H, D] rotated by cos, sin [B or 1, T, D] (x's dtype; D even) -> [B, T, H, D].
    Differentiable in x (cos and sin are constants of the positions: a cos or sin that
    requires grad runs the reference, which differentiates them too)."""
    x = _checks.float_tensor(x, "x", 4)
    if x.shape[-1] % 2:
        raise ValueError(f"x's last dimension must be even, got shape {tuple(x.shape)}")
    batch, steps, _, dim = x.shape
    for name, table in (("cos", cos), ("sin", sin)):
        _checks.float_tensor(table, name, 3)
        if table.shape[0] not in (1, batch) or tuple(table.shape[1:]) != (steps, dim):
            raise ValueError(f"{name} must have shape ({batch} or 1, {steps}, {dim}), got "
                             f"{tuple(table.shape)}")  # fmt: skip
        if table.dtype != x.dtype:
            raise TypeError(f"{name} must have x's dtype {x.dtype}, got {table.dtype}")
        _checks.same_device(table, name, x, "x")
    _checks.same_shape(sin, "sin", cos, "cos")
    backend = _dispatch.choose("rotary_embedding", x.device, backend)
    # Empty x: nothing to compute, and an empty tensor's strides (which .contiguous() keeps:
    # it counts as contiguous) need not be the unit last stride the C++ op requires.
    if backend == "reference" or cos.requires_grad or sin.requires_grad or x.numel() == 0:
        return rotary_embedding_reference(x, cos, sin)
    if x.stride(-1) != 1:
        x = x.contiguous()
    return _FusedRotary.apply(x, cos.contiguous(), sin.contiguous())
