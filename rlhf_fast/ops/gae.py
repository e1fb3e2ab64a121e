"""Generalized advantage estimation (Schulman et al. 2016) over masked [B, T] batches."""

from __future__ import annotations

import torch

from rlhf_fast.ops import _checks, _dispatch

_dispatch.IMPLEMENTED["gae"] = ("reference", "cpp", "cuda", "triton")


def gae_reference(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The definition of `gae`, in plain PyTorch (fp32, one vectorized step per time step).

    Each row's valid steps (mask true), in order, form one episode whose value after its last
    valid step is 0; "next" below is the next *valid* step of the same row:
        delta_t = r_t + gamma * V_next - V_t,   A_t = delta_t + gamma * lam * A_next.
    returns = A + V at valid steps; both outputs are 0 at invalid steps. Values at invalid
    steps are never read, so padding may hold anything (even NaN).
    """
    rewards, values = rewards.float(), values.float()
    batch, steps = rewards.shape
    valid = torch.ones_like(rewards, dtype=torch.bool) if mask is None else mask.bool()
    advantages = torch.zeros_like(rewards)
    next_advantage = rewards.new_zeros(batch)
    next_value = rewards.new_zeros(batch)
    for t in reversed(range(steps)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        valid_t = valid[:, t]
        advantages[:, t] = torch.where(valid_t, advantage, 0.0)
        next_advantage = torch.where(valid_t, advantage, next_advantage)
        next_value = torch.where(valid_t, values[:, t], next_value)
    returns = torch.where(valid, advantages + values, 0.0)
    return advantages, returns


def _gae_cpp_or_cuda(rewards, values, mask, gamma, lam):
    return torch.ops.rlhf_fast.gae(rewards, values, mask, gamma, lam)


def _gae_triton(rewards, values, mask, gamma, lam):
    from rlhf_fast.kernels.gae import gae_triton

    return gae_triton(rewards, values, mask, gamma, lam)


_IMPLEMENTATIONS = {
    "reference": lambda r, v, m, gamma, lam: gae_reference(r, v, m, gamma=gamma, lam=lam),
    "cpp": _gae_cpp_or_cuda,
    "cuda": _gae_cpp_or_cuda,
    "triton": _gae_triton,
}


@torch.no_grad()
def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns, both fp32 [B, T]; see `gae_reference` for the definition.

    rewards, values: [B, T] float32 / bfloat16 / float16 (accumulation is fp32). mask: [B, T]
    bool (or integer 0/1); None means every step is valid. No gradient flows through.
    """
    rewards = _checks.float_tensor(rewards, "rewards", 2)
    values = _checks.float_tensor(values, "values", 2)
    _checks.same_shape(values, "values", rewards, "rewards")
    _checks.same_device(values, "values", rewards, "rewards")
    mask = _checks.optional_mask(mask, rewards, "rewards")
    gamma = _checks.finite_float(gamma, "gamma")
    lam = _checks.finite_float(lam, "lam")
    if rewards.dtype != values.dtype:
        rewards, values = rewards.float(), values.float()
    backend = _dispatch.choose("gae", rewards.device, backend)
    return _IMPLEMENTATIONS[backend](rewards, values, mask, gamma, lam)
