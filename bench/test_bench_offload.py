"""Offloaded generation throughput (tokens/s) of a Llama-shaped model larger than its RAM budget.

Regime: TRUE DISK. Every offload file's pages are evicted from the page cache
(posix_fadvise DONTNEED) before each run, and our streamer evicts each shard again right after
reading it; Accelerate's files (the source shards and its offload folder) are evicted before
every decode step. So every streamed byte comes from the disk, as in the issue's peer numbers.

Providers, at batch 1, 8, 32, 64 and 128 (quick: 1 and 8), each with its I/O bound (bytes streamed
per step / the disk bandwidth measured here), the share of it reached, its ratio to Accelerate
at the same batch and, for ours, the cost model's predicted tokens/s (and predicted/measured)
and where a decode step's time went (MB read, seconds blocked on a read, the rest: compute):
  * accelerate: transformers + Accelerate device_map="auto", max_memory={"cpu": budget}, disk
    offload folder (the peer);
  * ours-auto: the policy's choice under the budget with the defaults, what `--offload auto`
    runs (it may pick int4; int4 follows the int4 activation rule, quant/activations.py:
    products of >= 32 rows on bf16, under which the streamed model equals the resident int4
    model token for token, tests/test_offload_bf16_rule.py);
  * ours-none: the policy's choice without compression (fp32 layers streamed);
  * ours-none-noprefetch: the same placement with prefetch=0 (reads never overlap compute);
  * ours-int4-streamed: int4 layers, none resident (compressed streaming), the default rule;
  * ours-int4-fp32: the same with the rule off (`act=fp32`: fp32 activations, as PPO
    rollouts run).
Decode tokens/s = batch / median decode-step time (prefill excluded). "ours-auto" is measured
twice at each batch, first and last of ours (the second as "ours-auto again"), and the grid twice,
the second pass in reverse order: the VM's speed moves within a run (one int4 policy measured 213
and 120 tok/s minutes apart), and that noise only ever slows a run, so the policy's prediction
is checked against the better of the two measurements, with both printed. Each provider is compared
with Accelerate at each one's best batch size ("best batch: X / accelerate"). Quick mode: a
tiny shape. The full shape is the issue's 1.57B Llama (hidden 2048, MLP 5632, 32 layers, 16/4
heads, vocab 32000; 6.3 GB fp32) with a 2 GiB budget; `llama-12l` is the same width with 12
layers (2.7 GB fp32, budget 900 MiB) for quicker runs. Every file is written under a temp dir
and deleted (the full setup writes ~13 GB and takes ~5-7 minutes; the whole full run ~45-60
minutes). The full benchmark, one command:
    python -m pytest -q -s bench/test_bench_offload.py -k "llama-1.57b"
Our compute's intra-op thread count is one more dimension of the policy: the calibration times
one fewer than torch has (the reader keeps a core) and all of them (charged the reader's CPU per
read), and each of ours runs the count its policy chose; the grid adds the pick at the other
count. RLHF_FAST_OFFLOAD_THREADS=N in front of the command pins one count.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import pytest
import torch

from rlhf_fast.offload import load_offloaded, prepare_offload
from rlhf_fast.offload.generate import generate_batch
from rlhf_fast.offload.policy import (
    calibrate,
    choose_policy,
    evaluate,
    format_size,
    model_shapes,
)
from rlhf_fast.offload.shards import drop_page_cache, layer_file

SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=6,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=256),
    "llama-1.57b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=32,
                        num_attention_heads=16, num_key_value_heads=4, vocab_size=32000),
    "llama-12l": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=12,
                      num_attention_heads=16, num_key_value_heads=4, vocab_size=32000),
}  # fmt: skip
BUDGETS = {"tiny": 1126 << 10, "llama-1.57b": 2 << 30, "llama-12l": 900 << 20}
NEW_TOKENS = {"tiny": 4, "llama-1.57b": 4, "llama-12l": 6}  # prefill + 3 (5) decode steps
PROMPT_TOKENS = 8
# up to where throughput stops rising (Accelerate still gained 2x from 32 to 64 on llama-12l)
BATCHES = {"tiny": (1, 8), "llama-1.57b": (1, 8, 32, 64, 128), "llama-12l": (1, 8, 32, 64, 128)}
GRID_BATCH = {"tiny": 8, "llama-1.57b": 32, "llama-12l": 32}


def _write_random_model(directory: Path, shape: dict, shard_bytes: int = 1 << 30) -> Path:
    """A Llama dir with N(0, 0.02) weights (norms 1), written in ~1 GB shards so that the whole
    model never sits in memory."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, tie_word_embeddings=False, max_position_embeddings=512)
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(config)
    directory.mkdir(parents=True)
    config.save_pretrained(directory)
    generator = torch.Generator().manual_seed(0)
    shard, size, index, weight_map = {}, 0, 0, {}

    def flush() -> None:
        nonlocal shard, size, index
        name = f"model-{index:05d}.safetensors"
        save_file(shard, directory / name, metadata={"format": "pt"})
        weight_map.update({key: name for key in shard})
        shard, size, index = {}, 0, index + 1

    for key, meta in skeleton.state_dict().items():
        if key.endswith("norm.weight"):
            tensor = torch.ones(meta.shape)
        else:
            tensor = torch.randn(meta.shape, generator=generator) * 0.02
        shard[key] = tensor
        size += tensor.numel() * 4
        if size >= shard_bytes:
            flush()
    if shard:
        flush()
    index_file = {"metadata": {}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index_file))
    return directory


