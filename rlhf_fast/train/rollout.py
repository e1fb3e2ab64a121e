"""PPO rollouts: sample a batch of answers with the KV cache, and score their tokens.

`generate_rollouts` left-pads the prompts, prefills them in one forward pass, then feeds one
new token per row per step with the KV cache until every row has emitted an EOS or
`max_new_tokens` is reached. Sampling is seeded by a `torch.Generator`, so a rollout is
reproducible (and resumable) without touching torch's global RNG.

Log-probs are those of the distribution that drew the tokens, logits / temperature (before
top-k, which only restricts what may be drawn; trl and OpenRLHF do the same), so that the
KL and ratios that PPO later computes compare like with like. The policy's come from the
sampling logits themselves in fp32 (no second forward), and from one full forward where
sampling rounds otherwise (16-bit or quantized weights: sampling_logprobs_exact); the
reference's from one full forward of the policy with its LoRA adapters disabled (peft's
`disable_adapter()`): one base model serves both roles, and the reference is exactly the model
the adapters were added to.

The response mask is true on every sampled token up to and including the first EOS; tokens
after it are `pad_token_id` and masked out. `ended` is false for rows that never emitted EOS.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from dataclasses import dataclass

import torch

from rlhf_fast.models.sampling import sample_tokens_and_logprobs
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
    return masked_logprobs(logits, response, response_mask, temperature)


def masked_logprobs(
    logits: torch.Tensor, response: torch.Tensor, response_mask: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Log-probs [B, R] of the response tokens under logits [B, R, V] that predict them, as
    sampled at `temperature` (0, greedy: 1), and 0 where response_mask is false."""
    logprobs = token_logprobs(logits, response, temperature if temperature > 0 else 1.0)
    return torch.where(response_mask, logprobs, 0.0)


def response_logits(model, query, query_mask, response, response_mask) -> torch.Tensor:
    """Logits [B, R, V] that predict each response token (differentiable: PPO's training
    forward uses this too). Position Q - 1 + t of query + response predicts response token t."""
    mask = torch.cat([query_mask, response_mask], dim=1)
    sequences = torch.cat([query, response], dim=1)
    keywords = _position_keywords(model, _positions(mask))
    if "logits_to_keep" in _forward_parameters(model):
        # The LM head (and its [rows, vocab] output) on the last R + 1 positions only, named by
        # an index tensor rather than a count: HF slices the hidden states with a count, and
        # torch.matmul multiplies such a strided [B, R + 1, H] slice by the head through bmm
        # on a [B, H, V] expanded copy of the weight (measured at B=8, H=768, V=8000: 1.6x
        # the plain GEMM's time in fp32, 6x in bf16); an index gathers contiguous rows.
        width = sequences.shape[1]
        first = width - response.shape[1] - 1
        keywords["logits_to_keep"] = torch.arange(first, width, device=sequences.device)
    output = model(input_ids=sequences, attention_mask=mask.long(), **keywords)
    return output.logits[:, -response.shape[1] - 1 : -1]


def reference_context(model: torch.nn.Module):
    """The context in which `model` computes the reference: its adapters disabled."""
    if not hasattr(model, "disable_adapter"):
        raise ValueError(
            "the reference is the policy with its LoRA adapters disabled: pass a peft model "
            f"(got {type(model).__name__}) or an explicit reference model"
        )
    return model.disable_adapter()


DECODER_CHOICES = ("auto", "hf", "lean")
DECODER_ENV = "RLHF_FAST_DECODER"  # "hf" forces the HF loop here too (as for chat)


