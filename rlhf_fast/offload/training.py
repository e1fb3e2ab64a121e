"""`rlhf-fast train --offload auto|SPEC --max-memory cpu=SIZE`: the trainer's streamed base.

LoRA only: the frozen base streams layer by layer (forward, then again in reverse for the
backward: offload/backward.py) while the adapters, heads and optimizer state stay resident.
The policy (offload/policy.py) places the layers in the budget left after an estimate of the
training step's activations (`training_activation_bytes`); for PPO also after the rollout's KV
cache (the policy's own term, batch_size rows of max_length tokens).
"""

from __future__ import annotations

import sys
from pathlib import Path

from rlhf_fast.models.load import ModelLoadError
from rlhf_fast.offload.lora import wrap_with_lora
from rlhf_fast.offload.model import OffloadedLM
from rlhf_fast.offload.policy import format_size, parse_max_memory


def training_activation_bytes(config, rows: int, tokens: int) -> int:
    """Bytes of one training micro-batch under streamed checkpointing (fp32): one saved input
    per decoder layer, one layer's recompute (attention scores, MLP and projections, twice for
    their gradients) and the logits (with their fp32 copy and gradient)."""
    hidden, vocab = config.hidden_size, config.vocab_size
    intermediate = getattr(config, "intermediate_size", None) or 4 * hidden
    heads = config.num_attention_heads
    per_token = config.num_hidden_layers * hidden + 2 * (8 * hidden + 3 * intermediate)
    per_token += 3 * vocab
    return 4 * rows * (tokens * per_token + 2 * heads * tokens * tokens)


def open_for_training(train_config, *, rows: int, rollout: bool = False) -> OffloadedLM:
    """The offloaded base for a training stage, its policy printed on stderr. `rows`: rows of a
    training micro-batch; `rollout`: also generation of batch_size rows (PPO, whose KV cache
    the policy counts). Errors: ModelLoadError, one line."""
    from transformers import AutoConfig

    from rlhf_fast.offload.session import open_offloaded_model

    model_dir = train_config.model
    try:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    except (OSError, ValueError) as error:
        path = Path(model_dir) / "config.json"
        if path.is_file():  # there, but not a config transformers can read
            reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise ModelLoadError(f"--offload: {path}: {type(error).__name__}: {reason}") from None
        raise ModelLoadError(
            f"--offload: {model_dir} has no config.json (an adapter directory? merge it first)"
        ) from None
    reserve = training_activation_bytes(config, rows, train_config.max_length)
    spec = train_config.offload
    try:
        budget = parse_max_memory(train_config.max_memory) if train_config.max_memory else None
    except ValueError as error:
        raise ModelLoadError(str(error)) from None
    if budget is not None and "cpu" not in budget:
        raise ModelLoadError("--max-memory: give cpu=SIZE (this build runs on the CPU)")
    if budget is not None and budget["cpu"] <= reserve:
        raise ModelLoadError(
            f"--max-memory cpu={format_size(budget['cpu'])} is too small: a training "
            f"micro-batch alone needs about {format_size(reserve)}"
        )
    try:
        lm, policy = open_offloaded_model(
            model_dir, offload=spec, max_memory=train_config.max_memory,
            offload_root=train_config.offload_dir,
            batch=train_config.batch_size if rollout else 1,
            context=train_config.max_length if rollout else 1, reserve=reserve,
            bf16_activations=False,  # rollout log-probs must be the fp32 training forward's
        )  # fmt: skip
    # ValueError: ShardError, a bad --offload / --max-memory, too small; OSError: preparing
    # the shards failed (a full disk, an --offload-dir prepare_offload will not replace)
    except (ValueError, OSError) as error:
        raise ModelLoadError(str(error).strip().splitlines()[0]) from None
    lm.model.requires_grad_(False)
    stored = lm.manifest["dtype"]
    if {"fp32": "float32", "bf16": "bfloat16"}.get(train_config.dtype) != stored:
        print(f"[offload: the layers stream as stored ({stored}); --dtype does not apply]",
              file=sys.stderr)  # fmt: skip
    print(
        f"[offload: {policy.describe()}; training activations ~{format_size(reserve)}]",
        file=sys.stderr,
        flush=True,
    )
    return lm


def build_offloaded_ppo_models(train_config, build_ppo_models, lora_settings):
    """PPO's four roles (train/ppo_models.py's `build_ppo_models`, passed in) on an offloaded
    base, dense or int4/int8: the adapters are created while the streamer shows shaped
    stand-ins, then every decoder layer is checkpointed for streamed training."""
    rows = train_config.mini_batch_size or train_config.batch_size
    lm = open_for_training(train_config, rows=rows, rollout=True)
    with lm.stand_ins():
        models = build_ppo_models(
            train_config.model, train_config.reward_model, lora_settings,
            dtype={"float32": "fp32", "bfloat16": "bf16"}.get(lm.manifest["dtype"], "fp32"),
            device="cpu", seed=train_config.seed, base=lm.model,
            attach=lambda base, settings: wrap_with_lora(lm, settings),
        )  # fmt: skip
    lm.enable_training()
    return models


def close_streamed(model) -> None:
    """Stops the reader thread and releases the slots of each streamed base inside `model` (a
    peft wrapper, PPOModels): the model and its OffloadedLM reference each other, so without
    this the thread outlived the stage until a garbage collection found the cycle."""
    for module in model.modules():
        offloaded = getattr(module, "rlhf_fast_offload", None)
        if offloaded is not None:
            offloaded.close()
