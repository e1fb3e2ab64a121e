"""LoRA training on a streamed base, and the 4-bit KV cache of batched generation.

test_offload_training_step — one LoRA training step (forward + backward, loss on every token)
of a Llama-shaped model with random weights:
  * resident: the whole model in RAM, peft LoRA through the fused op, no checkpointing;
  * streamed: the layers stream from their shards (none resident, prefetch 1), each layer
    checkpointed and streamed again in reverse for the backward (offload/backward.py);
  * streamed-noprefetch: the same with prefetch 0 (reads never overlap compute).
Regime: TRUE DISK for the streamed rows (every shard's pages are evicted before the step and
after each read). Printed per row: median step seconds, bytes read per step, the I/O bound
(those bytes / the disk bandwidth measured here), weights held in RAM; and streamed / resident.

test_offload_kv_cache — batched greedy generation (generate_batch, every layer resident so only
the cache differs) with the KV cache dense vs held 4-bit (group 64): decode tokens/s and the
cache's bytes at the end.

Quick mode: a tiny shape. Full: hidden 1024, MLP 2816, 16 layers (~0.8 GB fp32). Run with -s.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from pathlib import Path

import pytest
import torch

from rlhf_fast.models.load import LoraSettings, attach_lora
from rlhf_fast.offload import load_offloaded, prepare_offload
from rlhf_fast.offload.generate import generate_batch
from rlhf_fast.offload.kv_cache import cache_bytes, compressed_cache
from rlhf_fast.offload.lora import attach_offload_lora
from rlhf_fast.offload.policy import format_size, measure_disk_bandwidth
from rlhf_fast.offload.shards import drop_page_cache, layer_file

SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=256),
    "llama-0.8g": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=16,
                       num_attention_heads=16, num_key_value_heads=4, vocab_size=32000),
}  # fmt: skip
TRAIN_TOKENS = {"tiny": (2, 16), "llama-0.8g": (2, 128)}  # rows, tokens
ROUNDS = {"tiny": 2, "llama-0.8g": 3}
SHAPE_PARAMS = [pytest.param("tiny"), pytest.param("llama-0.8g", marks=pytest.mark.bench_full)]


def _model(shape: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**SHAPES[shape], tie_word_embeddings=False, max_position_embeddings=2048)
    return LlamaForCausalLM(config).eval()


def _step_seconds(model, ids, rounds: int, before=None) -> list[float]:
    model.train()
    times = []
    for _ in range(rounds + 1):  # the first warms up
        if before is not None:
            before()
        started = time.perf_counter()
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        times.append(time.perf_counter() - started)
    return times[1:]


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)


@pytest.mark.parametrize("shape", SHAPE_PARAMS)
def test_offload_training_step(shape: str) -> None:
    rows_, tokens = TRAIN_TOKENS[shape]
    model = _model(shape)
    ids = torch.randint(0, model.config.vocab_size, (rows_, tokens))
    settings = LoraSettings(r=8, alpha=16.0)
    layers_bytes = sum(p.numel() * 4 for p in model.model.layers.parameters())
    with tempfile.TemporaryDirectory(prefix="rlhf-fast-bench-offload-train-") as work:
        directory = prepare_offload(model, Path(work) / "off")
        files = [str(directory / layer_file(i)) for i in range(model.config.num_hidden_layers)]
        bandwidth = measure_disk_bandwidth(work, files)
        resident = attach_lora(copy.deepcopy(model), settings)
        seconds = statistics.median(_step_seconds(resident, ids, ROUNDS[shape]))
        results = {"resident": (seconds, 0, layers_bytes)}
        del resident, model

        def evict() -> None:
            for path in files:
                drop_page_cache(path)

        for name, prefetch in (("streamed", 1), ("streamed-noprefetch", 0)):
            with load_offloaded(directory, prefetch=prefetch, drop_cache=True) as lm:
                streamed = attach_offload_lora(lm, settings)
                before = lm.streamer.bytes_read
                seconds = _step_seconds(streamed, ids, ROUNDS[shape], before=evict)
                per_step = (lm.streamer.bytes_read - before) / (ROUNDS[shape] + 1)
                results[name] = (statistics.median(seconds), per_step, lm.streamer.held_bytes)
    table = [["provider", "step s", "read/step", "I/O bound s", "layer weights in RAM"]]
    for name, (seconds, read, held) in results.items():
        bound = f"{read / bandwidth:.3g}" if read else "-"
        table.append([name, f"{seconds:.3g}", format_size(read), bound, format_size(held)])
    base = results["resident"][0]
    print(
        f"\n[offload training {shape}: LoRA r=8 step on {rows_}x{tokens} tokens, fp32, true "
        f"disk for streamed rows, disk {bandwidth / 1e9:.2f} GB/s]\n" + _table(table)
    )
    for name in ("streamed", "streamed-noprefetch"):
        print(f"{name} / resident step time = {results[name][0] / base:.2f}x")


@pytest.mark.parametrize("shape", SHAPE_PARAMS)
def test_offload_kv_cache(shape: str) -> None:
    model = _model(shape)
    batch, prompt, new = (4, 64, 4) if shape == "tiny" else (8, 512, 8)
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt))
    table = [["kv cache", "decode tok/s", "cache bytes"]]
    speeds = {}
    with tempfile.TemporaryDirectory(prefix="rlhf-fast-bench-offload-kv-") as work:
        directory = prepare_offload(model, Path(work) / "off")
        layers = model.config.num_hidden_layers
        with load_offloaded(directory, resident_layers=layers) as lm:
            for name, bits in (("dense", None), ("int4 g64", 4)):
                steps: list[float] = []
                generate_batch(lm, ids, max_new_tokens=new, kv_bits=bits, step_seconds=steps)
                speeds[name] = batch / statistics.median(steps[1:])
                cache = compressed_cache(model.config) if bits else None
                with torch.no_grad():
                    if cache is not None:
                        model(ids, cache=cache, use_cache=True)
                        size = cache_bytes(cache)
                    else:
                        size = cache_bytes(model(ids, use_cache=True).cache)
                table.append([name, f"{speeds[name]:.3g}", format_size(size)])
    print(
        f"\n[offload KV cache {shape}: batch {batch}, prompt {prompt}, {new - 1} decode steps, "
        f"all layers resident]\n" + _table(table)
    )
    print(f"int4 / dense decode tokens/s = {speeds['int4 g64'] / speeds['dense']:.2f}x")
