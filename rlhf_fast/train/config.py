"""The run configuration of `rlhf-fast train`: one flat dataclass, loaded from defaults, then
a `--config run.yaml`, then command-line flags (each layer overriding the one before).

Every field is a YAML key of the same name and a flag with dashes (`lora_r` <-> `--lora-r`);
an unknown key or a value of the wrong type is a `ConfigError` with a one-line message naming
the file and key. The resolved config is written to the run directory as config.yaml, and a
resumed run reads it back from there.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

STAGES = ("sft", "rm", "ppo", "all")


class ConfigError(ValueError):
    """A bad config file, key or value (one line)."""


def _help(text: str, **kwargs) -> typing.Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass
class TrainConfig:
    stage: str = _help("sft | rm | ppo | all (sft -> rm -> ppo)", default="sft")
    model: str | None = _help(
        "base model directory (HF, safetensors); ppo: the SFT model", default=None
    )
    data: str | None = _help(
        "training data, JSONL (formats: README, Train); ppo, all: prompts", default=None
    )
    reward_model: str | None = _help(
        "ppo: reward-model directory (--stage rm's export)", default=None
    )
    sft_data: str | None = _help("all: SFT data, JSONL", default=None)
    rm_data: str | None = _help("all: reward-model data, JSONL", default=None)
    output: str | None = _help("run directory (default runs/<stage>-<timestamp>)", default=None)
    merge: bool = _help("also export a merged model directory", default=False)
    dtype: str = _help("fp32 | bf16 (weights and compute)", default="fp32")
    quant: str = _help(
        "none | int8 | int4: quantize the frozen base on load and train LoRA on it (QLoRA); "
        "exports stay plain peft adapters (and dense merged models)",
        default="none",
    )
    device: str = _help("cpu | cuda | auto", default="auto")
    seed: int = _help("seed of the init, data order, dropout and held-out split", default=0)
    lr: float = _help("peak learning rate", default=2e-4)
    schedule: str = _help("cosine | linear | constant (after warmup)", default="cosine")
    warmup_steps: int = _help("linear warmup steps", default=0)
    weight_decay: float = _help("AdamW weight decay", default=0.0)
    max_grad_norm: float = _help("gradient clipping norm (0: off)", default=1.0)
    batch_size: int = _help(
        "examples per micro-batch (rm: prompts with all their answers); ppo: prompts sampled "
        "per step (its micro-batches: mini_batch_size / grad_accum rows)",
        default=4,
    )
    grad_accum: int = _help("micro-batches per optimizer step", default=1)
    epochs: float = _help("passes over the training data (when max_steps is 0)", default=1.0)
    max_steps: int = _help("optimizer steps (0: from epochs)", default=0)
    max_length: int = _help("tokens per sequence (longer ones are truncated)", default=512)
    pack: bool = _help("sft: pack several examples per row", default=False)
    full_finetune: bool = _help(
        "sft, rm: train every weight instead of a LoRA adapter (small or random models)",
        default=False,
    )
    lora_r: int = _help("LoRA rank", default=8)
    lora_alpha: float = _help("LoRA alpha (scaling alpha / r)", default=16.0)
    lora_dropout: float = _help("LoRA dropout", default=0.0)
    lora_targets: list[str] | None = _help(
        "module names to put LoRA on (default: all linear projections)", default=None
    )
    lora_fused: bool = _help("run LoRA layers through the fused op (rlhf_fast.lora)", default=True)
    offload: str | None = _help(
        "sft, ppo: stream the frozen base from disk, auto or compress=..,resident=..,prefetch=..",
        default=None,
    )
    max_memory: str | None = _help(
        "with --offload: RAM budget, cpu=SIZE (e.g. cpu=2GiB)", default=None
    )
    offload_dir: str | None = _help(
        "with --offload: shards' home (MODEL/.rlhf_fast_offload)", default=None
    )
    rm_loss: str = _help(
        "rm: rank (K-wise pairs) | mse (direct scores) | auto (from the data)", default="auto"
    )
    eval_fraction: float = _help("share of examples held out for evaluation", default=0.1)
    eval_every: int = _help("evaluate every N steps (0: only at the end)", default=0)
    save_every: int = _help("checkpoint every N steps (0: only at the end)", default=50)
    keep_checkpoints: int = _help("checkpoints to keep (0: all)", default=2)
    log_every: int = _help("write metrics every N steps", default=1)
    # PPO (stage ppo, and the last stage of all). One step = one rollout batch of batch_size
    # prompts, then ppo_epochs passes over it in minibatches of mini_batch_size rows.
    ppo_steps: int = _help("all: PPO steps (0: max_steps / epochs as the other stages)", default=0)
    ppo_lr: float = _help("all: PPO learning rate (0: lr)", default=0.0)
    ppo_epochs: int = _help("ppo: passes over each rollout batch", default=4)
    mini_batch_size: int = _help("ppo: rows per PPO minibatch (0: the whole batch)", default=0)
    max_new_tokens: int = _help("ppo: longest sampled answer, tokens", default=48)
    temperature: float = _help("ppo: sampling temperature", default=1.0)
    top_k: int = _help("ppo: sample from the k likeliest tokens (0: all)", default=0)
    rollout_quant: str = _help(
        "ppo: none | int8 | int4 weights of the policy for sampling rollouts (Llama, Mistral, "
        "Qwen2; log-probs stay the fp32 policy's)",
        default="none",
    )
    kl_coef: float = _help("ppo: KL penalty coefficient (initial one when adaptive)", default=0.05)
    kl_estimator: str = _help("ppo: per-token KL estimator, k1 | k3", default="k1")
    kl_target: float = _help("ppo: adaptive KL controller's target (0: fixed coef)", default=0.0)
    kl_horizon: float = _help("ppo: adaptive KL controller's horizon, samples", default=10000.0)
    score_clip: float = _help("ppo: clip reward-model scores to [-c, c] (0: off)", default=5.0)
    missing_eos_penalty: float = _help("ppo: subtracted from answers without EOS", default=1.0)
    gamma: float = _help("ppo: discount", default=1.0)
    lam: float = _help("ppo: GAE lambda", default=0.95)
    clip_range: float = _help("ppo: policy ratio clip", default=0.2)
    value_clip: float = _help("ppo: value clip", default=0.2)
    vf_coef: float = _help("ppo: value loss coefficient", default=0.1)
    ptx_coef: float = _help("ppo: PPO-ptx SFT loss coefficient (0: off)", default=0.0)
    ptx_data: str | None = _help("ppo: SFT data for PPO-ptx (all: sft_data)", default=None)
    sample_every: int = _help("ppo: write sample answers every N steps (0: never)", default=10)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
CHOICES = {
    "stage": STAGES,
    "dtype": ("fp32", "bf16"),
    "quant": ("none", "int8", "int4"),
    "device": ("cpu", "cuda", "auto"),
    "schedule": ("cosine", "linear", "constant"),
    "rm_loss": ("auto", "rank", "mse"),
    "kl_estimator": ("k1", "k3"),
    "rollout_quant": ("none", "int8", "int4"),
}
_POSITIVE = (
    "batch_size", "grad_accum", "max_length", "lora_r", "log_every", "ppo_epochs",
    "max_new_tokens", "kl_horizon",
)  # fmt: skip
_NON_NEGATIVE = (
    "warmup_steps", "weight_decay", "max_grad_norm", "max_steps", "epochs", "eval_every",
    "save_every", "keep_checkpoints", "lr", "lora_alpha", "ppo_steps", "ppo_lr",
    "mini_batch_size", "temperature", "top_k", "kl_coef", "kl_target", "score_clip",
    "missing_eos_penalty", "gamma", "lam", "clip_range", "value_clip", "vf_coef", "ptx_coef",
    "sample_every",
)  # fmt: skip


_EXPONENT_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def field_type(name: str) -> tuple[type, bool]:
    """(base type, optional) of a field: list for list[str], else bool/int/float/str."""
    hint = typing.get_type_hints(TrainConfig)[name]
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if args else hint
    if typing.get_origin(base) is list or isinstance(base, types.GenericAlias):
        return list, optional
    return base, optional


def _coerce(name: str, value, where: str):
    base, optional = field_type(name)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: '{name}' must not be empty")
    if base is bool:
        ok = isinstance(value, bool)
    elif base is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif base is float:
        if isinstance(value, str) and _EXPONENT_NUMBER.fullmatch(value.strip()):
            value = float(value)  # PyYAML (YAML 1.1) reads 1e-5, lacking a dot, as a string
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif base is list:
        value = [value] if isinstance(value, str) else value
        ok = isinstance(value, list) and all(isinstance(v, str) and v for v in value)
    else:
        ok = isinstance(value, str)
    if not ok:
        expected = {list: "a list of names"}.get(base, base.__name__)
        raise ConfigError(f"{where}: '{name}' must be {expected}, got {value!r}")
    return value


def apply(config: TrainConfig, values: dict, where: str) -> TrainConfig:
    """A copy of `config` with `values` (key -> value) applied; `where` names their source."""
    updates = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in FIELDS:
            close = difflib.get_close_matches(name, FIELDS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{where}: unknown key '{key}'{hint}")
        updates[name] = _coerce(name, value, where)
    return dataclasses.replace(config, **updates)


def validate(config: TrainConfig) -> TrainConfig:
    """The same config (device auto -> cpu under --offload), or ConfigError naming the first
    bad value."""
    for name, choices in CHOICES.items():
        if getattr(config, name) not in choices:
            raise ConfigError(
                f"{name} must be one of {', '.join(choices)}, got {getattr(config, name)!r}"
            )
    for name in _POSITIVE:
        value = getattr(config, name)
        if value <= 0:
            raise ConfigError(f"{name} must be positive, got {value}")
        if not math.isfinite(value):  # NaN passes "<= 0" (kl_horizon is a float)
            raise ConfigError(f"{name} must be a finite number > 0, got {value}")
    for name in _NON_NEGATIVE:
        value = getattr(config, name)
        if value < 0 or not math.isfinite(value):
            raise ConfigError(f"{name} must be a finite number >= 0, got {value}")
    if config.max_length < 2:  # the encoders keep a prompt token and an answer token
        raise ConfigError(f"max_length must be >= 2 (a prompt and an answer token), got "
                          f"{config.max_length}")  # fmt: skip
    if not 0.0 <= config.eval_fraction < 1.0:
        raise ConfigError(f"eval_fraction must be in [0, 1), got {config.eval_fraction}")
    if not 0.0 <= config.lora_dropout < 1.0:
        raise ConfigError(f"lora_dropout must be in [0, 1), got {config.lora_dropout}")
    if config.max_steps == 0 and config.epochs == 0:
        raise ConfigError("set max_steps or epochs (both are 0)")
    if not config.model:
        raise ConfigError("--model DIR is required")
    if not config.data:
        what = "PROMPTS.jsonl" if config.stage in ("ppo", "all") else "FILE"
        raise ConfigError(f"--data {what} is required")
    if config.stage == "ppo" and not config.reward_model:
        raise ConfigError(
            "--stage ppo needs --reward-model DIR (made by: rlhf-fast train --stage rm)"
        )
    if config.stage == "all" and not (config.sft_data and config.rm_data):
        raise ConfigError(
            "--stage all needs --sft-data FILE and --rm-data FILE (and --data PROMPTS)"
        )
    if config.stage in ("ppo", "all") and config.max_new_tokens >= config.max_length:
        # a rollout (prompt + answer) must fit max_length, the prompt keeping one token at least
        raise ConfigError(
            f"max_new_tokens {config.max_new_tokens} must be < max_length {config.max_length} "
            "(a rollout is prompt + answer, at most max_length tokens)"
        )
    if config.kl_target > 0 and config.kl_coef == 0:
        raise ConfigError(
            "kl_target > 0 (the adaptive KL controller) needs kl_coef > 0: the controller "
            "scales the coefficient, and from 0 it never moves"
        )
    if config.kl_target > 0 and config.kl_horizon <= config.batch_size / 5:
        raise ConfigError(  # the controller's factor 1 + error * rows / horizon, error >= -0.2
            f"kl_horizon must be > batch_size / 5 = {config.batch_size / 5:g} (got "
            f"{config.kl_horizon:g}): a KL under target would turn kl_coef <= 0"
        )
    if config.quant != "none" and config.full_finetune:
        raise ConfigError(f"--quant {config.quant} freezes the base: drop --full-finetune")
    if config.quant != "none" and config.rollout_quant != "none":
        raise ConfigError(
            f"--rollout-quant {config.rollout_quant}: the base is already {config.quant} "
            "(--quant), and rollouts sample from it as it is"
        )
    if not 0 <= config.seed < 2**32:  # PPO's generators take seed * 1_000_003 + ... in 64 bits
        raise ConfigError(f"seed must be in [0, 2**32), got {config.seed}")
    if config.offload is not None:
        config = _validate_offload(config)
    else:  # without --offload they would be silently ignored, the whole base loaded
        for name in ("max_memory", "offload_dir"):
            if getattr(config, name) is not None:
                flag = "--" + name.replace("_", "-")
                raise ConfigError(
                    f"{flag} applies to --offload only: add --offload auto (or drop it)"
                )
    if config.gamma > 1 or config.lam > 1:
        raise ConfigError(f"gamma and lam must be in [0, 1], got {config.gamma} and {config.lam}")
    return config


def _validate_offload(config: TrainConfig) -> TrainConfig:
    """The config with device cpu (the streamer feeds the CPU), or ConfigError."""
    if config.stage not in ("sft", "ppo"):
        raise ConfigError(f"--offload: supported for --stage sft and ppo, not {config.stage}")
    if config.full_finetune:
        raise ConfigError(
            "--offload trains LoRA adapters on the streamed base: drop --full-finetune"
        )
    if config.merge:
        raise ConfigError(
            "--offload: --merge needs the whole base in memory; merge the adapter later"
        )
    if config.device == "cuda":
        raise ConfigError("--offload streams to the CPU in this build: use --device cpu")
    if config.rollout_quant != "none":
        raise ConfigError("--rollout-quant needs the whole policy in memory: not with --offload")
    if config.quant != "none":
        raise ConfigError(
            f"--quant {config.quant}: the streamed base is compressed by --offload compress=..."
        )
    return dataclasses.replace(config, device="cpu")


def read_yaml(path: str | os.PathLike) -> dict:
    """The mapping in a YAML file, or ConfigError (missing file, bad YAML, not a mapping)."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError(f"{path}: cannot read ({error.strerror or error})") from None
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}{line}: {problem}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(values).__name__}")
    return values


def load(path: str | os.PathLike, base: TrainConfig | None = None) -> TrainConfig:
    return apply(base or TrainConfig(), read_yaml(path), str(path))


def to_yaml(config: TrainConfig) -> str:
    import yaml

    return yaml.safe_dump(dataclasses.asdict(config), sort_keys=False)


# fields naming files or directories: config.yaml holds them absolute, so that `--resume RUN`
# run from another directory finds them (as typed, ../base failed there)
PATH_FIELDS = ("model", "data", "reward_model", "sft_data", "rm_data", "ptx_data", "output",
               "offload_dir")  # fmt: skip


def write(config: TrainConfig, path: str | os.PathLike) -> None:
    """config.yaml replaced whole (a kill mid-write must not leave a run --resume cannot read),
    its paths absolute (PATH_FIELDS)."""
    from rlhf_fast.train.metrics import rewrite_lines

    absolute = {
        name: str(Path(value).resolve())
        for name in PATH_FIELDS
        if (value := getattr(config, name)) and value != "-"  # "-": no file (bench, tests)
    }
    rewrite_lines(Path(path), to_yaml(dataclasses.replace(config, **absolute)).splitlines())
