"""ops.lora_linear_by_rows: one LoRA layer whose row blocks run different adapters (PPO's policy
and critic rows stacked as one batch, lora/row_groups.py), forward + backward.

Providers per size (group "lora_by_rows cpu <size>"):
- "cpp": ops.lora_linear_by_rows (one base GEMM over every row each way, each block's
  low-rank term in place);
- "peer-per-block": one fused ops.lora_linear call per block and a concatenation, what the
  stacked pass ran before; running peft's own layer per block is slower still (peft's
  `adapter_names=` mixed batches are refused in training);
- "reference": the fp32 definition with plain autograd.
Sizes: the PPO bench's q/v projection (2 x 512 rows of hidden 256, r=16; quick) and a wider
one (2 x 512 rows, 2048 -> 2048, r=16), fp32 and bf16.
"""

from __future__ import annotations

import pytest
import torch

from rlhf_fast import ops
from rlhf_fast.ops import LoraRows

SIZES = [(512, 256, 16), (512, 2048, 16)]  # (rows per block, width, rank)
SIZE_PARAMS = [
    pytest.param(size, dtype, id=f"2x{size[0]}-{size[1]}-r{size[2]}-{str(dtype)[6:]}",
                 marks=pytest.mark.bench_full if (i or dtype != torch.float32) else ())
    for i, size in enumerate(SIZES) for dtype in (torch.float32, torch.bfloat16)
]  # fmt: skip


def _inputs(size, dtype):
    rows, width, rank = size
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2 * rows, width, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(width, width, generator=g) / width**0.5).to(dtype)
    blocks = [
        LoraRows(start, start + rows,
                 (torch.randn(rank, width, generator=g) / width**0.5).requires_grad_(),
                 (torch.randn(width, rank, generator=g) * 0.01).requires_grad_(), 2.0)
        for start in (0, rows)
    ]  # fmt: skip
    return x, weight, blocks, torch.randn(2 * rows, width, generator=g).to(dtype)


@pytest.mark.parametrize("provider", ["cpp", "peer-per-block", "reference"])
@pytest.mark.parametrize(("size", "dtype"), SIZE_PARAMS)
def test_lora_linear_by_rows(measure, size, dtype, provider):
    x, weight, blocks, grad = _inputs(size, dtype)
    leaves = [x] + [t for b in blocks for t in (b.lora_A, b.lora_B)]

    def forward():
        if provider == "peer-per-block":
            return torch.cat([
                ops.lora_linear(x[b.start : b.stop], weight, None, b.lora_A, b.lora_B, b.scaling)
                for b in blocks
            ])  # fmt: skip
        backend = "cpp" if provider == "cpp" else "reference"
        return ops.lora_linear_by_rows(x, weight, None, blocks, backend=backend)

    def call():
        return torch.autograd.grad(forward(), leaves, grad)

    measure(call, op=f"lora_by_rows {str(dtype)[6:]}", device="cpu",
            size=f"2x{size[0]}-{size[1]}-r{size[2]}", provider=provider)  # fmt: skip
