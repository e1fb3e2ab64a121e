"""The arithmetic of PPO for language models, as small pure-PyTorch functions.

Shapes: B rows (one prompt + its sampled response each), T response positions. Every mask is
[B, T], bool or integer 0/1, true on the response tokens that count (the sampled tokens up to
and including the first EOS); statistics are taken over true entries only, and functions that
return a [B, T] tensor leave 0 at false entries. Padding may hold anything, NaN included: it is
never read into a result.

Pieces, in the order one PPO step uses them:
  token_logprobs                         log p(sampled token) from logits
  kl_k1 / kl_k3 / per_token_kl           KL of the policy vs the reference per token (Schulman)
  shaped_rewards                         -kl_coef * KL per token + clipped RM score at the end
  FixedKLController / AdaptiveKLController   the KL coefficient (Ziegler et al. 2019)
  advantages_and_returns                 rlhf_fast.ops.gae, then masked whitening
  masked_mean / masked_var / masked_whiten
  policy_loss / value_loss / entropy_from_logits / ppo_ptx_loss
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rlhf_fast import ops


def _as_mask(mask: torch.Tensor, like: torch.Tensor, like_name: str) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype.is_floating_point or mask.dtype.is_complex:
        raise TypeError(f"mask must be bool (or an integer 0/1 tensor), got {mask.dtype}")
    _same_shape(mask, "mask", like, like_name)
    return mask if mask.dtype == torch.bool else mask != 0


def _same_shape(t: torch.Tensor, name: str, like: torch.Tensor, like_name: str) -> None:
    if t.shape != like.shape:
        raise ValueError(
            f"{name} must have the shape of {like_name} {tuple(like.shape)}, got {tuple(t.shape)}"
        )


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """Softmax statistics of bf16/fp16 logits lose digits: compute them in fp32."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _non_negative(value: float, name: str) -> float:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


# ---------------------------------------------------------------- masked statistics


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `values` over true entries of `mask` (all of them, or along `dim`).

    No true entry gives 0 (not NaN), so an empty row or batch cannot poison a loss."""
    valid = _as_mask(mask, values, "values")
    kept = torch.where(valid, values, torch.zeros((), dtype=values.dtype, device=values.device))
    if dim is None:
        return kept.sum() / valid.sum().clamp(min=1)
    return kept.sum(dim) / valid.sum(dim).clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of `values` over the true entries of `mask` (a scalar).

    unbiased divides by n - 1 (Bessel), else by n. Fewer entries than that needs (n < 2
    unbiased, n < 1 biased) gives 0."""
    valid = _as_mask(mask, values, "values")
    count = valid.sum()
    centered = torch.where(valid, values - masked_mean(values, valid), 0.0)
    denominator = count - 1 if unbiased else count
    if int(denominator) <= 0:
        return values.new_zeros(())
    return centered.square().sum() / denominator


