"""ops.rms_norm (HF's LlamaRMSNorm) and its gradients on both backends against float64."""

from __future__ import annotations

import pytest
import torch
from backends_under_test import cpu_backend_params

from rlhf_fast import _native, ops

BACKENDS = cpu_backend_params()  # the C++ kernel per SIMD level (rms_norm_kernel.h)
# H = 1, 7, 33 and 257 are ragged against 8 and 16 lanes; (0, 16) has no rows
SHAPES = [(1, 1), (3, 7), (5, 33), (2, 3, 257), (64, 256), (0, 16)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# relative to the largest magnitude: fp32 sums and rsqrt; 16-bit outputs round once more
TOLERANCE = {torch.float32: 2e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def oracle(x, weight, eps):
    """HF's formula in float64, with its one rounding (h to x's dtype) kept; gradients flow
    through the rounding as through torch's .to()."""
    x64 = x.detach().double().requires_grad_(x.requires_grad)
    w64 = weight.detach().double().requires_grad_(weight.requires_grad)
    h = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps)
    rounded = h + (h.to(x.dtype).double() - h).detach()
    return x64, w64, w64 * rounded


def assert_close(actual, expected, dtype, scale=None):
    """Within TOLERANCE[dtype] of `scale` (default: the largest |expected|): dx can cancel to
    ~0 (H = 1), so its scale is that of the terms that cancel."""
    if scale is None:
        scale = expected.abs().max().item() + 1e-30 if expected.numel() else 1.0
    tolerance = TOLERANCE[dtype]
    torch.testing.assert_close(actual.double(), expected, atol=tolerance * scale, rtol=tolerance)


@pytest.mark.parametrize("op_backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("weight_kind", ["same", "fp32"])
def test_matches_float64_oracle(op_backend, shape, dtype, weight_kind):
    generator = torch.Generator().manual_seed(sum(shape) * 31 + DTYPES.index(dtype))
    x = (torch.randn(shape, generator=generator) * 3).to(dtype).requires_grad_(True)
    weight_dtype = dtype if weight_kind == "same" else torch.float32
    weight = (torch.randn(shape[-1], generator=generator) + 1).to(weight_dtype)
    weight.requires_grad_(True)
    eps = 1e-5
    y = ops.rms_norm(x, weight, eps, backend=op_backend)
    x64, w64, expected = oracle(x, weight, eps)
    assert y.dtype == torch.promote_types(weight_dtype, dtype) and y.shape == x.shape
    assert_close(y, expected, y.dtype)
    grad = torch.randn(shape, generator=generator).to(y.dtype)
    grad_x, grad_w = torch.autograd.grad(y, (x, weight), grad)
    expected_x, expected_w = torch.autograd.grad(expected, (x64, w64), grad.double())
    assert grad_x.dtype == dtype and grad_w.dtype == weight_dtype
    if x.numel():
        rstd = torch.rsqrt(x64.detach().pow(2).mean(-1) + eps).max().item()
        terms = grad.abs().max().item() * weight.abs().max().item() * rstd
        assert_close(grad_x, expected_x, dtype, scale=max(terms, expected_x.abs().max().item()))
    assert_close(grad_w, expected_w, weight_dtype if weight_dtype != torch.float32 else dtype)


@pytest.mark.parametrize("op_backend", BACKENDS, indirect=True)
def test_strided_inputs_and_frozen_weight(op_backend):
    generator = torch.Generator().manual_seed(5)
    wide = torch.randn(6, 50, generator=generator)
    weight = torch.randn(40, generator=generator)  # frozen: no gradient asked
    for x in (wide[:, 3:43], torch.randn(40, 6, generator=generator).T):
        assert not x.is_contiguous()
        x.requires_grad_(True)
        y = ops.rms_norm(x, weight, 1e-6, backend=op_backend)
        x64, _, expected = oracle(x, weight, 1e-6)
        assert_close(y, expected, torch.float32)
        (grad_x,) = torch.autograd.grad(y.sum(), x)
        assert weight.grad is None
        (expected_x,) = torch.autograd.grad(expected.sum(), x64)
        torch.testing.assert_close(grad_x.double(), expected_x, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(_native.cpp is None, reason="C++ extension not loaded")
@pytest.mark.parametrize("rows, hidden", [(300, 96), (5000, 512)])  # 5000: the blocks are capped
def test_weight_gradient_does_not_depend_on_threads(rows, hidden):
    generator = torch.Generator().manual_seed(9)
    x = torch.randn(rows, hidden, generator=generator)
    weight = torch.randn(hidden, generator=generator, requires_grad=True)
    grad = torch.randn(rows, hidden, generator=generator)
    results = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            y = ops.rms_norm(x, weight, 1e-6, backend="cpp")
            results.append(torch.autograd.grad(y, weight, grad)[0])
    finally:
        torch.set_num_threads(before)
    assert torch.equal(results[0], results[1])
    x64, weight64 = x.double(), weight.detach().double().requires_grad_(True)
    y64 = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6) * weight64
    (expected,) = torch.autograd.grad(y64, weight64, grad.double())
    torch.testing.assert_close(results[0].double(), expected, atol=1e-4 * rows**0.5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_bad_inputs_name_the_argument(backend):
    if backend == "cpp" and _native.cpp is None:
        pytest.skip("C++ extension not loaded")
    x, weight = torch.randn(3, 8), torch.ones(8)
    with pytest.raises(TypeError, match="x must be"):
        ops.rms_norm(x.long(), weight, backend=backend)
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\)"):
        ops.rms_norm(x, torch.ones(7), backend=backend)
    with pytest.raises(ValueError, match="weight must be 1-D"):
        ops.rms_norm(x, torch.ones(1, 8), backend=backend)
    with pytest.raises(ValueError, match="H > 0"):
        ops.rms_norm(torch.randn(3, 0), torch.ones(0), backend=backend)
    with pytest.raises(ValueError, match="eps must be finite"):
        ops.rms_norm(x, weight, float("nan"), backend=backend)
    with pytest.raises(TypeError, match="weight must be"):
        ops.rms_norm(x, torch.ones(8, dtype=torch.int32), backend=backend)


@pytest.mark.skipif(_native.cpp is None, reason="C++ extension not loaded")
def test_raw_ops_check_their_arguments():
    x, weight = torch.randn(4, 8), torch.ones(8)
    with pytest.raises(TypeError, match="weight must be float32"):
        torch.ops.rlhf_fast.rms_norm(x, weight.double(), 1e-6, torch.float32)
    with pytest.raises(ValueError, match="contiguous"):
        torch.ops.rlhf_fast.rms_norm(x.T, torch.ones(4), 1e-6, torch.float32)
    with pytest.raises(TypeError, match="out_dtype"):
        torch.ops.rlhf_fast.rms_norm(x, weight, 1e-6, torch.float16)
    y, rstd = torch.ops.rlhf_fast.rms_norm(x, weight, 1e-6, torch.float32)
    with pytest.raises(ValueError, match="rstd must be"):
        torch.ops.rlhf_fast.rms_norm_backward(y, x, weight, rstd[:3], False)
    with pytest.raises(TypeError, match="grad_y must be"):
        torch.ops.rlhf_fast.rms_norm_backward(y.half(), x.bfloat16(), weight, rstd, False)


@pytest.mark.skipif(_native.cpp is None, reason="C++ extension not loaded")
def test_double_backward_is_refused_not_silently_zero():
    # The C++ backward op has no autograd formula: with create_graph=True a second derivative
    # through it came out as zeros (the reference's is not). The fused backward must refuse.
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(0)).requires_grad_()
    weight = torch.randn(8, generator=torch.Generator().manual_seed(1))
    with pytest.raises(RuntimeError, match="first-order only"):
        torch.autograd.grad(
            ops.rms_norm(x, weight, backend="cpp").square().sum(), x, create_graph=True
        )
