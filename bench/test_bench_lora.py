"""lora_linear: one LoRA linear layer, forward + backward, fused beside peft and the limit.

Providers per size (group "lora_linear cpu <size>"):
- "cpp": rlhf_fast.ops.lora_linear (the fused backend);
- "peer": peft's LoRA Linear (peft 0.21) on the same base weight and adapters;
- "base-gemms": the frozen layer's two GEMMs alone, x W^T and dy W: the limit (no LoRA);
- int4 groups: "peer" dequantizes the whole int4 weight once per step to x's dtype with
  QuantizedWeight.dequantize and runs peft's layer on it (what bitsandbytes-style QLoRA does;
  bitsandbytes even dequantizes twice, in forward and in backward, so this peer is the kinder
  one); "peer-fast-dequantize" is the same with our one-pass C++ decode of the whole weight
  (the strongest such baseline we have: it costs memory, not time).

One training step of a small Llama-shaped model (group "lora_train_step"): forward with
labels and backward, LoRA r=16 on every projection, fused ("cpp") vs peft ("peer"), in fp32
and in bf16, and QLoRA (int4 base) fused. Memory there is the model's
parameter and buffer bytes plus the bytes saved for backward.

Memory is reported as the bytes each provider keeps alive for backward (found with
torch.autograd.graph.saved_tensors_hooks: distinct storages, the input x included, weights
that exist anyway left out, a dequantized copy made for the step counted): on CPU
there is no allocator peak counter, and this is the part of training memory a LoRA layer
decides. It goes into each benchmark's extra_info ("saved_bytes") and is printed.
"""

from __future__ import annotations

import itertools
import statistics
import time

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from rlhf_fast import lora, ops
from rlhf_fast.ops.lora_linear import dequantize_rows
from rlhf_fast.quant import quantize_weight

QUICK_SIZES = [(64, 256, 256, 16)]  # (M, K, N, r)
FULL_SIZES = [
    (m, k, n, r)
    for m, (k, n), r in itertools.product((512, 2048), ((4096, 4096), (4096, 11008)), (16, 64))
]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SIZE_PARAMS = [pytest.param(s, id="M{}-K{}-N{}-r{}".format(*s)) for s in QUICK_SIZES] + [
    pytest.param(s, id="M{}-K{}-N{}-r{}".format(*s), marks=pytest.mark.bench_full)
    for s in FULL_SIZES
]
SCALING = 2.0


def _saved_bytes(fn, existing=()) -> int:
    """Bytes of the distinct storages autograd saves for backward during fn(), leaving out
    those of `existing` tensors (weights that are alive anyway)."""
    storages = {}
    skip = {t.untyped_storage().data_ptr() for t in existing}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def _peft_layer(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor) -> nn.Module:
    n, k = weight.shape
    holder = nn.Sequential(nn.Linear(k, n, bias=False, dtype=weight.dtype))
    config = LoraConfig(
        r=lora_A.shape[0], lora_alpha=SCALING * lora_A.shape[0], target_modules=["0"]
    )
    model = get_peft_model(holder, config, autocast_adapter_dtype=False)
    layer = model.base_model.model[0]
    with torch.no_grad():
        layer.base_layer.weight.copy_(weight)
        layer.lora_A["default"].weight.copy_(lora_A)
        layer.lora_B["default"].weight.copy_(lora_B)
    return layer


def _inputs(m, k, n, r, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(n, k, generator=g) / k**0.5).to(dtype)
    lora_A = (torch.randn(r, k, generator=g) / k**0.5).to(dtype).requires_grad_()
    lora_B = (torch.randn(n, r, generator=g) / r**0.5).to(dtype).requires_grad_()
    grad_y = torch.randn(m, n, generator=g).to(dtype)
    return x, weight, lora_A, lora_B, grad_y


def _step(forward, x, params, grad_y):
    def run():
        for t in (x, *params):
            t.grad = None
        forward().backward(grad_y)

    return run


def _providers(weight, x, lora_A, lora_B, grad_y, quantized):
    dense = weight.dequantize(x.dtype) if quantized else weight
    peft_layer = _peft_layer(dense, lora_A, lora_B)
    peft_params = [p for p in peft_layer.parameters() if p.requires_grad]

    def peer():
        if quantized:  # dequantize the whole weight each step, then peft on it
            peft_layer.base_layer.weight.data = weight.dequantize(x.dtype)
        return peft_layer(x)

    def peer_fast_dequantize():
        peft_layer.base_layer.weight.data = dequantize_rows(weight, 0, weight.shape[0], x.dtype)
        return peft_layer(x)

    providers = {
        "cpp": _step(
            lambda: ops.lora_linear(x, weight, None, lora_A, lora_B, SCALING, backend="cpp"),
            x, (lora_A, lora_B), grad_y,
        ),
        "peer": _step(peer, x, peft_params, grad_y),
    }  # fmt: skip
    # Tensors alive anyway, whose storages saved for backward cost nothing: the weights as
    # they are before the call (the int4 peers' fresh dense copies are counted).
    existing = [weight] if not quantized else []
    providers["cpp"].existing = existing + [lora_A, lora_B]
    providers["peer"].existing = existing + list(peft_layer.parameters())
    if quantized:
        providers["peer-fast-dequantize"] = _step(peer_fast_dequantize, x, peft_params, grad_y)
        providers["peer-fast-dequantize"].existing = list(peft_layer.parameters())
    else:
        frozen = weight.detach()

        def base_gemms():
            torch.mm(x.detach(), frozen.t())
            torch.mm(grad_y, frozen)

        providers["base-gemms"] = base_gemms
    return providers


