"""The fused training layers, forward + backward on CPU, fp32 and bf16: ops.rms_norm (HF's
LlamaRMSNorm), ops.silu_mul (the SwiGLU product) and ops.rotary_embedding (of q and k), each
beside its reference (HF's own formula, what every Llama-family model in transformers runs), a
peer, and a memcpy of the bytes the op must move.

Peers: torch's own F.rms_norm for the norm; for silu_mul the reference is already what users
run (HF, peft, trl), so there is no separate peer row. Sizes: the PPO bench's h256 layer
([512 tokens, 256] and [512, 688]; rotary: 8 x 64 tokens, 4 q + 4 k heads of 64) and a 1B
model's at 4096 tokens ([4096, 2048], [4096, 5632]; rotary: 2 x 2048 tokens, 16 q + 4 k heads
of 128); the rotary reference is transformers' own apply_rotary_pos_emb on q and k.
Bytes moved (the memcpy row and GB/s): forward reads x (gate, up) and writes y; backward reads
dy and x (gate, up) and writes dx (d gate, d up); the norm's frozen weight is negligible.
bf16 rows: the activations of a bf16 base (`--dtype bf16`); torch's bf16 elementwise ops are
~2x slower than its fp32 ones here, which the fused ops do not inherit.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from rlhf_fast.ops import (
    backends,
    rms_norm,
    rms_norm_reference,
    rotary_embedding,
    silu_mul,
    silu_mul_reference,
)

NORM_SIZES = [(512, 256), (4096, 2048)]
MLP_SIZES = [(512, 688), (4096, 5632)]
ROTARY_SIZES = [(8, 64, 4, 4, 64), (2, 2048, 16, 4, 128)]  # B, T, q heads, k heads, D
# reads + writes, fwd + bwd, per element of x (the tables are small next to q and k), in
# elements of x's dtype
ACCESSES_PER_ELEMENT = {"silu_mul": 8, "rotary_embedding": 4}
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]


def _size_params(sizes):
    return [pytest.param(s, id=f"{s[0]}x{s[1]}", marks=pytest.mark.bench_full if i else ())
            for i, s in enumerate(sizes)]  # fmt: skip


def _bytes_moved(elements: int, op: str, dtype: torch.dtype) -> int:
    return elements * ACCESSES_PER_ELEMENT[op] * dtype.itemsize


def _rms_norm_bytes(elements: int, dtype: torch.dtype) -> int:
    """x read twice and dx written in x's dtype; y written and dy read in fp32 (see below)."""
    return elements * (3 * dtype.itemsize + 2 * 4)


def _memcpy(moved: int):
    """A copy that moves `moved` bytes (it reads and writes each byte)."""
    copied = moved // 2
    source = torch.ones(copied, dtype=torch.uint8)
    target = torch.zeros_like(source)
    return lambda: target.copy_(source)


def _name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]


def _forward_backward(fn, inputs, grad):
    return lambda: torch.autograd.grad(fn(*inputs), inputs, grad)


def _skip_unavailable(op: str, provider: str) -> None:
    if provider == "cpp" and not backends("cpu")[op]["cpp"].available:
        pytest.skip(f"{op} backend 'cpp': {backends('cpu')[op]['cpp'].reason}")


@pytest.mark.parametrize("provider", ["cpp", "reference", "peer", "memcpy"])
@pytest.mark.parametrize("size", _size_params(NORM_SIZES))
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm(measure, size, provider, dtype):
    _skip_unavailable("rms_norm", provider)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(size, generator=generator).to(dtype).requires_grad_(True)
    weight = torch.randn(size[1], generator=generator)  # frozen, as under LoRA
    # HF's norm multiplies its fp32 weight by h in x's dtype: y (so dy) is fp32 for any x
    grad = torch.randn(size, generator=generator)
    moved = _rms_norm_bytes(x.numel(), dtype)
    if provider == "memcpy":
        call = _memcpy(moved)
    elif provider == "peer":  # torch's norm takes the weight, and gives y, in x's dtype
        norm = functools.partial(F.rms_norm, normalized_shape=(size[1],), weight=weight.to(dtype))
        call = _forward_backward(lambda t: norm(t, eps=1e-6), (x,), grad.to(dtype))
    else:
        call = _forward_backward(lambda t: rms_norm(t, weight, 1e-6, backend=provider), (x,), grad)
    measure(call, op=f"rms_norm fwd+bwd {_name(dtype)}", device="cpu",
            size=f"{size[0]}x{size[1]}", provider=provider, bytes_moved=moved)  # fmt: skip


