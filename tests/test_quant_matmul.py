"""ops.quant_matmul on every CPU backend against a float64 product with the weight decoded
here from the packed bytes (independently of QuantizedWeight.dequantize)."""

from __future__ import annotations

import importlib
import sys

import pytest
import torch
from backends_under_test import cpu_backend_params, using

from rlhf_fast import _native, ops
from rlhf_fast.offload.generate import intra_op_threads
from rlhf_fast.ops.quant_matmul import registered_quant_matmul
from rlhf_fast.quant.weight import QuantizedWeight, quantize_weight

# (M, K, N): K = 200 and 576 are ragged for g = 128 (and 200 for 64 and 32), N = 37 and 9 are
# not multiples of the 4-channel tile, M = 130 is not a multiple of the 4-row tile.
SHAPES = [(1, 64, 37), (3, 200, 37), (16, 576, 20), (130, 1000, 9), (5, 4096, 12), (4, 700, 6)]
# int4 with a group size that is a multiple of 128 and 16-bit x at M <= 16 takes the VNNI GEMV
# (int16 activations) where the CPU has it; int4 with bf16 x at M >= 32 (AVX-512) or other x at
# M >= 64 dequantized tiles + torch's GEMM (M = 130 below); other cases the fp32 kernels.
FORMATS = [(8, -1), (4, 32), (4, 64), (4, 128), (4, 256)]
# fp32: fp32 products and accumulation; 16-bit: the output's own rounding dominates.
RELATIVE_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def decode_float64(qweight: QuantizedWeight) -> torch.Tensor:
    """The [N, K] weight in float64, read straight from the layout in weight.py's docstring."""
    n, k = qweight.shape
    if qweight.bits == 8:
        return qweight.data.double() * qweight.scales.double()[:, None]
    packed = qweight.data.view(n, -1, 16).long()  # [N, blocks, 16 bytes]
    codes = torch.cat([packed & 15, packed >> 4], dim=2).reshape(n, -1).double()
    group = torch.arange(codes.shape[1]) // qweight.group_size
    scales = qweight.scales.double()[:, group]
    offsets = qweight.offsets.double()[:, group]
    return (codes * scales + offsets)[:, :k]


def expected_output(x, qweight, bias):
    y = x.double() @ decode_float64(qweight).T
    return y if bias is None else y + bias.double()


def assert_close_to_oracle(y, x, qweight, bias, tolerances=None):
    """y within a relative tolerance per x dtype (`tolerances`, default RELATIVE_TOLERANCE) of
    the float64 oracle, scaled by the largest |y|."""
    expected = expected_output(x, qweight, bias)
    assert y.dtype == x.dtype and y.shape == expected.shape
    tolerance = (tolerances or RELATIVE_TOLERANCE)[x.dtype]
    scale = expected.abs().max().item() + 1e-30
    torch.testing.assert_close(y.double(), expected, atol=tolerance * scale, rtol=tolerance)


def make_weight(bits, group_size, n, k, generator):
    weight = torch.randn(n, k, generator=generator)
    return quantize_weight(weight, bits, 32 if bits == 8 else group_size)


