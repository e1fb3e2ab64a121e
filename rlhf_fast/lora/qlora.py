"""QLoRA: LoRA adapters trained on a base quantized to int4 / int8 by rlhf_fast.quant.

peft does not know QuantLinear, so its LoRA layer for it is registered through peft's custom
module API (`LoraConfig._register_custom_module`). The layer is peft's own LoRA Linear with
the two things that read a dense base weight replaced (the layer's size and device); its
adapter tensors are named and saved as for any nn.Linear, so an adapter trained here loads
with plain peft onto the dense model (`PeftModel.from_pretrained`), and back onto a quantized
one with `PeftModel.from_pretrained(model, dir, config=qlora_config(...))`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn

from rlhf_fast.lora.fuse import fuse
from rlhf_fast.quant.linear import QuantLinear
from rlhf_fast.quant.model import DEFAULT_SKIP, quantize_model


class QuantLoraLinear(LoraLinear):
    """peft's LoRA Linear over a QuantLinear base (unfused forward: base(x) + B A x * s)."""

    def _get_in_out_features(self, module: nn.Module):
        return module.in_features, module.out_features

    def _get_base_layer_device_and_dtype(self, base_layer: nn.Module):
        # The adapters follow the base's device but keep their own float dtype.
        return base_layer.qdata.device, None

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        raise NotImplementedError(
            "cannot merge a LoRA adapter into a quantized weight: load the adapter onto the "
            "dense model with peft and merge there"
        )

    def get_delta_weight(self, adapter: str):
        return self.lora_B[adapter].weight @ self.lora_A[adapter].weight * self.scaling[adapter]


def _quant_linear_names(model: nn.Module) -> list[str]:
    """Last name components of `model`'s QuantLinear layers, the output layer left out (as
    peft's "all-linear" leaves it out: a quantize_model(skip=()) quantizes lm_head too)."""
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if get_output is not None else None
    modules = model.named_modules()
    return sorted(
        {
            name.rpartition(".")[2]
            for name, m in modules
            if isinstance(m, QuantLinear) and m is not output
        }
    )


def qlora_config(lora_config: LoraConfig, model: nn.Module | None = None) -> LoraConfig:
    """A copy of `lora_config` whose LoRA layers can wrap QuantLinear. "all-linear" targets (or
    None) become the names of `model`'s QuantLinear layers but its output layer (peft's
    "all-linear" only sees nn.Linear)."""
    targets = lora_config.target_modules
    if model is not None and (targets is None or targets == "all-linear"):
        names = _quant_linear_names(model)
        if not names:
            raise ValueError("model has no QuantLinear layer to attach LoRA adapters to")
        lora_config = dataclasses.replace(lora_config, target_modules=names)
    else:
        lora_config = dataclasses.replace(lora_config)
    lora_config._register_custom_module({QuantLinear: QuantLoraLinear})
    return lora_config


def prepare_qlora(
    model: nn.Module,
    bits: int = 4,
    group_size: int = 128,
    lora_config: LoraConfig | None = None,
    *,
    skip: Iterable[str] = DEFAULT_SKIP,
    fused: bool = True,
) -> PeftModel:
    """Quantize `model`'s Linear / Conv1D layers (not those matching `skip`) to int`bits` in
    place, attach LoRA adapters (default: r=16, alpha=32, dropout=0.05 on every quantized
    layer) and, with fused=True, run them through the fused op. Returns the peft model; only
    the adapters are trainable."""
    quantize_model(model, bits=bits, group_size=group_size, skip=skip)
    if lora_config is None:
        lora_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05)
    peft_model = get_peft_model(model, qlora_config(lora_config, model))
    if fused:
        fuse(peft_model)
    return peft_model
