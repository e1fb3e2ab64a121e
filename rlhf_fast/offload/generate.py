"""generate_batch: batched generation over streamed layers with FlexGen's block schedule.

The batch is cut into micro-batches, each with its own KV cache. Every step (the prefill, then
one token per sequence) walks the layers once: layer i is acquired (its weights bound, read
from disk if streamed), all micro-batches of the block pass through it, then it is released
and the streamer's read-ahead of layer i+1 has been overlapping that compute. One weight load
thus serves the whole batch, which is what makes throughput-oriented generation (PPO
rollouts) fast under offloading; micro-batching bounds the activations and KV per call.

Llama-family models (SCHEDULED_TYPES: Llama, Mistral, Qwen2, Qwen3, Gemma, whose forward the
schedule repeats; with a sliding window only while the whole sequence fits in it) run the
schedule; other models fall back to one HF forward per micro-batch (each re-streams the
layers): a model merely laid out alike can differ (Granite scales its embeddings and logits).
Prompts are left-padded (`attention_mask` 0 on the left); sampling is greedy at temperature 0,
else softmax sampling with optional top-k from a seeded generator. Finished rows (EOS) are
padded with `pad_token_id`.
With `kv_bits=4` each micro-batch's KV cache is held 4-bit group-wise (offload/kv_cache.py).

int4 layers follow the model's int4 activation rule (quant/activations.py; on by default in
load_offloaded: products of >= 32 rows on bf16). A product's rows are a micro-batch's, so the
output equals the resident model's whole-batch forward under the same rule when every
micro-batch is on the batch's side of the threshold (`activations.same_side`; the policy only
proposes such micro-batches); otherwise it equals the resident model fed the same micro-batches.

Torch's intra-op threads are set to the offload policy's count while generating (`compute_threads`
overrides; without a policy, one fewer than torch has, at least 1). The policy times both one
fewer and all of them (candidate_threads) and charges the second for the reader's CPU: the
reader thread shares a core then, and torch's parallel regions wait at a barrier for their
slowest thread, so a reader (or another process) holding one of the cores stretches every op
of the step. With buffered reads (a copy per byte) that was measured at 2-4x per decoder layer
on the 2-core machine; O_DIRECT reads need ~0.01 s of CPU each, and there both cores decoded
int4 layers at batch 128 1.5x faster. The count holds without prefetching too, so that the
policy's calibration (policy.calibrate, timed with the same count) describes every policy.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass

import torch

from rlhf_fast.models.sampling import sample_tokens_and_logprobs
from rlhf_fast.offload.kv_cache import compressed_cache
from rlhf_fast.offload.model import OffloadedLM


@dataclass
class _MicroBatch:
    rows: slice
    mask: torch.Tensor  # [b, length] attention mask so far
    cache: object
    positions: torch.Tensor  # [b] next position id of each row
    prefilled: bool = False


# model types whose forward is exactly what _block_forward does: embed_tokens (Gemma's scales
# itself), rotary_emb, the layers under a full causal mask, norm, lm_head
SCHEDULED_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma"})


def _scheduled(model, length: int) -> bool:
    """Whether the block schedule reproduces `model`'s forward on sequences of `length`."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in SCHEDULED_TYPES:
        return False
    inner = getattr(model, "model", None)
    names = ("embed_tokens", "rotary_emb", "layers", "norm")
    if not (all(hasattr(inner, name) for name in names) and hasattr(model, "lm_head")):
        return False
    # the schedule's mask is fully causal: equal to a sliding window's while nothing slides out
    window = getattr(config, "sliding_window", None)
    return window is None or length <= window


