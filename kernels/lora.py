"""The fused LoRA linear's two big products as one Triton GEMM with a low-rank epilogue.

    out [M, P] = a [M, Q] @ b [Q, P]  +  (c [M, R] @ d [R, P]) * keep [M, P]  (+ bias [P])

forward:   a = x,  b = W^T, c = s * dropout(x) A^T, d = B^T, bias   (no keep mask)
backward:  a = dy, b = W,   c = s * dy B / (1 - p), d = A,   keep = dropout's 0/1 mask

Each program owns one [BLOCK_M, BLOCK_P] output tile: it runs the K loop of the base GEMM,
then multiplies its rows of c (r <= a few hundred columns) by its columns of d and adds the
result in registers, so the LoRA term never exists as an [M, P] tensor and the output is
written once (peft writes three [M, N] tensors and reads them back to add them). The [M, r]
products c are tiny and come from torch. Transposes are strides: nothing is copied.

Precision: fp32 accumulation; fp32 operands go through tl.dot's "ieee" mode (no TF32), 16-bit
operands through the tensor cores. Under the interpreter (TRITON_INTERPRET=1, CPU tests)
every operand is upcast to fp32 right after its load, because the interpreter mishandles bf16.
Not tuned: one tile shape for all sizes.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
# Tile shapes: the interpreter runs a Python loop per tile, so it gets big tiles.
_BLOCKS = (64, 64, 64) if _INTERPRETING else (64, 64, 32)  # (M, P, Q)
_MIN_DOT = 16  # tl.dot needs every dimension >= 16


@triton.jit
def _matmul_low_rank_kernel(
    a_ptr, b_ptr, c_ptr, d_ptr, keep_ptr, bias_ptr, out_ptr,
    M, P, Q, R,
    stride_am, stride_aq, stride_bq, stride_bp, stride_cm, stride_cr, stride_dr, stride_dp,
    stride_nm, stride_np, stride_om, stride_op, stride_bias,
    HAS_KEEP: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    row_ok = rows[:, None] < M
    col_ok = cols[None, :] < P
    rows64 = rows.to(tl.int64)[:, None]
    cols64 = cols.to(tl.int64)[None, :]

    acc = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
    inner = tl.arange(0, BLOCK_Q)
    for q0 in range(0, Q, BLOCK_Q):
        q = q0 + inner
        a = tl.load(
            a_ptr + rows64 * stride_am + q[None, :] * stride_aq,
            mask=row_ok & (q[None, :] < Q), other=0.0,
        )  # fmt: skip
        b = tl.load(
            b_ptr + q[:, None] * stride_bq + cols64 * stride_bp,
            mask=(q[:, None] < Q) & col_ok, other=0.0,
        )  # fmt: skip
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)

    low = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
    ranks = tl.arange(0, BLOCK_R)
    for r0 in range(0, R, BLOCK_R):
        r = r0 + ranks
        c = tl.load(
            c_ptr + rows64 * stride_cm + r[None, :] * stride_cr,
            mask=row_ok & (r[None, :] < R), other=0.0,
        )  # fmt: skip
        d = tl.load(
            d_ptr + r[:, None] * stride_dr + cols64 * stride_dp,
            mask=(r[:, None] < R) & col_ok, other=0.0,
        )  # fmt: skip
        if UPCAST:
            c = c.to(tl.float32)
            d = d.to(tl.float32)
        low = tl.dot(c, d, low, input_precision=PRECISION)
    if HAS_KEEP:
        keep = tl.load(
            keep_ptr + rows64 * stride_nm + cols64 * stride_np, mask=row_ok & col_ok, other=0
        )
        low = low * keep.to(tl.float32)
    acc += low
    if HAS_BIAS:
        # By its stride: a bias may be a strided view (a slice of a fused qkv bias).
        bias = tl.load(bias_ptr + cols64 * stride_bias, mask=col_ok, other=0.0)
        acc += bias.to(tl.float32)
    tl.store(
        out_ptr + rows64 * stride_om + cols64 * stride_op,
        acc.to(out_ptr.dtype.element_ty),
        mask=row_ok & col_ok,
    )


def matmul_low_rank(
    a: torch.Tensor,
    b: torch.Tensor,
    c: torch.Tensor,
    d: torch.Tensor,
    *,
    keep: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """a @ b + (c @ d) * keep (+ bias), in a's dtype; any strides (views of transposes, a
    strided bias)."""
    (m, q), (q2, p), (m2, r), (r2, p2) = a.shape, b.shape, c.shape, d.shape
    assert q == q2 and m == m2 and r == r2 and p == p2, "inconsistent shapes"
    out = torch.empty((m, p), dtype=a.dtype, device=a.device)
    block_m, block_p, block_q = _BLOCKS
    block_r = max(_MIN_DOT, min(64, triton.next_power_of_2(r)))
    precision = "ieee" if a.dtype == torch.float32 else "tf32"  # tf32: ignored for 16-bit
    keep_arg = keep if keep is not None else out  # never read when HAS_KEEP is False
    bias_arg = bias if bias is not None else out
    grid = (triton.cdiv(m, block_m), triton.cdiv(p, block_p))
    _matmul_low_rank_kernel[grid](
        a, b, c, d, keep_arg, bias_arg, out, m, p, q, r,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        d.stride(0), d.stride(1), keep_arg.stride(0), keep_arg.stride(1),
        out.stride(0), out.stride(1), bias_arg.stride(0),
        HAS_KEEP=keep is not None, HAS_BIAS=bias is not None, UPCAST=_INTERPRETING,
        PRECISION=precision, BLOCK_M=block_m, BLOCK_P=block_p, BLOCK_Q=block_q,
        BLOCK_R=block_r,
    )  # fmt: skip
    return out
