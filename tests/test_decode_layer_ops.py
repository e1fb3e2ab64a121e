"""The per-layer decode ops (csrc/cpu/decode_layer_ops.cpp) against their torch compositions:
RMSNorm as HF's LlamaRMSNorm, SiLU-and-multiply, and RoPE + KV-cache write + attention of
one query against scaled_dot_product_attention, in fp32 and bf16, with GQA and windows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rlhf_fast import _native

pytestmark = pytest.mark.skipif(
    _native.cpp is None or not hasattr(torch.ops.rlhf_fast, "decode_attention"),
    reason="the C++ extension is not built",
)
ops = torch.ops.rlhf_fast
TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def hf_rms_norm(x, weight, eps):
    normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows, hidden", [(1, 7), (3, 64), (1, 576)])
def test_add_rms_norm(dtype, rows, hidden):
    x = torch.randn(rows, hidden).to(dtype)
    delta = torch.randn(rows, hidden).to(dtype)
    weight = torch.randn(hidden).to(dtype)
    expected_x = x + delta
    expected = hf_rms_norm(expected_x, weight, 1e-5)
    out = ops.decode_add_rms_norm(x, delta, weight, 1e-5)
    torch.testing.assert_close(x, expected_x, atol=0, rtol=0)  # updated in place
    torch.testing.assert_close(out, expected, **TOLERANCE[dtype])
    torch.testing.assert_close(ops.decode_add_rms_norm(x, None, weight, 1e-5), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("rows, inner", [(2, 37), (8, 688), (1, 5)])
def test_silu_mul(dtype, rows, inner):
    gate_up = (3 * torch.randn(rows, 2 * inner)).to(dtype)
    expected = F.silu(gate_up[:, :inner]) * gate_up[:, inner:]
    out = ops.decode_silu_mul(gate_up)
    torch.testing.assert_close(out, expected, **TOLERANCE.get(dtype, TOLERANCE[torch.bfloat16]))
    if dtype != torch.float32 and rows * inner > 100:
        # rounded as the torch pair (the silu to 16 bits, then the product), not once: the
        # sigmoids differ by an fp32 ulp or two, which the 16-bit rounding almost always hides
        assert (out == expected).float().mean() > 0.99
    strided = (3 * torch.randn(2 * inner, rows)).to(dtype).t()  # a transposed view
    torch.testing.assert_close(
        ops.decode_silu_mul(strided), F.silu(strided[:, :inner]) * strided[:, inner:],
        **TOLERANCE.get(dtype, TOLERANCE[torch.bfloat16]),
    )  # fmt: skip


def rope_tables(capacity, head_dim, dtype):
    inverse = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    angles = torch.arange(capacity).float()[:, None] * inverse
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "heads, kv_heads, head_dim, position, window",
    [(4, 2, 16, 0, 0), (9, 3, 64, 37, 0), (4, 4, 10, 20, 5), (6, 1, 8, 12, 13), (2, 1, 4, 3, 1)],
)
def test_attention(dtype, heads, kv_heads, head_dim, position, window):
    capacity = 48
    cos, sin = rope_tables(capacity, head_dim, dtype)
    half = head_dim // 2
    signed_sin = torch.cat([-sin[:, :half], sin[:, half:]], dim=-1).contiguous()
    keys = torch.randn(1, kv_heads, capacity, head_dim).to(dtype)
    values = torch.randn(1, kv_heads, capacity, head_dim).to(dtype)
    qkv = torch.randn(1, (heads + 2 * kv_heads) * head_dim).to(dtype)
    old_keys, old_values = keys.clone(), values.clone()
    out = ops.decode_attention(
        qkv, cos, signed_sin, keys, values, position, heads, kv_heads, window, head_dim**-0.5
    )
    split = qkv.view(heads + 2 * kv_heads, head_dim)
    q = rotate(split[:heads].float(), cos[position].float(), sin[position].float()).to(dtype)
    k = rotate(
        split[heads : heads + kv_heads].float(), cos[position].float(), sin[position].float()
    )
    expected_keys, expected_values = old_keys.clone(), old_values.clone()
    expected_keys[0, :, position] = k.to(dtype)
    expected_values[0, :, position] = split[heads + kv_heads :]
    torch.testing.assert_close(keys, expected_keys, **TOLERANCE[dtype])
    torch.testing.assert_close(values, expected_values, atol=0, rtol=0)
    first = max(0, position - window + 1) if window > 0 else 0
    expected = F.scaled_dot_product_attention(
        q.float().view(1, heads, 1, head_dim),
        keys[:, :, first : position + 1].float(),
        values[:, :, first : position + 1].float(),
        enable_gqa=True,
    ).reshape(1, heads * head_dim)
    torch.testing.assert_close(out.float(), expected, **TOLERANCE[dtype])


def test_bad_arguments():
    cos, sin = rope_tables(8, 4, torch.float32)
    keys, values = torch.zeros(1, 1, 8, 4), torch.zeros(1, 1, 8, 4)
    qkv = torch.randn(1, 12)
    with pytest.raises(ValueError, match="outside the cache"):
        ops.decode_attention(qkv, cos, sin, keys, values, 8, 1, 1, 0, 0.5)
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        ops.decode_attention(torch.randn(1, 28), cos, sin, keys, values, 0, 3, 2, 0, 0.5)
    with pytest.raises(TypeError, match="keys"):
        ops.decode_attention(qkv, cos, sin, keys.double(), values, 0, 1, 1, 0, 0.5)
    with pytest.raises(ValueError, match="head_dim"):
        ops.decode_attention(torch.randn(1, 13), cos, sin, keys, values, 0, 1, 1, 0, 0.5)
    with pytest.raises(ValueError, match="weight"):
        ops.decode_add_rms_norm(torch.randn(1, 8), None, torch.ones(7), 1e-5)
    with pytest.raises(TypeError, match="delta"):
        ops.decode_add_rms_norm(torch.randn(1, 8), torch.randn(1, 8).bfloat16(), torch.ones(8), 0.1)
    with pytest.raises(ValueError, match="gate_up"):
        ops.decode_silu_mul(torch.randn(1, 7))


def test_opcheck():
    cos, sin = rope_tables(8, 4, torch.float32)
    keys, values = torch.zeros(1, 1, 8, 4), torch.zeros(1, 1, 8, 4)
    torch.library.opcheck(
        ops.decode_attention.default, (torch.randn(1, 12), cos, sin, keys, values, 2, 1, 1, 0, 0.5)
    )
    x = torch.randn(2, 8)
    torch.library.opcheck(
        ops.decode_add_rms_norm.default, (x, torch.randn(2, 8), torch.ones(8), 0.1)
    )
    torch.library.opcheck(ops.decode_silu_mul.default, (torch.randn(2, 8),))
