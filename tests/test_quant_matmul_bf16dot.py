"""The int4 GEMV on AVX512_BF16 (quant_gemv_bf16dot_avx512.h: x split into exact bf16 terms,
vdpbf16ps on 128 + code) against the float64 oracle, at every C++ ISA this CPU runs: under
"avx512" on a CPU with AVX512_BF16 it serves int4 at up to 16 rows (fp32 x: up to 2), below
that and elsewhere the fp32 kernels do. Its shapes are the ones its layout makes special: an
odd number of 32-column blocks (the last 64-column pair is half a row), K ragged inside a
group, more than 16 groups (several windows of group scales), channel counts that are not a
multiple of its 4- or 2-channel tiles, row counts around its 4-row blocks."""

from __future__ import annotations

import pytest
import torch
from backends_under_test import cpu_backend_params, using
from test_quant_matmul import assert_close_to_oracle

from rlhf_fast import ops
from rlhf_fast.quant.weight import quantize_weight

# (M, K, N). K = 96: 3 blocks; 200: ragged group and 7 blocks; 1056: 33 groups of 32 (three
# windows); 2100: ragged everywhere.
SHAPES = [(1, 96, 5), (1, 200, 37), (2, 1056, 9), (3, 2100, 6), (5, 96, 7), (16, 200, 11),
          (1, 4096, 13), (2, 33, 3)]  # fmt: skip
# fp32 x is split exactly (3 bf16 terms) and summed in fp32: as tight as the fp32 kernel.
# bf16 / fp16 y: their own rounding.
RELATIVE_TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def check(y, x, qweight, bias):
    assert_close_to_oracle(y, x, qweight, bias, RELATIVE_TOLERANCE)


@pytest.mark.parametrize("backend", cpu_backend_params())
@pytest.mark.parametrize("group_size", [32, 64, 128, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_few_rows_match_the_oracle(backend, group_size, dtype):
    generator = torch.Generator().manual_seed(group_size + 7)
    for index, (m, k, n) in enumerate(SHAPES):
        qweight = quantize_weight(torch.randn(n, k, generator=generator), 4, group_size)
        # a column slice of a wider tensor: rows are not contiguous
        x = torch.randn(m, k + 9, generator=generator)[:, 5 : 5 + k].to(dtype)
        bias = torch.randn(n, generator=generator) if index % 2 else None
        with using(backend) as name:
            y = ops.quant_matmul(x, qweight, bias, backend=name)
        check(y, x, qweight, bias)


@pytest.mark.parametrize("backend", cpu_backend_params())
def test_large_and_tiny_activations(backend):
    # The third bf16 term of fp32 x holds its last 8 bits: x spanning 2^-30 .. 2^30 within a
    # row keeps the split exact (bf16 has fp32's exponent range).
    generator = torch.Generator().manual_seed(3)
    qweight = quantize_weight(torch.randn(21, 320, generator=generator), 4, 32)
    magnitudes = 2.0 ** torch.randint(-30, 30, (2, 320), generator=generator).float()
    x = torch.randn(2, 320, generator=generator) * magnitudes
    with using(backend) as name:
        y = ops.quant_matmul(x, qweight, backend=name)
    check(y, x, qweight, None)


# Long rows: a tile's x terms and two tiles' codes outgrow 24 KB of L1 (bf16 x at one row from
# K ~ 4096; fp32 x sooner), so the kernel prefetches the next tile into L2 only. K = 5632: the
# MLP down projection, 11 windows at g32; 4160: 65 pairs, the last window partial.
@pytest.mark.parametrize("backend", cpu_backend_params())
@pytest.mark.parametrize("group_size", [32, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_long_rows_match_the_oracle(backend, group_size, dtype):
    generator = torch.Generator().manual_seed(group_size + 11)
    for index, (m, k, n) in enumerate([(1, 5632, 10), (2, 4160, 5), (5, 5632, 3)]):
        qweight = quantize_weight(torch.randn(n, k, generator=generator), 4, group_size)
        x = torch.randn(m, k + 3, generator=generator)[:, 2 : 2 + k].to(dtype)
        bias = torch.randn(n, generator=generator) if index % 2 == 0 else None
        with using(backend) as name:
            y = ops.quant_matmul(x, qweight, bias, backend=name)
        check(y, x, qweight, bias)
