"""GPU benchmarks of the weight-quantized matmul and the fused LoRA layer, beside what a GPU
user runs otherwise: cuBLAS bf16 F.linear, torch's own int4 kernel (aten._weight_int4pack_mm,
tinygemm) and peft's LoRA layer. Skipped without a GPU (GAE and rank_loss have their cuda
rows in their own files).

One timed call runs the op over a rotation of weight copies that together exceed the GPU's L2
(60 MB on an H200) several times, so each GEMV reads its weights from HBM, and a single
synchronize is amortized over the rotation. weight_bytes is the bytes of the whole rotation,
so the summary's GB/s column is the weight-read bandwidth, beside the measured copy bandwidth.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from peers import aten_int4_codes

from rlhf_fast import ops
from rlhf_fast.ops import backends
from rlhf_fast.quant import quantize_weight

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")

ROTATION_BYTES = 512 << 20  # ~8x an H200's L2
SHAPES = [(4096, 11008), (8192, 8192)]  # (in_features K, out_features N)
MS = [1, 16, 128, 2048]
PROVIDERS = ["bf16", "torch-int4pack-g128", "ours-int4-g128", "ours-int4-g32", "ours-int8"]


def _torch_int4pack(weight: torch.Tensor, group: int = 128):
    """tinygemm's CUDA format: the codes packed two per byte (high nibble first)."""
    codes, scale_and_zero = aten_int4_codes(weight, group)
    codes = codes.to(torch.uint8)
    packed_bytes = (codes[:, ::2] << 4 | codes[:, 1::2]).contiguous()
    return torch.ops.aten._convert_weight_to_int4pack(packed_bytes, 8), scale_and_zero


@functools.cache  # the copies serve every M
def _one_copy(provider: str, k: int, n: int, seed: int):
    """(call(x) -> y, bytes of weights read per call) for one weight copy on the GPU."""
    weight = torch.randn(n, k, device="cuda", generator=_generator(seed)) * 0.02
    if provider == "bf16":
        w16 = weight.bfloat16()
        return (lambda x: F.linear(x, w16)), w16.nbytes
    if provider == "torch-int4pack-g128":
        packed, scale_and_zero = _torch_int4pack(weight)
        return (
            lambda x: torch.ops.aten._weight_int4pack_mm(x, packed, 128, scale_and_zero)
        ), packed.nbytes + scale_and_zero.nbytes
    bits = 8 if provider == "ours-int8" else 4
    group = 32 if provider.endswith("g32") else 128
    q = quantize_weight(weight, bits, group).to("cuda")  # quantized on the GPU: it is torch ops
    return (lambda x: ops.quant_matmul(x, q)), q.nbytes


def _generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cuda").manual_seed(seed)


# Quick mode (--bench-quick) keeps the first shape at M=1 and M=16 (the decode GEMVs); the
# bigger shape and the prefill-sized M are bench_full.
QUANT_SIZES = [
    pytest.param(
        shape, m, id=f"K{shape[0]}-N{shape[1]}-M{m}",
        marks=pytest.mark.bench_full if i or m > 16 else (),
    )
    for i, shape in enumerate(SHAPES)
    for m in MS
]  # fmt: skip


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize(("shape", "m"), QUANT_SIZES)
def test_quant_matmul_cuda(measure, shape, m, provider):
    if provider.startswith("ours") and not backends("cuda")["quant_matmul"]["triton"].available:
        pytest.skip("no Triton on this GPU")
    k, n = shape
    try:
        first, weight_bytes = _one_copy(provider, k, n, 0)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        first(x)
    except (RuntimeError, NotImplementedError) as error:  # tinygemm is absent on some builds
        pytest.skip(f"{provider}: {str(error).splitlines()[0]}")
    copies = max(2, -(-ROTATION_BYTES // weight_bytes))
    calls = [first] + [_one_copy(provider, k, n, seed)[0] for seed in range(1, copies)]

    def rotation():
        for call in calls:
            call(x)

    measure(
        rotation,
        op="quant_matmul",
        device="cuda",
        size=f"M={m} K={k} N={n} x{copies}",
        provider=provider,
        weight_bytes=weight_bytes * copies,
    )


def test_read_bandwidth_cuda(measure):
    """The copy bandwidth of device memory (bytes read + written), the GEMVs' ceiling."""
    source = torch.ones(1 << 30, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    measure(
        lambda: target.copy_(source),
        op="read_bandwidth",
        device="cuda",
        size="copy of 1 GiB",
        provider="copy",
        bytes_moved=2 * source.nbytes,
    )


LORA_SIZES = [(4096, 4096, 4096, 16), (8192, 4096, 11008, 64)]  # (M tokens, K, N, r)
LORA_SIZE_PARAMS = [  # quick mode: the first size only
    pytest.param(s, id="M{}-K{}-N{}-r{}".format(*s), marks=pytest.mark.bench_full if i else ())
    for i, s in enumerate(LORA_SIZES)
]


def _peft_layer(weight, lora_a, lora_b, scaling):
    from peft import LoraConfig, get_peft_model
    from torch import nn

    n, k = weight.shape
    holder = nn.Sequential(nn.Linear(k, n, bias=False, dtype=weight.dtype, device="cuda"))
    config = LoraConfig(
        r=lora_a.shape[0], lora_alpha=scaling * lora_a.shape[0], target_modules=["0"]
    )
    layer = get_peft_model(holder, config, autocast_adapter_dtype=False).base_model.model[0]
    with torch.no_grad():
        layer.base_layer.weight.copy_(weight)
        layer.lora_A["default"].weight.copy_(lora_a)
        layer.lora_B["default"].weight.copy_(lora_b)
    return layer


@pytest.mark.parametrize("provider", ["triton", "peer", "base-gemms"])
@pytest.mark.parametrize("size", LORA_SIZE_PARAMS)
def test_lora_linear_cuda(measure, size, provider):
    """Forward + backward of one LoRA layer, bf16, frozen W; base-gemms is the floor (the two
    GEMMs a frozen layer needs: x W^T forward and dY W backward)."""
    if not backends("cuda")["lora_linear"]["triton"].available:
        pytest.skip("no Triton on this GPU")
    m, k, n, r = size
    g = _generator(0)
    x = torch.randn(m, k, device="cuda", generator=g).bfloat16().requires_grad_()
    weight = (torch.randn(n, k, device="cuda", generator=g) / k**0.5).bfloat16()
    lora_a = (torch.randn(r, k, device="cuda", generator=g) / k**0.5).bfloat16().requires_grad_()
    lora_b = (torch.randn(n, r, device="cuda", generator=g) / r**0.5).bfloat16().requires_grad_()
    grad_y = torch.randn(m, n, device="cuda", generator=g).bfloat16()
    if provider == "base-gemms":

        def step():
            torch.mm(x.detach(), weight.t())
            torch.mm(grad_y, weight)
    else:
        layer = _peft_layer(weight, lora_a, lora_b, 2.0) if provider == "peer" else None

        def step():
            x.grad = None
            if layer is None:
                y = ops.lora_linear(x, weight, None, lora_a, lora_b, 2.0, backend="triton")
            else:
                y = layer(x)
            y.backward(grad_y)

    measure(
        step,
        op="lora_linear bf16 fwd+bwd",
        device="cuda",
        size="M={} K={} N={} r={}".format(*size),
        provider=provider,
        tokens=m,
    )
