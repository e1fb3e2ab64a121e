"""adapters_by_rows: one forward pass of a peft model in which each block of batch rows runs its
own LoRA adapter, or none.

PPO's roles share one frozen base and differ only in their adapters: the policy and the critic
are trained on the same sequences, every minibatch. Run one after the other, each pays the
whole per-layer cost of a pass (every norm, attention, MLP and their autograd nodes, at half
the rows); stacked as one batch of twice the rows, they pay it once, and the base's GEMMs run
at twice the M. Measured on the PPO bench's policy (hidden 256, 4 layers, 8 x 64 tokens,
forward + backward, 2 threads): 10-17% less time than the two passes in fp32, 15-25% in bf16.

Inside `with adapters_by_rows(model, [("default", 8), ("critic", 8)]):` every LoRA layer of
`model` computes rows 0-7 with adapter "default" and rows 8-15 with "critic" (None: the base
alone, as under disable_adapter()), whatever adapter is active. Rows are the first dimension of
each layer's input, or batch and positions flattened batch-major (OPT's MLP). A fused layer
(lora.fuse) runs all its blocks as one `ops.lora_linear_by_rows` call where that op covers
them (no dropout: PPO's models have none): one base GEMM over every row each way, each block's
low-rank term added in place (PPO iteration in bf16 -3.7%, alternating with the per-block
path below; fp32 within noise). Otherwise each block's rows run the fused op where it covers
them (`fuse.fused_adapter_call`: the fused backward is kept), else peft's own formula. Rows
are independent in every other layer of a decoder, so each block's outputs are those of a pass
with its adapter active, up to the rounding of GEMMs of another M. Layers an adapter does not
sit on give its rows the base alone, as peft does.

peft's own `adapter_names=` mixed batches do the same for inference only (peft refuses them in
training mode) and through its unfused forward.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence

import torch
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn

from rlhf_fast.lora.fuse import adapter_unsupported, fused_adapter_call, fused_rows_call, is_fused


def lora_layers(model: nn.Module) -> list[LoraLinear]:
    """The peft LoRA layers of `model`, in module order."""
    return [module for module in model.modules() if isinstance(module, LoraLinear)]


def unsupported_reason(
    model: nn.Module, adapters: Sequence[str | None], layers: Sequence[LoraLinear] | None = None
) -> str | None:
    """Why `model` cannot run these adapters by rows (adapters_by_rows would raise), or None;
    layers: the model's LoRA layers, where the caller keeps them (see adapters_by_rows)."""
    layers = lora_layers(model) if layers is None else layers
    if not layers:
        return "the model has no LoRA layers"
    for layer in layers:
        if layer.merged:
            return "merged adapters"
        for adapter in adapters:
            if adapter is not None and adapter in layer.lora_A:
                reason = adapter_unsupported(layer, adapter)
                if reason is not None:
                    return f"adapter {adapter!r}: {reason}"
    return None


def _adapter_rows(layer: LoraLinear, x: torch.Tensor, adapter: str, fused: bool) -> torch.Tensor:
    """`layer` on rows x with `adapter`: the fused op where it covers them, else peft's
    formula (base, then the low-rank term in the adapter's dtype, the sum in the base's)."""
    if fused:
        out, _ = fused_adapter_call(layer, x, adapter)
        if out is not None:
            return out
    result = layer.base_layer(x)
    lora_a, lora_b = layer.lora_A[adapter], layer.lora_B[adapter]
    low_rank = lora_b(lora_a(layer.lora_dropout[adapter](x.to(lora_a.weight.dtype))))
    return (result + low_rank * layer.scaling[adapter]).to(result.dtype)


def _grouped_forward(
    self: LoraLinear, x: torch.Tensor, *args, blocks, fused: bool, **kwargs
) -> torch.Tensor:
    if args or kwargs:
        raise ValueError("adapters_by_rows: a LoRA layer was called with extra arguments")
    rows = blocks[-1][2]
    # [rows, ...], or [rows * positions, features] where a model flattens batch and positions
    # before a linear layer (OPT's MLP): each row's positions are then consecutive
    per_row = x.shape[0] // rows if x.dim() >= 2 and x.shape[0] % rows == 0 else 0
    if per_row == 0 or (per_row > 1 and x.dim() != 2):
        raise ValueError(
            f"adapters_by_rows: the plan covers {rows} rows, but a LoRA layer got input of "
            f"shape {tuple(x.shape)} (rows are the first dimension)"
        )
    if fused:
        out = fused_rows_call(self, x, blocks)
        if out is not None:
            return out
    outputs = []
    for adapter, start, stop in blocks:
        part = x[start * per_row : stop * per_row]
        if adapter is None or adapter not in self.lora_A:
            outputs.append(self.base_layer(part))
        else:
            outputs.append(_adapter_rows(self, part, adapter, fused))
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


@contextlib.contextmanager
def adapters_by_rows(
    model: nn.Module,
    plan: Sequence[tuple[str | None, int]],
    layers: Sequence[LoraLinear] | None = None,
) -> Iterator[None]:
    """Inside, the batch rows of every forward of `model` run the adapters of `plan`: a list
    of (adapter name or None for the base alone, number of rows), in row order. Every input
    must have exactly sum(rows) rows. Raises ValueError where `unsupported_reason` names one.
    layers: the model's LoRA layers (`lora_layers(model)`), for a caller that keeps the list
    between calls: finding them walks every module twice a call (~1 ms a PPO step of the
    bench's 4-layer policy, which enters this five times a step)."""
    if not plan or any(count < 1 for _, count in plan):
        raise ValueError(f"adapters_by_rows: the plan needs blocks of >= 1 rows, got {plan!r}")
    layers = lora_layers(model) if layers is None else list(layers)
    reason = unsupported_reason(model, [adapter for adapter, _ in plan], layers)
    if reason is not None:
        raise ValueError(f"adapters_by_rows: {reason}")
    blocks, start = [], 0
    for adapter, count in plan:
        blocks.append((adapter, start, start + count))
        start += count
    saved = [layer.__dict__.get("forward") for layer in layers]
    for layer in layers:
        layer.forward = functools.partial(
            _grouped_forward, layer, blocks=tuple(blocks), fused=is_fused(layer)
        )
    try:
        yield
    finally:
        for layer, forward in zip(layers, saved, strict=True):
            if forward is None:
                layer.__dict__.pop("forward", None)
            else:
                layer.forward = forward
