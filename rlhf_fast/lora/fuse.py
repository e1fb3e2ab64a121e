"""fuse / unfuse: peft LoRA Linear layers run ops.lora_linear for forward and backward.

The layer stays peft's own module (same parameters, names, state_dict, adapter switching,
`disable_adapter()`, save/load); only its forward is replaced, on the instance, by one that
calls the fused op with the active adapter's A, B, scaling and dropout probability. Calls the
fused op does not cover (several active adapters, DoRA and other LoRA variants, merged
adapters, `adapter_names=` mixed batches, lora_bias, a trainable base weight, a forward under
torch.autocast, ...) run peft's own forward, and a warning says so once per reason. Adapters
disabled: peft's forward too (the base layer alone), which is what a PPO reference model
through disable_adapter() needs.
"""

from __future__ import annotations

import os
import types
import warnings

import torch
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn

from rlhf_fast import ops
from rlhf_fast.ops import _dispatch
from rlhf_fast.quant.linear import QuantLinear, dense_weight, is_quantizable
from rlhf_fast.quant.weight import QuantizedWeight

_FUSED_FLAG = "_rlhf_fast_lora_fused"
_warned: set[str] = set()


def _warn_once(reason: str) -> None:
    if reason in _warned:
        return
    _warned.add(reason)
    warnings.warn(
        f"rlhf_fast.lora: {reason}: those LoRA layers run peft's unfused forward",
        stacklevel=3,
    )


def _base_weight(layer: LoraLinear):
    """(weight, bias, why not) of the layer's frozen base: dense [out, in] or QuantizedWeight."""
    base = layer.get_base_layer()
    if isinstance(base, QuantLinear):
        return base.qweight, base.bias, None
    if not is_quantizable(base):
        return None, None, f"base layer type {type(base).__name__} is not covered"
    weight = dense_weight(base)  # a transposed view for GPT-2's Conv1D: no copy
    if weight.requires_grad:
        return None, None, "a trainable base weight (the fused op gives the base no gradient)"
    return weight, base.bias, None


def _uncovered(layer: LoraLinear, args, kwargs) -> str | None:
    """Why this call must run peft's forward, or None; "" means silently (nothing to warn)."""
    if layer.disable_adapters:
        return ""
    if args or kwargs:
        return "extra forward arguments (e.g. adapter_names= mixed batches)"
    if layer.merged:
        return "merged adapters"
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if not active:
        return ""
    if len(active) > 1:
        return "several active adapters"
    return adapter_unsupported(layer, active[0])


def adapter_unsupported(layer: LoraLinear, adapter: str) -> str | None:
    """Why `adapter` of `layer` is not plain LoRA (base + B A x * scaling), or None."""
    if adapter in layer.lora_variant:
        return "DoRA or another LoRA variant"
    if layer.lora_bias.get(adapter, False):
        return "lora_bias=True"
    if not isinstance(layer.lora_dropout[adapter], (nn.Dropout, nn.Identity)):
        return "a custom dropout module"
    return None


def peft_is_faster_here(x: torch.Tensor) -> bool:
    """CUDA inputs run peft's forward unless RLHF_FAST_BACKEND=triton asks for the fused op.

    Measured on an H200 (bench/test_bench_gpu.py, bf16, forward + backward): the Triton fused
    layer took 1.25 ms against peft's 0.77 ms at M=4096, 4096x4096, r=16, and 5.9 against
    2.8 ms at M=8192, 4096x11008, r=64: cuBLAS's GEMMs beat the untuned kernel's epilogue
    fusion. On CPU the fused op wins (see bench/test_bench_lora.py)."""
    return x.is_cuda and os.environ.get(_dispatch.ENV_VAR) != "triton"


def fused_adapter_call(layer: LoraLinear, x: torch.Tensor, adapter: str):
    """(output, None) of `layer` with `adapter` through ops.lora_linear, or (None, why not):
    why is "" where peft's forward is simply the better path (nothing to warn about)."""
    reason = None
    if torch.is_autocast_enabled(x.device.type):
        # autocast would hand the op's GEMMs operands of two dtypes (a RuntimeError)
        reason = "torch.autocast is on"
    elif peft_is_faster_here(x):
        reason = ""  # silently: peft's forward is the better path there, not a limitation
    weight = bias = None
    if reason is None:
        weight, bias, reason = _base_weight(layer)
    if reason is None and not isinstance(weight, QuantizedWeight) and weight.dtype != x.dtype:
        reason = "input dtype differs from the base weight's"
    if reason is not None:
        return None, reason
    dropout = layer.lora_dropout[adapter]
    p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
    out = ops.lora_linear(
        x,
        weight,
        bias,
        layer.lora_A[adapter].weight,
        layer.lora_B[adapter].weight,
        layer.scaling[adapter],
        dropout=p,
    )
    return out, None


def fused_rows_call(layer: LoraLinear, x: torch.Tensor, blocks) -> torch.Tensor | None:
    """`layer` on x [rows, ..., in] whose row blocks (adapter or None, first row, end row) each
    run their own adapter, through one ops.lora_linear_by_rows call (one base GEMM over every
    row, each way); None where that op does not cover the call (dropout, autocast, CUDA
    inputs, a base the fused op does not take), for the caller's per-block path."""
    if torch.is_autocast_enabled(x.device.type) or peft_is_faster_here(x):
        return None
    weight, bias, reason = _base_weight(layer)
    if reason is not None or (not isinstance(weight, QuantizedWeight) and weight.dtype != x.dtype):
        return None
    x2d = x.reshape(-1, x.shape[-1])
    unit = x2d.shape[0] // blocks[-1][2]  # positions per row where the input has them
    rows = []
    for adapter, start, stop in blocks:
        if adapter is None or adapter not in layer.lora_A:
            continue  # the base alone
        dropout = layer.lora_dropout[adapter]
        if isinstance(dropout, nn.Dropout) and dropout.training and dropout.p > 0:
            return None
        rows.append(ops.LoraRows(start * unit, stop * unit, layer.lora_A[adapter].weight,
                                 layer.lora_B[adapter].weight, layer.scaling[adapter]))  # fmt: skip
    out = ops.lora_linear_by_rows(x2d, weight, bias, rows)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def _fused_forward(self: LoraLinear, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    reason = _uncovered(self, args, kwargs)
    if reason is None:
        adapter = next(name for name in self.active_adapters if name in self.lora_A)
        out, reason = fused_adapter_call(self, x, adapter)
        if reason is None:
            return out
    if reason:
        _warn_once(reason)
    return type(self).forward(self, x, *args, **kwargs)


def _lora_linear_layers(model: nn.Module):
    for module in model.modules():
        if isinstance(module, LoraLinear):
            yield module


def fuse(model: nn.Module) -> int:
    """Make every peft LoRA Linear / Conv1D layer of `model` use the fused op; returns how many.

    Idempotent. Training, eval, adapter switching and saving work as before; `unfuse` undoes.
    """
    count = 0
    for layer in _lora_linear_layers(model):
        layer.forward = types.MethodType(_fused_forward, layer)
        setattr(layer, _FUSED_FLAG, True)
        count += 1
    return count


def unfuse(model: nn.Module) -> int:
    """Give every fused layer of `model` back peft's own forward; returns how many."""
    count = 0
    for layer in _lora_linear_layers(model):
        if layer.__dict__.pop(_FUSED_FLAG, False):
            layer.__dict__.pop("forward", None)
            count += 1
    return count


def is_fused(layer: nn.Module) -> bool:
    return bool(layer.__dict__.get(_FUSED_FLAG, False))