def masked_whiten(
    values: torch.Tensor,
    mask: torch.Tensor,
    shift_mean: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    """(values - mean) / sqrt(var + eps) with mean and unbiased var over the true entries.

    shift_mean=False adds the mean back (scale only), as trl does for rewards. False entries
    are 0 in the result."""
    valid = _as_mask(mask, values, "values")
    values = torch.where(valid, values, 0.0)  # NaN padding would otherwise reach the gradient
    mean = masked_mean(values, valid)
    whitened = (values - mean) * torch.rsqrt(masked_var(values, valid) + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(valid, whitened, 0.0)


# ---------------------------------------------------------------- log-probs and KL


def token_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """log softmax(logits / temperature)[token] for each position: logits [B, T, V],
    tokens [B, T] -> [B, T] (fp32 at least). Pass the temperature that sampled the tokens, so
    the log-probs are those of the distribution that actually drew them. Runs the fused op
    (rlhf_fast.ops.token_logprobs: one read of the logits, no [B, T, V] temporaries)."""
    if logits.dim() != 3 or tokens.shape != logits.shape[:2]:
        raise ValueError(
            f"logits must be [B, T, V] and tokens [B, T], got {tuple(logits.shape)} "
            f"and {tuple(tokens.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return ops.token_logprobs(logits, tokens, temperature)


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Schulman's k1 estimate of KL(policy || reference) per sampled token: log p - log q.

    Unbiased but single samples are often negative."""
    _same_shape(ref_logprobs, "ref_logprobs", logprobs, "logprobs")
    return logprobs - ref_logprobs


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimate: (r - 1) - log r with r = q / p = exp(log q - log p).

    Unbiased for tokens sampled from the policy, and never negative (log r <= r - 1)."""
    _same_shape(ref_logprobs, "ref_logprobs", logprobs, "logprobs")
    log_ratio = ref_logprobs - logprobs
    return torch.expm1(log_ratio) - log_ratio


KL_ESTIMATORS = {"k1": kl_k1, "k3": kl_k3}


def per_token_kl(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, estimator: str = "k1"
) -> torch.Tensor:
    """KL estimate per response token ([B, T]); 0 at masked-out positions."""
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"estimator must be one of {sorted(KL_ESTIMATORS)}, got {estimator!r}")
    valid = _as_mask(mask, logprobs, "logprobs")
    return torch.where(valid, KL_ESTIMATORS[estimator](logprobs, ref_logprobs), 0.0)


# ---------------------------------------------------------------- reward shaping


def last_valid_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last true entry ([B] long); -1 for a row with none."""
    valid = mask.bool() if mask.dtype != torch.bool else mask
    positions = torch.arange(valid.shape[-1], device=valid.device).expand_as(valid)
    return torch.where(valid, positions, -1).amax(dim=-1)


@dataclass
class ShapedRewards:
    rewards: torch.Tensor  # [B, T]: what GAE consumes
    non_score_rewards: torch.Tensor  # [B, T]: the KL part alone (-kl_coef * kl)
    scores: torch.Tensor  # [B]: the score actually added (clipped, with the EOS penalty)


def shaped_rewards(
    scores: torch.Tensor,
    kl: torch.Tensor,
    mask: torch.Tensor,
    *,
    kl_coef: float,
    score_clip: float | None = None,
    ended: torch.Tensor | None = None,
    missing_eos_penalty: float = 0.0,
) -> ShapedRewards:
    """Per-token rewards of InstructGPT's PPO: r_t = -kl_coef * kl_t on every response token,
    plus the row's score on its last valid token.

    scores: [B] reward-model scores; kl: [B, T] per-token KL (see per_token_kl); mask [B, T].
    score_clip c: the score is clipped to [-c, c] first (None: no clipping). ended: [B] bool,
    whether the row emitted EOS; rows that did not get `missing_eos_penalty` (>= 0) subtracted
    after clipping, so that even a score already at -c is still penalised. A row with no valid
    token receives nothing (its score has no token to land on)."""
    kl_coef = _non_negative(kl_coef, "kl_coef")
    missing_eos_penalty = _non_negative(missing_eos_penalty, "missing_eos_penalty")
    valid = _as_mask(mask, kl, "kl")
    if scores.shape != kl.shape[:1]:
        raise ValueError(f"scores must be [B] = [{kl.shape[0]}], got {tuple(scores.shape)}")
    final_scores = scores.float()
    if score_clip is not None:
        score_clip = _non_negative(score_clip, "score_clip")
        final_scores = final_scores.clamp(-score_clip, score_clip)
    if ended is not None:
        if ended.shape != scores.shape:
            raise ValueError(f"ended must be [B] like scores, got {tuple(ended.shape)}")
        final_scores = torch.where(ended.bool(), final_scores, final_scores - missing_eos_penalty)
    non_score = torch.where(valid, -kl_coef * kl.float(), 0.0)
    last = last_valid_index(valid)
    has_token = last >= 0
    rewards = non_score.clone()
    rows = torch.nonzero(has_token).squeeze(-1)
    rewards[rows, last[rows]] += final_scores[rows]
    return ShapedRewards(rewards, non_score, final_scores)


# ---------------------------------------------------------------- KL controllers


class FixedKLController:
    """A constant KL coefficient."""

    kind = "fixed"

    def __init__(self, coef: float) -> None:
        self.coef = _non_negative(coef, "coef")

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.coef

    def state_dict(self) -> dict:
        return {"kind": self.kind, "coef": self.coef}

    def load_state_dict(self, state: dict) -> None:
        _check_kind(state, self.kind)
        self.coef = _non_negative(state["coef"], "coef")


class AdaptiveKLController:
    """Ziegler et al. (2019)'s proportional controller steering the KL toward `target`:

        error = clip(current_kl / target - 1, -0.2, 0.2)
        coef <- coef * (1 + error * n_steps / horizon)

    n_steps is the number of samples (rows) the KL was measured on, horizon how many samples
    it takes to close the gap."""

    kind = "adaptive"

    def __init__(self, init_coef: float, target: float, horizon: float) -> None:
        self.coef = _non_negative(init_coef, "init_coef")
        self.target = _non_negative(target, "target")
        self.horizon = _non_negative(horizon, "horizon")
        if self.target == 0 or self.horizon == 0:
            raise ValueError(f"target and horizon must be > 0, got {target} and {horizon}")
        if self.coef == 0:  # the update multiplies it: from 0 it would never move
            raise ValueError(f"init_coef must be > 0 for the adaptive controller, got {init_coef}")

    def update(self, current_kl: float, n_steps: int) -> float:
        if n_steps >= 5 * self.horizon:  # 1 + error * n_steps / horizon could reach 0 or less
            raise ValueError(
                f"horizon {self.horizon} is too short for {n_steps} rows a step (it must exceed "
                "rows / 5): a KL under target would turn the coefficient <= 0"
            )
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.coef *= 1.0 + error * n_steps / self.horizon
        return self.coef

    def state_dict(self) -> dict:
        return {
            "kind": self.kind,
            "coef": self.coef,
            "target": self.target,
            "horizon": self.horizon,
        }

    def load_state_dict(self, state: dict) -> None:
        _check_kind(state, self.kind)
        self.__init__(state["coef"], state["target"], state["horizon"])


def _check_kind(state: dict, kind: str) -> None:
    if not isinstance(state, dict) or state.get("kind") != kind:
        found = state.get("kind") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"state is not a {kind} KL controller's state (kind: {found!r})")


# ---------------------------------------------------------------- advantages


def advantages_and_returns(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
    whiten: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE advantages (whitened over the batch's valid tokens) and returns (not whitened:
    they are the value head's regression targets)."""
    advantages, returns = ops.gae(rewards, values, mask, gamma=gamma, lam=lam)
    if whiten:
        advantages = masked_whiten(advantages, mask)
    return advantages, returns


# ---------------------------------------------------------------- losses


@dataclass
class PolicyLoss:
    loss: torch.Tensor  # scalar, differentiable
    clip_fraction: torch.Tensor  # share of tokens where the clipped surrogate was taken
    approx_kl: torch.Tensor  # k3 estimate of KL(old policy || new policy)


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float = 0.2,
) -> PolicyLoss:
    """PPO's clipped surrogate, as a loss to minimise (masked mean over tokens):

    ratio = exp(logp - old_logp)
    loss  = mean(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)))"""
    clip_range = _non_negative(clip_range, "clip_range")
    _same_shape(old_logprobs, "old_logprobs", logprobs, "logprobs")
    _same_shape(advantages, "advantages", logprobs, "logprobs")
    valid = _as_mask(mask, logprobs, "logprobs")
    # Padding in the rollout tensors may be garbage (even NaN): zero it before it can reach a
    # gradient, where 0 * NaN would still be NaN.
    advantages = torch.where(valid, advantages, 0.0)
    old_logprobs = torch.where(valid, old_logprobs, logprobs.detach())
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), valid)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).float(), valid)
        approx_kl = masked_mean((ratio - 1.0) - log_ratio, valid)
    return PolicyLoss(loss, clip_fraction, approx_kl)


