"""What users run today instead of `rlhf_fast.ops`, rewritten here for the benchmarks.

Two kinds of peer per op:

- the code of the libraries people use (a Python loop over time steps for GAE, as in trl and
  OpenRLHF; a Python loop over prompts for the K-wise ranking loss, as in Open-Assistant),
  rewritten from a reading of those projects, keeping their structure and their cost;
- the best vectorized pure-PyTorch version we could write, so that a fast kernel is measured
  against a strong baseline and not only against a slow loop.

These are benchmark baselines, not library code: they check nothing about their inputs.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

# --------------------------------------------------------------------------------------------
# GAE
# --------------------------------------------------------------------------------------------


def gae_reversed_loop(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE as trl's PPO trainer and OpenRLHF's experience maker compute it.

    Both walk the time axis backwards in Python, one [B]-wide step at a time, collect the
    per-step advantages in a list and stack it reversed. Padding is handled by zeroing
    rewards and values outside the mask first (OpenRLHF multiplies by the action mask, trl
    uses masked_fill), which is exact for right padding: past the end every delta is 0.
    """
    if mask is not None:
        values = values * mask
        rewards = rewards * mask
    steps = rewards.shape[1]
    running = 0.0
    backwards = []
    for t in range(steps - 1, -1, -1):
        next_values = values[:, t + 1] if t + 1 < steps else 0.0
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        running = delta + gamma * lam * running
        backwards.append(running)
    advantages = torch.stack(backwards[::-1], dim=1)
    return advantages, advantages + values


@functools.lru_cache(maxsize=64)
def _discount_matrix(coef: float, size: int, device: torch.device) -> torch.Tensor:
    """W[s, t] = coef ** (s - t) for s >= t, else 0: `x @ W` is a reverse discounted cumsum."""
    index = torch.arange(size, dtype=torch.float64)
    lag = index[:, None] - index[None, :]
    weights = torch.where(lag >= 0, coef ** lag.clamp(min=0), 0.0)
    # Powers below fp32's normal range only add denormals (slow on some CPUs), never accuracy.
    weights = torch.where(weights < 1e-30, 0.0, weights)
    return weights.float().to(device)


@functools.lru_cache(maxsize=64)
def _carry_decay(coef: float, size: int, device: torch.device) -> torch.Tensor:
    """coef ** (size - t) for t in [0, size): how much of the next chunk's start reaches t."""
    return (coef ** torch.arange(size, 0, -1, dtype=torch.float64)).float().to(device)


