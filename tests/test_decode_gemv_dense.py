"""rlhf_fast::decode_gemv_dense (csrc/cpu/dense_gemv_kernel.h) on every CPU SIMD level against a
float64 product, and models/decode_linear.py, which routes decode steps to it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from backends_under_test import cpu_backend_params, using

from rlhf_fast import _native
from rlhf_fast.models import decode_linear as decode_linear_module
from rlhf_fast.models.decode_linear import GEMV_ROWS, decode_linear, uses_gemv

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


def test_opcheck():
    x, weight = torch.randn(3, 20), torch.randn(6, 20).bfloat16()
    torch.library.opcheck(torch.ops.rlhf_fast.decode_gemv_dense, (x, weight, torch.randn(6)))


@pytest.mark.parametrize("dtype", list(GEMV_ROWS), ids=str)
def test_decode_linear_routes_few_rows(monkeypatch, dtype):
    calls = []
    op = torch.ops.rlhf_fast.decode_gemv_dense

    def counting(x, weight, bias):
        calls.append(x.shape)
        return op(x, weight, bias)

    monkeypatch.setattr(decode_linear_module.torch.ops.rlhf_fast, "decode_gemv_dense", counting)
    limit = GEMV_ROWS[dtype]
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
