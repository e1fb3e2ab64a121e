"""ops.short_attention (causal / bool-masked attention of Tq == Tk sequences) beside its
reference and SDPA as the fused training path ran it before: fp32 SDPA, and for bf16 both
SDPA on q/k/v widened to fp32 (fused_layers._widen_for_cpu_sdpa) and bf16 SDPA itself.

Shapes: [16, 4, 64, 64] causal (the PPO bench's h256-L4 training call: policy and critic rows
stacked), [8, 4, 64, 64] with an HF left-padding mask, [16, 8, 120, 64] causal (h512's).
q/k/v are HF's [B, T, H, D] projections viewed as [B, H, T, D]. "fwd" is the forward alone
(scoring passes), "fwdbwd" forward and backward of all three inputs (training).

`python bench/test_bench_short_attention.py [ROUNDS]` times ours and the peers in turns in one
process (wall and CPU time per call, at the torch thread count set by the environment) and
prints the medians, ratios and the GFLOP/s of ours (visible scores only: 4 T_vis D flops forward,
10 T_vis D backward with the probabilities kept).

`python bench/test_bench_short_attention.py ppo SHAPE DTYPE [ROUNDS]` (SHAPE of
bench/test_bench_ppo.py, DTYPE fp32 or bf16) runs PPO iterations of bench_ppo's "ours" with
fused_layers.SHORT_ATTENTION on and off in turns (one trainer; rollout and optimize timed
apart) and prints the medians.
"""

from __future__ import annotations

import statistics
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from rlhf_fast import ops

SHAPES = {  # name: (B, H, T, D, masking)
    "ppo-h256": (16, 4, 64, 64, "causal"),
    "padded": (8, 4, 64, 64, "padded"),
    "ppo-h512": (16, 8, 120, 64, "causal"),
}
PROVIDERS = ["peer-sdpa", "peer-sdpa-fp32", "reference", "cpp"]


def inputs(shape: str, dtype: torch.dtype):
    batch, heads, steps, dim, masking = SHAPES[shape]
    generator = torch.Generator().manual_seed(0)

    def projection():
        t = torch.randn(batch, steps, heads, dim, generator=generator).to(dtype)
        return t.transpose(1, 2).requires_grad_(True)

    q, k, v = projection(), projection(), projection()
    grad = torch.randn(batch, heads, steps, dim, generator=generator).to(dtype)
    mask = None
    if masking == "padded":  # HF's sdpa mask: causal, rows left-padded by 0-12 positions
        positions = torch.arange(steps)
        pads = torch.arange(batch) * 13 % 13
        mask = (positions[None, :] <= positions[:, None])[None] & (
            positions[None, None, :] >= pads[:, None, None]
        )
        mask = mask[:, None]
    return q, k, v, mask, grad


def call(provider: str, q, k, v, mask, grad, backward: bool):
    causal = mask is None

    def attention():
        if provider == "cpp":
            return ops.short_attention(q, k, v, mask, is_causal=causal, backend="cpp")
        if provider == "reference":
            return ops.short_attention_reference(q, k, v, mask, is_causal=causal)
        wide = provider == "peer-sdpa-fp32" and q.dtype != torch.float32
        args = (q.float(), k.float(), v.float()) if wide else (q, k, v)
        out = F.scaled_dot_product_attention(*args, attn_mask=mask, is_causal=causal)
        return out.to(q.dtype)

    if not backward:

        def forward():
            with torch.no_grad():
                return attention()

        return forward
    return lambda: torch.autograd.grad(attention(), (q, k, v), grad)


def visible_flops(shape: str, backward: bool) -> float:
    batch, heads, steps, dim, masking = SHAPES[shape]
    q, k, v, mask, _ = inputs(shape, torch.float32)
    if mask is None:
        mask = torch.ones(steps, steps, dtype=torch.bool).tril().expand(batch, 1, steps, steps)
    visible = float(mask.sum()) * heads
    return visible * dim * (4 + (10 if backward else 0))


def case_id(shape: str, dtype: torch.dtype, backward: bool) -> str:
    return f"{shape}-{str(dtype)[6:]}-{'fwdbwd' if backward else 'fwd'}"


