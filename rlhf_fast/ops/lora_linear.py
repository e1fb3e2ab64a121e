"""y = x @ W.T (+ bias) + scaling * (dropout(x) @ A.T) @ B.T: a LoRA linear layer in one op.

W (dense or a frozen `QuantizedWeight`) gets no gradient; x, A, B (and a bias that requires
grad) do. The LoRA branch is under 1% of the base GEMM's FLOPs at r = 16, so what costs in an
unfused layer (peft's) is everything around it: a second [M, N] output, the scale and the add
(more [M, N] passes), a second [M, K] input gradient and its sum, and the dropout's [M, K]
copies saved for backward. The fused backend removes those:

- forward: y = bias + x W^T, then y += (s * x A^T) B^T accumulated in place (GEMM, beta = 1);
- backward: dx = dy W, then dx += (s * dy B) A in place; dA and dB from the [M, r] products;
- saved: x (needed for dA anyway), the [M, r] product s * x A^T, and with dropout the keep
  mask packed 8 to a byte (peft keeps the float noise and a dropped copy of x: 8 bytes an
  element with fp32 adapters). Drawing the mask again in backward would save even that bit
  but costs a second bernoulli_, which on CPU is single-threaded, ~7 ns an element: more than
  the rest of the layer at small widths; packing and unpacking are one C++ pass each
  (csrc/cpu/lora_mask_bits.cpp);
- dropout's 1 / (1 - p) is applied to the [M, r] products, not to [M, K] tensors;
- a quantized W is never dequantized whole: the forward runs `ops.quant_matmul` (C++ kernels
  that unpack tiles), the backward's dy W dequantizes row blocks of W, one at a time.

Dropout draws its mask as torch.nn.Dropout does on CPU (`bernoulli_(1 - p)` over x's shape,
which makes the same draws whatever the tensor's dtype) and scales by 1 / (1 - p) rounded in
the LoRA weights' dtype, so with the same RNG state the reference, the fused path and peft's
layer drop the same elements.

Precision: the base GEMM runs in x's dtype (as F.linear); the LoRA products run in x's dtype
with the GEMMs' fp32 accumulation (like autocast), and their gradients are returned in A's and
B's dtypes (peft keeps fp32 adapters on a bf16 model: those get bf16-accurate gradients).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from rlhf_fast import _native
from rlhf_fast.ops import _checks, _dispatch
from rlhf_fast.ops.quant_matmul import quant_matmul
from rlhf_fast.quant.weight import QuantizedWeight

# "cpp": the autograd.Function below driving ATen's C++ GEMMs (oneDNN / MKL) with in-place
# accumulation; quantized weights: rlhf_fast's C++ quant_matmul forward and the C++ row-block
# decode (lora_dequantize_rows) in backward. "triton": the same Function with each direction's
# base GEMM and LoRA term in one Triton kernel (kernels/lora.py); dense weights only, quantized
# ones take the "cpp" path's structure on their device.
_dispatch.IMPLEMENTED["lora_linear"] = ("reference", "cpp", "triton")

# Weight elements dequantized at a time in backward (row blocks of W): 2M elements is 8 MB in
# fp32, small beside the weight's dense copy (64 MB for 4096 x 4096) and big enough that the
# GEMM over the block runs at full speed.
DEQUANT_BLOCK_ELEMENTS = 1 << 21


def _registered(name: str):
    """torch.ops.rlhf_fast.<name> where the C++ extension has it, else None."""
    if _native.cpp is None or not hasattr(torch.ops.rlhf_fast, name):
        return None
    return getattr(torch.ops.rlhf_fast, name)


_DEQUANTIZE_ROWS_OP = _registered("lora_dequantize_rows")
_PACK_KEEP_OP = _registered("lora_pack_keep")
_UNPACK_KEEP_OP = _registered("lora_unpack_keep")


def lora_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor | QuantizedWeight,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    *,
    dropout: float = 0.0,
) -> torch.Tensor:
    """The definition, in fp32 with plain autograd, returned in x's dtype (no gradient to W)."""
    if isinstance(weight, QuantizedWeight):
        dense = weight.dequantize(torch.float32).to(x.device)
    else:
        dense = weight.detach().float()
    x32 = x.float()
    dropped = x32
    if dropout > 0:
        dropped = x32 * dropout_mask(x.shape, dropout, x.device) * keep_scale(dropout, lora_A.dtype)
    y = F.linear(x32, dense, None if bias is None else bias.float())
    y = y + scaling * F.linear(F.linear(dropped, lora_A.float()), lora_B.float())
    return y.to(x.dtype)