def _reverse_discounted_cumsum(x: torch.Tensor, coef: float, chunk: int) -> torch.Tensor:
    """y[:, t] = x[:, t] + coef * y[:, t + 1] along dim 1 of a contiguous [B, T] tensor.

    A matmul with a chunk x chunk discount matrix solves every chunk independently; the
    chunks' first elements then form the same recurrence with coefficient coef ** chunk,
    solved recursively, and one fused multiply-add carries each chunk's successor in.
    Everything is a dense op, so there is no Python loop over time and no log-depth cascade
    of full-size passes.
    """
    batch, steps = x.shape
    if steps <= chunk:
        return x @ _discount_matrix(coef, steps, x.device)
    chunks = -(-steps // chunk)
    if chunks * chunk != steps:
        x = F.pad(x, (0, chunks * chunk - steps))
    local = x.view(batch, chunks, chunk) @ _discount_matrix(coef, chunk, x.device)
    starts = _reverse_discounted_cumsum(local[:, :, 0].contiguous(), coef**chunk, chunk)
    next_start = F.pad(starts[:, 1:], (0, 1))
    local.addcmul_(next_start.unsqueeze(-1), _carry_decay(coef, chunk, x.device))
    return local.view(batch, chunks * chunk)[:, :steps]


def gae_chunked_scan(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    gamma: float,
    lam: float,
    chunk: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fastest pure-PyTorch GAE we found: deltas, then a chunked discount-matrix scan.

    With right padding (each row's valid steps are a prefix: the layout of trl and OpenRLHF
    batches) or no mask, zeroing rewards and values past the end makes every padded delta 0,
    and A = reverse discounted cumsum of the deltas with the constant gamma * lam. Masks with
    gaps would need a per-step coefficient (the next *valid* step) and are not supported.
    chunk=32 was the fastest of 16/32/64/128 on the project's 2-core CPU.
    """
    if mask is not None:
        rewards = torch.where(mask, rewards, 0.0)
        values = torch.where(mask, values, 0.0)
    deltas = rewards - values
    deltas[:, :-1].add_(values[:, 1:], alpha=gamma)
    advantages = _reverse_discounted_cumsum(deltas, gamma * lam, chunk)
    return advantages, advantages + values


# --------------------------------------------------------------------------------------------
# K-wise ranking loss
# --------------------------------------------------------------------------------------------


def ranked_to_flat(rewards: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, list]:
    """[B, K] rewards + mask -> Open-Assistant's layout: present rewards back to back, and the
    Python list of cumulative lengths that marks where each prompt's responses start."""
    counts = [rewards.shape[1]] * rewards.shape[0] if mask is None else mask.sum(1).tolist()
    bounds = [0]
    for count in counts:
        bounds.append(bounds[-1] + int(count))
    flat = rewards.reshape(-1) if mask is None else rewards[mask]
    return flat.contiguous(), bounds


def rank_loss_per_prompt(flat_rewards: torch.Tensor, bounds: list) -> torch.Tensor:
    """The K-wise loss as Open-Assistant's reward-model trainer computes it.

    Rewards arrive flat (each prompt's responses best first, back to back) with the Python
    list of cumulative lengths; a Python loop visits one prompt at a time, builds that
    prompt's index pairs with torch.combinations, gathers both sides with `take` and applies
    -logsigmoid. Two deliberate differences, neither of which changes the cost: Open-Assistant
    averages within each prompt and then over prompts, and adds a small L2 term on the
    rewards; here the sum over pairs is divided by the pair count, so the value equals
    `rlhf_fast.ops.rank_loss` (a mean over all pairs of the batch) and can be checked.
    """
    device = flat_rewards.device
    pair_losses = []
    pair_count = 0
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        pairs = torch.combinations(torch.arange(end - start, device=device), 2)
        if pairs.numel() == 0:
            continue
        better = flat_rewards.take(start + pairs[:, 0])
        worse = flat_rewards.take(start + pairs[:, 1])
        pair_losses.append(-F.logsigmoid(better - worse).sum())
        pair_count += pairs.shape[0]
    if not pair_losses:
        return flat_rewards.sum() * 0.0
    return torch.stack(pair_losses).sum() / pair_count


@functools.lru_cache(maxsize=32)
def _pair_index(size: int, device: torch.device) -> torch.Tensor:
    return torch.triu_indices(size, size, 1, device=device)


def rank_loss_pair_gather(rewards: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The fastest pure-PyTorch K-wise loss we found: gather every (better, worse) pair of
    the row with cached triu indices, softplus(worse - better) = -logsigmoid(better - worse),
    and a weighted mean. Absent rewards are zeroed on the [B, K] tensor (not on the larger
    pair tensor), so NaN padding cannot reach the gradient."""
    better, worse = _pair_index(rewards.shape[1], rewards.device)
    if mask is None:
        losses = F.softplus(rewards[:, worse] - rewards[:, better])
        return losses.sum() / max(losses.numel(), 1)
    safe = torch.where(mask, rewards, 0.0)
    weights = (mask[:, better] & mask[:, worse]).to(rewards.dtype)
    losses = F.softplus(safe[:, worse] - safe[:, better])
    return (losses * weights).sum() / weights.sum().clamp(min=1)


# --------------------------------------------------------------------------------------------
# int4 weights in aten's (tinygemm's) format
# --------------------------------------------------------------------------------------------


def aten_int4_codes(weight: torch.Tensor, group: int = 128):
    """Asymmetric int4 of a [N, K] weight as aten's int4pack ops take it: codes [N, K] in 0..15
    (float) and the bf16 [K / group, N, 2] (scale, zero) table, where w = (code - 8) * scale
    + zero per group. The CPU and CUDA formats differ only in how the codes are packed."""
    n, k = weight.shape
    groups = weight.view(n, k // group, group)
    low, high = groups.amin(-1), groups.amax(-1)
    scale = ((high - low) / 15).clamp(min=1e-8)
    zero = low + 8 * scale
    codes = ((groups - low[..., None]) / scale[..., None]).round().clamp(0, 15).view(n, k)
    scale_and_zero = torch.stack([scale, zero], -1).transpose(0, 1).contiguous().bfloat16()
    return codes, scale_and_zero
