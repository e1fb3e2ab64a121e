"""quant_matmul: our int4 / int8 kernels beside torch's own CPU options for the same linear
layer: fp32 and bf16 F.linear, and aten's weight-only int8 / int4 packed ops; and, up to 16
rows, our dense bf16 GEMV (rlhf_fast::decode_gemv_dense, what the lean decoders run for 1-4
rows of 16-bit weights) beside torch's bf16 F.linear, and the VNNI GEMVs the chat decoder runs on
int4 / int8 weights (rlhf_fast::decode_gemv_int4 / int8: activations quantized to int8 / int16).

Decode (M = 1) is a stream over the weights, so each provider's weights are rotated over
several copies that together hold twice the largest CPU cache the OS reports (`ROTATE_BYTES`):
every call reads its weights from DRAM, as in a real model whose layers do not fit in cache.
The dev VM's host reports a 300 MiB L3 (ENVIRONMENT.md's machine had 32 MiB); a rotation of
96 MiB, which the bench used before, still read at 24-37 GB/s there, against 20-21 GB/s for
1 GiB. The summary's weight-streaming table gives GB/s of weight bytes and the share of the
read bandwidth measured in the same run. Sizes run shape by shape, and only one shape's weight
copies are kept at a time (up to 1 GiB per provider).
"""

from __future__ import annotations

import functools
import gc
import itertools
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import quick_mode
from peers import aten_int4_codes

from rlhf_fast import ops
from rlhf_fast.ops import backends
from rlhf_fast.quant import quantize_weight

MS = [1, 8, 32, 128]
SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]  # (in_features K, out_features N)


def largest_cache_bytes() -> int:
    """The largest CPU cache the OS reports for cpu0 (sysfs: "307200K"), or 32 MiB."""
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = path.read_text().strip().upper()
        scale = {"K": 1 << 10, "M": 1 << 20}.get(text[-1:], 1)
        digits = text.rstrip("KM")
        if digits.isdigit():
            sizes.append(int(digits) * scale)
    return max(sizes, default=32 << 20)


# Twice the largest cache (at least 96 MiB, at most 1 GiB): each call finds its weights evicted.
ROTATE_BYTES = min(max(96 << 20, 2 * largest_cache_bytes()), 1 << 30)
SIZE_PARAMS = [  # shape by shape (see _build_for_shape), the first one in quick mode
    pytest.param((m, k, n), id=f"M{m}-K{k}-N{n}", marks=pytest.mark.bench_full if i else ())
    for i, ((k, n), m) in enumerate(itertools.product(SHAPES, MS))
]
PROVIDERS = [
    "fp32",  # first: the table's speedups are relative to it
    "bf16",
    "torch-int8pack",
    "torch-int4pack-g128",
    "ours-int8",
    "ours-int8-bf16x",
    "ours-int4-g128",
    "ours-int4-g128-bf16x",
    "ours-int4-g32",
    "ours-dense-bf16",
    "ours-decode-int8",  # the chat decoder's VNNI GEMVs (int16 / int8 activations), M <= 16
    "ours-decode-int4-g32",
]
DECODE_MAX_ROWS = 16  # the decode GEMVs and decode_gemv_dense serve up to this many rows