# --------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------


def _check(x, weight, bias, lora_A, lora_B, scaling, dropout) -> tuple[float, float]:
    x = _checks.tensor(x, "x")
    if x.dtype not in _checks.FLOAT_DTYPES:
        raise TypeError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    if isinstance(weight, QuantizedWeight):
        out_features, in_features = weight.shape
        if weight.device != x.device:
            raise ValueError(f"weight is on {weight.device} but x is on {x.device}")
    else:
        weight = _checks.float_tensor(weight, "weight", 2)
        if weight.dtype != x.dtype:
            raise TypeError(f"weight must have x's dtype {x.dtype}, got {weight.dtype}")
        _checks.same_device(weight, "weight", x, "x")
        out_features, in_features = weight.shape
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(
            f"x must have shape [..., {in_features}] (in_features), got {tuple(x.shape)}"
        )
    if bias is not None:
        bias = _checks.float_tensor(bias, "bias", 1)
        if bias.shape[0] != out_features:
            raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
        if not isinstance(weight, QuantizedWeight) and bias.dtype != x.dtype:
            raise TypeError(f"bias must have x's dtype {x.dtype}, got {bias.dtype}")
        _checks.same_device(bias, "bias", x, "x")
    lora_A = _checks.float_tensor(lora_A, "lora_A", 2)
    lora_B = _checks.float_tensor(lora_B, "lora_B", 2)
    rank = lora_A.shape[0]
    if rank < 1 or lora_A.shape[1] != in_features:
        raise ValueError(
            f"lora_A must have shape [r >= 1, {in_features}], got {tuple(lora_A.shape)}"
        )
    if lora_B.shape != (out_features, rank):
        raise ValueError(
            f"lora_B must have shape ({out_features}, {rank}) (out_features, r), "
            f"got {tuple(lora_B.shape)}"
        )
    if lora_B.dtype != lora_A.dtype:
        raise TypeError(f"lora_B must have lora_A's dtype {lora_A.dtype}, got {lora_B.dtype}")
    _checks.same_device(lora_A, "lora_A", x, "x")
    _checks.same_device(lora_B, "lora_B", x, "x")
    scaling = _checks.finite_float(scaling, "scaling")
    dropout = _checks.finite_float(dropout, "dropout")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    return scaling, dropout


# --------------------------------------------------------------------------------------------
# The frozen base: x W^T forward, dy W backward
# --------------------------------------------------------------------------------------------


class _TorchEpilogue:
    """The LoRA term added in place to the base GEMM's output by a second GEMM (beta = 1)."""

    def forward_with_lora(self, x2d, bias, scaled_t, b) -> torch.Tensor:
        y = self.forward(x2d, bias)
        return y.addmm_(scaled_t, b.t())  # in place: no second [M, N] tensor, no add pass

    def grad_input_with_lora(self, grad_y, scaled_dt, a, keep) -> torch.Tensor:
        grad_x = self.grad_input(grad_y)
        if keep is None:
            return grad_x.addmm_(scaled_dt, a)
        return grad_x.add_(torch.mm(scaled_dt, a).mul_(keep))