@pytest.mark.parametrize("provider", ["cpp", "peer", "base-gemms"])
@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
@pytest.mark.parametrize("size", SIZE_PARAMS)
def test_lora_linear(measure, benchmark, size, dtype, provider):
    m, k, n, r = size
    x, weight, lora_A, lora_B, grad_y = _inputs(m, k, n, r, DTYPES[dtype])
    fn = _providers(weight, x, lora_A, lora_B, grad_y, quantized=False)[provider]
    if provider != "base-gemms":
        benchmark.extra_info["saved_bytes"] = _saved_bytes(fn, fn.existing)
        print(f"\n{provider} {dtype} {size}: saved for backward {_mb(benchmark)} MB")
    measure(fn, op=f"lora_linear {dtype}", device="cpu", size=_name(size), provider=provider)


@pytest.mark.parametrize("provider", ["cpp", "peer", "peer-fast-dequantize"])
@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
@pytest.mark.parametrize("size", SIZE_PARAMS)
def test_lora_linear_int4(measure, benchmark, size, dtype, provider):
    m, k, n, r = size
    x, weight, lora_A, lora_B, grad_y = _inputs(m, k, n, r, DTYPES[dtype])
    qweight = quantize_weight(weight.float(), 4, 128)
    fn = _providers(qweight, x, lora_A, lora_B, grad_y, quantized=True)[provider]
    benchmark.extra_info["saved_bytes"] = _saved_bytes(fn, fn.existing)
    print(f"\nint4 {provider} {dtype} {size}: saved for backward {_mb(benchmark)} MB")
    measure(fn, op=f"lora_linear_int4 {dtype}", device="cpu", size=_name(size), provider=provider)


def _name(size) -> str:
    return "M{}-K{}-N{}-r{}".format(*size)


def _mb(benchmark) -> str:
    return f"{benchmark.extra_info['saved_bytes'] / 2**20:.1f}"


@pytest.mark.parametrize("quantized", [False, True], ids=["dense", "int4"])
def test_providers_agree(quantized):
    """The timed providers compute the same thing (a benchmark of a wrong peer is no baseline)."""
    x, weight, lora_A, lora_B, grad_y = _inputs(48, 256, 96, 8, torch.float32)
    w = quantize_weight(weight, 4, 128) if quantized else weight
    providers = _providers(w, x, lora_A, lora_B, grad_y, quantized)
    peer_params = providers["peer"].existing[-2:]  # the peft layer's lora_A, lora_B weights
    timed = [name for name in providers if name != "base-gemms"]  # base-gemms: the limit
    grads = {}
    for name in timed:
        providers[name]()
        adapters = (lora_A, lora_B) if name == "cpp" else peer_params
        grads[name] = [t.grad.clone() for t in (x, *adapters)]
    for name in timed[1:]:  # dx, d lora_A and d lora_B of every provider equal the fused op's
        for got, expected in zip(grads[name], grads["cpp"], strict=True):
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


TRAIN_SIZES = [
    pytest.param((64, 2, 64), id="h64-l2-t64"),
    pytest.param((512, 4, 512), id="h512-l4-t512", marks=pytest.mark.bench_full),
]
TRAIN_PROVIDERS = ["cpp", "peer", "cpp-int4"]


def _train_model(hidden, layers, provider, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=1024, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
        num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=8,
    )  # fmt: skip
    model = LlamaForCausalLM(config).to(dtype)
    projections = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lora_config = LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.05, init_lora_weights=False,
        target_modules=projections,
    )  # fmt: skip
    if provider == "cpp-int4":
        return lora.prepare_qlora(model, bits=4, group_size=128, lora_config=lora_config)
    model = get_peft_model(model, lora_config)
    if provider == "cpp":
        lora.fuse(model)
    return model


