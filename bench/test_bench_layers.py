"""The fused training layers, forward + backward on CPU, fp32: ops.rms_norm (HF's LlamaRMSNorm)
and ops.silu_mul (the SwiGLU product), each beside its reference (HF's own formula, what every
Llama-family model in transformers runs), a peer, and a memcpy of the bytes the op must move.

Peers: torch's own F.rms_norm for the norm; for silu_mul the reference is already what users
run (HF, peft, trl), so there is no separate peer row. Sizes: the PPO bench's h256 layer
([512 tokens, 256] and [512, 688]) and a 1B model's at 4096 tokens ([4096, 2048], [4096, 5632]).
Bytes moved (the memcpy row and GB/s): forward reads x (gate, up) and writes y; backward reads
dy and x (gate, up) and writes dx (d gate, d up); the norm's frozen weight is negligible.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rlhf_fast.ops import backends, rms_norm, rms_norm_reference, silu_mul, silu_mul_reference

NORM_SIZES = [(512, 256), (4096, 2048)]
MLP_SIZES = [(512, 688), (4096, 5632)]
BYTES_PER_ELEMENT = {"rms_norm": 4 * 5, "silu_mul": 4 * 8}  # fp32 reads + writes, fwd + bwd


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


def test_peers_compute_the_references():
    # A peer is only worth timing if it computes the op.
    generator = torch.Generator().manual_seed(1)
    x, weight = torch.randn(7, 33, generator=generator), torch.randn(33, generator=generator)
    torch.testing.assert_close(F.rms_norm(x, (33,), weight, 1e-6),
                               rms_norm_reference(x, weight, 1e-6))  # fmt: skip
    gate, up = torch.randn(5, 9, generator=generator), torch.randn(5, 9, generator=generator)
    torch.testing.assert_close(silu_mul(gate, up), silu_mul_reference(gate, up))