def _evict(*directories: Path) -> None:
    for directory in directories:
        for path in directory.rglob("*"):
            if path.is_file():
                drop_page_cache(path)


def _prompt(batch: int, vocab: int) -> torch.Tensor:
    return torch.randint(
        0, vocab, (batch, PROMPT_TOKENS), generator=torch.Generator().manual_seed(1)
    )


class _StepLog(list):
    """generate_batch's `step_seconds` list that also notes the streamer's counters at each
    step's end, so each decode step's bytes read and seconds blocked on I/O can be told."""

    def __init__(self, streamer) -> None:
        super().__init__()
        self.streamer, self.marks = streamer, [(0, 0.0, 0.0)]

    def append(self, seconds: float) -> None:
        super().append(seconds)
        s = self.streamer
        self.marks.append((s.bytes_read, s.wait_seconds, s.read_seconds))


def _run_ours(
    offload_dir: Path, policy, batch: int, vocab: int, new_tokens: int, bf16_rows=None
) -> dict:
    _evict(offload_dir)
    with load_offloaded(
        offload_dir, resident_layers=policy.resident_layers, prefetch=policy.prefetch,
        drop_cache=True, bf16_rows=bf16_rows,
    ) as lm:  # fmt: skip
        steps = _StepLog(lm.streamer)
        generate_batch(
            lm, _prompt(batch, vocab), max_new_tokens=new_tokens,
            micro_batch=policy.micro_batch, step_seconds=steps,
            compute_threads=policy.threads or None,
        )  # fmt: skip
        held = lm.resident_bytes
    decode = range(2, len(steps.marks))  # marks[k] - marks[k-1]: step k-1 (0: the prefill)
    median_step = statistics.median(steps[1:])
    per_step = [
        [b - a for a, b in zip(steps.marks[k - 1], steps.marks[k], strict=True)] for k in decode
    ]
    return {
        "tokens_per_s": batch / median_step,
        "weights_in_ram": held,
        "step_s": median_step,
        "read_mb": statistics.median(p[0] for p in per_step) / 1e6,
        "wait_s": statistics.median(p[1] for p in per_step),
        "reading_s": statistics.median(p[2] for p in per_step),
    }


