"""Independent float64 implementations of DESIGN.md's op definitions, written differently
from rlhf_fast.ops' references (per-row Python loops over explicit episodes), to check them."""

from __future__ import annotations

import math

import torch


def gae_float64(rewards, values, mask, gamma, lam):
    """Per row: collect the valid steps, run the textbook backward recursion over them."""
    rewards, values = rewards.double().cpu(), values.double().cpu()
    batch, steps = rewards.shape
    valid = torch.ones(batch, steps, dtype=torch.bool) if mask is None else mask.cpu().bool()
    advantages = torch.zeros(batch, steps, dtype=torch.float64)
    returns = torch.zeros(batch, steps, dtype=torch.float64)
    for b in range(batch):
        episode = [t for t in range(steps) if valid[b, t]]
        last_advantage, next_value = 0.0, 0.0
        for t in reversed(episode):
            delta = rewards[b, t].item() + gamma * next_value - values[b, t].item()
            last_advantage = delta + gamma * lam * last_advantage
            advantages[b, t] = last_advantage
            returns[b, t] = last_advantage + values[b, t].item()
            next_value = values[b, t].item()
    return advantages, returns


def rank_loss_float64(rewards, mask):
    """Loss and its analytic gradient, pair by pair."""
    rewards = rewards.detach().double().cpu()
    batch, k = rewards.shape
    present = torch.ones(batch, k, dtype=torch.bool) if mask is None else mask.cpu().bool()
    total, pairs = 0.0, 0
    grad = torch.zeros(batch, k, dtype=torch.float64)
    for b in range(batch):
        for i in range(k):
            for j in range(i + 1, k):
                if not (present[b, i] and present[b, j]):
                    continue
                margin = rewards[b, i].item() - rewards[b, j].item()
                # -log(sigmoid(m)) = log(1 + exp(-m)), evaluated stably
                total += max(-margin, 0.0) + math.log1p(math.exp(-abs(margin)))
                decay = math.exp(-abs(margin))
                pull = decay / (1.0 + decay) if margin >= 0 else 1.0 / (1.0 + decay)  # sigmoid(-m)
                grad[b, i] -= pull
                grad[b, j] += pull
                pairs += 1
    if pairs == 0:
        return torch.tensor(0.0, dtype=torch.float64), grad
    return torch.tensor(total / pairs, dtype=torch.float64), grad / pairs
