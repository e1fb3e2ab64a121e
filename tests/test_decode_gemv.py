"""rlhf_fast::decode_gemv_int4 / decode_gemv_int8 (csrc/cpu/decode_gemv_*): the decode GEMVs
with activations quantized on the fly (int8 per 32 columns for int4 weights, int16 per 128 for
int8), against a float64 product with the weight decoded here from the packed bytes, within
the error bound the activation quantization implies."""

from __future__ import annotations

import pytest
import torch
from test_quant_matmul import decode_float64

from rlhf_fast import _native
from rlhf_fast.quant.weight import quantize_weight

pytestmark = pytest.mark.skipif(
    _native.cpp is None or not hasattr(torch.ops.rlhf_fast, "decode_gemv_int4"),
    reason="the C++ extension is not built",
)

FORMATS = [(8, -1), (4, 32), (4, 64), (4, 96), (4, 128)]
# (M, K, N): K = 1, 31, 33, 100 ragged for every chunk; odd block counts (K = 33: 2 blocks, 100:
# 4, 1000: 32 blocks in 2 windows of 16); N not a multiple of the 4-channel tile.
SHAPES = [(1, 1, 3), (1, 31, 5), (2, 33, 9), (1, 100, 13), (3, 576, 37), (16, 1000, 6)]
CHUNK = {4: 32, 8: 128}  # columns that share one activation scale
LEVELS = {4: 127, 8: 32767}  # largest activation code


def call(x, qweight, bias):
    if qweight.bits == 8:
        return torch.ops.rlhf_fast.decode_gemv_int8(x, qweight.data, qweight.scales, bias)
    return torch.ops.rlhf_fast.decode_gemv_int4(
        x, qweight.data, qweight.scales, qweight.offsets, qweight.group_size,
        qweight.in_features, bias,
    )  # fmt: skip


def error_bound(x: torch.Tensor, weight: torch.Tensor, chunk: int, levels: int) -> torch.Tensor:
    """|y - x @ W.T| <= sum_k |W[n, k]| * (half a code step of k's chunk) + fp32 rounding."""
    m, k = x.shape
    padded = torch.nn.functional.pad(x.double().abs(), (0, -k % chunk))
    step = padded.view(m, -1, chunk).amax(-1) / levels  # [M, chunks]
    half_step = step.repeat_interleave(chunk, dim=1)[:, :k] / 2
    rounding = 1e-5 * (x.double().abs() @ weight.abs().T)
    return 1.01 * half_step @ weight.abs().T + rounding + 1e-6


@pytest.mark.parametrize("bits, group_size", FORMATS, ids=str)
@pytest.mark.parametrize("m, k, n", SHAPES, ids=str)
def test_within_the_activation_quantization_bound(bits, group_size, m, k, n):
    generator = torch.Generator().manual_seed(m * 7919 + k * 31 + n)
    qweight = quantize_weight(torch.randn(n, k, generator=generator), bits, max(group_size, 32))
    x = torch.randn(m, k, generator=generator)
    x[:, : min(k, 3)] *= 50  # an outlier chunk: its scale must not leak into other chunks
    if k >= 64:
        x[:, 32:64] = 0  # an all-zero chunk (scale 0)
    bias = torch.randn(n, generator=generator)
    weight = decode_float64(qweight)
    for with_bias in (False, True):
        b = bias if with_bias else None
        y = call(x, qweight, b)
        expected = x.double() @ weight.T + (bias.double() if with_bias else 0)
        assert y.dtype == torch.float32 and y.shape == (m, n)
        assert (
            (y.double() - expected).abs() <= error_bound(x, weight, CHUNK[bits], LEVELS[bits])
        ).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_and_strided_activations(dtype):
    generator = torch.Generator().manual_seed(3)
    qweight = quantize_weight(torch.randn(20, 200, generator=generator), 4, 32)
    wide = torch.randn(2, 400, generator=generator).to(dtype)
    x = wide[:, ::2]  # non-contiguous rows
    y = call(x, qweight, None)
    expected = x.double() @ decode_float64(qweight).T
    assert y.dtype == dtype
    torch.testing.assert_close(y.double(), expected, atol=1e-2 * expected.abs().max(), rtol=1e-2)


