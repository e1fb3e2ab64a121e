"""PPO's token log-probs: log softmax(logits / temperature)[token], and optionally the entropy
of softmax(logits / temperature), for logits [B, T, V] (or [N, V]) and sampled tokens [B, T]
(or [N]).

The PyTorch composition (the reference: a gather and logsumexp, then log_softmax / exp / mul /
sum for the entropy) is about six passes over [B, T, V] forward, with fp32 copies of 16-bit
logits, and four backward. The C++ backend reads each row of logits once forward (keeping two
floats per row for the backward, nothing of size V) and writes the gradient in one pass
(csrc/cpu/token_logprobs_op.cpp). The entropy carries no gradient: PPO only reports it.
"""

from __future__ import annotations

import torch

from rlhf_fast.ops import _checks, _dispatch

_dispatch.IMPLEMENTED["token_logprobs"] = ("reference", "cpp")

# float64 logits (gradcheck) run on the reference only; the C++ kernels read these.
_KERNEL_DTYPES = _checks.FLOAT_DTYPES


def _entropy(z: torch.Tensor) -> torch.Tensor:
    """-sum_v p_v log p_v of softmax(z) over the last dimension; 0 log 0 counts as 0 (a
    logit of -inf), where p * log p would be 0 * -inf = NaN. A NaN logit stays NaN."""
    log_p = torch.log_softmax(z, -1)
    p = log_p.exp()
    return -torch.where(p == 0, 0.0, p * log_p).sum(-1)


def token_logprobs_reference(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float = 1.0,
    *,
    with_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The definition of `token_logprobs`: with z = logits / temperature (in fp32 for 16-bit
    logits), z[token] - logsumexp(z) per row; with_entropy also returns the entropy of
    softmax(z) per row, without gradient."""
    z = logits.float() if logits.dtype in (torch.bfloat16, torch.float16) else logits
    if temperature != 1.0:
        z = z / temperature
    picked = torch.gather(z, -1, tokens.long().unsqueeze(-1)).squeeze(-1)
    logprobs = picked - torch.logsumexp(z, dim=-1)
    if not with_entropy:
        return logprobs
    with torch.no_grad():
        return logprobs, _entropy(z)


class _FusedTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, tokens, temperature):
        logprobs, entropy, stats = torch.ops.rlhf_fast.token_logprobs(logits, tokens, temperature)
        ctx.save_for_backward(logits, tokens, stats)
        ctx.temperature = temperature
        ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        _checks.first_order_backward("token_logprobs")
        logits, tokens, stats = ctx.saved_tensors
        grad = grad_logprobs.float().contiguous()
        grad_logits = torch.ops.rlhf_fast.token_logprobs_backward(
            grad, logits, tokens, stats, ctx.temperature
        )
        return grad_logits, None, None


def _check(logits: object, tokens: object, temperature: object) -> float:
    logits, tokens = _checks.tensor(logits, "logits"), _checks.tensor(tokens, "tokens")
    if logits.dtype not in _KERNEL_DTYPES + (torch.float64,):
        raise TypeError(f"logits must be float32, bfloat16, float16 or float64, got {logits.dtype}")
    if logits.dim() not in (2, 3) or logits.shape[-1] == 0:
        raise ValueError(
            f"logits must be [B, T, V] or [N, V] with V > 0, got shape {tuple(logits.shape)}"
        )
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise TypeError(f"tokens must be an integer tensor, got {tokens.dtype}")
    if tokens.shape != logits.shape[:-1]:
        raise ValueError(
            f"tokens must have shape {tuple(logits.shape[:-1])} (logits' without V), got "
            f"{tuple(tokens.shape)}"
        )
    _checks.same_device(tokens, "tokens", logits, "logits")
    temperature = _checks.temperature(temperature)
    # on the CPU only: the check would wait for a GPU (whose gather asserts on its own)
    if tokens.device.type == "cpu" and tokens.numel() > 0:
        low, high = torch.aminmax(tokens)
        if int(low) < 0 or int(high) >= logits.shape[-1]:
            bad = int(low) if int(low) < 0 else int(high)
            raise ValueError(f"tokens must be in [0, {logits.shape[-1]}) (V), got {bad}")
    return float(temperature)


def token_logprobs(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float = 1.0,
    *,
    with_entropy: bool = False,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log softmax(logits / temperature)[token] per row (see token_logprobs_reference):
    logits [B, T, V] or [N, V] (float32 / bfloat16 / float16; float64 on the reference),
    tokens of the leading shape, integers in [0, V). Returns fp32 log-probs of tokens' shape
    (float64 for float64 logits), differentiable in logits; with_entropy: (log-probs, entropy),
    the entropy without gradient."""
    temperature = _check(logits, tokens, temperature)
    if logits.dtype not in _KERNEL_DTYPES and backend is None:
        backend = "reference"
    backend = _dispatch.choose("token_logprobs", logits.device, backend)
    if backend == "reference":
        return token_logprobs_reference(logits, tokens, temperature, with_entropy=with_entropy)
    if logits.dtype not in _KERNEL_DTYPES:
        raise TypeError(f"logits: the {backend} backend takes float32, bfloat16 or float16, "
                        f"got {logits.dtype}")  # fmt: skip
    rows = logits if logits.dim() == 3 else logits.unsqueeze(0)
    if rows.shape[-1] > 1 and rows.stride(-1) != 1:
        rows = rows.contiguous()  # the kernel walks V with unit stride; B and T may stride
    ids = tokens.reshape(rows.shape[:2]).to(torch.int64).contiguous()
    logprobs, entropy = _FusedTokenLogprobs.apply(rows, ids, temperature)
    if logits.dim() == 2:  # (a view, and its autograd node, only where the shape changes)
        logprobs, entropy = logprobs.reshape(tokens.shape), entropy.reshape(tokens.shape)
    return (logprobs, entropy) if with_entropy else logprobs
