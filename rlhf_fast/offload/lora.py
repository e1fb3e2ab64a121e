"""attach_offload_lora: peft LoRA adapters on an offloaded model, ready to train.

The base stays frozen and streamed; the adapters (and anything else trainable) are ordinary
resident tensors. peft creates each adapter on the device and dtype of the layer's weight,
which for a streamed layer is a meta placeholder, so adapters are created while the streamer
shows shaped CPU stand-ins (`OffloadedLM.stand_ins`). Compressed (int4/int8) layers are
QuantLinear: their LoRA layer is rlhf_fast.lora's QuantLoraLinear (qlora_config).
"""

from __future__ import annotations

from torch import nn

from rlhf_fast.models.load import LORA_TARGETS, LoraSettings, ModelLoadError
from rlhf_fast.offload.model import OffloadedLM
from rlhf_fast.quant.linear import QuantLinear, is_quantizable


def _projection_names(model: nn.Module) -> set[str]:
    return {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, QuantLinear) or is_quantizable(module)
    }


def lora_targets(model: nn.Module, settings: LoraSettings) -> tuple[str, ...]:
    """settings.targets, or the family's projections (models.load.LORA_TARGETS) present."""
    found = _projection_names(model)
    if settings.targets:
        missing = [t for t in settings.targets if t not in found]
        if missing:
            raise ModelLoadError(
                f"--lora-targets: {', '.join(missing)} not found in {type(model).__name__}"
            )
        return tuple(settings.targets)
    family = LORA_TARGETS.get(getattr(model.config, "model_type", None), ())
    targets = tuple(t for t in family if t in found)
    if not targets:
        excluded = {"lm_head", "score", "embed_out", "output", "classifier", "value_head"}
        targets = tuple(sorted(found - excluded))
    if not targets:
        raise ModelLoadError(f"no linear layers to put LoRA on in {type(model).__name__}")
    return targets


def lora_config(lm: OffloadedLM, settings: LoraSettings):
    """The peft LoraConfig for `lm` (QuantLinear-aware when the layers are compressed)."""
    from peft import LoraConfig
    from transformers.pytorch_utils import Conv1D

    from rlhf_fast.lora.qlora import qlora_config

    if settings.r <= 0:
        raise ModelLoadError(f"--lora-r must be a positive integer, got {settings.r}")
    targets = lora_targets(lm.model, settings)
    modules = lm.model.named_modules()
    transposed = any(isinstance(m, Conv1D) for n, m in modules if n.rsplit(".", 1)[-1] in targets)
    config = LoraConfig(
        r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
        target_modules=list(targets), fan_in_fan_out=transposed, bias="none",
    )  # fmt: skip
    return qlora_config(config)


def attach_offload_lora(lm: OffloadedLM, settings: LoraSettings):
    """`lm.model` wrapped by peft with trainable LoRA adapters (fused when settings.fused),
    the streamed base frozen, and training through streamed layers enabled."""
    with lm.stand_ins():
        wrapped = wrap_with_lora(lm, settings)
    lm.enable_training()
    return wrapped


def wrap_with_lora(lm: OffloadedLM, settings: LoraSettings):
    """The peft wrapping of attach_offload_lora alone: call it inside `lm.stand_ins()`."""
    from peft import get_peft_model

    wrapped = get_peft_model(lm.model, lora_config(lm, settings))
    if settings.fused:
        from rlhf_fast.lora import fuse

        fuse(wrapped)
    return wrapped