def choose_decoder(model: torch.nn.Module, decoder: str = "auto", quant: str = "none") -> str:
    """ "lean" or "hf" for this model: "auto" takes the lean decoder where it runs the model
    (RLHF_FAST_DECODER=hf overrides); quantized rollouts need it (ValueError otherwise)."""
    from rlhf_fast.train.rollout_decoder import QUANT_CHOICES, unsupported_reason

    if decoder not in DECODER_CHOICES:
        raise ValueError(f"decoder must be one of {DECODER_CHOICES}, got {decoder!r}")
    if quant not in QUANT_CHOICES:
        raise ValueError(f"quant must be one of {QUANT_CHOICES}, got {quant!r}")
    if decoder == "auto" and os.environ.get(DECODER_ENV, "").strip().lower() == "hf":
        decoder = "hf"
    if decoder == "hf":
        if quant != "none":
            raise ValueError(f"quant={quant!r} rollouts run on the lean decoder, not decoder='hf'")
        return "hf"
    reason = unsupported_reason(model)
    if reason is None:
        return "lean"
    if decoder == "lean" or quant != "none":
        what = "decoder='lean'" if decoder == "lean" else f"quant={quant!r} rollouts"
        raise ValueError(f"{what}: the lean rollout decoder cannot run this model ({reason})")
    return "hf"


def reference_logprobs(model, reference, query, query_mask, response, response_mask, temperature):
    """The answers' log-probs under `reference`, or under `model` with its adapters disabled
    when `reference` is None (the shared-base reference: exactly the SFT model)."""
    with contextlib.ExitStack() as stack:
        if reference is None:
            stack.enter_context(reference_context(model))
        return response_logprobs(
            model if reference is None else reference, query, query_mask, response,
            response_mask, temperature,
        )  # fmt: skip


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
    decoder: str = "auto",
    quant: str = "none",
    exact_logprobs: bool = True,
) -> Rollout:
    """Sample one answer per prompt (token id lists) and score it; see the module docstring.

    reference: a separate reference model, or None for `model` with adapters disabled.
    score_reference=False skips the reference (ref_logprobs is None): for evaluation.
    decoder: "auto" (the lean batched decoder of rollout_decoder.py where it runs the model,
    else the HF loop), "hf" or "lean"; quant: "none", "int8" or "int4" weights for sampling
    (lean decoder only); the stored log-probs are then the unquantized policy's.
    exact_logprobs=False: the sampling log-probs as they are, also where they round otherwise
    (sampling_logprobs_exact is false): for a caller that scores the policy itself."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    device = next(model.parameters()).device
    eos = torch.tensor(
        [eos_token_ids] if isinstance(eos_token_ids, int) else list(eos_token_ids), device=device
    )
    path = choose_decoder(model, decoder, quant)
    with evaluating(model):
        query, query_mask = left_pad(prompts, pad_token_id, device)
        steps = _LeanSteps(model, quant) if path == "lean" else _HFSteps(model)
        response, response_mask, logprobs = _sample(
            steps, query, query_mask, pad_token_id, eos, max_new_tokens, temperature, top_k,
            generator,
        )  # fmt: skip
        del steps  # the KV cache
        if exact_logprobs and not sampling_logprobs_exact(model, path, quant):
            logprobs = response_logprobs(
                model, query, query_mask, response, response_mask, temperature
            )
        rollout = scored_rollout(
            model, query, query_mask, response, response_mask, logprobs, eos, temperature,
            reference=reference, score_reference=score_reference,
        )  # fmt: skip
    return rollout


def sampling_logprobs_exact(model: torch.nn.Module, path: str, quant: str) -> bool:
    """Whether the sampling logits give the log-probs of the full forward (to fp32 rounding):
    that forward scores the reference and is the one PPO trains, so the KL and the ratios
    compare like with like only then. Not so for 16-bit weights (the KV-cache steps, and the
    lean decoder's merged weights, round otherwise: log-probs 0.03-0.06 apart on a tiny bf16
    Llama), quantized sampling weights (quant), or the lean decoder over a quantized (QLoRA)
    base, whose int4 kernels quantize the activations; those rollouts pay one more forward."""
    from rlhf_fast.quant.linear import QuantLinear

    if quant != "none":
        return False
    if model.get_input_embeddings().weight.dtype in (torch.float16, torch.bfloat16):
        return False
    return path != "lean" or not any(isinstance(m, QuantLinear) for m in model.modules())


@contextlib.contextmanager
def evaluating(model: torch.nn.Module):
    """`model` in eval mode inside (no dropout while sampling: the log-probs PPO stores must
    be exact), in the caller's mode again afterwards, even on an exception."""
    was_training = model.training
    # a switch sets `training` on every module (~1.4 ms on the PPO bench's policy): skipped
    # where no module is training, as in PPO, whose models are already in eval mode here
    switch = any(module.training for module in model.modules())
    if switch:
        model.eval()
    try:
        yield
    finally:
        if switch:
            model.train(was_training)


