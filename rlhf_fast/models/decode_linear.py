"""decode_linear: F.linear for the few rows of a decode step, on the C++ GEMV where it is faster.

A decode step multiplies a few rows by every weight of the model: a stream over the weights.
rlhf_fast::decode_gemv_dense (csrc/cpu/dense_gemv_kernel.h) streams fp32, bf16 and fp16 weights
with fp32 sums; bf16 x with bf16 weights runs on AMX-BF16 tiles where the CPU has them
(csrc/cpu/dense_gemv_bf16_amx.cpp), else on AVX512_BF16's vdpbf16ps where it has that
(csrc/cpu/dense_gemv_bf16_dot_avx512.h). Where it beats torch's CPU F.linear:
- bf16 x and weights on AMX tiles, 1-16 rows. Dev VM (Xeon, AMX), one thread, us per call,
  torch / ours, the PPO bench's h256-L4 layers (in cache) at 8 rows: 768 x 256 86 / 31,
  256 x 256 35 / 10, 1376 x 256 71 / 21, 256 x 688 45 / 18, 2000 x 256 171 / 70; 2.0-2.7x at
  16 rows, 2.7-4.6x at 1-4 (a busy VM: absolute times drift 2x, the ratios less). 5632 x 2048
  rotated over 646 MB: 1.9-2.5 ms against 3.0-3.4 ms at 1-16 rows. Two threads (bench/
  test_bench_dense_gemv.py), on a VM whose other core was busy: 1.5-3.5x at 8 rows, with
  stalls of a scheduler slice on either side.
- bf16 x and weights with vdpbf16ps (AVX512_BF16, no AMX), 1-16 rows. AMD EPYC Zen 4 (a
  shared 2-core VM), one thread, CPU time per call, torch / ours, interleaved, medians of 7: the
  PPO bench's layers (in cache) at 8 rows 768 x 256 42 / 26, 256 x 256 24 / 10, 1376 x 256
  63 / 46, 256 x 688 40 / 25, 2000 x 256 85 / 66 (1.3-2.4x); 3.2-5.7x at 1 row, 1.5-3.1x at 4,
  1.15-1.8x at 16. 5632 x 2048 rotated over 185 MB, ms: 2.04 / 1.21 at 1 row (19 GB/s; torch's
  sum read 28 GB/s), 2.21 / 1.58 at 4, 2.57 / 2.16 at 8, 3.42 / 2.87 at 16 (1.2-1.7x). Two
  threads, wall time, in a quiet spell: 1.3-5.7x. The widening kernel below ran 1.1-1.9x
  slower than vdpbf16ps at all of these sizes (one thread).
- bf16 otherwise (fp32 x, or neither AMX nor AVX512_BF16), 1-4 rows: torch reads bf16 at
  ~16 GB/s, slower than its fp32 GEMV reads twice the bytes; ours 1.1-1.6x torch. From ~6 rows
  torch's bf16 GEMM (AMX tiles) is the faster.
- fp16, 1-16 rows: 1.5x torch at 4 rows, 1.25x at 8, even at 16 (this CPU has no AMX-FP16).
- fp32, 1-16 rows: even at 1-2 rows (both read at the bandwidth), 1.9-2.2x torch at 4-12 rows,
  where torch's small-M sgemm is far from either bound; 1.2x at 16. This is the PPO rollout's
  shape (one row per prompt).
Larger products, and anything under autograd, stay with F.linear. The result has x's dtype, as
F.linear's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlhf_fast import _native

# Up to this many rows (of x) the C++ GEMV beats torch's F.linear, by weight dtype (docstring);
# bf16 x with bf16 weights on AMX tiles: BF16_TILE_ROWS; with vdpbf16ps: BF16_DOT_ROWS (it won
# at all of 1, 4, 8 and 16 rows on Zen 4, so up to the op's limit).
GEMV_ROWS = {torch.bfloat16: 4, torch.float16: 16, torch.float32: 16}
BF16_TILE_ROWS = 16
BF16_DOT_ROWS = 16


def gemv_rows(x_dtype: torch.dtype, weight_dtype: torch.dtype) -> int:
    """The most rows of x that decode_linear sends to the C++ GEMV (0: never)."""
    if _native.cpp is None or weight_dtype not in GEMV_ROWS:
        return 0
    if x_dtype == weight_dtype == torch.bfloat16:
        if _native.cpp.dense_gemv_bf16_tiles():
            return BF16_TILE_ROWS
        if _native.cpp.dense_gemv_bf16_dot():
            return BF16_DOT_ROWS
    return GEMV_ROWS[weight_dtype]


def uses_gemv(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether decode_linear(x, weight) runs the C++ GEMV."""
    return (
        weight.dim() == 2
        and x.device.type == "cpu"
        and weight.device.type == "cpu"
        and x.is_floating_point()
        and x.dim() >= 1
        and x.shape[-1] > 0
        and x.numel() <= gemv_rows(x.dtype, weight.dtype) * x.shape[-1]
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