def _model_bytes(model) -> int:
    tensors = itertools.chain(model.parameters(), model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("provider", TRAIN_PROVIDERS)
@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
@pytest.mark.parametrize("size", TRAIN_SIZES)
def test_lora_train_step(measure, benchmark, size, dtype, provider):
    hidden, layers, tokens = size
    model = _train_model(hidden, layers, provider, DTYPES[dtype]).train()
    ids = torch.randint(0, 1024, (2, tokens // 2), generator=torch.Generator().manual_seed(0))

    def step():
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()

    saved = _saved_bytes(step, [*model.parameters(), *model.buffers()])
    weights = _model_bytes(model)
    benchmark.extra_info.update(saved_bytes=saved, model_bytes=weights)
    print(
        f"\ntrain step {provider} {dtype} {size}: weights {weights / 2**20:.1f} MB + saved for "
        f"backward {saved / 2**20:.1f} MB = {(weights + saved) / 2**20:.1f} MB"
    )
    name = "h{}-l{}-t{}".format(*size)
    measure(step, op=f"lora_train_step {dtype}", device="cpu", size=name, provider=provider)


# --------------------------------------------------------------------------------------------
# Contention-proof ratios: one intra-op thread, CPU time of the calling thread
# --------------------------------------------------------------------------------------------

RATIO_SIZES = [(512, 4096, 4096, 16), (2048, 4096, 11008, 64)]
RATIO_ROUNDS = 5


def _thread_time_medians(providers: dict, rounds: int) -> dict[str, float]:
    """Median CPU seconds of the calling thread per call, the providers taking turns.

    On a shared 2-core machine wall-clock medians of multi-threaded torch ops measure the
    scheduler (each parallel region waits for a core); the CPU time of a single thread does
    not, so it gives the ratios between providers even while others run."""
    samples = {name: [] for name in providers}
    for fn in providers.values():
        fn()  # warm-up
    for _ in range(rounds):
        for name, fn in providers.items():
            start = time.thread_time()
            fn()
            samples[name].append(time.thread_time() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


@pytest.mark.bench_full
@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
@pytest.mark.parametrize("size", RATIO_SIZES, ids=_name)
def test_lora_linear_one_thread_ratios(size, dtype):
    m, k, n, r = size
    x, weight, lora_A, lora_B, grad_y = _inputs(m, k, n, r, DTYPES[dtype])
    qweight = quantize_weight(weight.float(), 4, 128)
    dense = _providers(weight, x, lora_A, lora_B, grad_y, quantized=False)
    int4 = _providers(qweight, x, lora_A, lora_B, grad_y, quantized=True)
    providers = {
        "fused": dense["cpp"], "peft": dense["peer"], "base-gemms": dense["base-gemms"],
        "int4-fused": int4["cpp"], "int4-dequantize+peft": int4["peer"],
        "int4-fast-dequantize+peft": int4["peer-fast-dequantize"],
    }  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        medians = _thread_time_medians(providers, RATIO_ROUNDS)
    finally:
        torch.set_num_threads(threads)
    fused, int4_fused = medians["fused"], medians["int4-fused"]
    print(f"\n{_name(size)} {dtype}, one thread, median CPU time per forward+backward:")
    for name, seconds in medians.items():
        print(f"  {name:26s} {seconds * 1e3:9.1f} ms")
    print(f"  fused / base-gemms = {fused / medians['base-gemms']:.3f}")
    print(f"  peft / fused = {medians['peft'] / fused:.3f}")
    print(f"  int4: dequantize+peft / fused = {medians['int4-dequantize+peft'] / int4_fused:.3f}")
    fast_dequantize = medians["int4-fast-dequantize+peft"]
    print(f"  int4: fast-dequantize+peft / fused = {fast_dequantize / int4_fused:.3f}")


@pytest.mark.bench_full
def test_lora_train_step_one_thread_ratios():
    """One training step of the h512-l4-t512 model per provider and dtype, one thread."""
    ids = torch.randint(0, 1024, (2, 256), generator=torch.Generator().manual_seed(0))
    providers = {}
    for dtype, provider in itertools.product(DTYPES, TRAIN_PROVIDERS):
        model = _train_model(512, 4, provider, DTYPES[dtype]).train()

        def step(model=model):
            model.zero_grad(set_to_none=True)
            model(input_ids=ids, labels=ids).loss.backward()

        providers[f"{provider} {dtype}"] = step
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        medians = _thread_time_medians(providers, 3)
    finally:
        torch.set_num_threads(threads)
    print("\nh512-l4-t512 LoRA r=16 training step, one thread, median CPU time:")
    for name, seconds in medians.items():
        print(f"  {name:16s} {seconds * 1e3:8.1f} ms")
    for dtype in DTYPES:
        fused = medians[f"cpp {dtype}"]
        print(f"  {dtype}: peft / fused = {medians[f'peer {dtype}'] / fused:.3f}")
    print(f"  fp32 peft / bf16 fused = {medians['peer fp32'] / medians['cpp bf16']:.3f}")
