"""GAE: the fast backend beside the reference, trl/OpenRLHF's loop, the best vectorized
PyTorch version and a memcpy of the same bytes, for fp32 [B, T] batches with right padding."""

from __future__ import annotations

import pytest
import torch
from peers import gae_chunked_scan, gae_reversed_loop

from rlhf_fast.ops import backends, gae, gae_reference

GAMMA, LAM = 1.0, 0.95  # the project's defaults, and trl's
SIZES = [(64, 256), (64, 1024), (64, 4096), (512, 256), (512, 1024), (512, 4096)]
# Bytes the op must move per element: rewards fp32 + values fp32 + mask bool read,
# advantages fp32 + returns fp32 written.
BYTES_PER_STEP = 4 + 4 + 1 + 4 + 4
# Quick mode (--bench-quick) keeps only the first, smallest size.
SIZE_PARAMS = [
    pytest.param((b, t), id=f"B{b}-T{t}", marks=pytest.mark.bench_full if i else ())
    for i, (b, t) in enumerate(SIZES)
]

_NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
_FAST = {"cpu": ("cpp",), "cuda": ("cuda", "triton")}
_OTHERS = ("reference", "peer", "vectorized", "memcpy")
PROVIDERS = [
    pytest.param(
        device, provider, id=f"{device}-{provider}", marks=_NO_CUDA if device == "cuda" else ()
    )
    for device in ("cpu", "cuda")
    for provider in _FAST[device] + _OTHERS
    if provider not in _FAST[device] or provider in backends(device)["gae"]
]


def make_inputs(batch: int, steps: int, device: str = "cpu", seed: int = 0):
    """Random rewards and values, and a right-padded mask with random response lengths
    (between T/8 and T; one row reaches T, as the longest response sets a batch's width)."""
    generator = torch.Generator().manual_seed(seed)
    rewards = torch.randn(batch, steps, generator=generator)
    values = torch.randn(batch, steps, generator=generator)
    lengths = torch.randint(max(1, steps // 8), steps + 1, (batch,), generator=generator)
    lengths[0] = steps
    mask = torch.arange(steps)[None, :] < lengths[:, None]
    return rewards.to(device), values.to(device), mask.to(device)


def _timed_call(provider: str, rewards, values, mask):
    if provider == "peer":
        return lambda: gae_reversed_loop(rewards, values, mask, gamma=GAMMA, lam=LAM)
    if provider == "vectorized":
        return lambda: gae_chunked_scan(rewards, values, mask, gamma=GAMMA, lam=LAM)
    if provider == "memcpy":
        # The physical limit: a copy reads and writes each byte once, so copying half the op's
        # bytes moves exactly as many bytes as the op must read plus write.
        copied = rewards.numel() * BYTES_PER_STEP // 2
        source = torch.ones(copied, dtype=torch.uint8, device=rewards.device)
        target = torch.zeros_like(source)
        return lambda: target.copy_(source)
    return lambda: gae(rewards, values, mask, gamma=GAMMA, lam=LAM, backend=provider)


@pytest.mark.parametrize(("device", "provider"), PROVIDERS)
@pytest.mark.parametrize("size", SIZE_PARAMS)
def test_gae(measure, size, device, provider):
    batch, steps = size
    if provider in _FAST[device]:
        reason = backends(device)["gae"][provider]
        if not reason.available:
            pytest.skip(f"gae backend {provider!r}: {reason.reason}")
    rewards, values, mask = make_inputs(batch, steps, device)
    measure(
        _timed_call(provider, rewards, values, mask),
        op="gae",
        device=device,
        size=f"B={batch} T={steps}",
        provider=provider,
        bytes_moved=rewards.numel() * BYTES_PER_STEP,
    )


# The peers are only worth timing if they compute the op: check them against the definition.


@pytest.mark.parametrize("steps", [1, 7, 32, 33, 100, 1100])
@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.99, 0.9), (0.9, 1.0)])
@pytest.mark.parametrize("masked", [True, False])
def test_gae_peers_match_reference(steps, gamma, lam, masked):
    rewards, values, mask = make_inputs(5, steps, seed=steps)
    if masked:
        mask[1] = False  # an empty response
    else:
        mask = None
    expected = gae_reference(rewards, values, mask, gamma=gamma, lam=lam)
    for peer in (gae_reversed_loop, gae_chunked_scan):
        advantages, returns = peer(rewards, values, mask, gamma=gamma, lam=lam)
        torch.testing.assert_close(advantages, expected[0], atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(returns, expected[1], atol=1e-4, rtol=1e-5)


def test_gae_peers_match_fast_backend_on_benchmark_inputs():
    rewards, values, mask = make_inputs(*SIZES[2])
    expected = gae(rewards, values, mask, gamma=GAMMA, lam=LAM)
    for peer in (gae_reversed_loop, gae_chunked_scan):
        advantages, returns = peer(rewards, values, mask, gamma=GAMMA, lam=LAM)
        torch.testing.assert_close(advantages, expected[0], atol=1e-3, rtol=1e-5)
        torch.testing.assert_close(returns, expected[1], atol=1e-3, rtol=1e-5)
