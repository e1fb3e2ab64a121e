"""Causal language models: generation with a KV cache, sampling and streaming decoding."""

from rlhf_fast.models.generate import (
    GenerationStats,
    SamplingConfig,
    StreamDecoder,
    apply_repetition_penalty,
    filter_top_k,
    filter_top_p,
    generate_tokens,
    model_bytes,
    sample_next_token,
)

__all__ = [
    "GenerationStats",
    "SamplingConfig",
    "StreamDecoder",
    "apply_repetition_penalty",
    "filter_top_k",
    "filter_top_p",
    "generate_tokens",
    "model_bytes",
    "sample_next_token",
]
