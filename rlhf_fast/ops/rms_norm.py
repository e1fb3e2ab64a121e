"""RMSNorm as Llama, Qwen2 and Mistral define it (HF's LlamaRMSNorm), forward and backward.

Training and full-sequence forwards call it once per norm: 2 per layer + 1. HF's module is
seven torch ops forward and about ten backward, each a broadcasting pass over the activations;
the C++ backend is one pass each way (csrc/cpu/rms_norm_op.cpp).
"""

from __future__ import annotations

import torch

from rlhf_fast.ops import _checks, _dispatch

_dispatch.IMPLEMENTED["rms_norm"] = ("reference", "cpp")


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The definition of `rms_norm`, HF's LlamaRMSNorm.forward: x normalised in fp32 by the
    root of its mean square over the last dimension (+ eps), rounded back to x's dtype, then
    times weight, in the dtype torch promotes weight and x to."""
    normalized = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    return weight * normalized.to(x.dtype)


class _FusedRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        shape = x.shape
        x2d = x.reshape(-1, shape[-1]).contiguous()
        weight32 = weight.detach().float().contiguous()
        out_dtype = torch.promote_types(weight.dtype, x.dtype)
        y, rstd = torch.ops.rlhf_fast.rms_norm(x2d, weight32, eps, out_dtype)
        ctx.save_for_backward(x2d, weight32, rstd)
        ctx.shape, ctx.weight_dtype = shape, weight.dtype
        return y.reshape(shape)

    @staticmethod
    def backward(ctx, grad_y):
        _checks.first_order_backward("rms_norm")
        x2d, weight32, rstd = ctx.saved_tensors
        need_x, need_weight = ctx.needs_input_grad[:2]
        grad = grad_y.reshape(x2d.shape).contiguous()
        if grad.dtype not in (torch.float32, x2d.dtype):
            grad = grad.float()
        grad_x, grad_weight = torch.ops.rlhf_fast.rms_norm_backward(
            grad, x2d, weight32, rstd, need_weight
        )
        return (
            grad_x.reshape(ctx.shape) if need_x else None,
            grad_weight.to(ctx.weight_dtype) if need_weight else None,
            None,
        )


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *, backend: str | None = None
) -> torch.Tensor:
    """weight * (x / sqrt(mean(x^2, -1) + eps)) as HF's LlamaRMSNorm computes it (see
    rms_norm_reference): x [..., H] float32 / bfloat16 / float16, weight [H] float; the result
    has x's shape and the promoted dtype of weight and x. Differentiable in x and weight."""
    x = _checks.tensor(x, "x")
    if x.dtype not in _checks.FLOAT_DTYPES:
        raise TypeError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must be [..., H] with H > 0, got shape {tuple(x.shape)}")
    weight = _checks.float_tensor(weight, "weight", 1)
    if weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight must have shape ({x.shape[-1]},) (x's last dimension), got "
                         f"{tuple(weight.shape)}")  # fmt: skip
    _checks.same_device(weight, "weight", x, "x")
    eps = _checks.finite_float(eps, "eps")
    backend = _dispatch.choose("rms_norm", x.device, backend)
    if backend == "reference":
        return rms_norm_reference(x, weight, eps)
    return _FusedRMSNorm.apply(x, weight, eps)