@pytest.mark.parametrize("backend", cpu_backend_params())
@pytest.mark.parametrize("bits, group_size", FORMATS, ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_matches_float64_oracle(backend, bits, group_size, dtype):
    generator = torch.Generator().manual_seed(bits * 1000 + group_size)
    for index, (m, k, n) in enumerate(SHAPES):
        qweight = make_weight(bits, group_size, n, k, generator)
        x = torch.randn(m, k, generator=generator).to(dtype)
        bias = torch.randn(n, generator=generator) if index % 2 else None
        with using(backend) as name:
            y = ops.quant_matmul(x, qweight, bias, backend=name)
        assert_close_to_oracle(y, x, qweight, bias)


@pytest.mark.parametrize("backend", cpu_backend_params())
@pytest.mark.parametrize("bits", [8, 4])
def test_strided_and_batched_inputs(backend, bits):
    generator = torch.Generator().manual_seed(7)
    qweight = make_weight(bits, 64, 21, 200, generator)
    wide = torch.randn(6, 230, generator=generator)
    column_slice = wide[:, 17:217]  # row stride 230
    transposed = torch.randn(200, 5, generator=generator).T  # column stride 5
    batched = torch.randn(2, 3, 200, generator=generator)
    bias = torch.randn(21, generator=generator).bfloat16()  # bias of another dtype
    for x in (column_slice, transposed, batched):
        with using(backend) as name:
            y = ops.quant_matmul(x, qweight, bias, backend=name)
        assert y.shape == (*x.shape[:-1], 21)
        flat = x.reshape(-1, 200)
        assert_close_to_oracle(y.reshape(-1, 21), flat, qweight, bias.float())


@pytest.mark.parametrize("backend", cpu_backend_params())
@pytest.mark.parametrize("threads", [1, 2])
def test_many_rows_across_weight_tiles(backend, threads):
    # The many-row int4 path dequantizes tiles of channels (256 at K = 4096, up to one per
    # thread) into a per-thread buffer reused across calls and writes each tile's GEMM into its
    # column slice of the output: N = 300 is two tiles (1 thread) with a ragged last one, and
    # each call follows one with other weights in the same buffers.
    generator = torch.Generator().manual_seed(11)
    with intra_op_threads(threads):
        for dtype, m in ((torch.bfloat16, 40), (torch.float32, 70), (torch.float16, 65)):
            for n in (300, 133):
                qweight = make_weight(4, 64, n, 4096, generator)
                x = torch.randn(m, 4096, generator=generator).to(dtype)
                bias = torch.randn(n, generator=generator)
                with using(backend) as name, torch.inference_mode():
                    y = ops.quant_matmul(x, qweight, bias, backend=name)
                assert_close_to_oracle(y, x, qweight, bias)


@pytest.mark.parametrize("backend", cpu_backend_params())
@pytest.mark.parametrize("threads", [1, 2])
def test_many_rows_at_the_tile_width_floor(backend, threads):
    # Past K = 2048 (bf16) / 1024 (fp32) a 1 MiB tile is under 256 channels, so tiles are 256
    # wide: N = 600 is 256 + 256 + 88 on 1 thread; N = 200 is less than one tile. K = 3000 ends
    # in a partial group (g = 128) and a partial 32-weight block. M = 32 (bf16) and 64 (fp32,
    # fp16) are the thresholds of the tiled path, 31 and 63 just below them; x is a column
    # slice of a wider tensor (row stride 3017).
    generator = torch.Generator().manual_seed(23)
    with intra_op_threads(threads):
        for n in (600, 200):
            qweight = make_weight(4, 128, n, 3000, generator)
            bias = torch.randn(n, generator=generator)
            for dtype, m in ((torch.bfloat16, 32), (torch.bfloat16, 31), (torch.float32, 64),
                             (torch.float32, 63), (torch.float16, 64)):  # fmt: skip
                x = torch.randn(m, 3017, generator=generator).to(dtype)[:, 9:3009]
                with using(backend) as name:
                    y = ops.quant_matmul(x, qweight, bias, backend=name)
                assert_close_to_oracle(y, x, qweight, bias)
                with using(backend) as name:
                    y = ops.quant_matmul(x, qweight, backend=name)
                assert_close_to_oracle(y, x, qweight, None)


@pytest.mark.parametrize("backend", cpu_backend_params())
def test_pad_codes_are_never_used(backend):
    # K = 40 pads to 64 with g = 64: the pad's codes are arbitrary, and x has only 40 columns.
    generator = torch.Generator().manual_seed(3)
    qweight = make_weight(4, 64, 7, 40, generator)
    garbage = qweight.data.clone()
    garbage[:, 16:] |= 0xF0  # high nibbles of block 1: codes 48..63
    garbage[:, 24:] |= 0x0F  # low nibbles of its bytes 8..15: codes 40..47
    noisy = QuantizedWeight(4, 64, qweight.shape, garbage, qweight.scales, qweight.offsets)
    x = torch.randn(3, 40, generator=generator)
    with using(backend) as name:
        y = ops.quant_matmul(x, noisy, backend=name)
    torch.testing.assert_close(y, ops.quant_matmul_reference(x, qweight), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", cpu_backend_params())
def test_empty_batch(backend):
    qweight = make_weight(4, 32, 5, 64, torch.Generator().manual_seed(0))
    with using(backend) as name:
        y = ops.quant_matmul(torch.empty(0, 64), qweight, backend=name)
    assert y.shape == (0, 5)


@pytest.mark.parametrize("backend", cpu_backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("group_size", [64, 128])
def test_non_finite_activations_propagate(backend, dtype, group_size):
    # A NaN or inf in x must give what x @ W.T gives (NaN, +-inf), on every path: the int16
    # activation codes of the VNNI GEMV (16-bit x, M <= 16, g = 128) cannot hold them.
    generator = torch.Generator().manual_seed(group_size)
    qweight = make_weight(4, group_size, 6, 256, generator)
    x = torch.randn(3, 256, generator=generator).to(dtype)
    x[0, 5], x[1, 200] = float("nan"), float("inf")
    with using(backend) as name:
        y = ops.quant_matmul(x, qweight, backend=name)
    expected = ops.quant_matmul_reference(x, qweight)
    assert y[0].isnan().all()
    torch.testing.assert_close(y[1], expected[1], atol=0, rtol=0, equal_nan=True)
    assert_close_to_oracle(y[2:], x[2:], qweight, None)


def raw_call(qweight, x, bias=None):
    return registered_quant_matmul(x, qweight, bias)


needs_cpp = pytest.mark.skipif(_native.cpp is None, reason="C++ extension not loaded")


@pytest.mark.parametrize("bits", [8, 4])
def test_bad_inputs_name_the_argument(bits):
    qweight = make_weight(bits, 32, 6, 64, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="x must have shape"):
        ops.quant_matmul(torch.randn(2, 63), qweight)
    with pytest.raises(TypeError, match="x must be float32"):
        ops.quant_matmul(torch.ones(2, 64, dtype=torch.int32), qweight)
    with pytest.raises(ValueError, match="bias must have shape"):
        ops.quant_matmul(torch.randn(2, 64), qweight, torch.randn(5))


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.float64], ids=str)
def test_non_float_bias_is_refused_on_every_backend(backend, dtype, monkeypatch):
    # The reference added an int64 or bool bias silently; the C++ op refused it in its own
    # words: every backend must give the wrapper's one answer.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    qweight = make_weight(4, 32, 6, 64, torch.Generator().manual_seed(0))
    with pytest.raises(TypeError, match="bias must be float32, bfloat16 or float16"):
        ops.quant_matmul(torch.randn(2, 64), qweight, torch.ones(6, dtype=dtype), backend=backend)


@needs_cpp
@pytest.mark.parametrize("bits", [8, 4])
def test_raw_op_bad_inputs_name_the_argument(bits):
    qweight = make_weight(bits, 32, 6, 64, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="x must have shape|qdata must have shape"):
        raw_call(qweight, torch.randn(2, 63))
    with pytest.raises(TypeError, match="x must be float32"):
        raw_call(qweight, torch.ones(2, 64, dtype=torch.int32))
    with pytest.raises(ValueError, match="x must be 2-D"):
        raw_call(qweight, torch.randn(64))
    with pytest.raises(ValueError, match="bias must have shape"):
        raw_call(qweight, torch.randn(2, 64), torch.randn(5))
    wrong_scales = QuantizedWeight(
        bits, qweight.group_size, qweight.shape, qweight.data, qweight.scales.double(),
        qweight.offsets,
    )  # fmt: skip
    with pytest.raises(TypeError, match="scales must be"):
        raw_call(wrong_scales, torch.randn(2, 64))


@needs_cpp
def test_raw_int4_op_checks_group_size():
    qweight = make_weight(4, 32, 6, 64, torch.Generator().manual_seed(0))
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match="group_size must be"):
        torch.ops.rlhf_fast.quant_matmul_int4(
            x, qweight.data, qweight.scales, qweight.offsets, 48, 64, None
        )