def _breakdown(result: dict) -> str:
    """'step 0.52 s = 0.10 blocked on I/O + 0.42 compute; 232 MB read (0.31 s reading)'."""
    compute = result["step_s"] - result["wait_s"]
    return (
        f"{result['step_s']:.2f}s = {result['wait_s']:.2f} I/O wait + {compute:.2f} compute; "
        f"{result['read_mb']:.0f} MB ({result['reading_s']:.2f}s reading)"
    )


def _run_accelerate(source: Path, work: Path, budget: int, batch: int, new_tokens: int) -> dict:
    from transformers import AutoModelForCausalLM, StoppingCriteria, StoppingCriteriaList

    offload = work / "accelerate-offload"
    model = AutoModelForCausalLM.from_pretrained(
        source, device_map="auto", max_memory={"cpu": budget}, offload_folder=offload,
        dtype=torch.float32,
    ).eval()  # fmt: skip
    on_disk = {name for name, where in model.hf_device_map.items() if where == "disk"}
    disk_bytes = sum(
        p.numel() * p.element_size()
        for name, p in model.named_parameters()
        if any(name == d or name.startswith(d + ".") for d in on_disk)
    )
    marks: list[float] = []
    evictions: list[float] = []  # seconds each clock call spent evicting

    class Clock(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            marks.append(time.perf_counter())
            _evict(source, offload)  # the next step reads from the disk again
            evictions.append(time.perf_counter() - marks[-1])
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    _evict(source, offload)
    with torch.no_grad():
        model.generate(
            _prompt(batch, model.config.vocab_size), max_new_tokens=new_tokens, do_sample=False,
            stopping_criteria=StoppingCriteriaList([Clock()]), pad_token_id=0,
        )  # fmt: skip
    # The eviction that opens each step is not the peer's work: each step loses its own. (Timing
    # an eviction after the run did not do: of pages already evicted it takes ~0.03 ms, of a
    # cached 512 MiB file 3-40 ms here, so nearly all of it stayed charged to Accelerate.)
    steps = [b - a - evicted for a, b, evicted in zip(marks, marks[1:], evictions, strict=False)]
    del model
    gc.collect()
    shutil.rmtree(offload, ignore_errors=True)
    return {"tokens_per_s": batch / statistics.median(steps), "disk_bytes": disk_bytes}


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows)
    return "\n".join(lines)


_SETUP: dict[str, dict] = {}  # one shape's files at a time (the full one is ~13 GB on disk)


def _drop_setup() -> None:
    for setup in _SETUP.values():
        shutil.rmtree(setup["work"], ignore_errors=True)
    _SETUP.clear()


@pytest.fixture(scope="module", autouse=True)
def _cleanup():
    yield
    _drop_setup()


def _setup(shape: str) -> dict:
    """The random model, its offload dirs (fp32 and int4) and the calibration, made once."""
    from transformers import LlamaConfig

    if shape in _SETUP:
        return _SETUP[shape]
    _drop_setup()
    work = Path(tempfile.mkdtemp(prefix="rlhf-fast-bench-offload-", dir="/tmp"))
    setup = _SETUP[shape] = {"work": work}
    started = time.perf_counter()
    source = setup["source"] = _write_random_model(work / "source", SHAPES[shape])
    setup["prepared"] = {
        None: prepare_offload(source, work / "off-none"),
        4: prepare_offload(source, work / "off-int4", compress=4),
    }
    setup["setup_s"] = time.perf_counter() - started
    config = setup["config"] = LlamaConfig.from_pretrained(source)
    setup["shapes"] = model_shapes(config, torch.float32)
    layers = [str(setup["prepared"][None] / layer_file(i)) for i in range(4)]
    # the setup's gigabytes of dirty pages are written back first: writeback running under
    # the calibration slowed its timings (and its disk reads) below what the runs then met
    os.sync()
    setup["calibration"] = calibrate(
        config, torch.float32, work, compressions=(None, 4), files=layers
    )
    return setup


