"""Softmax attention of short sequences (training and scoring passes: as many queries as keys,
no KV cache), causal and/or under a boolean mask, forward and backward.

torch's CPU SDPA (flash attention) spends ~2.0 ms fwd+bwd at the PPO bench's q/k/v
[16, 4, 64, 64] fp32 (2 threads, a quiet machine) on ~100 MFLOP of work: its per-block
bookkeeping dominates at 64 positions, and its 16-bit backward is slower still (5.5 ms in
bf16). The C++ backend (csrc/cpu/short_attention_kernel.h) computes each (batch, head) pair's
visible scores in L1/L2-resident fp32 tiles, skipping the masked upper triangle and padding,
and keeps the probabilities (fp32 [B, H, T, T rounded up to 16]) for a backward without a
second Q K^T: 1.1 ms there, in fp32 and bf16 alike (bench/test_bench_short_attention.py).

One deliberate difference from SDPA: a query that sees no key (a fully masked row) gets zeros,
and zero gradients, where SDPA returns NaN.
"""

from __future__ import annotations

import torch

from rlhf_fast.ops import _checks, _dispatch

_dispatch.IMPLEMENTED["short_attention"] = ("reference", "cpp")


def _visible(mask: torch.Tensor | None, is_causal: bool, steps: int, device) -> torch.Tensor:
    """[.., T, T] bool: which keys each query sees (True = attend)."""
    visible = torch.ones(steps, steps, dtype=torch.bool, device=device)
    if is_causal:
        visible = visible.tril()
    return visible if mask is None else visible & mask


def short_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    is_causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """The definition of `short_attention`, in fp32 (fp64 for fp64 inputs): softmax(scale q k^T
    over the visible keys) v for each query head, its KV head being head // (H / Hkv); rows
    with no visible key are 0. Returned in q's dtype."""
    heads, kv_heads = q.shape[1], k.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    wide = torch.promote_types(q.dtype, torch.float32)
    keys = k.to(wide).repeat_interleave(heads // kv_heads, dim=1)
    values = v.to(wide).repeat_interleave(heads // kv_heads, dim=1)
    scores = q.to(wide) @ keys.transpose(-1, -2) * scale
    visible = _visible(mask, is_causal, q.shape[2], q.device)
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # empty rows: 0/0 -> 0
    return (probs @ values).to(q.dtype)


class _FusedShortAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, is_causal, scale):
        out, probs = torch.ops.rlhf_fast.short_attention(q, k, v, mask, is_causal, scale)
        ctx.save_for_backward(q, k, v, probs, mask)
        ctx.is_causal, ctx.scale = is_causal, scale
        return out

    @staticmethod
    def backward(ctx, grad):
        _checks.first_order_backward("short_attention")
        q, k, v, probs, mask = ctx.saved_tensors
        dq, dk, dv = torch.ops.rlhf_fast.short_attention_backward(
            grad, q, k, v, probs, mask, ctx.is_causal, ctx.scale
        )
        return dq, dk, dv, None, None, None


def _check_mask(mask: object, batch: int, heads: int, steps: int, q: torch.Tensor):
    if mask is None:
        return None
    mask = _checks.tensor(mask, "mask")
    if mask.dtype != torch.bool:
        raise TypeError(
            f"mask must be bool (True = attend), got {mask.dtype}; additive float masks are "
            "not supported (use SDPA)"
        )
    _checks.same_device(mask, "mask", q, "q")
    if mask.dim() > 4 or mask.dim() < 2:
        raise ValueError(f"mask must be 2-D to 4-D, got shape {tuple(mask.shape)}")
    mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    if (
        mask.shape[0] not in (1, batch)
        or mask.shape[1] not in (1, heads)
        or tuple(mask.shape[2:]) != (steps, steps)
    ):
        raise ValueError(
            f"mask must broadcast to ({batch}, {heads}, {steps}, {steps}), got {tuple(mask.shape)}"
        )
    return mask


def short_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    is_causal: bool = False,
    scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Attention of q [B, H, T, D] over k, v [B, Hkv, T, D] (H a multiple of Hkv; same T, D,
    dtype and device; any strides) -> [B, H, T, D] in q's dtype. Keys are visible where `mask`
    (bool, broadcastable to [B, H, T, T], True = attend) is True and, with is_causal, at or
    before the query; scale defaults to D ** -0.5. Differentiable in q, k and v."""
    q = _checks.float_tensor(q, "q", 4)
    k = _checks.float_tensor(k, "k", 4)
    v = _checks.float_tensor(v, "v", 4)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
        _checks.same_device(t, name, q, "q")
    batch, heads, steps, dim = q.shape
    if k.shape[0] != batch or k.shape[2:] != q.shape[2:]:
        raise ValueError(
            f"k must be ({batch}, kv_heads, {steps}, {dim}) (q's batch, length and head_dim), "
            f"got {tuple(k.shape)}"
        )
    _checks.same_shape(v, "v", k, "k")
    if k.shape[1] == 0 or heads % k.shape[1]:
        raise ValueError(f"q's heads ({heads}) must be a multiple of k's ({k.shape[1]})")
    mask = _check_mask(mask, batch, heads, steps, q)
    scale = dim**-0.5 if scale is None else _checks.finite_float(scale, "scale")
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")
    backend = _dispatch.choose("short_attention", q.device, backend)
    if backend == "reference" or q.numel() == 0 or k.numel() == 0:
        return short_attention_reference(q, k, v, mask, is_causal=is_causal, scale=scale)
    return _FusedShortAttention.apply(q, k, v, mask, is_causal, scale)