def _block_forward(lm: OffloadedLM, batches: list[_MicroBatch], tokens: list[torch.Tensor]):
    """Last-position logits of each micro-batch after feeding `tokens[k]` ([b, t])."""
    from transformers.masking_utils import create_causal_mask

    model, inner = lm.model, lm.model.model
    states, masks, rotary, positions = [], [], [], []
    for batch, ids in zip(batches, tokens, strict=True):
        if not batch.prefilled:  # positions count only real (unmasked) tokens, as HF generate
            position = (batch.mask.long().cumsum(-1) - 1).clamp(min=0)
        else:
            position = batch.positions[:, None]
        hidden = inner.embed_tokens(ids)
        masks.append(create_causal_mask(model.config, hidden, batch.mask, batch.cache, position))
        rotary.append(inner.rotary_emb(hidden, position_ids=position))
        states.append(hidden)
        positions.append(position)
    for index, layer in enumerate(inner.layers):
        lm.streamer.acquire(index)
        try:
            for k, batch in enumerate(batches):
                states[k] = layer(
                    states[k], attention_mask=masks[k], position_ids=positions[k],
                    cache=batch.cache, use_cache=True, position_embeddings=rotary[k],
                )  # fmt: skip
        finally:
            lm.streamer.release(index)
    # The LM head runs once over the whole batch: per micro-batch it would re-read its weights
    # (vocab x hidden, 262 MB in fp32 for a 32k vocab) once per micro-batch.
    last = torch.cat([hidden[:, -1] for hidden in states])
    return [model.lm_head(inner.norm(last))]


def _fallback_forward(lm: OffloadedLM, batches: list[_MicroBatch], tokens: list[torch.Tensor]):
    logits = []
    for batch, ids in zip(batches, tokens, strict=True):
        if not batch.prefilled:
            position = (batch.mask.long().cumsum(-1) - 1).clamp(min=0)
        else:
            position = batch.positions[:, None]
        out = lm.model(
            input_ids=ids, attention_mask=batch.mask, position_ids=position,
            cache=batch.cache, use_cache=True,
        )  # fmt: skip
        logits.append(out.logits[:, -1])
    return logits


THREADS_ENV = "RLHF_FAST_OFFLOAD_THREADS"


def streaming_threads() -> int:
    """Intra-op threads for generate_batch's compute (see the module docstring): one fewer
    than torch has, or $RLHF_FAST_OFFLOAD_THREADS (e.g. all of them on a quiet machine, where
    the O_DIRECT reader needs almost no CPU: untested here, the dev machine is always shared)."""
    text = os.environ.get(THREADS_ENV, "").strip()
    if text:
        if not text.isdigit() or int(text) < 1:
            raise ValueError(f"${THREADS_ENV} must be a whole number >= 1, got {text!r}")
        return int(text)
    return max(1, torch.get_num_threads() - 1)


def candidate_threads() -> tuple[int, ...]:
    """The intra-op thread counts the offload policy chooses between: $RLHF_FAST_OFFLOAD_THREADS
    alone when set, else one fewer than torch has (the reader keeps a core) and all of them
    (the O_DIRECT reader needs ~0.01 s of CPU per read; on a quiet 2-core machine both cores
    decoded int4 layers at batch 128 1.5x faster, but a busy machine can turn that around)."""
    if os.environ.get(THREADS_ENV, "").strip():
        return (streaming_threads(),)
    return tuple(sorted({streaming_threads(), torch.get_num_threads()}))


