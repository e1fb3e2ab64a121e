"""ops.rotary_embedding (HF's apply_rotary_pos_emb on q or k) on both backends against float64
and against HF's own function."""

from __future__ import annotations

import pytest
import torch
from backends_under_test import cpu_backend_params

from rlhf_fast import _native, ops

BACKENDS = cpu_backend_params()  # the C++ kernel per SIMD level (rotary_kernel.h)
TOLERANCE = {torch.float32: 2e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def oracle(x, cos, sin):
    x64 = x.detach().double().requires_grad_(True)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x64[..., half:], x64[..., :half]), dim=-1)
    return x64, x64 * cos.double().unsqueeze(2) + rotated * sin.double().unsqueeze(2)


def tables(batch, steps, dim, dtype, generator):
    # arbitrary tables (not only HF's duplicated halves), so every index pairing is checked
    return (torch.randn(batch, steps, dim, generator=generator).to(dtype),
            torch.randn(batch, steps, dim, generator=generator).to(dtype))  # fmt: skip


# half widths of 1, 4, 32 and 19 (one full AVX-512 vector and a ragged tail), and no rows
SHAPES = [(1, 1, 1, 2), (2, 5, 3, 8), (3, 17, 4, 64), (2, 3, 5, 38), (0, 4, 2, 6)]


@pytest.mark.parametrize("op_backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shared_table", [False, True], ids=["per-row", "broadcast"])
def test_matches_float64_oracle(op_backend, shape, dtype, shared_table):
    generator = torch.Generator().manual_seed(sum(shape))
    batch, steps, _, dim = shape
    cos, sin = tables(1 if shared_table else batch, steps, dim, dtype, generator)
    x = torch.randn(shape, generator=generator).to(dtype).requires_grad_(True)
    y = ops.rotary_embedding(x, cos, sin, backend=op_backend)
    x64, expected = oracle(x, cos, sin)
    assert y.shape == x.shape and y.dtype == dtype
    scale = TOLERANCE[dtype] * 8  # |y| <= 2 max|x| max|table|: an absolute scale of ~8
    torch.testing.assert_close(y.double(), expected, atol=scale, rtol=TOLERANCE[dtype])
    grad = torch.randn(shape, generator=generator).to(dtype)
    (grad_x,) = torch.autograd.grad(y, x, grad)
    (expected_x,) = torch.autograd.grad(expected, x64, grad.double())
    assert grad_x.dtype == dtype
    torch.testing.assert_close(grad_x.double(), expected_x, atol=scale, rtol=TOLERANCE[dtype])


@pytest.mark.parametrize("op_backend", BACKENDS, indirect=True)
def test_equals_hf_and_takes_the_projection_layout(op_backend):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    generator = torch.Generator().manual_seed(4)
    cos, sin = tables(2, 7, 16, torch.float32, generator)
    fused = torch.randn(2, 7, 3 * 16 + 2 * 16, generator=generator)  # one [q | k] projection
    q = fused[..., :48].view(2, 7, 3, 16)  # row stride 80: not contiguous
    k = fused[..., 48:].view(2, 7, 2, 16)
    expected_q, expected_k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    q, k = q.detach().requires_grad_(True), k.detach().requires_grad_(True)
    ours_q = ops.rotary_embedding(q, cos, sin, backend=op_backend).transpose(1, 2)
    ours_k = ops.rotary_embedding(k, cos, sin, backend=op_backend).transpose(1, 2)
    # bit for bit, forward and backward: the same fp32 products and sums, none fused
    assert torch.equal(ours_q, expected_q) and torch.equal(ours_k, expected_k)
    hf_q = q.detach().requires_grad_(True)
    hf_k = k.detach().requires_grad_(True)
    hf = apply_rotary_pos_emb(hf_q.transpose(1, 2), hf_k.transpose(1, 2), cos, sin)
    grad_q, grad_k = torch.randn_like(expected_q), torch.randn_like(expected_k)
    ours_grads = torch.autograd.grad((ours_q, ours_k), (q, k), (grad_q, grad_k))
    hf_grads = torch.autograd.grad(hf, (hf_q, hf_k), (grad_q, grad_k))
    assert all(torch.equal(a, b) for a, b in zip(ours_grads, hf_grads, strict=True))


