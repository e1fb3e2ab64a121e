"""Reward model: a causal LM's decoder plus a scalar head on the last real token of each row.

`RewardModel(backbone)` wraps any decoder that returns `last_hidden_state` (LlamaModel,
GPT2Model, ..., or the same wrapped by peft). The score of a row is
`value_head(hidden[last real token])`, where the last real token is the last position whose
attention_mask is 1, so right and left padding give the same scores (position ids are derived
from the mask for the models that take them). The head is kept in fp32 whatever the backbone's
dtype; scores are fp32 [N].

Reward-model directory (what `rlhf-fast train --stage rm` exports and a PPO stage loads with
`load_reward_model`):

    reward_config.json       {"format": "rlhf_fast.reward_model", "version": 1,
                              "backbone": "adapter" | "merged", "base_model": ABS_DIR,
                              "hidden_size": H, "model_type": "llama"}
    value_head.safetensors   "weight" [1, H] and "bias" [1], fp32
    adapter/                 ("adapter") a peft LoRA adapter of the decoder: plain peft loads it
                             onto `AutoModel.from_pretrained(base_model)`
    config.json, model.safetensors
                             ("merged") the decoder with LoRA merged in: plain
                             `AutoModel.from_pretrained(DIR)` loads it; base_model is informative
    tokenizer files          the reward model's own tokenizer: a policy with another tokenizer
                             hands it text, not token ids
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from rlhf_fast.models.load import ModelLoadError, check_model_dir, load_backbone, run_outputs

FORMAT = "rlhf_fast.reward_model"
CONFIG_FILE = "reward_config.json"
HEAD_FILE = "value_head.safetensors"
ADAPTER_DIR = "adapter"


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """[N] index of the last position whose mask is 1 in each row (right or left padding).
    A row with no real token is an error: it has no score."""
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be [N, L], got shape {tuple(attention_mask.shape)}")
    real = attention_mask.bool()
    if not real.any(dim=1).all():
        raise ValueError("attention_mask: a row has no real token (all padding)")
    length = real.shape[1]
    return length - 1 - real.flip(dims=[1]).int().argmax(dim=1)


def _unwrapped(module: nn.Module) -> nn.Module:
    get_base = getattr(module, "get_base_model", None)  # peft wrappers
    return get_base() if get_base is not None else module


def hidden_size_of(backbone: nn.Module) -> int:
    """Width of the decoder's output (its input embedding width: equal to the hidden size, or
    to OPT's projected width when it projects in and out)."""
    return _unwrapped(backbone).get_input_embeddings().embedding_dim


class RewardModel(nn.Module):
    """backbone (decoder, optionally peft-wrapped) + fp32 nn.Linear(hidden, 1) head."""

    def __init__(self, backbone: nn.Module, hidden_size: int | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        hidden_size = hidden_size or hidden_size_of(backbone)
        self.value_head = nn.Linear(hidden_size, 1, dtype=torch.float32)
        nn.init.normal_(self.value_head.weight, std=1.0 / (hidden_size + 1) ** 0.5)
        nn.init.zeros_(self.value_head.bias)
        forward = inspect.signature(_unwrapped(backbone).forward).parameters
        self._takes_position_ids = "position_ids" in forward

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Scores [N] (fp32) of rows input_ids [N, L] with attention_mask [N, L]."""
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
        if self._takes_position_ids:  # left padding must not shift the positions
            kwargs["position_ids"] = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)
        hidden = self.backbone(**kwargs).last_hidden_state
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        last = hidden[rows, last_token_index(attention_mask).to(hidden.device)]
        return self.value_head(last.float()).squeeze(-1)


def save_reward_model(
    model: RewardModel,
    directory: str | os.PathLike,
    *,
    base_model: str | os.PathLike,
    tokenizer=None,
    merge: bool = False,
) -> Path:
    """Write the directory format above. merge=True merges a peft backbone's LoRA into a copy
    written as the decoder itself; the in-memory model is left as it was."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    backbone = model.backbone
    is_peft = hasattr(backbone, "peft_config")
    if merge or not is_peft:
        _save_merged_backbone(backbone, directory, is_peft)
        kind = "merged"
    else:
        backbone.save_pretrained(directory / ADAPTER_DIR, safe_serialization=True)
        kind = "adapter"
    head = model.value_head.state_dict()
    head = {name: tensor.detach().float().cpu().contiguous() for name, tensor in head.items()}
    save_file(head, directory / HEAD_FILE)
    config = {
        "format": FORMAT,
        "version": 1,
        "backbone": kind,
        "base_model": str(Path(base_model).resolve()),
        "hidden_size": model.value_head.in_features,
        "model_type": getattr(_unwrapped(backbone).config, "model_type", None),
    }
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


def _save_merged_backbone(backbone: nn.Module, directory: Path, is_peft: bool) -> None:
    if not is_peft:
        backbone.save_pretrained(directory, safe_serialization=True)
        return
    # Merge into a copy, so the caller's model keeps its adapter (training may go on).
    import copy

    merged = copy.deepcopy(backbone).merge_and_unload()
    merged.save_pretrained(directory, safe_serialization=True)


def read_reward_config(directory: str | os.PathLike) -> dict:
    path = Path(directory) / CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        found = run_outputs(directory).get("reward_model")  # a --stage rm (or all) run dir
        if found is not None:
            raise ModelLoadError(
                f"{directory}: a run directory, not a reward model; its reward model is {found}"
            ) from None
        raise ModelLoadError(f"{path}: missing (not a reward-model directory)") from None
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"{path}: not valid JSON ({error})".splitlines()[0]) from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ModelLoadError(f"{path}: 'format' is not {FORMAT!r}")
    if config.get("backbone") not in ("adapter", "merged"):
        raise ModelLoadError(f"{path}: 'backbone' must be 'adapter' or 'merged'")
    return config


def load_reward_model(
    directory: str | os.PathLike,
    *,
    dtype: str = "fp32",
    device: str = "cpu",
    trainable: bool = False,
    quant: str = "none",
) -> RewardModel:
    """A RewardModel from the directory format above (eval mode; the LoRA adapter and head
    trainable only with trainable=True); quant "int8" / "int4": the backbone quantized on load
    (models.load.quantize_frozen_base), the adapter applied on top as QLoRA's."""
    directory = Path(directory)
    config = read_reward_config(directory)
    if config["backbone"] == "merged":
        backbone = load_backbone(directory, dtype=dtype, device=device, quant=quant)
    else:
        from peft import LoraConfig, PeftModel

        from rlhf_fast.lora.qlora import qlora_config

        base_dir = check_model_dir(config["base_model"])
        base = load_backbone(base_dir, dtype=dtype, device=device, quant=quant)
        adapter_dir = directory / ADAPTER_DIR
        try:
            # qlora_config lets the adapter's layers wrap QuantLinear (a no-op on a dense base)
            lora_config = qlora_config(LoraConfig.from_pretrained(str(adapter_dir)))
            backbone = PeftModel.from_pretrained(
                base, adapter_dir, is_trainable=trainable, config=lora_config
            )
        except Exception as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise ModelLoadError(f"{directory / ADAPTER_DIR}: cannot load ({reason})") from None
    model = RewardModel(backbone, config["hidden_size"])
    try:
        head = load_file(directory / HEAD_FILE)
        model.value_head.load_state_dict(head)
    except Exception as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelLoadError(f"{directory / HEAD_FILE}: cannot load ({reason})") from None
    model.value_head.requires_grad_(trainable)
    return model.to(device).eval()
