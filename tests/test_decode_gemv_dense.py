"""rlhf_fast::decode_gemv_dense (csrc/cpu/dense_gemv_kernel.h) on every CPU SIMD level against a
float64 product, and models/decode_linear.py, which routes decode steps to it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from backends_under_test import cpu_backend_params, using

from rlhf_fast import _native
from rlhf_fast.models import decode_linear as decode_linear_module
from rlhf_fast.models.decode_linear import (
    BF16_DOT_ROWS,
    GEMV_ROWS,
    decode_linear,
    gemv_rows,
    uses_gemv,
)

pytestmark = pytest.mark.skipif(
    _native.cpp is None or not hasattr(torch.ops.rlhf_fast, "decode_gemv_dense"),
    reason="the C++ extension is not built",
)
ISAS = [p for p in cpu_backend_params() if p.values[0][0] == "cpp"]
# (M, K, N): every row-block size 1-4 and 16 (4 blocks), K ragged against 8 and 16 lanes or
# empty, N not a multiple of the 4-channel block, or 1
SHAPES = [(1, 1, 1), (1, 7, 5), (2, 33, 9), (3, 100, 13), (4, 576, 37), (5, 16, 4), (16, 300, 6),
          (2, 0, 3)]  # fmt: skip
WEIGHT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def oracle(x, weight, bias):
    y = x.double() @ weight.double().T
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m, k, n", SHAPES)
@pytest.mark.parametrize("weight_dtype", WEIGHT_DTYPES, ids=str)
def test_matches_float64(isa, m, k, n, weight_dtype):
    generator = torch.Generator().manual_seed(m * 1000 + k + n)
    x = torch.randn(m, k, generator=generator)
    weight = torch.randn(n, k, generator=generator).to(weight_dtype)
    bias = torch.randn(n, generator=generator) if n % 2 else None
    with using(isa):
        y = torch.ops.rlhf_fast.decode_gemv_dense(x, weight, bias)
    assert y.dtype == torch.float32 and y.shape == (m, n)
    # fp32 sums of exact products: a few ulps of sum |x||w| per output
    scale = x.abs().double() @ weight.abs().double().T + 1.0
    assert ((y.double() - oracle(x, weight, bias)).abs() <= 4e-7 * scale * max(k, 1) ** 0.5).all()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float16], ids=str)
def test_16_bit_and_strided_inputs(isa, x_dtype):
    generator = torch.Generator().manual_seed(3)
    both = torch.randn(3, 2 * 70, generator=generator).to(x_dtype)
    x = both[:, ::2]  # column stride 2
    fused = torch.randn(2 * 11, 70, generator=generator).bfloat16()
    weight = fused[::2]  # every other row of a bigger matrix: row stride 140
    with using(isa):
        y = torch.ops.rlhf_fast.decode_gemv_dense(x, weight, None)
    assert y.dtype == x_dtype
    expected = oracle(x.float(), weight, None).to(x_dtype)
    torch.testing.assert_close(y, expected, atol=2e-2, rtol=1e-2)


def bf16_reference(x, weight, bias):
    """F.linear's bf16 result: fp32 sums of the bf16 products, the bias added, one rounding."""
    y = x.float() @ weight.float().T
    return (y if bias is None else y + bias.float()).bfloat16()


# bf16 x with bf16 weights: on avx512, AMX tiles where the CPU has them, else vdpbf16ps where it
# has AVX512_BF16 (1-7 rows: channel blocks of 3-8; 8-16 rows: 16-channel blocks transposed in
# 512-column chunks). (K, N) pairs: K below, at and past the 32 bf16 of one tile row or step,
# odd, many steps with a ragged tail, past two 512-column chunks with a ragged tail, and 2048
# (rows of 4 KB); N 1, under one 16-channel tile, and past 64 channels (four tiles, single
# tiles, a ragged tile)
BF16_SIZES = [(1, 1), (31, 7), (32, 9), (33, 1), (94, 13), (257, 83), (688, 21), (64, 150),
              (1100, 19), (2048, 35)]  # fmt: skip


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m", range(1, 17))
def test_bf16_inputs_match_rounded_fp32(isa, m):
    generator = torch.Generator().manual_seed(m)
    for k, n in BF16_SIZES:
        x = torch.randn(m, k, generator=generator).bfloat16()
        weight = torch.randn(n, k, generator=generator).bfloat16()
        bias = torch.randn(n, generator=generator).bfloat16() if (k + m) % 2 else None
        with using(isa):
            y = torch.ops.rlhf_fast.decode_gemv_dense(x, weight, bias)
        assert y.dtype == torch.bfloat16 and y.shape == (m, n)
        expected = bf16_reference(x, weight, bias)
        # The kernel's fp32 sums differ from the reference's only in the order of the exact
        # products (a few fp32 ulps of sum |x||w|); rounding both to bf16 can then land on
        # either side of a rounding boundary: at most one bf16 ulp, <= 2^-7 of the value.
        scale = x.abs().float() @ weight.abs().float().T + 1.0
        bound = 4e-7 * scale * k**0.5 + 2.0**-7 * expected.float().abs()
        assert ((y.float() - expected.float()).abs() <= bound).all(), (k, n)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m", [1, 5, 8, 16])