CASES = [
    pytest.param(shape, dtype, backward, id=case_id(shape, dtype, backward),
                 marks=() if shape == "ppo-h256" else pytest.mark.bench_full)
    for shape in SHAPES
    for dtype in (torch.float32, torch.bfloat16)
    for backward in (False, True)
]  # fmt: skip


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape, dtype, backward", CASES)
def test_short_attention(measure, shape, dtype, backward, provider):
    if provider == "cpp" and not hasattr(torch.ops.rlhf_fast, "short_attention"):
        pytest.skip("the C++ extension is not built")
    if provider == "peer-sdpa-fp32" and dtype == torch.float32:
        pytest.skip("fp32 inputs: the same as peer-sdpa")
    fn = call(provider, *inputs(shape, dtype), backward)
    batch, heads, steps, dim, masking = SHAPES[shape]
    measure(fn, op="short_attention", device="cpu",
            size=f"[{batch},{heads},{steps},{dim}] {masking} {str(dtype)[6:]} "
                 f"{'fwd+bwd' if backward else 'fwd'}",
            provider=provider)  # fmt: skip


def interleaved(rounds: int, calls: int = 20) -> None:
    threads = torch.get_num_threads()
    print(f"threads {threads}, medians over {rounds} rounds: wall ms per call (CPU ms)")
    for shape in SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            for backward in (False, True):
                names = [p for p in PROVIDERS if dtype != torch.float32 or p != "peer-sdpa-fp32"]
                fns = {p: call(p, *inputs(shape, dtype), backward) for p in names}
                wall: dict[str, list[float]] = {p: [] for p in names}
                cpu: dict[str, list[float]] = {p: [] for p in names}
                for _ in range(rounds):
                    for provider, fn in fns.items():
                        fn()
                        start, start_cpu = time.perf_counter(), time.process_time()
                        for _ in range(calls):
                            fn()
                        wall[provider].append((time.perf_counter() - start) / calls * 1e3)
                        cpu[provider].append((time.process_time() - start_cpu) / calls * 1e3)
                med = {p: statistics.median(t) for p, t in wall.items()}
                med_cpu = {p: statistics.median(t) for p, t in cpu.items()}
                ours = med["cpp"]
                peer = min(v for p, v in med.items() if p.startswith("peer"))
                flops = visible_flops(shape, backward)
                print(f"{shape:9} {str(dtype)[6:]:8} {'fwd+bwd' if backward else 'fwd':7} "
                      + "  ".join(f"{p} {med[p]:.3f} ({med_cpu[p]:.3f})" for p in names)
                      + f"  | peer/ours {peer / ours:.2f}x  ref/ours {med['reference'] / ours:.2f}x"
                      f"  ours {flops / ours / 1e6:.0f} GFLOP/s ({flops / med_cpu['cpp'] / 1e6:.0f}"
                      " per CPU second)")  # fmt: skip


def ppo_interleaved(shape: str, dtype: str, rounds: int) -> None:
    import gc
    import os
    from pathlib import Path

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(Path(__file__).parent))
    from test_bench_ppo import ours  # noqa: PLC0415  (a bench module, not a package)

    from rlhf_fast.models import fused_layers

    torch.manual_seed(0)
    iteration, clock = ours(shape, dtype=dtype)
    iteration()  # warm-up, both ways
    fused_layers.SHORT_ATTENTION = False
    iteration()
    gc.collect()
    gc.freeze()
    times: dict[bool, dict[str, list[float]]] = {
        flag: {"rollout": [], "train": [], "cpu": []} for flag in (True, False)
    }
    for round_ in range(rounds):
        for flag in (True, False) if round_ % 2 == 0 else (False, True):
            fused_layers.SHORT_ATTENTION = flag
            before, cpu = dict(clock), time.process_time()
            iteration()
            times[flag]["cpu"].append(time.process_time() - cpu)
            for part in ("rollout", "train"):
                times[flag][part].append(clock[part] - before[part])
    fused_layers.SHORT_ATTENTION = True
    print(f"PPO {shape} {dtype}, {torch.get_num_threads()} threads, {rounds} rounds in turns")
    for flag in (True, False):
        parts = {part: statistics.median(t) for part, t in times[flag].items()}
        total = statistics.median(
            [r + t for r, t in zip(times[flag]["rollout"], times[flag]["train"], strict=True)]
        )
        print(f"  short_attention {'on ' if flag else 'off'}: rollout {parts['rollout']:.3f} s"
              f"  train {parts['train']:.3f} s  iteration {total:.3f} s"
              f"  (CPU time {parts['cpu']:.3f} s)")  # fmt: skip


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "ppo":
        ppo_interleaved(sys.argv[2], sys.argv[3], int(sys.argv[4]) if len(sys.argv) > 4 else 6)
    else:
        interleaved(int(sys.argv[1]) if len(sys.argv) > 1 else 7)