@contextlib.contextmanager
def intra_op_threads(count: int):
    """torch's intra-op threads set to `count` meanwhile, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.no_grad()
def generate_batch(
    lm: OffloadedLM,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int,
    micro_batch: int | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int = 0,
    temperature: float = 0.0,
    top_k: int = 0,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    step_seconds: list[float] | None = None,
    logprobs: list[torch.Tensor] | None = None,
    kv_bits: int | None = None,
    kv_group_size: int = 64,
    compute_threads: int | None = None,
) -> torch.Tensor:
    """[B, T + new] token ids: the (left-padded) prompts followed by the generated tokens.

    `step_seconds`, when given, receives the wall time of each step (prefill first);
    `logprobs` each step's [B] log-probabilities of the chosen tokens under the distribution
    they were drawn from, softmax(logits / temperature) before top-k (temperature 0: 1).
    `kv_bits=4`: the KV cache is held compressed, groups of `kv_group_size` (kv_cache.py).
    `eos_token_id`: one id or several (a row ends at any of them).
    `compute_threads`: torch's intra-op threads meanwhile (default: the offload policy's that
    chose `lm`'s placement, else `streaming_threads()`)."""
    if compute_threads is not None and compute_threads < 1:
        raise ValueError(f"compute_threads must be >= 1, got {compute_threads}")
    policy_threads = lm.policy.threads if getattr(lm, "policy", None) is not None else 0
    threads = compute_threads or policy_threads or streaming_threads()
    with intra_op_threads(threads):
        return _generate(
            lm, input_ids, attention_mask, max_new_tokens=max_new_tokens, micro_batch=micro_batch,
            eos_token_id=eos_token_id, pad_token_id=pad_token_id, temperature=temperature,
            top_k=top_k, seed=seed, generator=generator, step_seconds=step_seconds,
            logprobs=logprobs, kv_bits=kv_bits, kv_group_size=kv_group_size,
        )  # fmt: skip


def _generate(
    lm, input_ids, attention_mask, *, max_new_tokens, micro_batch, eos_token_id, pad_token_id,
    temperature, top_k, seed, generator, step_seconds, logprobs, kv_bits, kv_group_size,
) -> torch.Tensor:  # fmt: skip
    from transformers import DynamicCache

    if input_ids.dim() != 2 or 0 in input_ids.shape:
        raise ValueError(f"input_ids must be [batch>0, length>0], got {tuple(input_ids.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError("attention_mask must have input_ids' shape")
    if temperature < 0 or max_new_tokens < 0:
        raise ValueError("temperature and max_new_tokens must be >= 0")
    size = input_ids.shape[0]
    if micro_batch is not None and micro_batch < 1:
        raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
    micro_batch = min(micro_batch or size, size)
    if seed is not None:
        if generator is not None:
            raise ValueError("give seed or generator, not both")
        generator = torch.Generator().manual_seed(seed)
    config = lm.model.config
    if kv_bits not in (None, 4):
        raise ValueError(f"kv_bits must be None or 4, got {kv_bits!r}")

    def new_cache():
        if kv_bits is None:
            return DynamicCache(config=config)
        return compressed_cache(config, kv_group_size)

    batches = [
        _MicroBatch(
            slice(start, min(start + micro_batch, size)),
            attention_mask[start : start + micro_batch].long(),
            new_cache(),
            attention_mask[start : start + micro_batch].long().sum(-1),
        )
        for start in range(0, size, micro_batch)
    ]
    length = input_ids.shape[1] + max_new_tokens
    forward = _block_forward if _scheduled(lm.model, length) else _fallback_forward
    tokens = [input_ids[batch.rows] for batch in batches]
    generated = []
    finished = torch.zeros(size, dtype=torch.bool)
    for _ in range(max_new_tokens):
        started = time.perf_counter()
        logits = torch.cat(forward(lm, batches, tokens))
        chosen, chosen_logprobs = sample_tokens_and_logprobs(logits, temperature, top_k, generator)
        if logprobs is not None:
            logprobs.append(chosen_logprobs)
        chosen = torch.where(finished, torch.full_like(chosen, pad_token_id), chosen)
        generated.append(chosen)
        if step_seconds is not None:
            step_seconds.append(time.perf_counter() - started)
        if eos_token_id is not None:
            finished |= torch.isin(chosen, torch.tensor(eos_token_id).reshape(-1))
            if bool(finished.all()):
                break
        for batch in batches:
            batch.mask = torch.cat([batch.mask, torch.ones_like(batch.mask[:, :1])], dim=1)
            if batch.prefilled:  # after the prefill, `positions` already is the next one
                batch.positions = batch.positions + 1
            batch.prefilled = True
        tokens = [chosen[batch.rows][:, None] for batch in batches]
    if not generated:
        return input_ids.clone()
    return torch.cat([input_ids, torch.stack(generated, dim=1)], dim=1)
