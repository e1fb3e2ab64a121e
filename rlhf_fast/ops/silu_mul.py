"""silu(gate) * up: the SwiGLU product of Llama-family MLPs, forward and backward.

HF's MLP runs it as F.silu, then a multiply; autograd's backward is silu_backward and two
multiplies: five passes over [tokens, intermediate] tensors, the largest activations of a layer.
The C++ backend is one pass each way (csrc/cpu/silu_mul_kernel.h, per SIMD level) for fp32,
bf16 and fp16, computed in fp32 and rounded once to the inputs' dtype (torch's 16-bit ops round
the silu and then the product).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlhf_fast.ops import _checks, _dispatch

_dispatch.IMPLEMENTED["silu_mul"] = ("reference", "cpp")


def silu_mul_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The definition of `silu_mul`, as HF's LlamaMLP computes it: F.silu(gate) * up."""
    return F.silu(gate) * up


class _FusedSiluMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        gate, up = gate.contiguous(), up.contiguous()
        ctx.save_for_backward(gate, up)
        return torch.ops.rlhf_fast.silu_mul(gate, up)

    @staticmethod
    def backward(ctx, grad):
        _checks.first_order_backward("silu_mul")
        gate, up = ctx.saved_tensors
        grad_gate, grad_up = torch.ops.rlhf_fast.silu_mul_backward(grad.contiguous(), gate, up)
        return grad_gate, grad_up


def silu_mul(gate: torch.Tensor, up: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """silu(gate) * up, elementwise, for gate and up of one shape, float dtype and device;
    differentiable in both."""
    gate, up = _checks.tensor(gate, "gate"), _checks.tensor(up, "up")
    if gate.dtype not in _checks.FLOAT_DTYPES:
        raise TypeError(f"gate must be float32, bfloat16 or float16, got {gate.dtype}")
    if up.dtype != gate.dtype:
        raise TypeError(f"up must have gate's dtype {gate.dtype}, got {up.dtype}")
    _checks.same_shape(up, "up", gate, "gate")
    _checks.same_device(up, "up", gate, "gate")
    backend = _dispatch.choose("silu_mul", gate.device, backend)
    if backend == "reference":
        return silu_mul_reference(gate, up)
    return _FusedSiluMul.apply(gate, up)
