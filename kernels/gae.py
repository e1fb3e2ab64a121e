"""Generalized advantage estimation as one Triton kernel: a chunked backward affine scan.

GAE is a backward recurrence over each row's valid steps. Carry the pair
(A_next, V_next) = (advantage, value) of the next valid step; a valid step t maps it to

    (A, V) -> (r_t - V_t + gamma * V + gamma * lam * A,  V_t)

and an invalid step passes it through unchanged. Both are affine maps of the form
x -> M x + c with M = [[p, q], [0, s]] (valid: p = gamma*lam, q = gamma, s = 0,
c = (r_t - V_t, V_t); invalid: the identity), and such maps stay in that form under
composition, so the recurrence is an associative scan over maps: T sequential steps become
log-depth work on a tile.

Shape: each program owns BLOCK_B rows and walks time backwards in chunks of BLOCK_T. A chunk
is loaded as a [BLOCK_B, BLOCK_T] tile whose columns run *backwards* in time (column c holds
step t_end - c), so loads stay contiguous along T (coalesced) and a plain forward
`tl.associative_scan` composes "this step after everything later in the chunk". The scan's
reverse=True mode is deliberately not used: with a non-commutative combine it has returned
wrong results on GPUs (triton-lang/triton#4362), and reading the addresses backwards costs
nothing. Column c of the scan is the composite map from the chunk's carry-in (the state just
after the chunk) to the state at step t; applying it to the carry gives A_t, and the last
column's result is the carry for the next, earlier chunk. Everything is fp32; values and
rewards at invalid steps only reach `tl.where` selects, so NaN padding never leaks.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Tile sizes for real GPUs: chunks of up to _MAX_BLOCK_T steps keep loads long and coalesced;
# a tile of at most _MAX_TILE elements keeps the five scan operands in registers with 4 warps
# (compiled for sm_90: 86 registers; a 1024-element tile needs 163, which halves occupancy).
_MAX_BLOCK_T = 128
_MAX_TILE = 512
# Enough programs to fill every SM of a large GPU a couple of times over.
_TARGET_PROGRAMS = 256


@triton.jit
def _compose(p_late, q_late, s_late, c0_late, c1_late, p, q, s, c0, c1):
    """(this step's map) after (the composite of every later step): the scan's combine.

    The forward scan passes the running prefix first; since columns run backwards in time,
    that prefix covers the *later* steps, which act on the state first.
    """
    return (
        p * p_late,
        p * q_late + q * s_late,
        s * s_late,
        p * c0_late + q * c1_late + c0,
        s * c1_late + c1,
    )


@triton.jit
def _gae_kernel(
    rewards_ptr, values_ptr, mask_ptr, advantages_ptr, returns_ptr,
    B, T, rewards_row_stride, values_row_stride, mask_row_stride,
    gamma, lam,
    HAS_MASK: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    rows64 = rows.to(tl.int64)  # B * T may exceed 2**31 elements
    columns = tl.arange(0, BLOCK_T)
    is_last_column = (columns == BLOCK_T - 1)[None, :]
    carry_advantage = tl.zeros([BLOCK_B], dtype=tl.float32)
    carry_value = tl.zeros([BLOCK_B], dtype=tl.float32)
    for chunk_start in range(0, T, BLOCK_T):
        steps = T - 1 - chunk_start - columns  # backwards in time along the tile
        in_range = row_ok[:, None] & (steps >= 0)[None, :]
        # Upcast right after the load: accumulation is fp32 (and bf16 only works that way
        # under the interpreter).
        rewards = tl.load(
            rewards_ptr + rows64[:, None] * rewards_row_stride + steps[None, :],
            mask=in_range, other=0.0,
        ).to(tl.float32)  # fmt: skip
        values = tl.load(
            values_ptr + rows64[:, None] * values_row_stride + steps[None, :],
            mask=in_range, other=0.0,
        ).to(tl.float32)  # fmt: skip
        valid = in_range
        if HAS_MASK:
            flags = tl.load(
                mask_ptr + rows64[:, None] * mask_row_stride + steps[None, :],
                mask=in_range, other=0,
            )  # fmt: skip
            valid = valid & (flags != 0)

        zeros = tl.zeros([BLOCK_B, BLOCK_T], dtype=tl.float32)
        p = tl.where(valid, zeros + gamma * lam, 1.0)
        q = tl.where(valid, zeros + gamma, 0.0)
        s = tl.where(valid, zeros, 1.0)
        c0 = tl.where(valid, rewards - values, 0.0)
        c1 = tl.where(valid, values, 0.0)
        p, q, s, c0, c1 = tl.associative_scan((p, q, s, c0, c1), axis=1, combine_fn=_compose)

        advantage = p * carry_advantage[:, None] + q * carry_value[:, None] + c0
        value = s * carry_value[:, None] + c1
        out_offsets = rows64[:, None] * T + steps[None, :]
        tl.store(advantages_ptr + out_offsets, tl.where(valid, advantage, 0.0), mask=in_range)
        tl.store(returns_ptr + out_offsets, tl.where(valid, advantage + values, 0.0), mask=in_range)
        # The state at the chunk's earliest step is what the earlier chunk sees as "next".
        carry_advantage = tl.sum(tl.where(is_last_column, advantage, 0.0), axis=1)
        carry_value = tl.sum(tl.where(is_last_column, value, 0.0), axis=1)


def _block_sizes(batch: int, steps: int) -> tuple[int, int]:
    # No padding floor under the interpreter: its scan runs element by element, so padded
    # columns cost as much as real ones; on a GPU, 16 keeps warps from idling on tiny T.
    floor = 1 if _interpreted() else 16
    block_t = min(_MAX_BLOCK_T, max(floor, triton.next_power_of_2(steps)))
    block_b = min(triton.next_power_of_2(batch), max(1, _MAX_TILE // block_t))
    # Rows in a program share the sequential walk over chunks; split them across programs
    # while there are too few programs to occupy the GPU.
    while block_b > 1 and triton.cdiv(batch, block_b) < _TARGET_PROGRAMS:
        block_b //= 2
    return block_b, block_t


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _unit_stride_rows(t: torch.Tensor) -> torch.Tensor:
    """The kernel takes a row stride but needs consecutive steps to be adjacent."""
    return t if t.stride(1) == 1 or t.shape[1] <= 1 else t.contiguous()


def gae_triton(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor | None,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns), new contiguous fp32 [B, T] tensors; see `gae_reference`.

    rewards, values: [B, T] of one float dtype on one device (checked by `rlhf_fast.ops.gae`);
    mask: None or bool [B, T]. Rows may be strided views.
    """
    batch, steps = rewards.shape
    advantages = torch.empty((batch, steps), dtype=torch.float32, device=rewards.device)
    returns = torch.empty_like(advantages)
    if batch == 0 or steps == 0:
        return advantages, returns
    rewards, values = _unit_stride_rows(rewards), _unit_stride_rows(values)
    if mask is not None:
        # Bytes, not i1: the 0/1 byte layout of torch.bool is what the kernel reads.
        mask = _unit_stride_rows(mask).view(torch.uint8)
    block_b, block_t = _block_sizes(batch, steps)
    _gae_kernel[(triton.cdiv(batch, block_b),)](
        rewards, values, mask if mask is not None else rewards, advantages, returns,
        batch, steps, rewards.stride(0), values.stride(0),
        mask.stride(0) if mask is not None else 0,
        float(gamma), float(lam),
        HAS_MASK=mask is not None, BLOCK_B=block_b, BLOCK_T=block_t, num_warps=4,
    )  # fmt: skip
    return advantages, returns