def test_bf16_exact_sums_round_like_torch(isa, m):
    """Small integers: every product and partial sum is exact in fp32 whatever the order, so
    the one rounding to bf16 (to nearest even, sums up to ~2^14 lose bits) must match torch's
    bit for bit; a bound of one ulp would let a truncating kernel through."""
    generator = torch.Generator().manual_seed(100 + m)
    for k, n in [(300, 37), (1100, 19)]:
        x = torch.randint(-4, 5, (m, k), generator=generator).bfloat16()
        weight = torch.randint(-4, 5, (n, k), generator=generator).bfloat16()
        bias = torch.randint(-300, 300, (n,), generator=generator).float()
        with using(isa):
            y = torch.ops.rlhf_fast.decode_gemv_dense(x, weight, bias)
        assert torch.equal(y, bf16_reference(x, weight, bias)), (k, n)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m", [5, 16])
def test_bf16_split_over_threads(isa, m):
    """Enough products for two threads: the split falls inside a 16-channel tile (500)."""
    generator = torch.Generator().manual_seed(11)
    x = torch.randn(m, 520, generator=generator).bfloat16()
    weight = torch.randn(1000, 520, generator=generator).bfloat16()
    bias = torch.randn(1000, generator=generator)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with using(isa):
            y = torch.ops.rlhf_fast.decode_gemv_dense(x, weight, bias)
    finally:
        torch.set_num_threads(threads)
    expected = bf16_reference(x, weight, bias)
    scale = x.abs().float() @ weight.abs().float().T + 1.0
    bound = 4e-7 * scale * 520**0.5 + 2.0**-7 * expected.float().abs()
    assert ((y.float() - expected.float()).abs() <= bound).all()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m", [6, 9, 16])
def test_bf16_strided_inputs_and_special_values(isa, m):
    generator = torch.Generator().manual_seed(5)
    both = torch.randn(m, 2 * 45, generator=generator).bfloat16()
    x = both[:, 1::2]  # column stride 2
    weight = torch.randn(2 * 19, 45, generator=generator).bfloat16()[::2]  # row stride 90
    x[2, 40] = float("inf")
    x[4, 3] = float("nan")
    weight[17, 44] = float("-inf")  # in the ragged last channels of a 16-channel block
    with using(isa):
        y = torch.ops.rlhf_fast.decode_gemv_dense(x, weight, None)
    expected = bf16_reference(x, weight, None)
    assert torch.equal(y.isnan(), expected.isnan()) and torch.equal(y.isinf(), expected.isinf())
    finite = expected.isfinite()
    torch.testing.assert_close(y[finite], expected[finite], atol=0.1, rtol=2.0**-7)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m, k, n", [(3, 0, 4), (0, 5, 4), (2, 6, 0)])
def test_bf16_empty_products(isa, m, k, n):
    x, weight, bias = torch.randn(m, k).bfloat16(), torch.randn(n, k).bfloat16(), torch.randn(n)
    with using(isa):
        y = torch.ops.rlhf_fast.decode_gemv_dense(x, weight, bias)
        unbiased = torch.ops.rlhf_fast.decode_gemv_dense(x, weight, None)
    assert y.dtype == unbiased.dtype == torch.bfloat16 and y.shape == unbiased.shape == (m, n)
    assert torch.equal(y, bias.bfloat16().expand(m, n)) and not unbiased.any()


@pytest.mark.parametrize("m", [1, 4, 8, 16])
def test_bf16_dot_runs_where_expected(m):
    """vdpbf16ps reads denormal inputs as zero (its definition): 2^-130 x 1 sums to exactly 0
    on it, and to a denormal on the widening kernel. So the output shows which kernel ran."""
    x = torch.full((m, 40), 2.0**-130).bfloat16()
    weight = torch.ones(3, 40).bfloat16()
    assert (x != 0).all()
    with using(("cpp", "active")):
        y = torch.ops.rlhf_fast.decode_gemv_dense(x, weight, None)
        widened = torch.ops.rlhf_fast.decode_gemv_dense(x.float(), weight, None)
    assert (widened != 0).all()  # fp32 x: always the widening kernel
    dot = _native.cpp.dense_gemv_bf16_dot()
    assert dot == (
        _native.cpp.cpu_isa() == "avx512"
        and "avx512_bf16" in _cpu_flags()
        and not _native.cpp.dense_gemv_bf16_tiles()
    )
    if not _native.cpp.dense_gemv_bf16_tiles():  # AMX also flushes: nothing to tell apart
        assert bool((y == 0).all()) == dot and bool((y != 0).all()) == (not dot)
    with using(("cpp", "avx2")):  # below avx512: never
        assert not _native.cpp.dense_gemv_bf16_dot()
        assert (torch.ops.rlhf_fast.decode_gemv_dense(x, weight, None) != 0).all()


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@pytest.mark.skipif(
    _native.cpp is None or not _native.cpp.dense_gemv_bf16_tiles(), reason="no AMX-BF16 tiles"
)
def test_bf16_tiles_leave_torch_amx_matmul_intact():
    """Our kernel configures and releases the tile registers on torch's threads; oneDNN's bf16
    matmul (AMX at this many rows) must still be right before and after it."""
    generator = torch.Generator().manual_seed(7)
    big_x = torch.randn(96, 256, generator=generator).bfloat16()
    weight = torch.randn(80, 256, generator=generator).bfloat16()
    x = big_x[:8]
    torch_before = F.linear(big_x, weight)
    ours = torch.ops.rlhf_fast.decode_gemv_dense(x, weight, None)
    torch_after = F.linear(big_x, weight)
    assert torch.equal(torch_before, torch_after)
    expected = bf16_reference(big_x, weight, None)
    torch.testing.assert_close(torch_after, expected, atol=0.1, rtol=2.0**-7)
    torch.testing.assert_close(ours, expected[:8], atol=0.1, rtol=2.0**-7)


