"""Token-by-token sampling with the model's KV cache, and incremental text decoding.

`generate_tokens` prefills the prompt once, then feeds one token at a time with the KV
cache (`past_key_values`, named `cache` since transformers 5.24), so each step costs one read
of the weights. Decoding is memory-bound: `GenerationStats.gigabytes_per_second` reports how
close it gets to the memory's bandwidth.
It yields token ids as they are chosen so that a caller can stream them; `StreamDecoder`
turns that stream into text without ever printing half of a multi-byte character.

Supported Llama-family models (Llama, Mistral, Qwen2 on the CPU) run through the lean path of
`fast_decoder.FastDecoder` (fused weights, static KV cache, a few torch calls per layer); any
other model, or `decoder="hf"` / RLHF_FAST_DECODER=hf, runs the HF forward with its KV cache.

Sampling order, per step: repetition penalty on the raw logits, then greedy argmax when the
temperature is 0, else divide by the temperature, keep the top-k, keep the top-p nucleus and
draw from the softmax with a seeded `torch.Generator` (models/sampling.py).
"""

from __future__ import annotations

import inspect
import math
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from rlhf_fast.models.sampling import sample_from_probs


@dataclass
class SamplingConfig:
    """How to pick each next token. `temperature=0` is greedy; `top_k=0`/`top_p=1` are off."""

    temperature: float = 0.7
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    max_new_tokens: int = 256

    def __post_init__(self) -> None:
        # NaN passes every range check below (comparisons with it are false): refuse it first
        for name in ("temperature", "top_p", "repetition_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 turns it off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")


@dataclass
class GenerationStats:
    """Timings of one generation; the time spent in the caller between tokens is excluded."""

    model_bytes: int = 0
    prompt_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_steps: int = 0
    decode_seconds: float = 0.0
    new_tokens: int = 0

    @property
    def tokens_per_second(self) -> float:
        return self.decode_steps / self.decode_seconds if self.decode_seconds > 0 else 0.0

    @property
    def gigabytes_per_second(self) -> float:
        """Weights (parameters + buffers) read per decoded token, times tokens per second."""
        return self.model_bytes * self.tokens_per_second / 1e9

    def summary(self) -> str:
        return (
            f"{self.new_tokens} tokens; decode {self.tokens_per_second:.1f} tok/s, "
            f"prefill {self.prompt_tokens} tokens in {self.prefill_seconds * 1e3:.1f} ms, "
            f"{self.gigabytes_per_second:.2f} GB/s"
        )


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer: what one decode step has to read."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def _check_one_row(logits: torch.Tensor) -> None:
    # [B, V] would have its rows indexed by token id and its argmax taken over the flat batch
    if logits.dim() != 1:
        raise ValueError(f"logits must be [V] (one position), got shape {tuple(logits.shape)}")


def apply_repetition_penalty(
    logits: torch.Tensor, context_ids: torch.Tensor, penalty: float
) -> torch.Tensor:
    """CTRL's penalty: the logit of every token already in the context is divided by
    `penalty` when positive and multiplied by it when negative (penalty > 1 discourages
    repeats). `logits` is [V], `context_ids` 1-D; returns a new tensor."""
    _check_one_row(logits)
    if penalty == 1.0 or context_ids.numel() == 0:
        return logits
    seen = torch.unique(context_ids.to(logits.device))
    seen_logits = logits[seen]
    penalized = torch.where(seen_logits > 0, seen_logits / penalty, seen_logits * penalty)
    out = logits.clone()
    out[seen] = penalized
    return out


def filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Set every logit below the k-th largest to -inf (ties with the k-th survive)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth_largest = torch.topk(logits, k).values[..., -1:]
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability sums to at least `p`."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True)
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    # A token is dropped when the tokens ranked above it already reach p; the first always stays.
    mass_before = torch.cumsum(probs, dim=-1) - probs
    drop_sorted = mass_before >= p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_next_token(
    logits: torch.Tensor,
    context_ids: torch.Tensor,
    config: SamplingConfig,
    generator: torch.Generator | None = None,
) -> int:
    """Pick the next token id from the last position's logits ([V])."""
    _check_one_row(logits)
    logits = apply_repetition_penalty(logits.float(), context_ids, config.repetition_penalty)
    if config.temperature == 0:
        return int(torch.argmax(logits))
    logits = filter_top_k(logits / config.temperature, config.top_k)
    logits = filter_top_p(logits, config.top_p)
    return int(sample_from_probs(torch.softmax(logits, dim=-1), generator))


def _forward_keywords(model: torch.nn.Module) -> tuple[str, dict]:
    """The KV-cache argument's name (transformers >= 5.24 calls it `cache`, earlier versions
    `past_key_values`) and `logits_to_keep=1` where supported: a long prompt would otherwise
    materialise [T, vocab] logits only to read the last row. A peft model's forward takes
    **kwargs and hands them to its base model: that model's signature decides (read off the
    wrapper's, a deprecated `past_key_values` warned at every step, and transformers 5.40
    drops it)."""
    get_base_model = getattr(model, "get_base_model", None)
    inner = get_base_model() if get_base_model is not None else model
    parameters = inspect.signature(inner.forward).parameters
    cache_keyword = "cache" if "cache" in parameters else "past_key_values"
    return cache_keyword, {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}


@torch.inference_mode()
def _forward(model: torch.nn.Module, input_ids: torch.Tensor, cache, keywords):
    """Logits of the last position ([V]) and the updated KV cache."""
    cache_keyword, extra = keywords
    out = model(input_ids=input_ids, use_cache=True, **{cache_keyword: cache}, **extra)
    new_cache = getattr(out, "cache", None)
    if new_cache is None:
        new_cache = out.past_key_values
    return out.logits[0, -1], new_cache


DECODER_ENV = "RLHF_FAST_DECODER"  # "hf" forces the HF forward, "fast" insists on the lean path
DECODER_CHOICES = ("auto", "hf", "fast")


def _choose_decoder(model: torch.nn.Module, decoder: str | None) -> str:
    """The path for this model, "fast" or "hf": the argument, else RLHF_FAST_DECODER, else auto."""
    from rlhf_fast.models.fast_decoder import unsupported_reason

    choice = decoder or os.environ.get(DECODER_ENV, "").strip().lower() or "auto"
    if choice not in DECODER_CHOICES:
        source = "decoder" if decoder else DECODER_ENV
        raise ValueError(f"{source} must be one of {DECODER_CHOICES}, got {choice!r}")
    if choice == "hf":
        return "hf"
    reason = unsupported_reason(model)
    if reason is None:
        return "fast"
    if choice == "fast":
        raise ValueError(f"decoder='fast': {reason}")
    return "hf"


# A model may carry a factory of the KV cache its HF forward should start from (a streamed model
# under `--offload ...,kv=int4` sets one that holds the cache 4-bit, offload/kv_cache.py).
CACHE_FACTORY = "rlhf_fast_new_cache"


