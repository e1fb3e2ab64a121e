"""decode_attention_rows (what rollout_decoder runs at a width-1 step) beside the SDPA call it
replaces, at the PPO bench's policy shape: 8 rows, 4 heads, head_dim 64, 16-64 cached columns,
rows left-padded by different amounts.

`python bench/test_bench_decode_attention_rows.py [ROUNDS]` times both alternately (rounds of
a few hundred calls each, fp32 and bf16, at the torch thread count set by the environment) and
prints the medians per call.
"""

from __future__ import annotations

import statistics
import sys
import time

import pytest
import torch
import torch.nn.functional as F

ROWS, HEADS, HEAD_DIM = 8, 4, 64
SIZES = [
    pytest.param(keys, dtype, id=f"keys{keys}-{str(dtype)[6:]}")
    for dtype in (torch.float32, torch.bfloat16)
    for keys in (16, 64)
]
PROVIDERS = ["peer", "cpp"]  # peer (SDPA) first: the summary's speedups are over it


def inputs(keys: int, dtype: torch.dtype):
    """q [B, heads, D] (a strided view, as the decoder's), caches, the [B, keys] mask."""
    generator = torch.Generator().manual_seed(0)
    shape = (ROWS, HEADS, keys, HEAD_DIM)
    cache = [torch.randn(shape, generator=generator).to(dtype) for _ in range(2)]
    q = torch.randn(ROWS, 1, 2 * HEADS, HEAD_DIM, generator=generator).to(dtype)[:, 0, :HEADS]
    pads = torch.arange(ROWS) % 5
    mask = torch.arange(keys)[None, :] >= pads[:, None]
    return q, cache[0], cache[1], mask


def call(provider: str, q, keys, values, mask):
    scale = HEAD_DIM**-0.5
    if provider == "cpp":
        op = torch.ops.rlhf_fast.decode_attention_rows.default
        return lambda: op(q, keys, values, mask, 0, scale)
    query, sdpa_mask = q.unsqueeze(2), mask[:, None, None, :]

    def sdpa():  # as rollout_decoder._attention: SDPA, then [B, heads * D]
        out = F.scaled_dot_product_attention(query, keys, values, attn_mask=sdpa_mask, scale=scale)
        return out.transpose(1, 2).reshape(ROWS, HEADS * HEAD_DIM)

    return sdpa


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("keys, dtype", SIZES)
def test_decode_attention_rows(measure, keys, dtype, provider):
    if not hasattr(torch.ops.rlhf_fast, "decode_attention_rows"):
        pytest.skip("the C++ extension is not built")
    fn = call(provider, *inputs(keys, dtype))
    with torch.inference_mode():
        measure(fn, op="decode_attention_rows", device="cpu",
                size=f"B={ROWS} heads={HEADS} D={HEAD_DIM} keys={keys} {str(dtype)[6:]}",
                provider=provider)  # fmt: skip


def interleaved(rounds: int, calls: int = 300) -> None:
    import rlhf_fast  # noqa: F401  (loads the ops)

    print(f"threads {torch.get_num_threads()}, median us per call over {rounds} rounds")
    with torch.inference_mode():
        for dtype in (torch.float32, torch.bfloat16):
            for keys in (16, 32, 64):
                fns = {p: call(p, *inputs(keys, dtype)) for p in PROVIDERS}
                times: dict[str, list[float]] = {p: [] for p in PROVIDERS}
                for _ in range(rounds):
                    for provider, fn in fns.items():
                        fn()
                        start = time.perf_counter()
                        for _ in range(calls):
                            fn()
                        times[provider].append((time.perf_counter() - start) / calls * 1e6)
                medians = {p: statistics.median(t) for p, t in times.items()}
                print(
                    f"{str(dtype)[6:]:9} keys {keys:3}  sdpa {medians['peer']:7.1f}  "
                    f"cpp {medians['cpp']:6.1f}  ({medians['peer'] / medians['cpp']:.1f}x)"
                )


if __name__ == "__main__":
    interleaved(int(sys.argv[1]) if len(sys.argv) > 1 else 11)
