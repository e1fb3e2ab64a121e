"""InstructGPT's K-wise ranking loss for reward models, over all valid pairs of a batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlhf_fast.ops import _checks, _dispatch

_dispatch.IMPLEMENTED["rank_loss"] = ("reference", "cpp", "triton")


def rank_loss_reference(rewards: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The definition of `rank_loss`, in plain PyTorch (fp32, differentiable).

    rewards [B, K] holds each prompt's responses best first; mask [B, K] marks the present
    ones. The loss is the mean, over every pair i < j of the same row with both present, of
    -logsigmoid(r_i - r_j). With no valid pair it is 0 with a zero gradient. Rewards of absent
    responses are never used (they may be NaN).
    """
    rewards = rewards.float()
    better, worse = torch.triu_indices(rewards.shape[1], rewards.shape[1], 1, device=rewards.device)
    margin = rewards[:, better] - rewards[:, worse]
    if mask is None:
        valid = torch.ones_like(margin, dtype=torch.bool)
    else:
        valid = mask[:, better] & mask[:, worse]
    # Zero the margin of invalid pairs *before* the loss, so NaN padding gets no NaN gradient.
    margin = torch.where(valid, margin, 0.0)
    losses = torch.where(valid, F.softplus(-margin), 0.0)
    return losses.sum() / valid.sum().clamp(min=1)


class _FusedRankLoss(torch.autograd.Function):
    """Fused backends return (loss, d loss / d rewards) from one pass; backward only scales."""

    @staticmethod
    def forward(ctx, rewards, mask, fused):
        loss, grad = fused(rewards, mask)
        ctx.save_for_backward(grad)
        ctx.rewards_dtype = rewards.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        # grad was computed in forward: it does not depend on rewards in the autograd graph.
        _checks.first_order_backward("rank_loss")
        (grad,) = ctx.saved_tensors
        return (grad * grad_loss).to(ctx.rewards_dtype), None, None


def _rank_loss_cpp(rewards, mask):
    return torch.ops.rlhf_fast.rank_loss(rewards, mask)


def _rank_loss_triton(rewards, mask):
    from rlhf_fast.kernels.rank_loss import rank_loss_triton

    return rank_loss_triton(rewards, mask)


_FUSED = {"cpp": _rank_loss_cpp, "triton": _rank_loss_triton}


def rank_loss(
    rewards: torch.Tensor, mask: torch.Tensor | None = None, *, backend: str | None = None
) -> torch.Tensor:
    """Mean -logsigmoid(r_i - r_j) over valid pairs i < j; a 0-dim fp32 tensor.

    rewards: [B, K] float32 / bfloat16 / float16, best response first. mask: [B, K] bool (or
    integer 0/1) marking present responses, so rows may have different K. Differentiable with
    respect to rewards. K = 2 is the usual chosen/rejected loss.
    """
    rewards = _checks.float_tensor(rewards, "rewards", 2)
    mask = _checks.optional_mask(mask, rewards, "rewards")
    backend = _dispatch.choose("rank_loss", rewards.device, backend)
    if backend == "reference":
        return rank_loss_reference(rewards, mask)
    return _FusedRankLoss.apply(rewards, mask, _FUSED[backend])