def opcheck_samples():
    generator = torch.Generator().manual_seed(5)
    for bits, group_size, (m, k, n), dtype in [
        (8, -1, (3, 40, 5), torch.float32),
        (4, 32, (1, 70, 9), torch.bfloat16),
        (4, 64, (4, 128, 6), torch.float16),
    ]:
        qweight = make_weight(bits, group_size, n, k, generator)
        x = torch.randn(m, k, generator=generator).to(dtype)
        yield qweight, x, torch.randn(n, generator=generator)


@needs_cpp
@pytest.mark.parametrize("sample", list(opcheck_samples()), ids=["int8", "int4-g32", "int4-g64"])
def test_opcheck(sample):
    qweight, x, bias = sample
    if qweight.bits == 8:
        op, args = torch.ops.rlhf_fast.quant_matmul_int8.default, (
            x, qweight.data, qweight.scales, bias,
        )  # fmt: skip
    else:
        op, args = torch.ops.rlhf_fast.quant_matmul_int4.default, (
            x, qweight.data, qweight.scales, qweight.offsets, qweight.group_size,
            qweight.in_features, bias,
        )  # fmt: skip
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("bits", [4, 8])
def test_gradients_reach_x_and_bias(backend, bits):
    """The weight is frozen; x and a trainable bias get the same gradients as the reference."""
    if backend == "cpp" and _native.cpp is None:
        pytest.skip("no C++ quant_matmul")
    generator = torch.Generator().manual_seed(bits)
    qweight = quantize_weight(torch.randn(37, 70, generator=generator), bits, 32)
    x = torch.randn(2, 5, 70, generator=generator, requires_grad=True)
    bias = torch.randn(37, generator=generator, requires_grad=True)
    ops.quant_matmul(x, qweight, bias, backend=backend).square().sum().backward()
    dense = qweight.dequantize().double()
    x64 = x.detach().double().requires_grad_(True)
    b64 = bias.detach().double().requires_grad_(True)
    (x64 @ dense.T + b64).square().sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(bias.grad.double(), b64.grad, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_gradient_reaches_a_trainable_bias_when_x_needs_none(backend):
    """A trainable bias over frozen activations (x without requires_grad) must still get its
    gradient: the fast path may only skip autograd when neither needs one."""
    if backend == "cpp" and _native.cpp is None:
        pytest.skip("no C++ quant_matmul")
    generator = torch.Generator().manual_seed(11)
    qweight = quantize_weight(torch.randn(37, 70, generator=generator), 4, 32)
    x = torch.randn(3, 70, generator=generator)
    bias = torch.randn(37, generator=generator, requires_grad=True)
    grad_y = torch.randn(3, 37, generator=generator)
    ops.quant_matmul(x, qweight, bias, backend=backend).backward(grad_y)
    torch.testing.assert_close(bias.grad, grad_y.sum(0), atol=1e-5, rtol=1e-5)


@needs_cpp
def test_cuda_backend_without_triton_runs_many_rows_on_the_gemv(monkeypatch):
    # The "cuda" backend sends M > 1 to the Triton GEMM; where triton is not installed (CUDA
    # torch on Windows ships without it) that was an ImportError on every prefill, though the
    # CUDA GEMV handles any M. Exercised on CPU tensors: the same registered ops serve both.
    quant_matmul_module = importlib.import_module("rlhf_fast.ops.quant_matmul")
    monkeypatch.setattr(quant_matmul_module, "_triton_installed", lambda: False)
    monkeypatch.setitem(sys.modules, "rlhf_fast.kernels.quant_matmul", None)  # import fails
    qweight = make_weight(4, 32, 6, 64, torch.Generator().manual_seed(0))
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    y = quant_matmul_module._quant_matmul_cuda(x, qweight, None)
    assert_close_to_oracle(y, x, qweight, None)