@dataclass
class ValueLoss:
    loss: torch.Tensor  # scalar, differentiable
    clip_fraction: torch.Tensor  # share of tokens where the clipped error was the larger


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float = 0.2,
) -> ValueLoss:
    """Clipped value loss: 0.5 * mean(max((V - R)^2, (V_clip - R)^2)) with
    V_clip = old_V + clip(V - old_V, -clip_range, clip_range)."""
    clip_range = _non_negative(clip_range, "clip_range")
    _same_shape(old_values, "old_values", values, "values")
    _same_shape(returns, "returns", values, "values")
    valid = _as_mask(mask, values, "values")
    old_values = torch.where(valid, old_values, values.detach())  # padding: see policy_loss
    returns = torch.where(valid, returns, values.detach())
    clipped_values = old_values + (values - old_values).clamp(-clip_range, clip_range)
    unclipped_error = (values - returns).square()
    clipped_error = (clipped_values - returns).square()
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), valid)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped_error > unclipped_error).float(), valid)
    return ValueLoss(loss, clip_fraction)


def entropy_from_logits(
    logits: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Masked mean over tokens of the entropy of softmax(logits / temperature) ([B, T, V] ->
    scalar): H = -sum_v p_v log p_v. Logits that need no gradient (PPO's metric) go through
    the fused op (one read, nothing of size V kept); otherwise one differentiable
    log_softmax."""
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B, T, V], got {tuple(logits.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    differentiable = logits.requires_grad and torch.is_grad_enabled()
    if differentiable or logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        z = _at_least_fp32(logits)
        logprobs = torch.log_softmax(z / temperature if temperature != 1.0 else z, -1)
        entropy = -(logprobs.exp() * logprobs).sum(-1)
    else:
        any_token = torch.zeros(logits.shape[:2], dtype=torch.long, device=logits.device)
        _, entropy = ops.token_logprobs(logits, any_token, temperature, with_entropy=True)
    return masked_mean(entropy, _as_mask(mask, entropy, "logits[..., 0]"))


def ppo_ptx_loss(ppo_loss: torch.Tensor, sft_loss: torch.Tensor, ptx_coef: float) -> torch.Tensor:
    """InstructGPT's PPO-ptx objective as a loss: ppo_loss + ptx_coef * sft_loss (the
    pretraining / SFT language-model loss on a batch of its own)."""
    return ppo_loss + _non_negative(ptx_coef, "ptx_coef") * sft_loss
