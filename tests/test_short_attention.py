"""ops.short_attention (causal / bool-masked attention of Tq == Tk sequences) and its
gradients on every CPU backend against a float64 evaluation of its reference, against torch's
SDPA, and its bad-input errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from backends_under_test import cpu_backend_params, using

from rlhf_fast import _native, ops

# (atol, rtol) of the output; gradients get 4x, relative to their largest element.
# fp32: sums of a few hundred products; 16-bit: one rounding of each output (2^-8 / 2^-11)
TOLERANCE = {
    torch.float32: (1e-5, 1e-4),
    torch.bfloat16: (1e-3, 2**-8),
    torch.float16: (1e-4, 2**-10),
}
DTYPES = list(TOLERANCE)

# (B, heads, kv_heads, T, D): MHA, GQA (8 over 2), MQA; head_dims 40, 64, 128 and odd 33;
# lengths 1, 2, 17, 64, 65, 203
SHAPES = [
    (1, 1, 1, 1, 64),
    (2, 4, 4, 2, 40),
    (3, 8, 2, 17, 64),
    (9, 4, 1, 17, 33),
    (2, 4, 4, 64, 64),
    (1, 8, 2, 65, 128),
    (2, 2, 1, 203, 40),
]


def make(shape, dtype, seed, transposed=True):
    """q, k, v as HF makes them ([B, T, H, D] projections viewed as [B, H, T, D]), or
    contiguous [B, H, T, D]."""
    batch, heads, kv_heads, steps, dim = shape
    generator = torch.Generator().manual_seed(seed)

    def one(h):
        if transposed:
            t = torch.randn(batch, steps, h, dim, generator=generator).transpose(1, 2)
        else:
            t = torch.randn(batch, h, steps, dim, generator=generator)
        return (t * 1.5).to(dtype).requires_grad_(True)

    return one(heads), one(kv_heads), one(kv_heads)


def padded_mask(batch, steps, seed):
    """HF-style [B, 1, T, T] bool: causal, left padding of a different length per row, a padded
    stretch in the middle of one row, and one query row that sees nothing."""
    generator = torch.Generator().manual_seed(seed)
    positions = torch.arange(steps)
    visible = positions[None, :] <= positions[:, None]
    mask = visible.expand(batch, 1, steps, steps).clone()
    for b in range(batch):
        pad = int(torch.randint(0, max(1, steps // 2), (1,), generator=generator))
        mask[b, :, :, :pad] = False
    if steps >= 8:
        mask[0, :, :, steps // 3 : steps // 3 + 3] = False
        mask[-1, :, steps // 2, :] = False
    return mask


def oracle(q, k, v, mask, is_causal, scale, grad):
    wide = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    out = ops.short_attention_reference(*wide, mask, is_causal=is_causal, scale=scale)
    grads = torch.autograd.grad(out, wide, grad.double())
    return out.detach(), grads


def run(backend, q, k, v, mask, is_causal, scale, grad):
    with using(backend) as name:
        out = ops.short_attention(q, k, v, mask, is_causal=is_causal, scale=scale, backend=name)
        grads = torch.autograd.grad(out, (q, k, v), grad)
    return out, grads


def assert_matches(out, grads, expected_out, expected_grads, dtype):
    atol, rtol = TOLERANCE[dtype]
    assert out.dtype == dtype and out.shape == expected_out.shape
    torch.testing.assert_close(out.double(), expected_out, atol=atol, rtol=rtol)
    for actual, wanted in zip(grads, expected_grads, strict=True):
        assert actual.dtype == dtype and actual.shape == wanted.shape
        scale = max(1.0, float(wanted.abs().max()))
        torch.testing.assert_close(actual.double(), wanted, atol=4 * atol * scale, rtol=4 * rtol)


@pytest.mark.parametrize("backend", cpu_backend_params())
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("masking", ["causal", "mask", "both", "none"])
def test_matches_float64_reference(backend, shape, dtype, masking):
    seed = sum(shape) + DTYPES.index(dtype)
    q, k, v = make(shape, dtype, seed, transposed=shape[0] % 2 == 0)
    mask = padded_mask(shape[0], shape[3], seed) if masking in ("mask", "both") else None
    if masking == "mask":
        mask = mask | (torch.rand(mask.shape, generator=torch.Generator().manual_seed(seed)) > 0.6)
    is_causal = masking in ("causal", "both")
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    scale = 0.3 if masking == "none" else None
    out, grads = run(backend, q, k, v, mask, is_causal, scale, grad)
    assert_matches(out, grads, *oracle(q, k, v, mask, is_causal, scale, grad), dtype)


@pytest.mark.parametrize("backend", cpu_backend_params())
def test_per_head_mask_and_non_contiguous_everything(backend):
    # a [B, H, T, T] mask sliced with a key stride of 2, q/k/v/grad with odd strides everywhere
    generator = torch.Generator().manual_seed(7)
    big = torch.randn(3, 6, 40, 2 * 48, generator=generator)
    q = big[:, :4, :, ::2][..., :37].requires_grad_(True)  # D stride 2, [3, 4, 40, 37]
    k = big[:, 4:5, :, 1::2][..., :37].requires_grad_(True)
    v = big[:, 5:6, :, 1::2][..., 1:38].requires_grad_(True)
    mask = (torch.rand(3, 4, 40, 80, generator=generator) > 0.3)[..., ::2]
    grad = torch.randn(3, 40, 4, 37, generator=generator).transpose(1, 2)
    out, grads = run(backend, q, k, v, mask, True, None, grad)
    assert_matches(out, grads, *oracle(q, k, v, mask, True, None, grad), torch.float32)


@pytest.mark.parametrize("backend", cpu_backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_sdpa(backend, dtype):
    # SDPA as HF calls it: is_causal without a mask, or a bool mask without fully masked rows
    # (there SDPA gives NaN and short_attention zeros, by design)
    q, k, v = make((4, 8, 2, 33, 64), dtype, 11)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(12)).to(dtype)
    mask = padded_mask(4, 33, 13)
    mask[-1, :, 16, 16] = True
    mask = mask | torch.eye(33, dtype=torch.bool)  # every query sees itself
    for attn_mask, is_causal in ((None, True), (mask, False)):
        out, grads = run(backend, q, k, v, attn_mask, is_causal, None, grad)
        wide = [t.detach().float().requires_grad_(True) for t in (q, k, v)]
        expected = F.scaled_dot_product_attention(*wide, attn_mask=attn_mask,
                                                  is_causal=is_causal, enable_gqa=True)  # fmt: skip
        expected_grads = torch.autograd.grad(expected, wide, grad.float())
        assert_matches(out, grads, expected.double(), [g.double() for g in expected_grads],
                       dtype)  # fmt: skip


@pytest.mark.parametrize("backend", cpu_backend_params())
def test_fully_masked_rows_are_zero_with_zero_gradients(backend):
    q, k, v = make((2, 2, 2, 9, 16), torch.float32, 5)
    mask = torch.ones(2, 1, 9, 9, dtype=torch.bool)
    mask[0, :, 3] = False
    mask[1] = False
    out, (dq, dk, dv) = run(backend, q, k, v, mask, False, None, torch.ones(q.shape))
    for rows in (out[0, :, 3], out[1], dq[0, :, 3], dq[1], dk[1], dv[1]):
        assert torch.equal(rows, torch.zeros_like(rows))


@pytest.mark.skipif(_native.cpp is None, reason="C++ extension not loaded")
def test_opcheck():
    q, k, v = make((2, 4, 2, 17, 24), torch.float32, 3)
    mask = padded_mask(2, 17, 3)
    for args in ((q, k, v, mask, False, 0.2), (q, k, v, None, True, 0.2)):
        plain = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
        torch.library.opcheck(torch.ops.rlhf_fast.short_attention.default, plain)
        _, probs = torch.ops.rlhf_fast.short_attention(*plain)
        grad = torch.randn(q.shape)
        torch.library.opcheck(torch.ops.rlhf_fast.short_attention_backward.default,
                              (grad, *plain[:3], probs, *plain[3:]))  # fmt: skip


def test_no_second_order_through_the_fused_backward():
    if _native.cpp is None:
        pytest.skip("C++ extension not loaded")
    q, k, v = make((1, 2, 2, 5, 8), torch.float32, 1)
    out = ops.short_attention(q, k, v, is_causal=True, backend="cpp")
    with pytest.raises(RuntimeError, match="first-order only"):
        torch.autograd.grad(out.sum(), q, create_graph=True)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_bad_input(backend):
    if backend == "cpp" and _native.cpp is None:
        pytest.skip("C++ extension not loaded")
    q = torch.randn(2, 4, 8, 16)
    k = torch.randn(2, 2, 8, 16)

    def call(*args, **kwargs):
        return ops.short_attention(*args, backend=backend, **kwargs)

    with pytest.raises(ValueError, match="multiple"):
        call(q, torch.randn(2, 3, 8, 16), torch.randn(2, 3, 8, 16))
    with pytest.raises(ValueError, match="k must be"):
        call(q, torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 16))
    with pytest.raises(ValueError, match="k must be"):
        call(q, torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16))
    with pytest.raises(ValueError, match="v must have"):
        call(q, k, torch.randn(2, 2, 8, 15))
    with pytest.raises(ValueError, match="q must be 4-D"):
        call(q[0], k, k)
    with pytest.raises(TypeError, match="k must have q's dtype"):
        call(q, k.half(), k)
    with pytest.raises(TypeError, match="q must be float32"):
        call(q.long(), k, k)
    with pytest.raises(TypeError, match="mask must be bool"):
        call(q, k, k, torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match="mask must broadcast"):
        call(q, k, k, torch.ones(2, 1, 8, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask must broadcast"):
        call(q, k, k, torch.ones(3, 1, 8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="scale must be finite"):
        call(q, k, k, scale=float("inf"))


@pytest.mark.skipif(_native.cpp is None, reason="C++ extension not loaded")
def test_cpp_op_checks_its_arguments():
    op = torch.ops.rlhf_fast.short_attention
    q, k = torch.randn(2, 4, 8, 16), torch.randn(2, 3, 8, 16)
    with pytest.raises(ValueError, match="multiple"):
        op(q, k, k, None, True, 0.25)
    with pytest.raises(TypeError, match="mask must be bool"):
        op(q, q, q, torch.zeros(2, 1, 8, 8), False, 0.25)
    with pytest.raises(ValueError, match="mask must be"):
        op(q, q, q, torch.ones(2, 1, 8, 7, dtype=torch.bool), False, 0.25)
    _, probs = op(q, q, q, None, True, 0.25)
    with pytest.raises(ValueError, match="probs must be"):
        torch.ops.rlhf_fast.short_attention_backward(q, q, q, q, probs[:, :2], None, True, 0.25)
