"""decode_gemv_dense: our few-row dense GEMV (rlhf_fast::decode_gemv_dense, what decode_linear
runs for a decode step's rows) beside torch's F.linear at the shapes of the PPO rollout.

Sizes: every linear layer of the PPO bench's h256-L4 policy (hidden 256, MLP 688, vocab 2000:
fused qkv 768 x 256, o 256 x 256, gate+up 1376 x 256, down 256 x 688, lm head 2000 x 256) at 8
and 16 rows (one row per prompt; bf16 also at 1 and 4, the chat and small-batch decode steps),
whose bf16 weights sit in cache during a rollout as here; and
one 5632 x 2048 layer whose copies are rotated over twice the largest cache
(test_bench_quant_matmul.ROTATE_BYTES), so every call streams its weights from DRAM.

Providers: "cpp" is decode_gemv_dense with x in the weight's dtype (bf16: AMX tiles where the
CPU has them, else vdpbf16ps where it has AVX512_BF16, else the widening kernel); "cpp-widened"
(bf16 only) is the same op with fp32 x, which always runs the kernel that widens each bf16
weight to fp32 (what bf16 x runs on a CPU with neither); "peer" is F.linear. The session
summary's speedup column is each provider's over F.linear's.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from conftest import quick_mode
from test_bench_quant_matmul import ROTATE_BYTES

PPO_SHAPES = [(768, 256), (256, 256), (1376, 256), (256, 688), (2000, 256)]  # (N, K)
BEYOND_L3 = (5632, 2048)
SIZES = [
    pytest.param(m, n, k, dtype, id=f"M{m}-N{n}-K{k}-{str(dtype)[6:]}",
                 marks=pytest.mark.bench_full if (m, n, k, dtype) != (8, 1376, 256, torch.bfloat16)
                 else ())
    for dtype in (torch.bfloat16, torch.float32)
    for n, k in [*PPO_SHAPES, BEYOND_L3]
    for m in (1, 4, 8, 16)
    if (dtype == torch.bfloat16 or (n, k) in ((1376, 256), BEYOND_L3))
    and (m >= 8 or dtype == torch.bfloat16)
]  # fmt: skip
PROVIDERS = ["peer", "cpp", "cpp-widened"]  # peer first: the summary's speedups are over it


def _call(provider: str, weight: torch.Tensor):
    if provider == "peer":
        return lambda x: F.linear(x, weight)
    if provider == "cpp-widened":
        return lambda x: torch.ops.rlhf_fast.decode_gemv_dense(x.float(), weight, None)
    return lambda x: torch.ops.rlhf_fast.decode_gemv_dense(x, weight, None)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("m, n, k, dtype", SIZES)
def test_dense_gemv(measure, request, m, n, k, dtype, provider):
    if not hasattr(torch.ops.rlhf_fast, "decode_gemv_dense"):
        pytest.skip("the C++ extension is not built")
    if provider == "cpp-widened" and dtype != torch.bfloat16:
        pytest.skip("fp32 weights have one kernel")
    generator = torch.Generator().manual_seed(0)
    weight_bytes = n * k * dtype.itemsize
    streamed = (n, k) == BEYOND_L3 and not quick_mode(request.config)
    copies = max(2, ROTATE_BYTES // weight_bytes) if streamed else 1
    weights = [torch.randn(n, k, generator=generator).to(dtype) for _ in range(copies)]
    calls = itertools.cycle([_call(provider, w) for w in weights])
    x = torch.randn(m, k, generator=generator).to(dtype)
    with torch.no_grad():
        measure(
            lambda: next(calls)(x),
            op="decode_gemv_dense",
            device="cpu",
            size=f"M={m} N={n} K={k} {str(dtype)[6:]}" + (" from DRAM" if streamed else ""),
            provider=provider,
            weight_bytes=weight_bytes,
        )