class _HFSteps:
    """The HF forward with its own KV cache: prefill(prompt) then step(token), logits [V]."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.keywords, self.cache = model, _forward_keywords(model), None

    def prefill(self, prompt: torch.Tensor) -> torch.Tensor:
        factory = getattr(self.model, CACHE_FACTORY, None)
        cache = factory() if factory is not None else None
        logits, self.cache = _forward(self.model, prompt.reshape(1, -1), cache, self.keywords)
        return logits

    def step(self, token_input: torch.Tensor) -> torch.Tensor:
        logits, self.cache = _forward(self.model, token_input, self.cache, self.keywords)
        return logits


class _FastSteps:
    def __init__(self, model: torch.nn.Module, capacity: int) -> None:
        from rlhf_fast.models.fast_decoder import decoder_for

        self.decoder = decoder_for(model, capacity)

    def prefill(self, prompt: torch.Tensor) -> torch.Tensor:
        return self.decoder.prefill(prompt.reshape(-1))

    def step(self, token_input: torch.Tensor) -> torch.Tensor:
        return self.decoder.step(int(token_input.reshape(-1)[0]))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generate_tokens(
    model: torch.nn.Module,
    input_ids: torch.Tensor | list[int],
    config: SamplingConfig,
    *,
    eos_token_ids: Iterable[int] = (),
    seed: int | None = None,
    stats: GenerationStats | None = None,
    decoder: str | None = None,
) -> Iterator[int]:
    """Yield new token ids one at a time until an EOS id (not yielded) or `max_new_tokens`.

    `input_ids` is one prompt (1-D or [1, T]). The prompt is run once (prefill); every later
    step feeds only the last token with the KV cache. `stats`, when given, is filled in as
    the generation runs. `decoder`: "auto" (default; RLHF_FAST_DECODER overrides) takes the
    lean path where the model supports it, "hf" the HF forward, "fast" the lean path or a
    ValueError.
    """
    device = next(model.parameters()).device
    prompt = torch.as_tensor(input_ids, dtype=torch.long, device=device)
    if prompt.dim() > 2 or (prompt.dim() == 2 and prompt.shape[0] != 1):
        # reshape(1, -1) would join a batch's rows into one prompt
        raise ValueError(
            f"input_ids must be one prompt (1-D or [1, T]), got shape {tuple(prompt.shape)}"
        )
    prompt = prompt.reshape(1, -1)
    if prompt.shape[1] == 0:
        raise ValueError("input_ids is empty: generation needs at least one prompt token")
    stop_ids = set(eos_token_ids)
    generator = None
    if seed is not None and config.temperature > 0:
        generator = torch.Generator(device=device).manual_seed(seed)
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens = prompt.shape[1]
    if config.max_new_tokens == 0:
        return
    context = torch.empty(prompt.shape[1] + config.max_new_tokens, dtype=torch.long, device=device)
    context[: prompt.shape[1]] = prompt[0]
    length = prompt.shape[1]

    started = time.perf_counter()
    if _choose_decoder(model, decoder) == "fast":
        steps = _FastSteps(model, prompt.shape[1] + config.max_new_tokens)
    else:
        steps = _HFSteps(model)
    logits = steps.prefill(prompt)
    token = sample_next_token(logits, context[:length], config, generator)
    _sync(device)
    stats.prefill_seconds = time.perf_counter() - started
    while True:
        if token in stop_ids:
            return
        stats.new_tokens += 1
        yield token
        if stats.new_tokens >= config.max_new_tokens:
            return
        context[length] = token
        length += 1
        started = time.perf_counter()
        step_input = context[length - 1 : length].reshape(1, 1)
        logits = steps.step(step_input)
        token = sample_next_token(logits, context[:length], config, generator)
        _sync(device)
        stats.decode_seconds += time.perf_counter() - started
        stats.decode_steps += 1


class StreamDecoder:
    """Turn a stream of token ids into text pieces that are safe to print.

    Decoding one token alone breaks characters split across tokens (byte-level BPE) and
    spaces that depend on the neighbours (SentencePiece), so the whole running sequence is
    decoded and only the new suffix is released, once it no longer ends in an incomplete
    character (U+FFFD). `flush()` releases whatever is left at the end.
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.token_ids: list[int] = []
        self.text = ""

    def _decode(self) -> str:
        return self.tokenizer.decode(
            self.token_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )

    def _release(self, full_text: str) -> str:
        if not full_text.startswith(self.text):
            # Earlier text changed (rare normalisation): printed text cannot be taken back, so
            # continue from the same length.
            self.text = full_text[: len(self.text)]
        piece = full_text[len(self.text) :]
        self.text = full_text
        return piece

    def push(self, token_id: int) -> str:
        """Add one token; return the text that became stable (possibly "")."""
        self.token_ids.append(token_id)
        full_text = self._decode()
        if full_text.endswith("\ufffd"):
            return ""
        return self._release(full_text)

    def flush(self) -> str:
        """Return the rest of the text, incomplete characters included."""
        return self._release(self._decode())
