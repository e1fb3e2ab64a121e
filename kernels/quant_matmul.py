"""y = x @ W.T (+ bias) with W weight-only quantized (rlhf_fast.quant), as Triton kernels.

Formats (rlhf_fast/quant/weight.py): int8 is q [N, K] with one fp32 scale per output row;
int4 is q in 0..15 packed two per byte, 16 bytes per block of 32 weights (byte 16b + j holds
q[32b + j] low and q[32b + 16 + j] high), with fp16 scale and offset per group of g weights.

Shape: a program owns a [BLOCK_M, BLOCK_N] tile of y and walks K in steps of BLOCK_K; the
weight is never dequantized in memory, only tile by tile in registers.

int4. BLOCK_K divides the group size, so a K step lies inside one group and each output
column has a single (scale, offset) there. Then

    sum_k x[m, k] (q[n, k] s[n] + o[n]) = s[n] * sum_k x[m, k] q[n, k] + o[n] * sum_k x[m, k]

so the step is one dot of x with the raw codes (0..15, exact in fp16 and bf16), scaled per
column, plus the offset times the step's row sum of x: no per-weight multiply-add, and no
rounding of dequantized weights to x's precision. The packed bytes are loaded as a
[BLOCK_K / 2, BLOCK_N] tile and split into low and high nibbles without reordering them:
instead x is loaded twice, once at the low halves (k = 32b + j) and once at the high halves
(k = 32b + 16 + j) of each 32-block, and the step is two dots of BLOCK_K / 2. Reordering
registers (join + permute) would cost shuffles; the two x loads are contiguous 16-runs.

int8. Same idea with one scale per row: y = s[n] * sum_k x q, applied once after the K loop.

Precision: accumulation is always fp32, and the codes are exact in every dot input type.
fp16 / bf16 x feed the tensor cores as they are. fp32 x uses a 3xTF32 dot on the GPU: x is
split into two TF32 parts (about 22 of fp32's 24 bits) and, since a code has no low part, two
tensor-core products recover x q to ~2^-22, well inside the fp32 tolerance of the reference.
An IEEE fp32 dot would match the reference's arithmetic, but it runs on the FMA units and,
compiled for sm_90, spills thousands of bytes per thread at these tiles. Under the Triton
interpreter the dot is plain fp32, and bf16 x is upcast to fp32 right after the load
(interpreted bf16 is unreliable).
Edges: x reads 0 past K (so the int4 pad never contributes); N is masked on every load and the
store.

Launch shapes (_GPU_SHAPES) were checked by compiling each for sm_90 (triton.compile with a
GPUTarget, no GPU needed) and reading ptxas's report: none spills. The tests compile the
decode and large-M shapes again for sm_90. Their speed is unmeasured (no GPU yet): tune on one.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INT4_BLOCK = 32


@triton.jit
def _int4_kernel(
    x_ptr, data_ptr, scales_ptr, offsets_ptr, bias_ptr, y_ptr,
    M, N, K, group_size,
    stride_xm, stride_xk, stride_data, stride_scales, stride_offsets, stride_ym,
    HAS_BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    # Byte c of a K step holds the codes of k = 32 (c // 16) + c % 16 (low) and that + 16 (high).
    bytes_ = tl.arange(0, BLOCK_K // 2)
    low_k = (bytes_ // 16) * 32 + bytes_ % 16
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_low = k0 + low_k
        k_high = k_low + 16
        x_low = tl.load(
            x_ptr + rows64[:, None] * stride_xm + k_low[None, :] * stride_xk,
            mask=row_ok[:, None] & (k_low < K)[None, :], other=0.0,
        ).to(DOT_DTYPE)  # fmt: skip
        x_high = tl.load(
            x_ptr + rows64[:, None] * stride_xm + k_high[None, :] * stride_xk,
            mask=row_ok[:, None] & (k_high < K)[None, :], other=0.0,
        ).to(DOT_DTYPE)  # fmt: skip
        packed = tl.load(
            data_ptr + cols64[None, :] * stride_data + (k0 // 2 + bytes_)[:, None],
            mask=col_ok[None, :] & (k_low < K)[:, None], other=0,
        )  # fmt: skip
        q_low = (packed & 0xF).to(DOT_DTYPE)
        q_high = (packed >> 4).to(DOT_DTYPE)
        step = tl.dot(x_low, q_low, input_precision=PRECISION)
        step = tl.dot(x_high, q_high, step, input_precision=PRECISION)
        group = k0 // group_size
        scale = tl.load(scales_ptr + cols64 * stride_scales + group, mask=col_ok, other=0.0)
        offset = tl.load(offsets_ptr + cols64 * stride_offsets + group, mask=col_ok, other=0.0)
        x_sum = tl.sum(x_low.to(tl.float32), axis=1) + tl.sum(x_high.to(tl.float32), axis=1)
        acc += (
            step * scale.to(tl.float32)[None, :] + x_sum[:, None] * offset.to(tl.float32)[None, :]
        )
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    y = y_ptr + rows64[:, None] * stride_ym + cols[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _int8_kernel(
    x_ptr, data_ptr, scales_ptr, bias_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_data, stride_ym,
    HAS_BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + ks
        k_ok = k < K
        x = tl.load(
            x_ptr + rows64[:, None] * stride_xm + k[None, :] * stride_xk,
            mask=row_ok[:, None] & k_ok[None, :], other=0.0,
        ).to(DOT_DTYPE)  # fmt: skip
        q = tl.load(
            data_ptr + cols64[None, :] * stride_data + k[:, None],
            mask=col_ok[None, :] & k_ok[:, None], other=0,
        ).to(DOT_DTYPE)  # fmt: skip
        acc = tl.dot(x, q, acc, input_precision=PRECISION)
    acc *= tl.load(scales_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    y = y_ptr + rows64[:, None] * stride_ym + cols[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _dot_dtype(dtype: torch.dtype):
    if dtype == torch.float16:
        return tl.float16
    if dtype == torch.bfloat16 and not _interpreted():
        return tl.bfloat16
    return tl.float32


# (fp32 x, bits, M class) -> (BLOCK_M, BLOCK_N, largest BLOCK_K, num_warps, num_stages);
# M classes: decode-like M <= 16, M <= 64, larger. Small M is a weight stream: 64-wide N tiles
# give enough programs to cover the SMs, long K steps keep each load wide. Large M uses
# wgmma-sized tiles; int4 keeps BLOCK_M at 64 because its per-step partial product doubles
# the accumulator registers (128 x 128 spilled). fp32 tiles are smaller: 3xTF32 operands
# take twice the registers and shared memory.
_GPU_SHAPES = {
    (False, 4, 0): (16, 64, 128, 4, 4),
    (False, 4, 1): (32, 128, 64, 4, 4),
    (False, 4, 2): (64, 128, 64, 8, 3),
    (False, 8, 0): (16, 64, 128, 4, 4),
    (False, 8, 1): (32, 128, 64, 4, 4),
    (False, 8, 2): (128, 128, 64, 8, 3),
    (True, 4, 0): (16, 64, 64, 4, 3),
    (True, 4, 1): (32, 64, 64, 4, 3),
    (True, 4, 2): (64, 128, 32, 8, 3),
    (True, 8, 0): (16, 64, 64, 4, 3),
    (True, 8, 1): (32, 64, 64, 4, 3),
    (True, 8, 2): (128, 128, 32, 8, 3),
}


def _launch_shape(
    bits: int, dot_dtype, m: int, n: int, k_limit: int
) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages); BLOCK_K <= k_limit, a power of 2."""
    if _interpreted():
        # The interpreter pays per program and per step, not per element: few, large tiles.
        block_m = min(64, max(16, triton.next_power_of_2(m)))
        return block_m, min(64, max(16, triton.next_power_of_2(n))), min(k_limit, 128), 1, 1
    m_class = 0 if m <= 16 else 1 if m <= 64 else 2
    block_m, block_n, block_k, warps, stages = _GPU_SHAPES[dot_dtype == tl.float32, bits, m_class]
    return block_m, block_n, min(block_k, k_limit), warps, stages


