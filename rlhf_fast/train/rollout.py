"""PPO rollouts: sample a batch of answers with the KV cache, and score their tokens.

`generate_rollouts` left-pads the prompts, prefills them in one forward pass, then feeds one
new token per row per step with the KV cache until every row has emitted an EOS or
`max_new_tokens` is reached. Sampling is seeded by a `torch.Generator`, so a rollout is
reproducible (and resumable) without touching torch's global RNG.

Log-probs are those of the distribution that drew the tokens, logits / temperature (before
top-k, which only restricts what may be drawn; trl and OpenRLHF do the same), so that the
KL and ratios that PPO later computes compare like with like. The policy's come from the
sampling logits themselves (no second forward); the reference's from one full forward of the
policy with its LoRA adapters disabled (peft's `disable_adapter()`): one base model serves
both roles, and the reference is exactly the model the adapters were added to.

The response mask is true on every sampled token up to and including the first EOS; tokens
after it are `pad_token_id` and masked out. `ended` is false for rows that never emitted EOS.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass

import torch

from rlhf_fast.train.ppo_math import token_logprobs


@dataclass
class Rollout:
    query: torch.Tensor  # [B, Q] long, left-padded prompts
    query_mask: torch.Tensor  # [B, Q] bool, true on prompt tokens
    response: torch.Tensor  # [B, R] long, pad_token_id after each row's end
    response_mask: torch.Tensor  # [B, R] bool, true up to and including the first EOS
    ended: torch.Tensor  # [B] bool, whether the row emitted an EOS
    logprobs: torch.Tensor  # [B, R] fp32, policy log-probs of the sampled tokens (0 if masked)
    ref_logprobs: torch.Tensor | None  # [B, R] fp32, reference log-probs (0 if masked)

    @property
    def sequences(self) -> torch.Tensor:
        return torch.cat([self.query, self.response], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.query_mask, self.response_mask], dim=1)


def left_pad(prompts: list[list[int]], pad_token_id: int, device=None):
    """(ids [B, Q], mask [B, Q] bool) with each prompt flush right."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token id lists")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long, device=device)
    mask = torch.zeros(len(prompts), width, dtype=torch.bool, device=device)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt) :] = True
    return ids, mask


def _forward_parameters(model: torch.nn.Module):
    """The base model's forward arguments (a peft wrapper hides them behind **kwargs)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inspect.signature(base.forward).parameters


def _cache_keyword(model: torch.nn.Module) -> str:
    """transformers >= 5.24 names the KV-cache argument `cache`, earlier versions
    `past_key_values`."""
    return "cache" if "cache" in _forward_parameters(model) else "past_key_values"


def _position_keywords(model: torch.nn.Module, positions: torch.Tensor) -> dict:
    """position_ids for models that take them; ALiBi models (BLOOM) derive positions from the
    attention mask instead and take none."""
    return {"position_ids": positions} if "position_ids" in _forward_parameters(model) else {}


def _returned_cache(output):
    cache = getattr(output, "cache", None)
    return output.past_key_values if cache is None else cache


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on each row's first real token (left padding)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


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
    return torch.multinomial(torch.softmax(scaled, -1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def response_logprobs(
    model: torch.nn.Module,
    query: torch.Tensor,
    query_mask: torch.Tensor,
    response: torch.Tensor,
    response_mask: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Log-probs [B, R] of the response tokens under `model`, from one full forward pass of
    query + response (0 where response_mask is false)."""
    logits = response_logits(model, query, query_mask, response, response_mask)
    logprobs = token_logprobs(logits, response, temperature if temperature > 0 else 1.0)
    return torch.where(response_mask, logprobs, 0.0)


def response_logits(model, query, query_mask, response, response_mask) -> torch.Tensor:
    """Logits [B, R, V] that predict each response token (differentiable: PPO's training
    forward uses this too). Position Q - 1 + t of query + response predicts response token t."""
    mask = torch.cat([query_mask, response_mask], dim=1)
    sequences = torch.cat([query, response], dim=1)
    positions = _position_keywords(model, _positions(mask))
    output = model(input_ids=sequences, attention_mask=mask.long(), **positions)
    width = query.shape[1]
    return output.logits[:, width - 1 : -1]


def reference_context(model: torch.nn.Module):
    """The context in which `model` computes the reference: its adapters disabled."""
    if not hasattr(model, "disable_adapter"):
        raise ValueError(
            "the reference is the policy with its LoRA adapters disabled: pass a peft model "
            f"(got {type(model).__name__}) or an explicit reference model"
        )
    return model.disable_adapter()


@torch.no_grad()
def generate_rollouts(
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
) -> Rollout:
    """Sample one answer per prompt (token id lists) and score it; see the module docstring.

    reference: a separate reference model, or None for `model` with adapters disabled.
    score_reference=False skips the reference (ref_logprobs is None): for evaluation."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    device = next(model.parameters()).device
    eos = torch.tensor(
        [eos_token_ids] if isinstance(eos_token_ids, int) else list(eos_token_ids), device=device
    )
    was_training = model.training
    model.eval()  # no dropout while sampling, and the log-probs PPO stores must be exact
    try:
        query, query_mask = left_pad(prompts, pad_token_id, device)
        response, response_mask, logprobs = _sample(
            model, query, query_mask, pad_token_id, eos, max_new_tokens, temperature, top_k,
            generator,
        )  # fmt: skip
        ended = (torch.isin(response, eos) & response_mask).any(-1)
        ref_logprobs = None
        if score_reference:
            with contextlib.ExitStack() as stack:
                if reference is None:
                    stack.enter_context(reference_context(model))
                ref_model = model if reference is None else reference
                ref_logprobs = response_logprobs(
                    ref_model, query, query_mask, response, response_mask, temperature
                )
    finally:
        model.train(was_training)
    return Rollout(query, query_mask, response, response_mask, ended, logprobs, ref_logprobs)


def _sample(model, query, query_mask, pad_token_id, eos, max_new_tokens, temperature, top_k,
            generator):  # fmt: skip
    keyword = _cache_keyword(model)
    batch = query.shape[0]
    attention = query_mask.long()
    positions = _positions(query_mask)
    output = model(
        input_ids=query,
        attention_mask=attention,
        use_cache=True,
        **_position_keywords(model, positions),
    )
    cache = _returned_cache(output)
    last_logits = output.logits[:, -1]
    finished = torch.zeros(batch, dtype=torch.bool, device=query.device)
    tokens, masks, logprobs = [], [], []
    next_position = positions[:, -1:] + 1
    for step in range(max_new_tokens):
        token = sample_tokens(last_logits, temperature, top_k, generator)
        scale = temperature if temperature > 0 else 1.0
        logprob = torch.log_softmax(last_logits.float() / scale, -1).gather(-1, token[:, None])
        alive = ~finished
        tokens.append(torch.where(alive, token, pad_token_id))
        masks.append(alive)
        logprobs.append(torch.where(alive, logprob.squeeze(-1), 0.0))
        finished = finished | torch.isin(token, eos)
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        attention = torch.cat([attention, alive.long()[:, None]], dim=1)
        output = model(
            input_ids=tokens[-1][:, None],
            attention_mask=attention,
            use_cache=True,
            **{keyword: cache},
            **_position_keywords(model, next_position),
        )
        cache = _returned_cache(output)
        last_logits = output.logits[:, -1]
        next_position = next_position + 1
    return torch.stack(tokens, 1), torch.stack(masks, 1), torch.stack(logprobs, 1)
