"""PPO rollouts on an offloaded policy: generate_batch's block schedule instead of HF decoding.

`generate_offloaded_rollouts` takes generate_rollouts' arguments (rlhf_fast/train/rollout.py)
and returns its Rollout, built the same way: left-padded prompts, answers drawn from
softmax(logits / temperature) (top-k restricts the draw, not the log-probs), the response mask
true up to and including the first EOS, and the reference's log-probs from one forward of the
policy with its adapters disabled. The draw order of the seeded generator is the same (one
draw over all rows per step, models/sampling.py), so a seed gives the answers the resident
path gives. What differs is the schedule: each decode step streams each layer once for all
the rows, the rows cut into the policy's micro-batches (FlexGen's block), instead of one HF
forward per step.

Activations stay fp32 here whatever the model's int4 activation rule (quant/activations.py;
chat and plain generation default to bf16 for many-row int4 products): the log-probs of the
sampling forward are stored as PPO's old log-probs, and the training forward that PPO compares
them with runs fp32 under autograd, so bf16 here would bias epoch 1's ratio away from 1.
For the same reason, with the 4-bit KV cache (kv=int4: the answers are drawn from logits that
read a lossy cache, off by up to several nats) the stored log-probs are the policy's own, from
one more forward of query + answer without a cache (as the resident path does for answers
sampled from quantized weights).
"""

from __future__ import annotations

import torch

from rlhf_fast.offload.generate import generate_batch
from rlhf_fast.quant.activations import int4_activations


@torch.no_grad()
def generate_offloaded_rollouts(
    model: torch.nn.Module,
    prompts: list[list[int]],
    *,
    pad_token_id: int,
    eos_token_ids: int | list[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    generator: torch.Generator | None = None,
    reference: torch.nn.Module | None = None,
    score_reference: bool = True,
    micro_batch: int | None = None,
    decoder: str = "auto",
    quant: str = "none",
):
    """generate_rollouts (train/rollout.py) for a peft model over an offloaded base.
    `micro_batch`: rows per micro-batch of the block (default: the offload policy's). The
    lean decoder and its quantized copies need every weight in memory: `decoder` is ignored
    (the block schedule is the offloaded decoder) and `quant` must be "none"."""
    from rlhf_fast.train.rollout import evaluating, left_pad, response_logprobs, scored_rollout

    lm = model.rlhf_fast_offload
    if quant != "none":
        raise ValueError(f"rollout quant={quant!r} needs the whole policy in memory, not offload")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    eos_list = [eos_token_ids] if isinstance(eos_token_ids, int) else list(eos_token_ids)
    # fp32 activations while sampling and scoring: see the module docstring
    with evaluating(model), int4_activations(lm.model, None):
        query, query_mask = left_pad(prompts, pad_token_id)
        kv_bits = lm.policy.kv_bits if lm.policy is not None else None
        if micro_batch is None and lm.policy is not None:
            micro_batch = lm.policy.micro_batch
        steps: list[torch.Tensor] = []
        sequences = generate_batch(
            lm, query, query_mask.long(), max_new_tokens=max_new_tokens,
            micro_batch=micro_batch, eos_token_id=eos_list,
            pad_token_id=pad_token_id, temperature=temperature, top_k=top_k,
            generator=generator, logprobs=steps, kv_bits=kv_bits,
        )  # fmt: skip
        response = sequences[:, query.shape[1] :]
        eos = torch.tensor(eos_list)
        is_eos = torch.isin(response, eos)
        ended_before = (is_eos.long().cumsum(1) - is_eos.long()) > 0
        response_mask = ~ended_before
        response = response.masked_fill(~response_mask, pad_token_id)
        logprobs = torch.where(response_mask, torch.stack(steps, 1), 0.0)
        if kv_bits is not None:  # drawn from logits of a lossy cache: see the module docstring
            logprobs = response_logprobs(
                model, query, query_mask, response, response_mask, temperature
            )
        rollout = scored_rollout(
            model, query, query_mask, response, response_mask, logprobs, eos, temperature,
            reference=reference, score_reference=score_reference,
        )  # fmt: skip
    return rollout
