"""decode_linear: F.linear for the few rows of a decode step, with 16-bit weights on the C++ GEMV.

A decode step multiplies 1-4 rows by every weight of the model: a stream over the weights. With
bf16 (or fp16) weights torch's CPU path reads them at ~16 GB/s on the dev VM, slower than its
fp32 GEMV reads twice the bytes, so a bf16 model decoded slower than its fp32 copy.
rlhf_fast::decode_gemv_dense (csrc/cpu/dense_gemv_kernel.h) streams them at 31-42 GB/s (1.4-1.6x
torch's bf16 up to 4 rows on a 2048 x 5632 matrix); from ~6 rows torch's bf16 GEMM (AMX tiles
on this CPU) is the faster, so larger products stay with F.linear. Sums are fp32 either way;
the result has x's dtype, as F.linear's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlhf_fast import _native

GEMV_ROWS = 4  # up to this many rows the C++ GEMV beats torch's bf16 GEMM (see the docstring)
_SIXTEEN_BIT = (torch.bfloat16, torch.float16)


def uses_gemv(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether decode_linear(x, weight) runs the C++ GEMV."""
    return (
        _native.cpp is not None
        and weight.dtype in _SIXTEEN_BIT
        and weight.dim() == 2
        and x.device.type == "cpu"
        and weight.device.type == "cpu"
        and x.is_floating_point()
        and x.dim() >= 1
        and x.numel() <= GEMV_ROWS * x.shape[-1]
        and x.shape[-1] > 0
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    )


def decode_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x @ weight.T (+ bias), as F.linear(x, weight, bias) (x [..., in_features])."""
    if not uses_gemv(x, weight):
        return F.linear(x, weight, bias)
    rows = x.reshape(-1, x.shape[-1])
    y = torch.ops.rlhf_fast.decode_gemv_dense(rows, weight, bias)
    return y.view(*x.shape[:-1], weight.shape[0])