def test_bad_arguments():
    x, weight = torch.randn(2, 8), torch.randn(5, 8).bfloat16()
    op = torch.ops.rlhf_fast.decode_gemv_dense
    with pytest.raises(ValueError, match="at most 16 rows"):
        op(torch.randn(17, 8), weight, None)
    with pytest.raises(ValueError, match=r"weight must be \[out_features, 8\]"):
        op(x, torch.randn(5, 9).bfloat16(), None)
    with pytest.raises(ValueError, match="x must be 2-D"):
        op(x[0], weight, None)
    with pytest.raises(TypeError, match="weight must be float32, bfloat16 or float16"):
        op(x, weight.double(), None)
    with pytest.raises(TypeError, match="x must be float32, bfloat16 or float16"):
        op(x.long(), weight, None)
    with pytest.raises(ValueError, match=r"bias must have shape \[5\]"):
        op(x, weight, torch.randn(4))


@pytest.mark.parametrize("m", [3, 12])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck(m, x_dtype):
    x, weight = torch.randn(m, 20).to(x_dtype), torch.randn(6, 20).bfloat16()
    torch.library.opcheck(torch.ops.rlhf_fast.decode_gemv_dense, (x, weight, torch.randn(6)))


@pytest.mark.parametrize("dtype", list(GEMV_ROWS), ids=str)
def test_decode_linear_routes_few_rows(monkeypatch, dtype):
    calls = []
    op = torch.ops.rlhf_fast.decode_gemv_dense

    def counting(x, weight, bias):
        calls.append(x.shape)
        return op(x, weight, bias)

    monkeypatch.setattr(decode_linear_module.torch.ops.rlhf_fast, "decode_gemv_dense", counting)
    limit = gemv_rows(dtype, dtype)
    weight, bias = torch.randn(9, 16).to(dtype), torch.randn(9).to(dtype)
    x = torch.randn(1, limit, 16).to(dtype)  # leading dims are flattened
    with torch.no_grad():
        y = decode_linear(x, weight, bias)
        assert calls == [(limit, 16)] and y.shape == (1, limit, 9)
        torch.testing.assert_close(y, F.linear(x, weight, bias), atol=2e-2, rtol=1e-2)
        decode_linear(torch.randn(limit + 1, 16).to(dtype), weight)  # many rows: torch's
        decode_linear(torch.randn(2, 16).double(), weight.double())  # a dtype it lacks: torch's
    assert len(calls) == 1
    grad_x = torch.randn(2, 16).to(dtype).requires_grad_(True)
    assert not uses_gemv(grad_x, weight)  # under autograd: F.linear, which has a backward
    decode_linear(grad_x, weight).float().sum().backward()
    assert grad_x.grad is not None


def test_gemv_rows_follow_the_bf16_kernel():
    tiles, dot = _native.cpp.dense_gemv_bf16_tiles(), _native.cpp.dense_gemv_bf16_dot()
    assert not (tiles and dot)  # AMX keeps priority
    expected = 16 if tiles else BF16_DOT_ROWS if dot else GEMV_ROWS[torch.bfloat16]
    assert gemv_rows(torch.bfloat16, torch.bfloat16) == expected
    assert gemv_rows(torch.float32, torch.bfloat16) == GEMV_ROWS[torch.bfloat16]  # widened
    assert gemv_rows(torch.float32, torch.float64) == 0
    with using(("cpp", "scalar")):  # no tiles nor vdpbf16ps below avx512
        assert not _native.cpp.dense_gemv_bf16_tiles() and not _native.cpp.dense_gemv_bf16_dot()
        assert gemv_rows(torch.bfloat16, torch.bfloat16) == GEMV_ROWS[torch.bfloat16]