SHAPE_PARAMS = [
    pytest.param("tiny"),
    pytest.param("llama-1.57b", marks=pytest.mark.bench_full),
    pytest.param("llama-12l", marks=pytest.mark.bench_full),
]


@pytest.mark.parametrize("shape", SHAPE_PARAMS)
def test_offload_generation_throughput(shape: str) -> None:
    setup = _setup(shape)
    budget, new_tokens = BUDGETS[shape], NEW_TOKENS[shape]
    source, prepared, config = setup["source"], setup["prepared"], setup["config"]
    shapes, calibration, setup_s, work = (
        setup["shapes"], setup["calibration"], setup["setup_s"], setup["work"]
    )  # fmt: skip
    bandwidth = calibration.disk_bandwidth
    context = PROMPT_TOKENS + new_tokens
    head = ["provider", "batch", "policy", "predicted", "measured", "pred/meas", "x accel"]
    rows = [head + ["I/O bound", "% bound", "decode step (median)", "RAM"]]
    measured: dict[tuple[str, int], float] = {}
    predicted: dict[int, float] = {}  # ours-auto's, by batch
    batches = BATCHES[shape]
    for batch in batches:
        auto = choose_policy(
            {c: shapes[c] for c in prepared}, calibration, cpu_budget=budget, batch=batch,
            context=context, prompt=PROMPT_TOKENS,
        )  # fmt: skip
        none = choose_policy(
            {None: shapes[None]}, calibration, cpu_budget=budget, batch=batch, context=context,
            prompt=PROMPT_TOKENS,
        )  # fmt: skip
        pinned = dict(resident_layers=none.resident_layers, micro_batch=none.micro_batch)
        no_overlap = evaluate(
            shapes[None], calibration, compress=None, prefetch=0, batch=batch,
            context=context, prompt=PROMPT_TOKENS, **pinned,
        )  # fmt: skip
        int4_streamed = choose_policy(
            {4: shapes[4]}, calibration, cpu_budget=budget, batch=batch, context=context,
            prompt=PROMPT_TOKENS, fixed={"resident_layers": 0},
        )  # fmt: skip
        int4_fp32 = choose_policy(
            {4: shapes[4]}, calibration, cpu_budget=budget, batch=batch, context=context,
            prompt=PROMPT_TOKENS, fixed={"resident_layers": 0, "bf16_rows": None},
        )  # fmt: skip
        predicted[batch] = auto.predicted_tokens_per_s
        cases = [
            ("ours-auto", auto),
            ("ours-none", none),
            ("ours-int4-streamed", int4_streamed),
            ("ours-int4-fp32", int4_fp32),
        ]
        if batch <= 8:  # the no-overlap baseline only where I/O is a large share of a step
            cases.insert(2, ("ours-none-noprefetch", no_overlap))
        cases.append(("ours-auto again", auto))
        peer = _run_accelerate(source, work, budget, batch, new_tokens)
        peer_tokens = measured[("accelerate", batch)] = peer["tokens_per_s"]
        peer_bound = batch * bandwidth / peer["disk_bytes"] if peer["disk_bytes"] else 0
        rows.append([
            "accelerate", str(batch), f"disk {format_size(peer['disk_bytes'])}", "-",
            f"{peer_tokens:.3g}", "-", "1.00", f"{peer_bound:.3g}",
            f"{100 * peer_tokens / peer_bound:.0f}%" if peer_bound else "-", "-", "-",
        ])  # fmt: skip
        for name, policy in cases:
            result = _run_ours(
                prepared[policy.compress], policy, batch, config.vocab_size, new_tokens,
                bf16_rows=policy.bf16_rows,
            )  # fmt: skip
            tokens = measured[(name, batch)] = result["tokens_per_s"]
            bound = policy.io_bound_tokens_per_s
            rows.append([
                name, str(batch), policy.describe().split(";")[0]
                + (" act=bf16" if policy.bf16_rows else ""),
                f"{policy.predicted_tokens_per_s:.3g}", f"{tokens:.3g}",
                f"{policy.predicted_tokens_per_s / tokens:.2f}", f"{tokens / peer_tokens:.2f}",
                f"{bound:.3g}", f"{100 * tokens / bound:.0f}%",
                _breakdown(result), format_size(result["weights_in_ram"]),
            ])  # fmt: skip
    names = {n for n, _ in measured} - {"ours-auto again"}
    best = {
        name: max((measured[(name, b)], b) for b in batches if (name, b) in measured)
        for name in names
    }
    print(
        f"\n[offload {shape}: true-disk regime, budget {format_size(budget)}, disk "
        f"{bandwidth / 1e9:.2f} GB/s (cold reads as the streamer makes them), setup "
        f"{setup_s:.0f} s, {new_tokens - 1} decode steps per run, tokens/s; compute timed with "
        f"{_thread_counts(calibration)} intra-op threads]\n" + _table(rows)
    )
    peer_best, peer_batch = best["accelerate"]
    for name in sorted(names - {"accelerate"}):
        tokens, at = best[name]
        print(
            f"best batch: {name} {tokens:.3g} tok/s (batch {at}) / accelerate {peer_best:.3g} "
            f"(batch {peer_batch}) = {tokens / peer_best:.2f}x"
        )
    print(_prediction_summary(predicted, measured, batches))
    print(_calibration_summary(calibration))


