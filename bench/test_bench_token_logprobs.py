"""ops.token_logprobs (PPO's log p(token), and the entropy metric) on CPU beside its reference,
the PyTorch composition PPO ran before (a gather and logsumexp; log_softmax / exp / mul / sum
for the entropy), which is also what trl and OpenRLHF run.

Two timings per size: forward + backward of the log-probs (PPO's policy term), and the forward
with the entropy, without gradient (what the metric costs). Sizes: the PPO bench's h256-L4
([8, 48, 2000] fp32), a 32k vocabulary at 4 x 256 answer tokens, fp32 and bf16 (a bf16 base's
logits); quick mode keeps only a tiny shape. Bytes moved (GB/s): the logits read once forward;
backward reads them again and writes their gradient.
"""

from __future__ import annotations

import pytest
import torch

from rlhf_fast.ops import backends, token_logprobs

SIZES = [
    ((2, 8, 500), torch.float32),
    ((8, 48, 2000), torch.float32),
    ((4, 256, 32000), torch.float32),
    ((4, 256, 32000), torch.bfloat16),
]
SIZE_PARAMS = [
    pytest.param(size, dtype, id=f"{'x'.join(map(str, size))}-{str(dtype)[6:]}",
                 marks=pytest.mark.bench_full if i else ())
    for i, (size, dtype) in enumerate(SIZES)
]  # fmt: skip
TEMPERATURE = 0.7  # not 1: the reference then pays for its division, as PPO with sampling does


def make_inputs(size, dtype, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    logits = (torch.randn(size, generator=generator) * 3).to(dtype).requires_grad_(True)
    tokens = torch.randint(0, size[-1], size[:-1], generator=generator)
    grad = torch.randn(size[:-1], generator=generator)
    return logits, tokens, grad


def _skip_unavailable(provider: str) -> None:
    if provider == "cpp" and not backends("cpu")["token_logprobs"]["cpp"].available:
        pytest.skip(f"token_logprobs 'cpp': {backends('cpu')['token_logprobs']['cpp'].reason}")


@pytest.mark.parametrize("provider", ["cpp", "reference"])
@pytest.mark.parametrize(("size", "dtype"), SIZE_PARAMS)
def test_token_logprobs_forward_backward(measure, size, dtype, provider):
    _skip_unavailable(provider)
    logits, tokens, grad = make_inputs(size, dtype)

    def call():
        logprobs = token_logprobs(logits, tokens, TEMPERATURE, backend=provider)
        return torch.autograd.grad(logprobs, logits, grad)

    measure(call, op=f"token_logprobs fwd+bwd {str(dtype)[6:]}", device="cpu",
            size="x".join(map(str, size)), provider=provider,
            bytes_moved=3 * logits.numel() * dtype.itemsize)  # fmt: skip


@pytest.mark.parametrize("provider", ["cpp", "reference"])
@pytest.mark.parametrize(("size", "dtype"), SIZE_PARAMS)
def test_token_logprobs_with_entropy(measure, size, dtype, provider):
    _skip_unavailable(provider)
    logits, tokens, _ = make_inputs(size, dtype)
    logits = logits.detach()

    def call():
        return token_logprobs(logits, tokens, TEMPERATURE, with_entropy=True, backend=provider)

    measure(call, op=f"token_logprobs fwd+entropy {str(dtype)[6:]}", device="cpu",
            size="x".join(map(str, size)), provider=provider,
            bytes_moved=logits.numel() * dtype.itemsize)  # fmt: skip


def test_the_providers_agree():
    """Both providers compute the op (the timings compare like with like)."""
    logits, tokens, grad = make_inputs((3, 5, 777), torch.float32, seed=1)
    results = []
    for provider in ("reference", "cpp"):
        if provider == "cpp" and not backends("cpu")["token_logprobs"]["cpp"].available:
            pytest.skip("C++ backend unavailable")
        logprobs, entropy = token_logprobs(
            logits, tokens, TEMPERATURE, with_entropy=True, backend=provider
        )
        results.append((logprobs, entropy, *torch.autograd.grad(logprobs, logits, grad)))
    for ours, reference in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