def scored_rollout(
    model, query, query_mask, response, response_mask, logprobs, eos, temperature, *,
    reference, score_reference: bool,
) -> Rollout:  # fmt: skip
    """The Rollout of sampled answers: `ended` from the EOS tokens (a tensor of ids) inside the
    mask, and with score_reference the reference's log-probs (reference_logprobs)."""
    ended = (torch.isin(response, eos) & response_mask).any(-1)
    ref_logprobs = None
    if score_reference:
        ref_logprobs = reference_logprobs(
            model, reference, query, query_mask, response, response_mask, temperature
        )
    return Rollout(query, query_mask, response, response_mask, ended, logprobs, ref_logprobs)


class _HFSteps:
    """The HF forward with its KV cache: start() prefills, step() feeds one token per row (the
    attention mask grows by `alive`: rows that already ended no longer count)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.keyword = model, _cache_keyword(model)

    def start(self, query, query_mask, max_new_tokens):
        model = self.model
        self.attention = query_mask.long()
        positions = _positions(query_mask)
        output = model(
            input_ids=query,
            attention_mask=self.attention,
            use_cache=True,
            **_position_keywords(model, positions),
        )
        self.cache = _returned_cache(output)
        self.next_position = positions[:, -1:] + 1
        return output.logits[:, -1]

    def step(self, tokens, alive):
        model = self.model
        self.attention = torch.cat([self.attention, alive.long()[:, None]], dim=1)
        output = model(
            input_ids=tokens[:, None],
            attention_mask=self.attention,
            use_cache=True,
            **{self.keyword: self.cache},
            **_position_keywords(model, self.next_position),
        )
        self.cache = _returned_cache(output)
        self.next_position = self.next_position + 1
        return output.logits[:, -1]


class _LeanSteps:
    """rollout_decoder.RolloutDecoder: the same steps through the lean batched decoder."""

    def __init__(self, model: torch.nn.Module, quant: str) -> None:
        from rlhf_fast.train.rollout_decoder import RolloutDecoder

        self.decoder = RolloutDecoder(model, quant)

    def start(self, query, query_mask, max_new_tokens):
        return self.decoder.start(query, query_mask, max_new_tokens)

    def step(self, tokens, alive):
        return self.decoder.step(tokens)


def _sample(steps, query, query_mask, pad_token_id, eos, max_new_tokens, temperature, top_k,
            generator):  # fmt: skip
    batch = query.shape[0]
    last_logits = steps.start(query, query_mask, max_new_tokens)
    finished = torch.zeros(batch, dtype=torch.bool, device=query.device)
    tokens, masks, logprobs = [], [], []
    for step in range(max_new_tokens):
        token, logprob = sample_tokens_and_logprobs(last_logits, temperature, top_k, generator)
        alive = ~finished
        tokens.append(torch.where(alive, token, pad_token_id))
        masks.append(alive)
        logprobs.append(torch.where(alive, logprob, 0.0))
        finished = finished | torch.isin(token, eos)
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        last_logits = steps.step(tokens[-1], alive)
    return torch.stack(tokens, 1), torch.stack(masks, 1), torch.stack(logprobs, 1)