def _copies(weight_bytes: int) -> int:
    return max(2, -(-ROTATE_BYTES // weight_bytes))


def _torch_int4pack(weight: torch.Tensor, group: int = 128):
    """aten's packed int4 CPU format: codes 0..15 around 8, bf16 (scale, zero) per group."""
    codes, scale_and_zero = aten_int4_codes(weight, group)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.int(), 2), scale_and_zero


_BUILT_SHAPE: list[tuple[int, int]] = []


def _build_for_shape(provider: str, k: int, n: int, seed: int):
    """_build, keeping only one (K, N)'s weight copies: a rotation is up to 1 GiB per provider,
    and all shapes' copies at once would not fit in RAM."""
    if _BUILT_SHAPE != [(k, n)]:
        _build.cache_clear()
        gc.collect()
        _BUILT_SHAPE[:] = [(k, n)]
    return _build(provider, k, n, seed)


@functools.cache  # weights are reused across M (and across the providers' rows of one shape)
def _build(provider: str, k: int, n: int, seed: int):
    """(call(x) -> y, activation dtype, weight bytes read per call) for one weight copy."""
    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.02
    if provider == "fp32":
        return (lambda x: F.linear(x, weight)), torch.float32, weight.nbytes
    if provider == "bf16":
        w16 = weight.bfloat16()
        return (lambda x: F.linear(x, w16)), torch.bfloat16, w16.nbytes
    if provider == "torch-int8pack":
        q = quantize_weight(weight, 8)
        scales = q.scales.bfloat16()
        call = lambda x: torch.ops.aten._weight_int8pack_mm(x, q.data, scales)  # noqa: E731
        return call, torch.bfloat16, q.data.nbytes + scales.nbytes
    if provider == "torch-int4pack-g128":
        packed, scale_and_zero = _torch_int4pack(weight)
        call = lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(  # noqa: E731
            x, packed, 128, scale_and_zero
        )
        return call, torch.bfloat16, packed.nbytes + scale_and_zero.nbytes
    if provider == "ours-dense-bf16":
        w16 = weight.bfloat16()
        call = lambda x: torch.ops.rlhf_fast.decode_gemv_dense(x, w16, None)  # noqa: E731
        return call, torch.bfloat16, w16.nbytes
    bits = 8 if "int8" in provider else 4
    group = 32 if provider.endswith("g32") else 128
    q = quantize_weight(weight, bits, group)
    if provider.startswith("ours-decode"):  # what `rlhf-fast chat --int4/--int8` decodes with
        if bits == 8:
            call = lambda x: torch.ops.rlhf_fast.decode_gemv_int8(x, q.data, q.scales, None)  # noqa: E731
        else:
            call = lambda x: torch.ops.rlhf_fast.decode_gemv_int4(  # noqa: E731
                x, q.data, q.scales, q.offsets, q.group_size, q.in_features, None
            )
        return call, torch.float32, q.nbytes
    dtype = torch.bfloat16 if provider.endswith("bf16x") else torch.float32
    return (lambda x: ops.quant_matmul(x, q)), dtype, q.nbytes


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("size", SIZE_PARAMS)
def test_quant_matmul(measure, request, size, provider):
    cpp = backends()["quant_matmul"].get("cpp")
    if provider.startswith("ours") and not (cpp and cpp.available):
        pytest.skip("the C++ quant_matmul kernels are not built")
    m, k, n = size
    if provider in ("ours-dense-bf16", "ours-decode-int8", "ours-decode-int4-g32") and m > 16:
        pytest.skip(f"the decode GEMVs take at most {DECODE_MAX_ROWS} rows")
    first_call, dtype, weight_bytes = _build_for_shape(provider, k, n, seed=0)
    # Quick mode (a CI smoke run) skips the rotation: building the copies is its slowest part.
    # Its one copy then sits in the cache, and the size says so: its GB/s (up to 3x the read
    # bandwidth in a quick run) are the cache's, not a DRAM stream's.
    quick = quick_mode(request.config)
    copies = 1 if quick else _copies(weight_bytes)
    calls = [first_call] + [_build_for_shape(provider, k, n, s)[0] for s in range(1, copies)]
    x = torch.randn(m, k).to(dtype)
    rotation = itertools.cycle(calls)
    measure(
        lambda: next(rotation)(x),
        op="quant_matmul",
        device="cpu",
        size=f"M={m} K={k} N={n}" + (" cached (quick: no rotation)" if quick else ""),
        provider=provider,
        weight_bytes=weight_bytes,
    )


@pytest.mark.parametrize(
    "gib",
    [pytest.param(1, id="1GiB", marks=pytest.mark.bench_full), pytest.param(0.25, id="256MiB")],
)
def test_read_bandwidth(measure, gib):
    """The machine's read bandwidth with torch's threads: a sum over 1 GiB, beyond any L3 (quick
    mode's 256 MiB is within the dev VM host's reported 300 MiB, but read as fast as 1 GiB)."""
    data = torch.ones(int(gib * (1 << 30)) // 4)
    measure(
        lambda: data.sum(),
        op="read_bandwidth",
        device="cpu",
        size=f"sum of {gib} GiB",
        provider="torch.sum",
        bytes_moved=data.nbytes,
    )


def _represented_weight(provider: str, weight: torch.Tensor) -> torch.Tensor:
    """The fp32 weight that `provider`'s format stores for `weight` (dequantized)."""
    if provider == "fp32":
        return weight
    if provider in ("bf16", "ours-dense-bf16"):
        return weight.bfloat16().float()
    if provider == "torch-int8pack":
        q = quantize_weight(weight, 8)
        return q.data.float() * q.scales.bfloat16().float()[:, None]
    if provider == "torch-int4pack-g128":  # aten's w = (code - 8) * scale + zero per group
        codes, scale_and_zero = aten_int4_codes(weight, 128)
        scale, zero = scale_and_zero.float().transpose(0, 1).repeat_interleave(128, 1).unbind(-1)
        return (codes - 8) * scale + zero
    bits = 8 if "int8" in provider else 4
    return quantize_weight(weight, bits, 32 if provider.endswith("g32") else 128).dequantize()


def test_providers_compute_the_layer():
    """A provider is only worth timing if it computes the layer: each one, built as the
    benchmark builds it (aten's packed formats included), against fp32 F.linear on the weight
    its format represents (relative error ~0.003 for bf16 activations, ~0.006 for the decode
    GEMVs' int8 activations), at 1, 5, 16 and 32 rows, and its weight bytes (the GB/s column)
    with scales counted."""
    cpp = backends()["quant_matmul"].get("cpp")
    k, n = 512, 384
    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(0)) * 0.02
    generator = torch.Generator().manual_seed(1)
    rows = [torch.randn(m, k, generator=generator) for m in (1, 5, 16, 32)]
    for provider in PROVIDERS:
        if provider.startswith("ours") and not (cpp and cpp.available):
            continue
        call, dtype, weight_bytes = _build.__wrapped__(provider, k, n, seed=0)
        represented = _represented_weight(provider, weight)
        for x in rows:
            if provider in ("ours-dense-bf16", "ours-decode-int8", "ours-decode-int4-g32"):
                if x.shape[0] > DECODE_MAX_ROWS:
                    continue
            got = call(x.to(dtype)).float()
            expected = F.linear(x, represented)
            assert got.shape == expected.shape, provider
            error = float((got - expected).norm() / expected.norm())
            assert error < 0.02, f"{provider}, {x.shape[0]} rows: relative error {error:.4f}"
        # GB/s counts every byte read: the codes, and the scales (and offsets) of int8 / int4
        data_bytes = {"fp32": 4 * n * k, "bf16": 2 * n * k, "int8": n * k, "int4": n * k // 2}
        kind = next(kind for kind in ("int4", "int8", "bf16", "fp32") if kind in provider)
        if kind in ("int8", "int4"):
            assert weight_bytes > data_bytes[kind], f"{provider}: scales not counted"
        else:
            assert weight_bytes == data_bytes[kind], provider
