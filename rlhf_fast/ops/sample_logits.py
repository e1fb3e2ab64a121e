"""A decode step's draw: one token per row of logits [B, V] from softmax(logits / temperature),
optionally restricted to the top_k largest logits, by inverse CDF with uniforms [B] the caller
drew (so a seeded generator gives the same tokens on every backend), and each token's log-prob
under the unrestricted softmax (what PPO stores as the sampling log-prob; trl and OpenRLHF
also take it before top-k).

The reference composes softmax, models/sampling.py's two-level inverse CDF, log_softmax and a
gather: ~25 small ops, ~0.3 ms a step at 8 rows of a 2000-token vocabulary on 2 cores, more
than that step's attention. The C++ backend reads each row twice and keeps one row of exps
(csrc/cpu/sample_logits_kernel.h). The backends may pick different tokens only where a uniform
falls within rounding (~1e-7 of the row's mass) of the boundary between two tokens.
"""

from __future__ import annotations

import torch

from rlhf_fast.models.sampling import pick_from_weights
from rlhf_fast.ops import _checks, _dispatch

_dispatch.IMPLEMENTED["sample_logits"] = ("reference", "cpp")

_NO_DISTRIBUTION = "has no distribution to sample: a NaN or +inf logit, or every logit -inf"


def sample_logits_reference(
    logits: torch.Tensor, uniforms: torch.Tensor, temperature: float, top_k: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The definition of `sample_logits`: z = logits / temperature (fp32 for 16-bit logits);
    the weights softmax(z), zero where the logit is below the top_k-th largest of its row
    (top_k 0 or >= V: none); token = the first index whose running sum of weights exceeds
    uniform * their total (models.sampling.pick_from_weights); logprob = log_softmax(z)[token].
    Returns (tokens int64 [B], logprobs [B], fp32 or fp64 for fp64 logits)."""
    if uniforms.numel() and not bool(((uniforms >= 0) & (uniforms < 1)).all()):
        raise ValueError("uniforms must be in [0, 1)")  # the C++ op checks this itself
    z = logits.float() if logits.dtype in (torch.bfloat16, torch.float16) else logits
    z = z / temperature
    bad = ~torch.isfinite(z.amax(-1)) | torch.isnan(z).any(-1)
    if bool(bad.any()):
        raise ValueError(f"logits row {int(bad.nonzero()[0])} {_NO_DISTRIBUTION}")
    weights = torch.softmax(z, -1)
    if 0 < top_k < z.shape[-1]:
        raw = logits.to(z.dtype)
        kth = torch.topk(raw, top_k, dim=-1).values[:, -1:]
        weights = weights.masked_fill(raw < kth, 0.0)
    tokens = pick_from_weights(weights, uniforms.to(z.device))
    logprobs = torch.log_softmax(z, -1).gather(-1, tokens[:, None]).squeeze(-1)
    return tokens, logprobs


def _check(logits: object, uniforms: object, temperature: object, top_k: object) -> float:
    logits, uniforms = _checks.tensor(logits, "logits"), _checks.tensor(uniforms, "uniforms")
    if logits.dtype not in _checks.FLOAT_DTYPES + (torch.float64,):
        raise TypeError(f"logits must be float32, bfloat16, float16 or float64, got {logits.dtype}")
    if logits.dim() != 2 or logits.shape[-1] == 0:
        raise ValueError(f"logits must be [B, V] with V > 0, got shape {tuple(logits.shape)}")
    if uniforms.dtype != torch.float64:
        raise TypeError(f"uniforms must be float64, got {uniforms.dtype}")
    if uniforms.shape != logits.shape[:1]:
        raise ValueError(
            f"uniforms must have shape ({logits.shape[0]},) (one per row), got "
            f"{tuple(uniforms.shape)}"
        )
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0: every token), got {top_k!r}")
    return _checks.temperature(temperature)


def sample_logits(
    logits: torch.Tensor,
    uniforms: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [B] int64, logprobs [B] fp32) drawn from logits [B, V] (float32 / bfloat16 /
    float16; float64 on the reference) with uniforms [B] (float64 in [0, 1), e.g. torch.rand
    with the run's generator): see sample_logits_reference. A row without a distribution (a
    NaN or +inf logit, or only -inf) is a ValueError."""
    temperature = _check(logits, uniforms, temperature, top_k)
    if logits.dtype not in _checks.FLOAT_DTYPES and backend is None:
        backend = "reference"
    backend = _dispatch.choose("sample_logits", logits.device, backend)
    if backend == "reference":
        return sample_logits_reference(logits, uniforms, temperature, top_k)
    if logits.dtype not in _checks.FLOAT_DTYPES:
        raise TypeError(f"logits: the {backend} backend takes float32, bfloat16 or float16, "
                        f"got {logits.dtype}")  # fmt: skip
    if logits.shape[-1] > 1 and logits.stride(-1) != 1:
        logits = logits.contiguous()
    try:
        return torch.ops.rlhf_fast.sample_logits(
            logits, uniforms.cpu().contiguous(), temperature, top_k
        )
    except ValueError as error:  # the kernel's message names the row
        raise ValueError(str(error).splitlines()[0]) from None
