"""End to end: decode and prefill tokens/s of Llama-shaped models with random weights, through
the generation loop `rlhf-fast chat` uses: our lean path (rlhf_fast/models/fast_decoder.py) in
fp32, bf16, int8 and int4 beside transformers' own forward loop (the peer) in fp32 and bf16.

Shapes: the 135M-parameter chat model llama.cpp was measured on (hidden 576, 30 layers,
9 heads / 3 KV heads, MLP 1536, vocab 49152, tied embeddings) and a ~1.1B Llama (hidden 2048,
16 layers, 32 / 8 heads, MLP 8192, vocab 32000). Quick mode runs a tiny shape only.

Decode: each call prefills a 16-token prompt and decodes 32 tokens greedily; the tables below
pytest-benchmark's give the decode-only rate (prefill excluded, from GenerationStats) and its
ratios. Prefill: a 128-token prompt and one sampled token per call. llama.cpp's figures on the
135M model (Q4_1, 2 threads, measured on this machine by the issue's author) are quoted, not
run here: 190 tokens/s decode, 470 tokens/s prefill.
"""

from __future__ import annotations

import functools
import statistics

import pytest
import torch

from rlhf_fast.models.generate import GenerationStats, SamplingConfig, generate_tokens
from rlhf_fast.quant import quantize_model

PROMPT_TOKENS, NEW_TOKENS, PREFILL_TOKENS = 16, 32, 128
LLAMA_CPP_135M = {"decode": 190.0, "prefill": 470.0}  # Q4_1, 2 threads (issue 3)
SHAPES = {
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=352, vocab_size=2048),
    "smollm-135m": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                        num_key_value_heads=3, intermediate_size=1536, vocab_size=49152),
    "llama-1.1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                       num_key_value_heads=8, intermediate_size=8192, vocab_size=32000),
}  # fmt: skip
# (path, format): the HF forward loop in fp32 and bf16 (the peer), the lean path in every format.
PROVIDERS = [("hf", "fp32"), ("hf", "bf16"), ("fast", "fp32"), ("fast", "bf16"),
             ("fast", "int8"), ("fast", "int4-g32")]  # fmt: skip
# Ordered so that each model is built once (one model alive at a time).
CASES = [
    pytest.param(shape, fmt, path, id=f"{shape}-{path}-{fmt}",
                 marks=pytest.mark.bench_full if shape != "tiny" else ())
    for shape in SHAPES
    for fmt in ("fp32", "bf16", "int8", "int4-g32")
    for path, provider_fmt in PROVIDERS
    if provider_fmt == fmt
]  # fmt: skip
RESULTS: dict[tuple[str, str, str], float] = {}  # (shape, "decode" | "prefill", provider) -> tok/s


@functools.lru_cache(maxsize=1)  # one model alive at a time: the 1.1B one is 4.4 GB in fp32
def _model(shape: str, fmt: str) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**SHAPES[shape], tie_word_embeddings=True, max_position_embeddings=512)
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).eval()
    if fmt == "bf16":
        model = model.to(torch.bfloat16)
    elif fmt.startswith("int"):
        quantize_model(model, bits=8 if fmt == "int8" else 4, group_size=32)
    return model


def _run(model, prompt, new_tokens: int, path: str, rates: list[float], kind: str) -> int:
    config = SamplingConfig(temperature=0.0, max_new_tokens=new_tokens)
    stats = GenerationStats()
    with torch.inference_mode():
        count = sum(1 for _ in generate_tokens(model, prompt, config, stats=stats, decoder=path))
    if kind == "decode":
        rates.append(stats.tokens_per_second)
    else:
        rates.append(stats.prompt_tokens / stats.prefill_seconds)
    return count


@pytest.mark.parametrize("shape, fmt, path", CASES)
def test_decode(measure, shape, fmt, path):
    model = _model(shape, fmt)
    prompt = torch.randint(0, SHAPES[shape]["vocab_size"], (PROMPT_TOKENS,)).tolist()
    rates: list[float] = []
    # No EOS id: every call decodes exactly NEW_TOKENS tokens.
    measure(
        lambda: _run(model, prompt, NEW_TOKENS, path, rates, "decode"),
        op="decode",
        device="cpu",
        size=f"{shape} {PROMPT_TOKENS}+{NEW_TOKENS} tokens",
        provider=f"{path}-{fmt}",
        tokens=NEW_TOKENS,
    )
    RESULTS[(shape, "decode", f"{path}-{fmt}")] = statistics.median(rates)


@pytest.mark.parametrize("shape, fmt, path", CASES)
def test_prefill(measure, shape, fmt, path):
    model = _model(shape, fmt)
    prompt = torch.randint(0, SHAPES[shape]["vocab_size"], (PREFILL_TOKENS,)).tolist()
    rates: list[float] = []
    measure(
        lambda: _run(model, prompt, 1, path, rates, "prefill"),
        op="prefill",
        device="cpu",
        size=f"{shape} {PREFILL_TOKENS} tokens",
        provider=f"{path}-{fmt}",
        tokens=PREFILL_TOKENS,
    )
    RESULTS[(shape, "prefill", f"{path}-{fmt}")] = statistics.median(rates)


def _ratio(shape: str, kind: str, numerator: str, denominator: str) -> str:
    top, bottom = RESULTS.get((shape, kind, numerator)), RESULTS.get((shape, kind, denominator))
    return f"{top / bottom:.2f}x" if top and bottom else "-"


@pytest.fixture(scope="module", autouse=True)
def _summary():
    """After the module: tokens/s per provider and the ratios the issue's targets are about."""
    yield
    if not RESULTS:
        return
    lines = ["", "Decode (prefill excluded) and prefill tokens/s, median of the timed calls:"]
    for shape in SHAPES:
        for kind in ("decode", "prefill"):
            rates = {p: r for (s, k, p), r in RESULTS.items() if s == shape and k == kind}
            if not rates:
                continue
            cells = "  ".join(f"{provider} {rate:.1f}" for provider, rate in rates.items())
            lines.append(f"  {shape} {kind}: {cells}")
            ratios = [
                f"int4/fp32 {_ratio(shape, kind, 'fast-int4-g32', 'fast-fp32')}",
                f"int8/fp32 {_ratio(shape, kind, 'fast-int8', 'fast-fp32')}",
                f"int4/hf-fp32 {_ratio(shape, kind, 'fast-int4-g32', 'hf-fp32')}",
                f"int4/hf-bf16 {_ratio(shape, kind, 'fast-int4-g32', 'hf-bf16')}",
                f"fast-bf16/hf-bf16 {_ratio(shape, kind, 'fast-bf16', 'hf-bf16')}",
            ]
            int4 = rates.get("fast-int4-g32")
            if shape == "smollm-135m" and int4:
                ratios.append(f"int4/llama.cpp {int4 / LLAMA_CPP_135M[kind]:.2f}x")
            lines.append("    " + "  ".join(ratios))
    print("\n".join(lines))