@pytest.mark.parametrize("provider", ["cpp", "reference", "memcpy"])
@pytest.mark.parametrize("size", _size_params(MLP_SIZES))
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul(measure, size, provider, dtype):
    _skip_unavailable("silu_mul", provider)
    generator = torch.Generator().manual_seed(0)
    gate = torch.randn(size, generator=generator).to(dtype).requires_grad_(True)
    up = torch.randn(size, generator=generator).to(dtype).requires_grad_(True)
    grad = torch.randn(size, generator=generator).to(dtype)
    moved = _bytes_moved(gate.numel(), "silu_mul", dtype)
    if provider == "memcpy":
        call = _memcpy(moved)
    else:
        call = _forward_backward(lambda g, u: silu_mul(g, u, backend=provider), (gate, up), grad)
    measure(call, op=f"silu_mul fwd+bwd {_name(dtype)}", device="cpu",
            size=f"{size[0]}x{size[1]}", provider=provider, bytes_moved=moved)  # fmt: skip


@pytest.mark.parametrize("provider", ["cpp", "reference", "memcpy"])
@pytest.mark.parametrize(
    "size",
    [pytest.param(s, id=f"B{s[0]}-T{s[1]}-H{s[2]}+{s[3]}-D{s[4]}",
                  marks=pytest.mark.bench_full if i else ()) for i, s in enumerate(ROTARY_SIZES)],
)  # fmt: skip
@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_embedding(measure, size, provider, dtype):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    _skip_unavailable("rotary_embedding", provider)
    batch, steps, q_heads, k_heads, dim = size
    generator = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(shape, generator=generator).to(dtype)

    q = randn(batch, steps, q_heads, dim).requires_grad_(True)
    k = randn(batch, steps, k_heads, dim).requires_grad_(True)
    cos, sin = randn(2, batch, steps, dim)
    grads = (randn(*q.shape), randn(*k.shape))
    moved = _bytes_moved(q.numel() + k.numel(), "rotary_embedding", dtype)
    if provider == "memcpy":
        call = _memcpy(moved)
    elif provider == "reference":  # HF's, on its [B, H, T, D] views, as its attention calls it
        call = lambda: torch.autograd.grad(  # noqa: E731
            apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin), (q, k),
            tuple(g.transpose(1, 2) for g in grads))  # fmt: skip
    else:
        call = lambda: torch.autograd.grad(  # noqa: E731
            (rotary_embedding(q, cos, sin), rotary_embedding(k, cos, sin)), (q, k), grads
        )
    measure(call, op=f"rotary q+k fwd+bwd {_name(dtype)}", device="cpu",
            size="x".join(map(str, size)), provider=provider, bytes_moved=moved)  # fmt: skip


def test_peers_compute_the_references():
    # A peer is only worth timing if it computes the op.
    generator = torch.Generator().manual_seed(1)
    x, weight = torch.randn(7, 33, generator=generator), torch.randn(33, generator=generator)
    torch.testing.assert_close(F.rms_norm(x, (33,), weight, 1e-6),
                               rms_norm_reference(x, weight, 1e-6))  # fmt: skip
    gate, up = torch.randn(5, 9, generator=generator), torch.randn(5, 9, generator=generator)
    torch.testing.assert_close(silu_mul(gate, up), silu_mul_reference(gate, up))