class _DenseBase(_TorchEpilogue):
    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight.detach()

    def forward(self, x2d: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if bias is None:
            return torch.mm(x2d, self.weight.t())
        return torch.addmm(bias.detach(), x2d, self.weight.t())

    def grad_input(self, grad_y: torch.Tensor) -> torch.Tensor:
        return torch.mm(grad_y, self.weight)


def dequantize_rows(
    qweight: QuantizedWeight, start: int, stop: int, dtype: torch.dtype
) -> torch.Tensor:
    """Rows start:stop of the weight, [stop - start, in_features] in dtype: the C++ op
    (csrc/cpu/lora_dequantize_rows.cpp, one pass) on CPU, QuantizedWeight.dequantize of the
    rows elsewhere; both give the same bits."""
    offsets = None if qweight.offsets is None else qweight.offsets[start:stop]
    rows = QuantizedWeight(
        qweight.bits, qweight.group_size, (stop - start, qweight.in_features),
        qweight.data[start:stop], qweight.scales[start:stop], offsets,
    )  # fmt: skip
    if _DEQUANTIZE_ROWS_OP is not None and qweight.device.type == "cpu":
        return _DEQUANTIZE_ROWS_OP(
            rows.data, rows.scales, rows.offsets, rows.group_size, rows.in_features, dtype
        )
    return rows.dequantize(dtype)


class _QuantizedBase(_TorchEpilogue):
    def __init__(self, qweight: QuantizedWeight) -> None:
        self.qweight = qweight

    def forward(self, x2d: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        with torch.no_grad():
            return quant_matmul(x2d, self.qweight, None if bias is None else bias.detach())

    def grad_input(self, grad_y: torch.Tensor) -> torch.Tensor:
        """dy W = sum over row blocks b of dy[:, b] W[b, :], each block dequantized alone."""
        q = self.qweight
        out_features, in_features = q.shape
        rows = max(64, DEQUANT_BLOCK_ELEMENTS // in_features // 64 * 64)
        grad_x = None
        for start in range(0, out_features, rows):
            stop = min(start + rows, out_features)
            block = dequantize_rows(q, start, stop, grad_y.dtype)
            if grad_x is None:
                grad_x = torch.mm(grad_y[:, start:stop], block)
            else:
                grad_x.addmm_(grad_y[:, start:stop], block)
        return grad_x


class _TritonDenseBase:
    """One Triton GEMM per direction with the LoRA term in its epilogue (kernels/lora.py)."""

    def __init__(self, weight: torch.Tensor) -> None:
        from rlhf_fast.kernels.lora import matmul_low_rank  # triton may be absent

        self.weight = weight.detach()
        self.kernel = matmul_low_rank

    def forward_with_lora(self, x2d, bias, scaled_t, b) -> torch.Tensor:
        bias = None if bias is None else bias.detach()
        return self.kernel(x2d, self.weight.t(), scaled_t, b.t(), bias=bias)

    def grad_input_with_lora(self, grad_y, scaled_dt, a, keep) -> torch.Tensor:
        return self.kernel(grad_y, self.weight, scaled_dt, a, keep=keep)


# --------------------------------------------------------------------------------------------
# The fused autograd.Function
# --------------------------------------------------------------------------------------------


def dropout_mask(
    shape: torch.Size, p: float, device: torch.device, dtype: torch.dtype = torch.bool
) -> torch.Tensor:
    """The keep mask (0/1 in `dtype`) that torch.nn.Dropout draws on CPU for this shape:
    bernoulli_(1 - p) makes the same draws for every dtype (float ones draw fastest)."""
    return torch.empty(shape, dtype=dtype, device=device).bernoulli_(1 - p)


# Multiplying 8 bytes of 0/1 (one int64, little-endian) by _GATHER puts byte i's bit at bit
# 56 + i, every partial product at its own position (no carries): the top byte is the packed
# byte. Unpacking replicates the byte to 8 lanes (_SPREAD), keeps bit i in lane i (_LANES) and
# turns each lane into 0/1 by adding 0x7F (no lane carries out) and taking its top bit.
_GATHER = 0x0102040810204080
_SPREAD = 0x0101010101010101
_LANES = -0x7FBFDFEFF7FBFDFF  # 0x8040201008040201 as a signed int64
_LANE_ROUND = 0x7F7F7F7F7F7F7F7F
_LANE_TOP = -0x7F7F7F7F7F7F7F80  # 0x8080808080808080 as a signed int64


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A tensor of 0/1 (bool, uint8 or float) as bits, 8 to a byte (element 8j + i at bit i of
    byte j), zero-padded: one pass in C++ on CPU, int64 word arithmetic elsewhere."""
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
    if _PACK_KEEP_OP is not None and mask.device.type == "cpu":
        return _PACK_KEEP_OP(mask)
    if mask.dtype.is_floating_point:
        mask = mask.to(torch.uint8)
    flat = mask.reshape(-1)
    pad = -flat.numel() % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    words = flat.view(torch.uint8).view(torch.int64)  # int64 products wrap, as wanted
    return ((words * _GATHER) >> 56).to(torch.uint8)


def unpack_mask(
    packed: torch.Tensor, shape: torch.Size, dtype: torch.dtype = torch.bool
) -> torch.Tensor:
    """Inverse of pack_mask: a tensor of `shape` holding 0/1 in `dtype`."""
    if _UNPACK_KEEP_OP is not None and packed.device.type == "cpu" and dtype != torch.bool:
        return _UNPACK_KEEP_OP(packed, shape.numel(), dtype).view(shape)
    lanes = (packed.to(torch.int64) * _SPREAD) & _LANES
    # >> is arithmetic on int64: mask again after it (lane 7 would get the sign's ones)
    ones = ((((lanes + _LANE_ROUND) & _LANE_TOP) >> 7) & _SPREAD).view(torch.uint8)
    ones = ones.view(-1)[: shape.numel()].view(shape)
    return ones.view(torch.bool) if dtype == torch.bool else ones.to(dtype)


def keep_scale(p: float, dtype: torch.dtype) -> float:
    """1 / (1 - p) rounded as nn.Dropout's noise holds it in `dtype`."""
    return torch.ones((), dtype=dtype).div_(1 - p).item()


class _FusedLoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d, lora_A, lora_B, bias, base, scaling, dropout):
        compute = x2d.dtype
        a = lora_A.detach().to(compute)
        b = lora_B.detach().to(compute)
        keep = None
        lora_scale = scaling
        if dropout > 0:
            # x * keep / (1 - p): the 1 / (1 - p) rides on the [M, r] product, not on [M, K];
            # keep is 0/1 in x's dtype, because float multiplies are the fast masking on CPU.
            keep = dropout_mask(x2d.shape, dropout, x2d.device, compute)
            lora_scale = scaling * keep_scale(dropout, lora_A.dtype)
        dropped = x2d if keep is None else x2d * keep
        scaled_t = torch.mm(dropped, a.t()).mul_(lora_scale)  # [M, r]
        y = base.forward_with_lora(x2d, bias, scaled_t, b)

        ctx.base, ctx.lora_scale = base, lora_scale
        ctx.lora_dtype = lora_A.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        # x only where dA needs it, s * x A^T only where dB does; the mask as bits (peft keeps
        # the float noise and the dropped copy of x: 8 bytes an element with fp32 adapters).
        ctx.save_for_backward(
            x2d if ctx.needs_input_grad[1] else None,
            scaled_t if ctx.needs_input_grad[2] else None,
            a,
            b,
            None if keep is None else pack_mask(keep),
        )
        return y

    @staticmethod
    def backward(ctx, grad_y):
        # a, b and scaled_t are detached: second derivatives through them would be wrong.
        _checks.first_order_backward("lora_linear")
        x2d, scaled_t, a, b, packed_mask = ctx.saved_tensors
        keep = None
        if packed_mask is not None:
            keep = unpack_mask(packed_mask, torch.Size((grad_y.shape[0], a.shape[1])), a.dtype)
        need_x, need_a, need_b, need_bias = ctx.needs_input_grad[:4]
        grad_y = grad_y.to(a.dtype)
        grad_x = grad_a = grad_b = grad_bias = None
        if need_x or need_a:
            scaled_dt = torch.mm(grad_y, b).mul_(ctx.lora_scale)  # s / (1 - p) * dy B, [M, r]
        if need_x:
            grad_x = ctx.base.grad_input_with_lora(grad_y, scaled_dt, a, keep)
        if need_a:
            dropped = x2d if keep is None else x2d * keep
            grad_a = torch.mm(scaled_dt.t(), dropped).to(ctx.lora_dtype)
        if need_b:
            grad_b = torch.mm(grad_y.t(), scaled_t).to(ctx.lora_dtype)
        if need_bias:
            grad_bias = grad_y.sum(0).to(ctx.bias_dtype)
        return grad_x, grad_a, grad_b, grad_bias, None, None, None


def _lora_linear_fused(x, weight, bias, lora_A, lora_B, scaling, dropout, backend):
    if isinstance(weight, QuantizedWeight):
        # quant_matmul picks its own fastest backend for the device (C++ on CPU, CUDA/Triton
        # on GPU); the backward's dequantized row blocks go through torch's GEMM.
        base = _QuantizedBase(weight)
    elif backend == "triton":
        base = _TritonDenseBase(weight)
    else:
        base = _DenseBase(weight)
    out_features = weight.shape[0]
    x2d = x.reshape(-1, x.shape[-1])
    y = _FusedLoraLinear.apply(x2d, lora_A, lora_B, bias, base, scaling, dropout)
    return y.reshape(*x.shape[:-1], out_features)


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor | QuantizedWeight,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    *,
    dropout: float = 0.0,
    backend: str | None = None,
) -> torch.Tensor:
    """x [..., in] @ W.T (+ bias) + scaling * (dropout(x) @ lora_A.T) @ lora_B.T -> [..., out].

    weight: [out, in] dense in x's dtype, or a QuantizedWeight (int8 / int4); frozen.
    lora_A: [r, in], lora_B: [out, r], both of one float dtype (may differ from x's).
    dropout: probability of dropping an element of x on the LoRA branch (training only: pass
    0 in eval). Gradients flow to x, lora_A, lora_B and a bias that requires grad.
    """
    scaling, dropout = _check(x, weight, bias, lora_A, lora_B, scaling, dropout)
    backend = _dispatch.choose("lora_linear", x.device, backend)
    if backend == "reference":
        return lora_linear_reference(x, weight, bias, lora_A, lora_B, scaling, dropout=dropout)
    return _lora_linear_fused(x, weight, bias, lora_A, lora_B, scaling, dropout, backend)


# --------------------------------------------------------------------------------------------
# Blocks of rows, each with its own adapter (PPO's stacked roles: lora/row_groups.py)
# --------------------------------------------------------------------------------------------


class LoraRows(NamedTuple):
    """Rows [start, stop) of x2d and the LoRA adapter they run (no dropout)."""

    start: int
    stop: int
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: float


def lora_linear_by_rows_reference(
    x2d: torch.Tensor,
    weight: torch.Tensor | QuantizedWeight,
    bias: torch.Tensor | None,
    blocks: list[LoraRows],
) -> torch.Tensor:
    """The definition of lora_linear_by_rows, in fp32 with plain autograd (as
    lora_linear_reference), returned in x2d's dtype."""
    if isinstance(weight, QuantizedWeight):
        dense = weight.dequantize(torch.float32).to(x2d.device)
    else:
        dense = weight.detach().float()
    x32 = x2d.float()
    y = F.linear(x32, dense, None if bias is None else bias.float())
    pieces, row = [], 0
    for block in sorted(blocks, key=lambda b: b.start):
        pieces.append(y.new_zeros(block.start - row, y.shape[1]))  # rows of the base alone
        low_rank = F.linear(F.linear(x32[block.start : block.stop], block.lora_A.float()),
                            block.lora_B.float())  # fmt: skip
        pieces.append(block.scaling * low_rank)
        row = block.stop
    pieces.append(y.new_zeros(y.shape[0] - row, y.shape[1]))
    return (y + torch.cat(pieces)).to(x2d.dtype)


class _LoraLinearByRows(torch.autograd.Function):
    """One base GEMM over every row each way; each block's low-rank term in place on its rows.
    Per-block lora_linear calls would run the base once per block (GEMMs of fewer rows), and
    autograd would give each block's slice of x its own full-size zero-filled gradient to sum."""

    @staticmethod
    def forward(ctx, x2d, bias, base, spans, *adapters):
        compute = x2d.dtype
        y = base.forward(x2d, bias)
        saved = []
        for (start, stop, scaling), (lora_a, lora_b) in zip(
            spans, zip(adapters[0::2], adapters[1::2], strict=True), strict=True
        ):
            a, b = lora_a.detach().to(compute), lora_b.detach().to(compute)
            scaled_t = torch.mm(x2d[start:stop], a.t()).mul_(scaling)  # [rows, r]
            y[start:stop].addmm_(scaled_t, b.t())
            saved += [a, b, scaled_t]
        ctx.base, ctx.spans = base, spans
        ctx.lora_dtypes = [t.dtype for t in adapters]
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(x2d, *saved)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        _checks.first_order_backward("lora_linear")
        x2d, *saved = ctx.saved_tensors
        need_x, need_bias = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_y = grad_y.to(x2d.dtype)
        grad_x = ctx.base.grad_input(grad_y) if need_x else None
        grads = []
        for index, (start, stop, scaling) in enumerate(ctx.spans):
            a, b, scaled_t = saved[3 * index : 3 * index + 3]
            rows_grad = grad_y[start:stop]
            scaled_dt = torch.mm(rows_grad, b).mul_(scaling)  # s * dy B, [rows, r]
            if need_x:
                grad_x[start:stop].addmm_(scaled_dt, a)
            grads.append(torch.mm(scaled_dt.t(), x2d[start:stop]).to(ctx.lora_dtypes[2 * index]))
            grads.append(torch.mm(rows_grad.t(), scaled_t).to(ctx.lora_dtypes[2 * index + 1]))
        grad_bias = grad_y.sum(0).to(ctx.bias_dtype) if need_bias else None
        return grad_x, grad_bias, None, None, *grads


def lora_linear_by_rows(
    x2d: torch.Tensor,
    weight: torch.Tensor | QuantizedWeight,
    bias: torch.Tensor | None,
    blocks: list[LoraRows],
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """x2d [M, in] @ W.T (+ bias), plus on the rows of each block its own LoRA term,
    block.scaling * (x2d[rows] @ A.T) @ B.T (rows in no block get the base alone): the layer
    of several adapters run as one batch (PPO's policy and critic rows, lora/row_groups.py),
    without dropout. Blocks must not overlap. Gradients flow to x2d, each A and B and a bias
    that requires grad; each block's adapter is checked as lora_linear checks one."""
    blocks = sorted(blocks, key=lambda block: block.start)
    rows = x2d.shape[0] if isinstance(x2d, torch.Tensor) and x2d.dim() == 2 else None
    if rows is None:
        raise ValueError(f"x2d must be [M, in_features], got {getattr(x2d, 'shape', x2d)}")
    end = 0
    for block in blocks:
        if not (end <= block.start < block.stop <= rows):
            raise ValueError(f"blocks must be non-empty, in [0, {rows}) and not overlap, got "
                             f"{[(b.start, b.stop) for b in blocks]}")  # fmt: skip
        _check(x2d, weight, bias, block.lora_A, block.lora_B, block.scaling, 0.0)
        end = block.stop
    if not blocks:
        _checks.tensor(x2d, "x")
    backend = _dispatch.choose("lora_linear", x2d.device, backend)
    if backend == "reference":
        return lora_linear_by_rows_reference(x2d, weight, bias, blocks)
    # the torch epilogue on any device: one GEMM per block and direction is all the LoRA adds
    base = _QuantizedBase(weight) if isinstance(weight, QuantizedWeight) else _DenseBase(weight)
    spans = tuple((block.start, block.stop, float(block.scaling)) for block in blocks)
    adapters = [t for block in blocks for t in (block.lora_A, block.lora_B)]
    return _LoraLinearByRows.apply(x2d, bias, base, spans, *adapters)
