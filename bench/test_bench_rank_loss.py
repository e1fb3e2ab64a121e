"""K-wise ranking loss, forward + backward: the fast backend beside the reference,
Open-Assistant's per-prompt loop and the best vectorized PyTorch version."""

from __future__ import annotations

import pytest
import torch
from peers import rank_loss_pair_gather, rank_loss_per_prompt, ranked_to_flat

from rlhf_fast.ops import backends, rank_loss, rank_loss_reference

SIZES = [(64, 2), (64, 4), (64, 9), (1024, 2), (1024, 4), (1024, 9)]
# Quick mode (--bench-quick) keeps only the first, smallest size.
SIZE_PARAMS = [
    pytest.param((b, k), id=f"B{b}-K{k}", marks=pytest.mark.bench_full if i else ())
    for i, (b, k) in enumerate(SIZES)
]

_NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
_FAST = {"cpu": ("cpp",), "cuda": ("cuda", "triton")}
_OTHERS = ("reference", "peer", "vectorized")
PROVIDERS = [
    pytest.param(
        device, provider, id=f"{device}-{provider}", marks=_NO_CUDA if device == "cuda" else ()
    )
    for device in ("cpu", "cuda")
    for provider in _FAST[device] + _OTHERS
    if provider not in _FAST[device] or provider in backends(device)["rank_loss"]
]


def make_inputs(batch: int, responses: int, device: str = "cpu", seed: int = 0):
    """fp32 rewards [B, K], best first. K = 2 is the chosen/rejected case and has no mask;
    for larger K each prompt has between 2 and K ranked responses (one has K)."""
    generator = torch.Generator().manual_seed(seed)
    rewards = torch.randn(batch, responses, generator=generator)
    if responses == 2:
        return rewards.to(device), None
    counts = torch.randint(2, responses + 1, (batch,), generator=generator)
    counts[0] = responses
    mask = torch.arange(responses)[None, :] < counts[:, None]
    return rewards.to(device), mask.to(device)


def _forward_backward(loss_fn, leaf: torch.Tensor):
    return lambda: torch.autograd.grad(loss_fn(leaf), leaf)[0]


def _timed_call(provider: str, rewards: torch.Tensor, mask: torch.Tensor | None):
    if provider == "peer":
        # Open-Assistant's model emits the flat layout itself: building it is not timed.
        flat, bounds = ranked_to_flat(rewards, mask)
        leaf = flat.detach().clone().requires_grad_()
        return _forward_backward(lambda x: rank_loss_per_prompt(x, bounds), leaf)
    leaf = rewards.detach().clone().requires_grad_()
    if provider == "vectorized":
        return _forward_backward(lambda x: rank_loss_pair_gather(x, mask), leaf)
    return _forward_backward(lambda x: rank_loss(x, mask, backend=provider), leaf)


@pytest.mark.parametrize(("device", "provider"), PROVIDERS)
@pytest.mark.parametrize("size", SIZE_PARAMS)
def test_rank_loss(measure, size, device, provider):
    batch, responses = size
    if provider in _FAST[device]:
        reason = backends(device)["rank_loss"][provider]
        if not reason.available:
            pytest.skip(f"rank_loss backend {provider!r}: {reason.reason}")
    rewards, mask = make_inputs(batch, responses, device)
    measure(
        _timed_call(provider, rewards, mask),
        op="rank_loss",
        device=device,
        size=f"B={batch} K={responses}",
        provider=provider,
    )


# The peers are only worth timing if they compute the op: check them against the definition.


@pytest.mark.parametrize("size", [(1, 2), (7, 2), (7, 3), (13, 9), *SIZES[3:]])
def test_rank_loss_peers_match_reference(size):
    rewards, mask = make_inputs(*size, seed=size[0] + size[1])
    leaf = rewards.clone().requires_grad_()
    expected = rank_loss_reference(leaf, mask)
    (expected_grad,) = torch.autograd.grad(expected, leaf)

    loss = rank_loss_pair_gather(leaf, mask)
    (grad,) = torch.autograd.grad(loss, leaf)
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grad, expected_grad, atol=1e-7, rtol=1e-5)

    flat, bounds = ranked_to_flat(rewards, mask)
    flat = flat.clone().requires_grad_()
    loss = rank_loss_per_prompt(flat, bounds)
    (grad,) = torch.autograd.grad(loss, flat)
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-5)
    present_grad = expected_grad.reshape(-1) if mask is None else expected_grad[mask]
    torch.testing.assert_close(grad, present_grad, atol=1e-7, rtol=1e-5)


def test_pair_gather_ignores_nan_padding():
    rewards, mask = make_inputs(6, 4, seed=3)
    rewards[~mask] = float("nan")
    leaf = rewards.clone().requires_grad_()
    loss = rank_loss_pair_gather(leaf, mask)
    (grad,) = torch.autograd.grad(loss, leaf)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