@pytest.mark.parametrize("op_backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_16_bit_outputs_round_to_nearest_even_as_torch(op_backend, dtype):
    # with sin = 0, y = x * cos: exact in fp32 for 16-bit x and cos, so the output is one
    # rounding of a known value, which must be torch's .to(dtype) bit for bit: ties to even,
    # fp16 subnormals, overflow to inf, inf and NaN
    generator = torch.Generator().manual_seed(6)
    info = torch.finfo(dtype)
    x = torch.randn(3, 64, 2, 38, generator=generator).to(dtype)
    cos = torch.randn(3, 64, 38, generator=generator).to(dtype)
    x[0, 0, 0, :6] = torch.tensor([float("inf"), float("nan"), info.max, info.tiny, 0.0, -0.0])
    cos[0, 0, :6] = torch.tensor([1.0, 1.0, 2.0, 0.25, -1.0, 1.0])
    x[1, :, :, :] *= 2.0**-10 if dtype == torch.float16 else 1.0  # fp16 subnormal products
    cos[1] *= 2.0**-6 if dtype == torch.float16 else 1.0
    sin = torch.zeros_like(cos)
    y = ops.rotary_embedding(x, cos, sin, backend=op_backend)
    # (the rotated half times 0 adds an exact 0, or NaN next to an inf, in either precision)
    expected = ops.rotary_embedding_reference(x.float(), cos.float(), sin.float()).to(dtype)
    assert torch.equal(y.isnan(), expected.isnan())
    assert torch.equal(y.nan_to_num(), expected.nan_to_num())


def test_tables_that_require_grad_get_gradients():
    generator = torch.Generator().manual_seed(5)
    cos, sin = tables(1, 3, 4, torch.float32, generator)
    cos.requires_grad_(True)
    x = torch.randn(2, 3, 1, 4, generator=generator)
    (grad_cos,) = torch.autograd.grad(ops.rotary_embedding(x, cos, sin).sum(), cos)
    torch.testing.assert_close(grad_cos, x.sum((0, 2), keepdim=False)[None])


def test_bad_inputs_name_the_argument():
    x = torch.randn(2, 3, 4, 8)
    cos = sin = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match="x must be 4-D"):
        ops.rotary_embedding(x[0], cos, sin)
    with pytest.raises(ValueError, match="must be even"):
        ops.rotary_embedding(x[..., :7], cos[..., :7], sin[..., :7])
    with pytest.raises(ValueError, match=r"cos must have shape \(2 or 1, 3, 8\)"):
        ops.rotary_embedding(x, torch.randn(2, 4, 8), sin)
    with pytest.raises(TypeError, match="sin must have x's dtype"):
        ops.rotary_embedding(x, cos, sin.half())
    if _native.cpp is not None:
        with pytest.raises(ValueError, match="contiguous D"):
            torch.ops.rlhf_fast.rotary_embedding(x.transpose(2, 3), cos[..., :4], sin[..., :4],
                                                 False)  # fmt: skip


@pytest.mark.skipif(_native.cpp is None, reason="C++ extension not loaded")
def test_double_backward_is_refused_not_silently_zero():
    # The C++ backward op has no autograd formula: a second derivative through it came out
    # as zeros (the reference's is not); under create_graph=True
    # the fused backward must refuse.
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 2, 4, generator=generator).requires_grad_()
    cos, sin = torch.randn(1, 3, 4, generator=generator), torch.randn(1, 3, 4, generator=generator)
    with pytest.raises(RuntimeError, match="first-order only"):
        torch.autograd.grad(
            ops.rotary_embedding(x, cos, sin, backend="cpp").square().sum(), x, create_graph=True
        )


@pytest.mark.parametrize("op_backend", BACKENDS, indirect=True)
def test_empty_inputs_forward_and_backward(op_backend):
    # An empty x reports itself contiguous whatever its strides, so .contiguous() kept a
    # strided last dimension (x[..., ::2]) or the all-zero strides of sum()'s gradient, and
    # the C++ op refused them: T = 0 failed forward (strided) and backward (always).
    cos, sin = torch.randn(1, 0, 4), torch.randn(1, 0, 4)
    strided = torch.randn(1, 0, 3, 8)[..., ::2]
    assert ops.rotary_embedding(strided, cos, sin, backend=op_backend).shape == (1, 0, 3, 4)
    x = torch.randn(1, 0, 3, 4, requires_grad=True)
    ops.rotary_embedding(x, cos, sin, backend=op_backend).sum().backward()
    assert x.grad.shape == (1, 0, 3, 4)


@pytest.mark.parametrize("op_backend", BACKENDS, indirect=True)
def test_a_non_contiguous_output_gradient_and_tables_of_two_shapes(op_backend):
    """Mutation-testing additions: backward on a gradient whose last stride is not 1 (a
    transposed view), against float64; cos and sin of different (each valid) shapes refused."""
    generator = torch.Generator().manual_seed(9)
    cos, sin = tables(2, 3, 8, torch.float32, generator)
    x = torch.randn(2, 3, 4, 8, generator=generator, requires_grad=True)
    grad = torch.randn(2, 3, 8, 4, generator=generator).transpose(2, 3)  # stride(-1) == 4
    ops.rotary_embedding(x, cos, sin).backward(grad)
    x64, y64 = oracle(x, cos, sin)
    y64.backward(grad.double())
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="sin must have the shape of cos"):
        ops.rotary_embedding(x.detach(), cos, sin[:1])
