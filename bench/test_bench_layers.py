"""The fused training layers, forward + backward on CPU, fp32: ops.rms_norm (HF's LlamaRMSNorm),
ops.silu_mul (the SwiGLU product) and ops.rotary_embedding (of q and k), each beside its
reference (HF's own formula, what every Llama-family model in transformers runs), a peer, and a
memcpy of the bytes the op must move.

Peers: torch's own F.rms_norm for the norm; for silu_mul the reference is already what users
run (HF, peft, trl), so there is no separate peer row. Sizes: the PPO bench's h256 layer
([512 tokens, 256] and [512, 688]; rotary: 8 x 64 tokens, 4 q + 4 k heads of 64) and a 1B
model's at 4096 tokens ([4096, 2048], [4096, 5632]; rotary: 2 x 2048 tokens, 16 q + 4 k heads
of 128); the rotary reference is transformers' own apply_rotary_pos_emb on q and k.
Bytes moved (the memcpy row and GB/s): forward reads x (gate, up) and writes y; backward reads
dy and x (gate, up) and writes dx (d gate, d up); the norm's frozen weight is negligible.
"""

from __future__ import annotations

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
# fp32 reads + writes, fwd + bwd, per element of x (the tables are small next to q and k)
BYTES_PER_ELEMENT = {"rms_norm": 4 * 5, "silu_mul": 4 * 8, "rotary_embedding": 4 * 4}


def _size_params(sizes):
    return [pytest.param(s, id=f"{s[0]}x{s[1]}", marks=pytest.mark.bench_full if i else ())
            for i, s in enumerate(sizes)]  # fmt: skip


def _memcpy(elements: int, op: str):
    copied = elements * BYTES_PER_ELEMENT[op] // 2  # a copy reads and writes each byte
    source = torch.ones(copied, dtype=torch.uint8)
    target = torch.zeros_like(source)
    return lambda: target.copy_(source)


def _forward_backward(fn, inputs, grad):
    return lambda: torch.autograd.grad(fn(*inputs), inputs, grad)


def _skip_unavailable(op: str, provider: str) -> None:
    if provider == "cpp" and not backends("cpu")[op]["cpp"].available:
        pytest.skip(f"{op} backend 'cpp': {backends('cpu')[op]['cpp'].reason}")


@pytest.mark.parametrize("provider", ["cpp", "reference", "peer", "memcpy"])
@pytest.mark.parametrize("size", _size_params(NORM_SIZES))
def test_rms_norm(measure, size, provider):
    _skip_unavailable("rms_norm", provider)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(size, generator=generator, requires_grad=True)
    weight = torch.randn(size[1], generator=generator)  # frozen, as under LoRA
    grad = torch.randn(size, generator=generator)
    if provider == "memcpy":
        call = _memcpy(x.numel(), "rms_norm")
    elif provider == "peer":
        call = _forward_backward(lambda t: F.rms_norm(t, (size[1],), weight, 1e-6), (x,), grad)
    else:
        call = _forward_backward(lambda t: rms_norm(t, weight, 1e-6, backend=provider), (x,), grad)
    measure(call, op="rms_norm fwd+bwd", device="cpu", size=f"{size[0]}x{size[1]}",
            provider=provider, bytes_moved=x.numel() * BYTES_PER_ELEMENT["rms_norm"])  # fmt: skip


@pytest.mark.parametrize("provider", ["cpp", "reference", "memcpy"])
@pytest.mark.parametrize("size", _size_params(MLP_SIZES))
def test_silu_mul(measure, size, provider):
    _skip_unavailable("silu_mul", provider)
    generator = torch.Generator().manual_seed(0)
    gate = torch.randn(size, generator=generator, requires_grad=True)
    up = torch.randn(size, generator=generator, requires_grad=True)
    grad = torch.randn(size, generator=generator)
    if provider == "memcpy":
        call = _memcpy(gate.numel(), "silu_mul")
    else:
        call = _forward_backward(lambda g, u: silu_mul(g, u, backend=provider), (gate, up), grad)
    moved = gate.numel() * BYTES_PER_ELEMENT["silu_mul"]
    measure(call, op="silu_mul fwd+bwd", device="cpu", size=f"{size[0]}x{size[1]}",
            provider=provider, bytes_moved=moved)  # fmt: skip


@pytest.mark.parametrize("provider", ["cpp", "reference", "memcpy"])
@pytest.mark.parametrize(
    "size",
    [pytest.param(s, id=f"B{s[0]}-T{s[1]}-H{s[2]}+{s[3]}-D{s[4]}",
                  marks=pytest.mark.bench_full if i else ()) for i, s in enumerate(ROTARY_SIZES)],
)  # fmt: skip
def test_rotary_embedding(measure, size, provider):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    _skip_unavailable("rotary_embedding", provider)
    batch, steps, q_heads, k_heads, dim = size
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(batch, steps, q_heads, dim, generator=generator, requires_grad=True)
    k = torch.randn(batch, steps, k_heads, dim, generator=generator, requires_grad=True)
    cos, sin = torch.randn(2, batch, steps, dim, generator=generator)
    grads = (torch.randn(q.shape, generator=generator), torch.randn(k.shape, generator=generator))
    if provider == "memcpy":
        call = _memcpy(q.numel() + k.numel(), "rotary_embedding")
    elif provider == "reference":  # HF's, on its [B, H, T, D] views, as its attention calls it
        call = lambda: torch.autograd.grad(  # noqa: E731
            apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin), (q, k),
            tuple(g.transpose(1, 2) for g in grads))  # fmt: skip
    else:
        call = lambda: torch.autograd.grad(  # noqa: E731
            (rotary_embedding(q, cos, sin), rotary_embedding(k, cos, sin)), (q, k), grads
        )
    moved = (q.numel() + k.numel()) * BYTES_PER_ELEMENT["rotary_embedding"]
    measure(call, op="rotary q+k fwd+bwd", device="cpu", size="x".join(map(str, size)),
            provider=provider, bytes_moved=moved)  # fmt: skip


def test_peers_compute_the_references():
    # A peer is only worth timing if it computes the op.
    generator = torch.Generator().manual_seed(1)
    x, weight = torch.randn(7, 33, generator=generator), torch.randn(33, generator=generator)
    torch.testing.assert_close(F.rms_norm(x, (33,), weight, 1e-6),
                               rms_norm_reference(x, weight, 1e-6))  # fmt: skip
    gate, up = torch.randn(5, 9, generator=generator), torch.randn(5, 9, generator=generator)
    torch.testing.assert_close(silu_mul(gate, up), silu_mul_reference(gate, up))
