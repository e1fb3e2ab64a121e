"""InstructGPT's K-wise ranking loss, fused forward + backward, as one Triton kernel.

For each row (a prompt's K responses, best first) and each pair i < j with both present:

    loss += softplus(r_j - r_i)        (= -logsigmoid(r_i - r_j))
    grad_i -= sigmoid(r_j - r_i),   grad_j += sigmoid(r_j - r_i)

both divided by N, the number of valid pairs in the whole batch. The gradient costs a division
on top of the exp the loss needs anyway, so the forward pass emits it and backward only scales.

Shape: each program owns BLOCK_B rows and, for a chunk of CHUNK_K responses k, walks the
responses o in chunks of CHUNK_K, evaluating the [BLOCK_B, CHUNK_K, CHUNK_K] tile of pairs
(k, o) in registers. Every pair is seen from both ends (as (k, o) and as (o, k)); that lets
each chunk of k finish its own gradient, sum_o ±sigmoid, without scattering into other
positions, and it costs nothing extra, since a square tile of a triangle computes every cell
anyway. The loss counts each pair once, from its better end (k < o). With K <= 64 (the usual
case is 2..16) the loops run once and a row's whole K x K tile lives in registers; no
B x K x K tensor ever reaches global memory.

Numerics: with x = r_worse - r_better, softplus(x) = max(x, 0) + log(1 + exp(-|x|)) and
sigmoid(x) from exp(-|x|) stay finite for |x| up to 1e4 and beyond. Rewards of absent
responses reach only `tl.where` selects, so NaN padding never leaks; NaN at a present response
propagates into the loss, as in the reference.

Determinism: each program writes its partial loss sum to its own slot and the host sums the
slots in a fixed order; N is computed from the mask before the launch, so the kernel writes
the final gradient directly. No atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Chunks of _MAX_CHUNK_K cover K <= 64 in a single pass. About 8 cells of the
# [BLOCK_B, CHUNK_K, CHUNK_K] tile per thread keeps it in registers: compiled for sm_90 that is
# 80-115 registers and no spills, where 32 cells a thread spill.
_MAX_CHUNK_K = 64
_MAX_TILE = 1024
_CELLS_PER_WARP = 256


@triton.jit
def _rank_loss_kernel(
    rewards_ptr, mask_ptr, grad_ptr, partial_loss_ptr, inv_pairs_ptr,
    B, K, rewards_row_stride, mask_row_stride,
    HAS_MASK: tl.constexpr, BLOCK_B: tl.constexpr, CHUNK_K: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = (rows < B)[:, None, None]
    rows64 = rows.to(tl.int64)[:, None, None]  # B * K may exceed 2**31 elements
    row_rewards = rewards_ptr + rows64 * rewards_row_stride
    row_mask = mask_ptr + rows64 * mask_row_stride
    offsets = tl.arange(0, CHUNK_K)
    inv_pairs = tl.load(inv_pairs_ptr)
    loss = tl.zeros([BLOCK_B], dtype=tl.float32)
    for k_start in range(0, K, CHUNK_K):
        # Responses k, whose gradient this pass finishes, along axis 1.
        k_idx = (k_start + offsets)[None, :, None]
        k_present = row_ok & (k_idx < K)
        if HAS_MASK:
            k_present &= tl.load(row_mask + k_idx, mask=k_present, other=0) != 0
        # Upcast right after the load (fp32 math; bf16 only works that way interpreted).
        r_k = tl.load(row_rewards + k_idx, mask=k_present, other=0.0).to(tl.float32)
        grad = tl.zeros([BLOCK_B, CHUNK_K], dtype=tl.float32)
        for o_start in range(0, K, CHUNK_K):
            # Their partners o along axis 2.
            o_idx = (o_start + offsets)[None, None, :]
            o_present = row_ok & (o_idx < K)
            if HAS_MASK:
                o_present &= tl.load(row_mask + o_idx, mask=o_present, other=0) != 0
            r_o = tl.load(row_rewards + o_idx, mask=o_present, other=0.0).to(tl.float32)

            valid = k_present & o_present & (k_idx != o_idx)
            k_better = k_idx < o_idx
            # x = r_worse - r_better; on invalid pairs it may be NaN (padding), which only
            # ever reaches the selects below.
            x = tl.where(k_better, r_o - r_k, r_k - r_o)
            e = tl.exp(-tl.abs(x))
            sigmoid = tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
            softplus = tl.maximum(x, 0.0) + tl.log(1.0 + e)
            # d softplus(r_worse - r_better): -sigmoid at the better end, +sigmoid the worse.
            grad += tl.sum(tl.where(valid, tl.where(k_better, -sigmoid, sigmoid), 0.0), axis=2)
            loss += tl.sum(tl.sum(tl.where(valid & k_better, softplus, 0.0), axis=2), axis=1)
        out_rows = rows.to(tl.int64)[:, None]
        out_ks = (k_start + offsets)[None, :]
        out_ok = (out_rows < B) & (out_ks < K)
        tl.store(grad_ptr + out_rows * K + out_ks, grad * inv_pairs, mask=out_ok)
    tl.store(partial_loss_ptr + tl.program_id(0), tl.sum(loss, axis=0))


def _launch_shape(batch: int, responses: int) -> tuple[int, int, int]:
    """(BLOCK_B, CHUNK_K, num_warps)."""
    chunk_k = min(_MAX_CHUNK_K, triton.next_power_of_2(responses))
    block_b = min(triton.next_power_of_2(batch), max(1, _MAX_TILE // (chunk_k * chunk_k)))
    # A 64 x 64 tile is one row's worth and cannot shrink: give it more warps instead.
    num_warps = min(16, max(4, block_b * chunk_k * chunk_k // _CELLS_PER_WARP))
    return block_b, chunk_k, num_warps


def _pair_count(
    mask: torch.Tensor | None, batch: int, responses: int, device: torch.device
) -> torch.Tensor:
    """N, the batch's number of valid pairs, as an int64 tensor on `device` (no host sync)."""
    if mask is None:
        return torch.full((), batch * responses * (responses - 1) // 2, device=device)
    present = mask.sum(dim=1, dtype=torch.int64)
    return (present * (present - 1) // 2).sum()


def rank_loss_triton(
    rewards: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, d loss / d rewards): a 0-dim fp32 tensor and an fp32 [B, K] tensor.

    rewards: [B, K] float32 / bfloat16 / float16, best response first (checked by
    `rlhf_fast.ops.rank_loss`); mask: None or bool [B, K]. Rows may be strided views.
    """
    batch, responses = rewards.shape
    device = rewards.device
    grad = torch.empty((batch, responses), dtype=torch.float32, device=device)
    if batch == 0 or responses < 2:  # no pair at all
        return torch.zeros((), dtype=torch.float32, device=device), grad.zero_()
    pairs = _pair_count(mask, batch, responses, device)
    if rewards.stride(1) != 1:
        rewards = rewards.contiguous()
    if mask is not None:
        # Bytes, not i1: the 0/1 byte layout of torch.bool is what the kernel reads.
        mask = (mask if mask.stride(1) == 1 else mask.contiguous()).view(torch.uint8)
    # Dividing by max(N, 1) leaves the all-zero result of a batch without pairs at zero.
    inv_pairs = 1.0 / pairs.clamp(min=1).to(torch.float32).reshape(1)
    block_b, chunk_k, num_warps = _launch_shape(batch, responses)
    programs = triton.cdiv(batch, block_b)
    partial_loss = torch.empty(programs, dtype=torch.float32, device=device)
    _rank_loss_kernel[(programs,)](
        rewards, mask if mask is not None else rewards, grad, partial_loss, inv_pairs,
        batch, responses, rewards.stride(0), mask.stride(0) if mask is not None else 0,
        HAS_MASK=mask is not None, BLOCK_B=block_b, CHUNK_K=chunk_k, num_warps=num_warps,
    )  # fmt: skip
    # fp64 over the few per-program partials, in a fixed order: deterministic and exact enough.
    loss = partial_loss.double().sum() / pairs.clamp(min=1).double()
    return loss.to(torch.float32), grad
