"""ops.silu_mul (the SwiGLU product) and its gradients on every CPU backend against float64."""

from __future__ import annotations

import pytest
import torch
from backends_under_test import cpu_backend_params, using

from rlhf_fast import _native, ops

# lengths that are not multiples of 8 or 16 lanes, one element, none; a 3-D activation
SHAPES = [(1,), (7,), (33,), (5, 17), (2, 3, 257), (0, 4), (40000,)]


def oracle(gate, up):
    g, u = gate.detach().double().requires_grad_(True), up.detach().double().requires_grad_(True)
    return g, u, g * torch.sigmoid(g) * u


# (atol, rtol): fp32 a few ulps; 16-bit: one rounding of the output (torch's reference rounds
# twice, so it gets a looser bound below)
TOLERANCE = {
    torch.float32: (1e-6, 2e-6),
    torch.bfloat16: (1e-5, 2**-8),
    torch.float16: (1e-6, 2**-11),
}
DTYPES = list(TOLERANCE)


@pytest.mark.parametrize("backend", cpu_backend_params())
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_float64_oracle(backend, shape, dtype):
    generator = torch.Generator().manual_seed(sum(shape) + len(shape))
    # gates over the whole range sigmoid bends in, and far into both tails
    gate = (torch.randn(shape, generator=generator) * 6).to(dtype).requires_grad_(True)
    up = torch.randn(shape, generator=generator).to(dtype).requires_grad_(True)
    with using(backend) as name:
        y = ops.silu_mul(gate, up, backend=name)
        grad = torch.randn(shape, generator=generator).to(dtype)
        grad_gate, grad_up = torch.autograd.grad(y, (gate, up), grad)
    g, u, expected = oracle(gate, up)
    expected_gate, expected_up = torch.autograd.grad(expected, (g, u), grad.double())
    atol, rtol = TOLERANCE[dtype]
    if name == "reference" and dtype != torch.float32:
        atol, rtol = 4 * atol, 4 * rtol  # torch's 16-bit ops round every intermediate
    for actual, wanted in ((y, expected), (grad_gate, expected_gate), (grad_up, expected_up)):
        assert actual.dtype == dtype and actual.shape == wanted.shape
        torch.testing.assert_close(actual.double(), wanted, atol=atol, rtol=rtol)


@pytest.mark.parametrize("backend", cpu_backend_params())
def test_extreme_and_non_finite_gates(backend):
    finite = torch.tensor([-200.0, -88.0, -30.0, 0.0, 30.0, 88.0, 200.0])
    non_finite = torch.tensor([float("inf"), float("-inf"), float("nan")])
    gate = torch.cat([finite, non_finite]).requires_grad_(True)
    up = torch.full((10,), 2.0)
    with using(backend) as name:
        y = ops.silu_mul(gate, up, backend=name)
        (grad,) = torch.autograd.grad(y.sum(), gate)
    reference_gate = gate.detach().requires_grad_(True)
    expected = ops.silu_mul_reference(reference_gate, up)
    (expected_grad,) = torch.autograd.grad(expected.sum(), reference_gate)
    torch.testing.assert_close(y[:7], expected[:7], atol=1e-6, rtol=1e-6)
    # non-finite gates as torch: silu(-inf) = -inf * sigmoid(-inf) = -inf * 0 is NaN (an exp
    # clamped at ~1e-38 instead of 0 made it -inf), and so is its gradient
    torch.testing.assert_close(y[7:], expected[7:], atol=0, rtol=0, equal_nan=True)
    torch.testing.assert_close(grad, expected_grad, atol=1e-6, rtol=1e-6, equal_nan=True)


@pytest.mark.parametrize("backend", cpu_backend_params())
def test_strided_inputs(backend):
    generator = torch.Generator().manual_seed(3)
    both = torch.randn(6, 2 * 50, generator=generator)
    gate, up = both[:, :50], both[:, 50:]  # [gate | up] halves of one tensor: row stride 100
    with using(backend) as name:
        y = ops.silu_mul(gate, up, backend=name)
    torch.testing.assert_close(y, ops.silu_mul_reference(gate, up), atol=1e-6, rtol=2e-6)


@pytest.mark.parametrize("backend", cpu_backend_params())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_16_bit_outputs_are_the_fp32_result_rounded_once(backend, dtype):
    # the fp32 result of fp32 inputs equal to the 16-bit ones, then torch's own rounding: equal
    # to the C++ kernel's bit for bit wherever its fp32 silu is the same as torch's (most
    # elements); anywhere else one 16-bit ulp away at most
    generator = torch.Generator().manual_seed(5)
    gate = (torch.randn(4099, generator=generator) * 4).to(dtype)
    up = torch.randn(4099, generator=generator).to(dtype)
    with using(backend) as name:
        y = ops.silu_mul(gate, up, backend=name)
    expected = ops.silu_mul_reference(gate.float(), up.float()).to(dtype)
    if name == "reference":
        return  # rounds twice: covered by the oracle test's looser bound
    ulp = torch.finfo(dtype).eps * expected.float().abs()
    assert ((y.float() - expected.float()).abs() <= ulp + 1e-30).all()
    assert (y == expected).float().mean() > 0.95


def test_bad_inputs_name_the_argument():
    gate = torch.randn(3, 4)
    with pytest.raises(TypeError, match="gate must be"):
        ops.silu_mul(gate.long(), gate.long())
    with pytest.raises(TypeError, match="up must have gate's dtype"):
        ops.silu_mul(gate, gate.double())
    with pytest.raises(ValueError, match="up must have the shape of gate"):
        ops.silu_mul(gate, torch.randn(3, 5))
    if _native.cpp is not None:
        with pytest.raises(ValueError, match="contiguous"):
            torch.ops.rlhf_fast.silu_mul(gate.T, gate.T.contiguous())
        with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
            torch.ops.rlhf_fast.silu_mul(gate.double(), gate.double())
        with pytest.raises(TypeError, match="up must have gate's dtype"):
            torch.ops.rlhf_fast.silu_mul(gate, gate.bfloat16())


@pytest.mark.skipif(_native.cpp is None, reason="C++ extension not loaded")
def test_double_backward_is_refused_not_silently_missing():
    # The C++ backward op has no autograd formula: a second derivative through it was
    # silently absent (None, counted as zero); under create_graph=True
    # the fused backward must refuse.
    gate = torch.randn(3, 8, generator=torch.Generator().manual_seed(0)).requires_grad_()
    up = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    with pytest.raises(RuntimeError, match="first-order only"):
        torch.autograd.grad(ops.silu_mul(gate, up, backend="cpp").sum(), gate, create_graph=True)
