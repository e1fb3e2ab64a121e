"""y = x @ W.T (+ bias) with W a weight-only quantized matrix (rlhf_fast.quant)."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from rlhf_fast import _native
from rlhf_fast.ops import _checks, _dispatch
from rlhf_fast.quant.weight import QuantizedWeight

# Backends register their kernels here as they land: name -> fn(x2d, qweight, bias) -> y2d.
KERNELS: dict = {}
_dispatch.IMPLEMENTED["quant_matmul"] = ("reference",)


def register_kernel(backend: str, kernel) -> None:
    KERNELS[backend] = kernel
    implemented = _dispatch.IMPLEMENTED["quant_matmul"]
    if backend not in implemented:
        _dispatch.IMPLEMENTED["quant_matmul"] = implemented + (backend,)
    _dispatch.forget_automatic_picks()


def quant_matmul_reference(
    x: torch.Tensor, qweight: QuantizedWeight, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """The definition: x @ qweight.dequantize().T (+ bias), in fp32, returned in x's dtype."""
    weight = qweight.dequantize(torch.float32).to(x.device)
    y = F.linear(x.float(), weight, None if bias is None else bias.float())
    return y.to(x.dtype)


def _check(x, qweight, bias) -> None:
    x = _checks.tensor(x, "x")
    if x.dtype not in _checks.FLOAT_DTYPES:
        raise TypeError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    if not isinstance(qweight, QuantizedWeight):
        raise TypeError(
            f"qweight must be a rlhf_fast.quant.QuantizedWeight, got {type(qweight).__name__}"
        )
    if x.dim() == 0 or x.shape[-1] != qweight.in_features:
        raise ValueError(
            f"x must have shape [..., {qweight.in_features}] (in_features), got {tuple(x.shape)}"
        )
    if qweight.device != x.device:
        raise ValueError(f"qweight is on {qweight.device} but x is on {x.device}")
    if bias is not None:
        bias = _checks.tensor(bias, "bias")
        if bias.dtype not in _checks.FLOAT_DTYPES:
            raise TypeError(f"bias must be float32, bfloat16 or float16, got {bias.dtype}")
        if bias.shape != (qweight.out_features,):
            raise ValueError(
                f"bias must have shape ({qweight.out_features},) (out_features), "
                f"got {tuple(bias.shape)}"
            )
        _checks.same_device(bias, "bias", x, "x")


def quant_matmul(
    x: torch.Tensor,
    qweight: QuantizedWeight,
    bias: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """x [..., in_features] (fp32 / bf16 / fp16) @ the dequantized weight.T, fp32 accumulation.

    Returns [..., out_features] in x's dtype. The weight is never dequantized in full by the
    fast backends: they unpack it tile by tile.
    """
    _check(x, qweight, bias)
    backend = _dispatch.choose("quant_matmul", x.device, backend)
    if backend == "reference":
        return quant_matmul_reference(x, qweight, bias)
    leading = x.shape[:-1]
    x2d = x.reshape(-1, qweight.in_features)
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or (bias is not None and bias.requires_grad)
    )
    if needs_grad:
        y = _FusedQuantMatmul.apply(x2d, qweight, bias, KERNELS[backend])
    else:
        y = KERNELS[backend](x2d, qweight, bias)
    return y.reshape(*leading, qweight.out_features)


class _FusedQuantMatmul(torch.autograd.Function):
    """The weight is frozen, but gradients must reach x (LoRA adapters and trainable layers
    below a quantized one) and a trainable bias. Forward runs the fast kernel; backward is
    grad_y @ W on the dequantized weight (a dense copy only while backward runs)."""

    @staticmethod
    def forward(ctx, x2d, qweight, bias, kernel):
        ctx.qweight = qweight
        ctx.x_dtype = x2d.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return kernel(x2d, qweight, bias)

    @staticmethod
    def backward(ctx, grad_y):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            weight = ctx.qweight.dequantize(torch.float32).to(grad_y.device)
            grad_x = (grad_y.float() @ weight).to(ctx.x_dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_y.float().sum(0).to(ctx.bias_dtype)
        return grad_x, None, grad_bias, None


def registered_quant_matmul(x, qweight, bias):
    """The registered ops: on CPU tensors the C++ kernels (csrc/cpu/quant_matmul_kernel.h:
    weights unpacked in registers, fp32 products and accumulation for every activation dtype),
    on CUDA tensors the CUDA GEMV (csrc/cuda/quant_gemv.cu)."""
    if qweight.bits == 8:
        return torch.ops.rlhf_fast.quant_matmul_int8(x, qweight.data, qweight.scales, bias)
    return torch.ops.rlhf_fast.quant_matmul_int4(
        x, qweight.data, qweight.scales, qweight.offsets, qweight.group_size,
        qweight.in_features, bias,
    )  # fmt: skip


if _native.cpp is not None and hasattr(torch.ops.rlhf_fast, "quant_matmul_int4"):
    register_kernel("cpp", registered_quant_matmul)


def _quant_matmul_triton(x, qweight, bias):
    # Imported on first use: the package must import where triton is not installed.
    from rlhf_fast.kernels.quant_matmul import quant_matmul_triton

    return quant_matmul_triton(x, qweight, bias)


register_kernel("triton", _quant_matmul_triton)


@functools.cache
def _triton_installed() -> bool:
    return _dispatch._triton_missing() is None


def _quant_matmul_cuda(x, qweight, bias):
    """Decode (one row) on the CUDA GEMV, which reads each weight byte once; larger M on the
    Triton GEMM, which reuses each unpacked weight tile across rows, or, where triton is not
    installed, on the GEMV too (correct for any M, each row re-reading the weight)."""
    if x.shape[0] != 1 and _triton_installed():
        return _quant_matmul_triton(x, qweight, bias)
    return registered_quant_matmul(x, qweight, bias)  # the same torch ops, dispatched to CUDA


if _native.cuda is not None and hasattr(torch.ops.rlhf_fast, "quant_matmul_int4"):
    register_kernel("cuda", _quant_matmul_cuda)
