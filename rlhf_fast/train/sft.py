"""Supervised fine-tuning stage: next-token loss on the answer tokens (and the EOS) only.

The labels come from the data layer (`encode_sft`): -100 on prompt and padding, so the loss is
the mean cross-entropy over answer tokens. With `pack`, several examples share a row (position
ids restart per example; the model must keep them apart, checked with `packing_isolates`).

Export: RUN_DIR/adapter/ (a peft adapter + the tokenizer: plain peft loads it onto the base
model) and, with merge, RUN_DIR/merged/ (LoRA merged in: plain transformers loads it). With
full_finetune every weight trains (no adapter) and RUN_DIR/merged/ is the model.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from rlhf_fast.models.load import LoraSettings, attach_lora, load_causal_lm
from rlhf_fast.quant.linear import QuantLinear
from rlhf_fast.train.config import ConfigError, TrainConfig
from rlhf_fast.train.data import (
    IGNORE_INDEX,
    SFTCollator,
    encode_sft,
    packing_isolates,
    read_sft,
    split_held_out,
)
from rlhf_fast.train.loop import Stage

ADAPTER_DIR = "adapter"
MERGED_DIR = "merged"
EVAL_BATCH = 8


def read_data(config: TrainConfig) -> tuple[TrainConfig, list, list]:
    """(config, train, held_out); DataError on the first bad line."""
    return (config, *split_held_out(read_sft(config.data), config.eval_fraction, config.seed))


def token_loss(model, batch: dict[str, torch.Tensor], reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of each labelled token given the tokens before it (labels -100 skipped)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False).logits
    labels = batch["labels"][:, 1:]
    logits = logits[:, :-1].float()
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction=reduction,
    )


def _tokens(batch: dict[str, torch.Tensor]) -> int:
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


def build(config: TrainConfig, tokenizer, train: list, held_out: list, device: str) -> Stage:
    """Encode the examples, load the model with LoRA and return the Stage for the loop."""
    encoded = [encode_sft(tokenizer, example, config.max_length) for example in train]
    held_encoded = [encode_sft(tokenizer, example, config.max_length) for example in held_out]
    if config.offload:  # the frozen base streams from disk (rlhf_fast/offload/training.py)
        from rlhf_fast.offload.training import open_for_training

        base = open_for_training(config, rows=config.batch_size).model
    else:
        base = load_causal_lm(config.model, dtype=config.dtype, device=device, quant=config.quant)
    if config.pack and not packing_isolates(base):
        raise ConfigError(
            f"--pack: {type(base).__name__} would let packed examples attend to each other"
        )
    torch.manual_seed(config.seed)
    if config.offload:
        from rlhf_fast.offload.lora import attach_offload_lora

        model = attach_offload_lora(base.rlhf_fast_offload, lora_settings(config))
    elif config.full_finetune:
        model = base.requires_grad_(True)
    else:
        model = attach_lora(base, lora_settings(config))
    pad = tokenizer.pad_token_id
    collate = SFTCollator(pad, pack_to=config.max_length if config.pack else None)
    eval_collate = SFTCollator(pad)

    def loss(batch):
        return token_loss(model, batch), {"tokens": _tokens(batch)}

    def evaluate() -> dict[str, float]:
        total, count = 0.0, 0
        with torch.no_grad():
            for start in range(0, len(held_encoded), EVAL_BATCH):
                batch = eval_collate(held_encoded[start : start + EVAL_BATCH])
                batch = {k: v.to(device) for k, v in batch.items()}
                total += token_loss(model, batch, reduction="sum").item()
                count += label_count(batch)
        return {"loss": total / max(count, 1)}

    return Stage(
        "sft", model, encoded, collate, loss, evaluate if held_encoded else None, label_count
    )


def label_count(batch: dict[str, torch.Tensor]) -> int:
    """The tokens token_loss averages over: labels at the positions the model predicts."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def merge_for_export(model, adapter_dir: Path, dtype: str):
    """The dense model with the adapter merged: peft's merge, or for a quantized (--quant)
    base, whose int4/int8 codes cannot absorb it, the saved adapter merged into a fresh dense
    copy of the base it names (an adapter trained with QLoRA applies to the dense model)."""
    if any(isinstance(m, QuantLinear) for m in model.modules()):
        return load_causal_lm(adapter_dir, dtype=dtype)
    return model.merge_and_unload()


def lora_settings(config: TrainConfig) -> LoraSettings:
    targets = tuple(config.lora_targets) if config.lora_targets else None
    return LoraSettings(
        config.lora_r, config.lora_alpha, config.lora_dropout, targets, config.lora_fused
    )


def export(model, tokenizer, run_dir: Path, config: TrainConfig) -> dict[str, Path]:
    """Write adapter/ (and merged/ with config.merge); returns {"adapter": ..., "merged": ...}.
    A full fine-tune has no adapter: merged/ is the model itself."""
    if not hasattr(model, "peft_config"):
        paths = {"merged": run_dir / MERGED_DIR}
        model.save_pretrained(paths["merged"], safe_serialization=True)
        tokenizer.save_pretrained(paths["merged"])
        return paths
    paths = {"adapter": run_dir / ADAPTER_DIR}
    # The adapter names the directory it was trained on (which may itself be an adapter dir).
    model.peft_config["default"].base_model_name_or_path = str(Path(config.model).resolve())
    model.save_pretrained(paths["adapter"], safe_serialization=True)
    tokenizer.save_pretrained(paths["adapter"])
    if config.merge:
        paths["merged"] = run_dir / MERGED_DIR
        merged = merge_for_export(model, paths["adapter"], config.dtype)
        merged.save_pretrained(paths["merged"], safe_serialization=True)
        tokenizer.save_pretrained(paths["merged"])
    return paths