def _precision(dot_dtype) -> str | None:
    if dot_dtype != tl.float32:
        return None  # fp16 / bf16 products are exact in the fp32 accumulator
    return "ieee" if _interpreted() else "tf32x3"


def quant_matmul_triton(x: torch.Tensor, qweight, bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] (fp32 / bf16 / fp16, any strides) @ qweight.dequantize().T (+ bias) -> [M, N]
    in x's dtype, fp32 accumulation. Arguments are checked by `rlhf_fast.ops.quant_matmul`."""
    m, k = x.shape
    n = qweight.out_features
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    if k == 0:
        return y.zero_() if bias is None else y.copy_(bias.expand(m, n))
    data = qweight.data if qweight.data.stride(-1) == 1 else qweight.data.contiguous()
    scales = qweight.scales.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    dot_dtype = _dot_dtype(x.dtype)
    common = dict(HAS_BIAS=bias is not None, DOT_DTYPE=dot_dtype, PRECISION=_precision(dot_dtype))
    if qweight.bits == 4:
        group_size = qweight.group_size
        # The largest power-of-2 multiple of 32 that divides the group (g is a multiple of 32).
        k_limit = _INT4_BLOCK * (group_size // _INT4_BLOCK & -(group_size // _INT4_BLOCK))
        block_m, block_n, block_k, warps, stages = _launch_shape(4, dot_dtype, m, n, k_limit)
        offsets = qweight.offsets.contiguous()
        grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
        _int4_kernel[grid](
            x, data, scales, offsets, bias if bias is not None else scales, y,
            m, n, k, group_size,
            x.stride(0), x.stride(1), data.stride(0), scales.stride(0), offsets.stride(0),
            y.stride(0),
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps,
            num_stages=stages, **common,
        )  # fmt: skip
        return y
    block_m, block_n, block_k, warps, stages = _launch_shape(8, dot_dtype, m, n, 128)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _int8_kernel[grid](
        x, data, scales, bias if bias is not None else scales, y,
        m, n, k,
        x.stride(0), x.stride(1), data.stride(0), y.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps,
        num_stages=stages, **common,
    )  # fmt: skip
    return y