@pytest.mark.parametrize("bits, group_size", FORMATS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_non_finite_activations_propagate(bits, group_size, dtype):
    # NaN or inf has no int8 / int16 code: quantized, a NaN became a finite garbage output
    generator = torch.Generator().manual_seed(bits + group_size)
    qweight = quantize_weight(torch.randn(5, 300, generator=generator), bits, max(group_size, 32))
    x = torch.randn(3, 300, generator=generator).to(dtype)
    x[0, 7], x[1, 290] = float("nan"), float("-inf")
    y = call(x, qweight, None)
    expected = x.double() @ decode_float64(qweight).T
    assert y[0].isnan().all()
    torch.testing.assert_close(y[1].double(), expected[1], atol=0, rtol=0, equal_nan=True)
    torch.testing.assert_close(y[2].double(), expected[2], atol=0.05, rtol=0.02)


@pytest.mark.parametrize("bits", [4, 8])
def test_without_vnni_it_is_quant_matmul(bits):
    """Below AVX-512 the op runs the exact quant_matmul kernels of the ISA in use."""
    qweight = quantize_weight(torch.randn(9, 70), bits, 32)
    x = torch.randn(1, 70)
    previous = _native.cpp.cpu_isa()
    assert _native.cpp.set_cpu_isa("avx2") or _native.cpp.set_cpu_isa("scalar")
    try:
        y = call(x, qweight, None)
        if bits == 8:
            exact = torch.ops.rlhf_fast.quant_matmul_int8(x, qweight.data, qweight.scales, None)
        else:
            exact = torch.ops.rlhf_fast.quant_matmul_int4(
                x, qweight.data, qweight.scales, qweight.offsets, 32, 70, None
            )
    finally:
        _native.cpp.set_cpu_isa(previous)
    torch.testing.assert_close(y, exact, atol=0, rtol=0)


def test_bad_arguments():
    qweight = quantize_weight(torch.randn(8, 64), 4, 32)
    x = torch.randn(1, 64)
    op = torch.ops.rlhf_fast.decode_gemv_int4
    with pytest.raises(ValueError, match="in_features"):
        op(torch.randn(1, 65), qweight.data, qweight.scales, qweight.offsets, 32, 64, None)
    with pytest.raises(ValueError, match="group_size"):
        op(x, qweight.data, qweight.scales, qweight.offsets, 48, 64, None)
    with pytest.raises(TypeError, match="qdata"):
        op(x, qweight.data.to(torch.int8), qweight.scales, qweight.offsets, 32, 64, None)
    with pytest.raises(ValueError, match="scales"):
        op(x, qweight.data, qweight.scales[:, :1], qweight.offsets, 32, 64, None)
    with pytest.raises(ValueError, match="bias"):
        op(x, qweight.data, qweight.scales, qweight.offsets, 32, 64, torch.zeros(3))
    with pytest.raises(TypeError, match="x must be"):
        op(x.double(), qweight.data, qweight.scales, qweight.offsets, 32, 64, None)
    int8 = quantize_weight(torch.randn(8, 64), 8)
    with pytest.raises(ValueError, match="scales"):
        torch.ops.rlhf_fast.decode_gemv_int8(x, int8.data, int8.scales[:3], None)


def test_opcheck():
    qweight = quantize_weight(torch.randn(6, 40), 4, 32)
    x, bias = torch.randn(2, 40), torch.randn(6)
    args = (x, qweight.data, qweight.scales, qweight.offsets, 32, 40, bias)
    torch.library.opcheck(torch.ops.rlhf_fast.decode_gemv_int4.default, args)
    int8 = quantize_weight(torch.randn(6, 40), 8)
    args = (x, int8.data, int8.scales, None)
    torch.library.opcheck(torch.ops.rlhf_fast.decode_gemv_int8.default, args)


def test_quant_matmul_many_rows_under_inference_mode():
    """bf16 x with M >= 32 multiplies dequantized tiles in worker threads, which must run in
    the caller's inference mode (the lean decoder's prefill runs under torch.inference_mode)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        qweight = quantize_weight(torch.randn(20000, 64), 4, 32)  # 3 tiles of 8192 channels
        x = torch.randn(40, 64).bfloat16()
        with torch.inference_mode():
            y = torch.ops.rlhf_fast.quant_matmul_int4(
                x, qweight.data, qweight.scales, qweight.offsets, 32, 64, None
            )
    finally:
        torch.set_num_threads(previous)
    expected = x.double() @ decode_float64(qweight).T
    torch.testing.assert_close(y.double(), expected, atol=2e-2 * expected.abs().max(), rtol=2e-2)
