"""End to end: greedy decode tokens/s of Llama-shaped models with random weights, in fp32,
bf16, int8 and int4, through the same generation loop `rlhf-fast chat` uses.

Shapes: the 135M-parameter chat model llama.cpp was measured on (hidden 576, 30 layers,
9 heads / 3 KV heads, MLP 1536, vocab 49152, tied embeddings) and a ~1.1B Llama (hidden 2048,
16 layers, 32 / 8 heads, MLP 8192, vocab 32000). Quick mode runs a tiny shape only. The
weight-streaming table reports the model bytes read per call (weights x new tokens) as GB/s.
"""

from __future__ import annotations

import functools

import pytest
import torch

from rlhf_fast.models.generate import SamplingConfig, generate_tokens, model_bytes
from rlhf_fast.quant import quantize_model

PROMPT_TOKENS, NEW_TOKENS = 16, 32
SHAPES = {
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=352, vocab_size=2048),
    "smollm-135m": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                        num_key_value_heads=3, intermediate_size=1536, vocab_size=49152),
    "llama-1.1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                       num_key_value_heads=8, intermediate_size=8192, vocab_size=32000),
}  # fmt: skip
SHAPE_PARAMS = [
    pytest.param(name, id=name, marks=pytest.mark.bench_full if name != "tiny" else ())
    for name in SHAPES
]
FORMATS = ["fp32", "bf16", "int8", "int4-g32"]


@functools.lru_cache(maxsize=1)  # one model alive at a time: the 1.1B one is 4.4 GB in fp32
def _model(shape: str, fmt: str) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**SHAPES[shape], tie_word_embeddings=True, max_position_embeddings=256)
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).eval()
    if fmt == "bf16":
        model = model.to(torch.bfloat16)
    elif fmt.startswith("int"):
        quantize_model(model, bits=8 if fmt == "int8" else 4, group_size=32)
    return model


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", SHAPE_PARAMS)
def test_decode(measure, shape, fmt):
    model = _model(shape, fmt)
    prompt = torch.randint(0, SHAPES[shape]["vocab_size"], (PROMPT_TOKENS,)).tolist()
    # max_new_tokens with no EOS id: every call decodes exactly NEW_TOKENS tokens.
    config = SamplingConfig(temperature=0.0, max_new_tokens=NEW_TOKENS)

    def decode():
        with torch.inference_mode():
            return sum(1 for _ in generate_tokens(model, prompt, config))

    measure(
        decode,
        op="decode",
        device="cpu",
        size=f"{shape} {NEW_TOKENS} tokens",
        provider=fmt,
        weight_bytes=model_bytes(model) * NEW_TOKENS,
    )