def _thread_counts(calibration) -> str:
    return " and ".join(str(c.threads) for c in calibration.per_thread_count())


def _calibration_summary(calibration) -> str:
    """The timings the predictions rest on (ms per decoder layer at each row count, the
    forward's own work once per micro-batch), to tell a miss of the model from a calibration
    that ran in a fast or slow spell of the VM."""
    lines = ["calibration (ms):"]
    for timing in calibration.per_thread_count():
        points = "; ".join(
            f"{key} " + ", ".join(f"{int(rows)}: {seconds * 1e3:.3g}" for rows, seconds in series)
            for key, series in sorted(timing.layer_points.items())
        )
        lines.append(
            f"  {timing.threads} threads: layer {points}; forward outside the layers "
            f"{timing.forward_fixed * 1e3:.3g}"
        )
    return "\n".join(lines)


def _prediction_summary(predicted: dict[int, float], measured: dict, batches) -> str:
    """ours-auto's predicted / measured at each batch: against each of its two runs and
    against the better of them, and how many are within 25% (issue 7's tolerance)."""
    lines, within = [], {"first": 0, "again": 0, "better": 0}
    for batch in batches:
        first, again = measured[("ours-auto", batch)], measured[("ours-auto again", batch)]
        ratios = {
            "first": predicted[batch] / first,
            "again": predicted[batch] / again,
            "better": predicted[batch] / max(first, again),
        }
        within.update({k: within[k] + (abs(r - 1) <= 0.25) for k, r in ratios.items()})
        lines.append(
            f"  batch {batch}: predicted {predicted[batch]:.3g}, measured {first:.3g} then "
            f"{again:.3g} ({max(first, again) / min(first, again):.2f}x apart); predicted/better "
            f"{ratios['better']:.2f}"
        )
    counts = ", ".join(f"{k} {v} of {len(batches)}" for k, v in within.items())
    return "ours-auto predicted vs measured (within 25%: " + counts + "):\n" + "\n".join(lines)


