"""ops.sample_logits (a decode step's draw of one token per row, and its log-prob) on CPU,
beside its reference (softmax, models/sampling.py's two-level inverse CDF, log_softmax and a
gather: what rollouts ran before) and the peer: torch.multinomial on the softmax and a
log_softmax gather, what HF `generate(do_sample=True)` and trl's rollouts do.

Sizes: the PPO bench's decode step (8 rows, vocabulary 2000), 8 and 64 rows of a 32k
vocabulary (Llama), and 64 rows of Qwen2's 152k; fp32 logits, temperature 0.7; quick mode keeps
the first. Bytes moved (GB/s): the logits, read once (the kernel reads them twice and its
scratch once, all from cache at these sizes but the last).
"""

from __future__ import annotations

import pytest
import torch

from rlhf_fast.ops import backends, sample_logits

SIZES = [(8, 2000), (8, 32000), (64, 32000), (64, 151936)]
SIZE_PARAMS = [
    pytest.param(size, id="x".join(map(str, size)), marks=pytest.mark.bench_full if i else ())
    for i, size in enumerate(SIZES)
]
TEMPERATURE = 0.7


def _peer(logits: torch.Tensor, generator: torch.Generator):
    scaled = logits.float() / TEMPERATURE
    tokens = torch.multinomial(torch.softmax(scaled, -1), 1, generator=generator)
    return tokens[:, 0], torch.log_softmax(scaled, -1).gather(-1, tokens)[:, 0]


@pytest.mark.parametrize("provider", ["cpp", "reference", "peer"])
@pytest.mark.parametrize("size", SIZE_PARAMS)
def test_sample_logits(measure, size, provider):
    if provider == "cpp" and not backends("cpu")["sample_logits"]["cpp"].available:
        pytest.skip(f"sample_logits 'cpp': {backends('cpu')['sample_logits']['cpp'].reason}")
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(size, generator=generator) * 3
    rows = size[0]

    if provider == "peer":

        def call():
            return _peer(logits, generator)
    else:

        def call():
            uniforms = torch.rand(rows, dtype=torch.float64, generator=generator)
            return sample_logits(logits, uniforms, TEMPERATURE, backend=provider)

    measure(call, op="sample_logits fp32", device="cpu", size="x".join(map(str, size)),
            provider=provider, bytes_moved=logits.numel() * 4)  # fmt: skip
