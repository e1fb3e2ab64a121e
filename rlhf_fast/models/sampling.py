"""Drawing tokens: one uniform number per row and an inverse CDF, not torch.multinomial.

torch.multinomial draws one exponential per vocabulary entry (argmax of p / E): B x V random
numbers a step, ~27 ns each on the dev machine's CPU, so 1.75 ms a decode step at B=8 and
V=8000 and 0.26 s at B=64 and V=150k, more than the step's matrix work. `sample_from_probs`
draws B uniforms and finds each in the running sum of its row instead: the same distribution
(the sum is fp64, so its rounding stays ~1e-16 of the row's total, far below any probability
that a draw can tell apart), in O(B x V) additions.

The uniforms come from the caller's generator on the generator's device: PPO's run-wide CPU
generator therefore gives the same draws whatever device the logits are on. From logits,
`sample_tokens_and_logprobs` draws through rlhf_fast.ops.sample_logits (softmax, top-k, this
draw and the token's log-prob in one C++ call on the CPU).
"""

from __future__ import annotations

import torch

BLOCK = 256  # entries per block of the two-level search


def sample_from_probs(
    probs: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One index per row of `probs` [..., V] (weights >= 0, as a softmax gives; normalized or
    not) -> [...], with one uniform per row from `generator` (pick_from_weights)."""
    if probs.dim() == 0 or probs.shape[-1] == 0:
        raise ValueError(f"probabilities need a non-empty last dimension, got {tuple(probs.shape)}")
    *lead, vocab = probs.shape
    rows = probs.reshape(-1, vocab)
    return pick_from_weights(rows, draw_uniforms(len(rows), generator, rows.device)).reshape(lead)


def draw_uniforms(rows: int, generator: torch.Generator | None, device) -> torch.Tensor:
    """`rows` fp64 uniforms in [0, 1) from `generator` on its own device, moved to `device`."""
    where = generator.device if generator is not None else device
    uniform = torch.rand(rows, generator=generator, dtype=torch.float64, device=where)
    return uniform.to(device)


def pick_from_weights(rows: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Per row of weights [N, V] (>= 0, normalized or not), the first index whose running sum
    exceeds uniform * the row's total (uniforms [N] fp64 in [0, 1)) -> [N] int64. Two levels,
    so that no [N, V] temporary is written: the uniform picks a block of BLOCK entries from the
    blocks' running sum, then an entry from the running sum inside that block. Block sums are
    fp32 sums (fp64 for fp64 weights; relative error ~1e-7, the size of the softmax's own
    rounding), whatever the weights' dtype; the running sums and the uniform are fp64."""
    vocab = rows.shape[-1]
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
    target = uniforms.reshape(-1, 1).to(rows.device) * total
    # the first block (then entry) whose running sum exceeds the target: zero-weight blocks and
    # entries never win; the clamps keep a last-ulp overshoot on the last positive one
    block = _search(block_cdf, target)
    before = torch.where(block > 0, block_cdf.gather(1, (block - 1).clamp(min=0)), 0.0)
    columns = block * BLOCK + torch.arange(min(BLOCK, vocab), device=rows.device)
    inside = rows.gather(1, columns.clamp(max=vocab - 1)).masked_fill(columns >= vocab, 0.0)
    entry = _search(inside.double().cumsum(-1), target - before)
    return (block * BLOCK + entry).reshape(-1)


def _search(cdf: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per row, the first index with cdf > target, at most the row's last positive step."""
    last_positive = (cdf < cdf[:, -1:]).sum(-1, keepdim=True)
    return torch.minimum(torch.searchsorted(cdf, target, right=True), last_positive)


def sample_tokens(
    logits: torch.Tensor, temperature: float, top_k: int, generator: torch.Generator | None
) -> torch.Tensor:
    """One token per row from logits [B, V]: greedy at temperature 0, else softmax of
    logits / temperature restricted to the top_k (0: all)."""
    return sample_tokens_and_logprobs(logits, temperature, top_k, generator)[0]


def sample_tokens_and_logprobs(
    logits: torch.Tensor, temperature: float, top_k: int, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [B], their fp32 log-probs [B]) from logits [B, V]: sample_tokens' draw, and
    log_softmax(logits / temperature) at each token (temperature 0: argmax, and the log-prob
    of the logits as they are), before the top_k restriction (rlhf_fast.ops.sample_logits)."""
    if temperature == 0:
        tokens = logits.argmax(-1)
        logprobs = torch.log_softmax(logits.float(), -1).gather(-1, tokens[:, None]).squeeze(-1)
        return tokens, logprobs
    from rlhf_fast.ops import sample_logits  # rlhf_fast.ops imports this module

    uniforms = draw_uniforms(logits.shape[0], generator, logits.device)
    return sample_logits(logits, uniforms, temperature, top_k)