@pytest.mark.parametrize("shape", SHAPE_PARAMS)
def test_offload_policy_vs_grid(shape: str) -> None:
    """At GRID_BATCH: the policy's pick, measured, beside every policy of a coarse grid
    (compression x prefetch x micro-batch, each with the most resident layers that fit); the
    grid runs twice, the second pass in reverse order, and each policy counts its better pass."""
    setup = _setup(shape)
    budget, new_tokens, batch = BUDGETS[shape], NEW_TOKENS[shape], GRID_BATCH[shape]
    shapes, calibration = setup["shapes"], setup["calibration"]
    context = PROMPT_TOKENS + new_tokens
    shapes = {c: shapes[c] for c in setup["prepared"]}
    pick = choose_policy(
        shapes, calibration, cpu_budget=budget, batch=batch, context=context, prompt=PROMPT_TOKENS
    )
    grid = {}
    for compress in (None, 4):
        for prefetch in (0, 1, 2):
            for micro_batch in sorted({max(1, batch // 4), batch}):
                try:
                    policy = choose_policy(
                        {compress: shapes[compress]}, calibration, cpu_budget=budget,
                        batch=batch, context=context, prompt=PROMPT_TOKENS,
                        fixed={"prefetch": prefetch, "micro_batch": micro_batch},
                    )  # fmt: skip
                except ValueError:  # does not fit the budget
                    continue
                streamed = policy.resident_layers < shapes[compress].num_layers
                key = (compress, policy.resident_layers, prefetch if streamed else 0, micro_batch)
                grid.setdefault(key + (policy.threads,), policy)
    for other in calibration.per_thread_count():  # the pick at the other thread count(s)
        same = dict(
            compress=pick.compress,
            resident_layers=pick.resident_layers,
            prefetch=pick.prefetch,
            micro_batch=pick.micro_batch,
            threads=other.threads,
        )
        policy = choose_policy(shapes, calibration, cpu_budget=budget, batch=batch,
                               context=context, prompt=PROMPT_TOKENS, fixed=same)  # fmt: skip
        streamed = pick.resident_layers < shapes[pick.compress].num_layers
        key = (pick.compress, pick.resident_layers, pick.prefetch if streamed else 0)
        grid.setdefault(key + (pick.micro_batch, other.threads), policy)
    rows = [["policy", "predicted", "measured (pass 1, 2)", "predicted/better", "decode step"]]
    policies = list(grid.values())
    runs: dict[int, list[dict]] = {i: [] for i in range(len(policies))}
    for order in (range(len(policies)), reversed(range(len(policies)))):  # 2nd pass reversed
        for i in order:
            policy = policies[i]
            runs[i].append(
                _run_ours(
                    setup["prepared"][policy.compress], policy, batch,
                    setup["config"].vocab_size, new_tokens, bf16_rows=policy.bf16_rows,
                )
            )  # fmt: skip
    results = []
    for i, policy in enumerate(policies):
        result = max(runs[i], key=lambda r: r["tokens_per_s"])
        results.append((policy, result["tokens_per_s"]))
        rows.append([
            policy.describe().split(";")[0], f"{policy.predicted_tokens_per_s:.3g}",
            ", ".join(f"{r['tokens_per_s']:.3g}" for r in runs[i]),
            f"{policy.predicted_tokens_per_s / result['tokens_per_s']:.2f}", _breakdown(result),
        ])  # fmt: skip
    best_policy, best = max(results, key=lambda item: item[1])
    picked = [m for p, m in results if p.describe() == pick.describe()]
    picked_text = "not in grid"
    if picked:
        picked_text = (
            f"{picked[0]:.3g} ({100 * picked[0] / best:.0f}% of the grid's best; predicted "
            f"{pick.predicted_tokens_per_s:.3g} = {pick.predicted_tokens_per_s / picked[0]:.2f}x "
            f"the measured)"
        )
    within = sum(abs(p.predicted_tokens_per_s / m - 1) <= 0.25 for p, m in results)
    print(
        f"\n[offload {shape} grid, batch {batch}, true disk, budget {format_size(budget)}]\n"
        + _table(rows)
        + f"\npolicy pick: {pick.describe()}\n  measured {picked_text} tokens/s; best of grid "
        f"{best:.3g} ({best_policy.describe().split(';')[0]})\n  predictions within 25% of "
        f"the better pass: {within} of {len(results)}"
    )
