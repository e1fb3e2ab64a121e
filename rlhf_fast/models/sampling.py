"""Drawing tokens: one uniform number per row and an inverse CDF, not torch.multinomial.

torch.multinomial draws one exponential per vocabulary entry (argmax of p / E): B x V random
numbers a step, ~27 ns each on the dev machine's CPU, so 1.75 ms a decode step at B=8 and
V=8000 and 0.26 s at B=64 and V=150k, more than the step's matrix work. `sample_from_probs`
draws B uniforms and finds each in the running sum of its row instead: the same distribution
(the sum is fp64, so its rounding stays ~1e-16 of the row's total, far below any probability
that a draw can tell apart), in O(B x V) additions.

The uniforms come from the caller's generator on the generator's device: PPO's run-wide CPU
generator therefore gives the same draws whatever device the logits are on.
"""

from __future__ import annotations

import torch

BLOCK = 256  # entries per block of the two-level search


def sample_from_probs(
    probs: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One index per row of `probs` [..., V] (weights >= 0, as a softmax gives; normalized or
    not) -> [...]. Two levels, so that no [B, V] temporary is written: the uniform picks a
    block of BLOCK entries from the blocks' running sum, then an entry from the running sum
    inside that block. Block sums are fp32 sums (fp64 for fp64 weights; relative error ~1e-7,
    the size of the softmax's own rounding), whatever the weights' dtype; the running sums and
    the uniform are fp64."""
    if probs.dim() == 0 or probs.shape[-1] == 0:
        raise ValueError(f"probabilities need a non-empty last dimension, got {tuple(probs.shape)}")
    *lead, vocab = probs.shape
    rows = probs.reshape(-1, vocab)
    whole = vocab - vocab % BLOCK
    # fp32 (fp64 for fp64 weights): a bf16 block sum would round 1 + 0.00176 to 1, and the
    # inverse CDF would never reach the small entry
    accumulate = torch.float64 if rows.dtype == torch.float64 else torch.float32
    sums = (
        [rows[:, :whole].reshape(len(rows), whole // BLOCK, BLOCK).sum(-1, dtype=accumulate)]
        if whole
        else []
    )
    if whole < vocab:
        sums.append(rows[:, whole:].sum(-1, keepdim=True, dtype=accumulate))
    block_cdf = torch.cat(sums, -1).double().cumsum(-1)
    total = block_cdf[:, -1:]
    if not bool((torch.isfinite(total) & (total > 0)).all()):
        raise ValueError("probabilities must be finite, >= 0 and not all 0 in each row")
    device = generator.device if generator is not None else rows.device
    uniform = torch.rand(total.shape, generator=generator, dtype=torch.float64, device=device)
    target = uniform.to(rows.device) * total
    # the first block (then entry) whose running sum exceeds the target: zero-weight blocks and
    # entries never win; the clamps keep a last-ulp overshoot on the last positive one
    block = _search(block_cdf, target)
    before = torch.where(block > 0, block_cdf.gather(1, (block - 1).clamp(min=0)), 0.0)
    columns = block * BLOCK + torch.arange(min(BLOCK, vocab), device=rows.device)
    inside = rows.gather(1, columns.clamp(max=vocab - 1)).masked_fill(columns >= vocab, 0.0)
    entry = _search(inside.double().cumsum(-1), target - before)
    return (block * BLOCK + entry).reshape(lead)


def _search(cdf: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per row, the first index with cdf > target, at most the row's last positive step."""
    last_positive = (cdf < cdf[:, -1:]).sum(-1, keepdim=True)
    return torch.minimum(torch.searchsorted(cdf, target, right=True), last_positive)


def sample_tokens(
    logits: torch.Tensor, temperature: float, top_k: int, generator: torch.Generator | None
) -> torch.Tensor:
    """One token per row from logits [B, V]: greedy at temperature 0, else softmax of
    logits / temperature restricted to the top_k (0: all)."""
    if temperature == 0:
        return logits.argmax(-1)
    scaled = logits.float() / temperature
    if 0 < top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    return sample_from_probs(torch.softmax(scaled, -1), generator)
