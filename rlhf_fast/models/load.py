"""Load a local Hugging Face causal LM for training, and attach LoRA adapters to it.

Only local directories are read (`local_files_only=True`), only safetensors weights
(`use_safetensors=True`), and never remote code (`trust_remote_code=False`). A directory may
also be a peft adapter directory (adapter_config.json naming its base model, as the SFT stage
exports it): the base is loaded and the adapter merged into it, so `--model runs/sft-x/adapter`
works as well as `--model runs/sft-x/merged`.

Every failure is a `ModelLoadError` whose message is one line naming the directory.

LoRA is attached in exactly one place, `attach_lora`, so that switching from plain peft to the
fused LoRA ops of `rlhf_fast.lora` is a change of that function only.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ADAPTER_CONFIG = "adapter_config.json"

# Module names (last path component) that LoRA targets by default, per model family: every
# linear projection of attention and MLP, never the LM head. Families not listed get every
# nn.Linear / Conv1D leaf except the output embedding (see default_lora_targets).
LORA_TARGETS = {
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "mistral": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "gpt2": ("c_attn", "c_proj", "c_fc"),
    "opt": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
    "bloom": ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
}


class ModelLoadError(ValueError):
    """A model directory that cannot be loaded; str() is one line naming the directory."""


@dataclass(frozen=True)
class LoraSettings:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] | None = None  # None: the family's default (LORA_TARGETS)
    fused: bool = True  # run rlhf_fast.lora's fused forward/backward (ops.lora_linear)


def _one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def resolve_device(device: str) -> str:
    """'cpu' | 'cuda' | 'auto' -> 'cpu' or 'cuda'; asking for cuda without one is an error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda: no CUDA device is available")
    if device not in ("cpu", "cuda"):
        raise ModelLoadError(f"--device must be cpu, cuda or auto, got {device!r}")
    return device


def resolve_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ModelLoadError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


# what `rlhf-fast train` exports into a run directory: (kind, the file that marks it, where:
# the stage's own directory first, then the stage of a --stage all run that holds it)
_RUN_OUTPUTS = (
    ("merged", "config.json", ("merged", "ppo/merged")),
    ("adapter", ADAPTER_CONFIG, ("adapter", "ppo/adapter")),
    ("reward_model", "reward_config.json", ("reward_model", "rm/reward_model")),
)


def run_outputs(directory: str | os.PathLike) -> dict[str, Path]:
    """The models a trainer's run directory holds, by kind ("merged", "adapter",
    "reward_model"): for messages that point a user who gave the run directory to the model."""
    directory, found = Path(directory), {}
    for kind, marker, places in _RUN_OUTPUTS:
        for place in places:
            if (directory / place / marker).is_file():
                found[kind] = directory / place
                break
    return found


def check_model_dir(model_dir: str | os.PathLike) -> Path:
    """The directory as an absolute Path, or ModelLoadError saying what is missing."""
    path = Path(model_dir).expanduser()
    if not path.exists():
        raise ModelLoadError(f"{path}: model directory does not exist")
    if not path.is_dir():
        raise ModelLoadError(f"{path}: not a directory (expected a model directory)")
    if not (path / "config.json").is_file() and not (path / ADAPTER_CONFIG).is_file():
        outputs = run_outputs(path)  # a trainer's run directory
        inside = outputs.get("merged") or outputs.get("adapter")
        if inside is not None:
            raise ModelLoadError(f"{path}: a run directory, not a model; its model is {inside}")
        raise ModelLoadError(f"{path}: no config.json (not a Hugging Face model directory)")
    return path.resolve()


# Families whose positions are a learned table (the config key of its size): a sequence longer
# than the table fails inside the embedding (IndexError), where rotary or ALiBi ones run on.
_POSITION_TABLES = {"gpt2": "n_positions", "gpt_bigcode": "n_positions", "opt":
                    "max_position_embeddings", "gpt_neo": "max_position_embeddings"}  # fmt: skip


def learned_positions(config) -> int | None:
    """The size of a learned position table (GPT-2, OPT, ...; `config` a PretrainedConfig or
    config.json's dict): no token past it has a position embedding. None for models without
    one (rotary, ALiBi)."""
    get = config.get if isinstance(config, dict) else lambda key: getattr(config, key, None)
    key = _POSITION_TABLES.get(get("model_type"))
    positions = get(key) if key else None
    return positions if isinstance(positions, int) and positions > 0 else None


def check_max_length(model_dir: str | os.PathLike, max_length: int) -> None:
    """ModelLoadError when sequences of `max_length` tokens do not fit the model's learned
    position table (GPT-2, OPT, ...); other models, or a directory without config.json (an
    adapter, checked where its base loads), pass."""
    path = check_model_dir(model_dir)
    try:
        config = json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        return
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"{path / 'config.json'}: {_one_line(error)}") from None
    positions = learned_positions(config) if isinstance(config, dict) else None
    if positions is not None and max_length > positions:
        raise ModelLoadError(
            f"--max-length {max_length} exceeds the {positions} positions of {path} "
            f"({config['model_type']} learns a table of them): pass --max-length {positions}"
        )


def adapter_base(adapter_dir: Path) -> Path:
    """The base model directory an exported adapter names (base_model_name_or_path)."""
    try:
        config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
        base = config["base_model_name_or_path"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ModelLoadError(f"{adapter_dir / ADAPTER_CONFIG}: {_one_line(error)}") from None
    if not isinstance(base, str) or not base:
        raise ModelLoadError(f"{adapter_dir / ADAPTER_CONFIG}: no base_model_name_or_path")
    return check_model_dir(base)


def quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


QUANT_GROUP_SIZE = 32  # int4 groups: the project's default (README, quant.perplexity)


def _ready(model: nn.Module, quant: str) -> nn.Module:
    """A loaded model as training uses it: quantized per --quant, RMSNorms and SwiGLU MLPs on
    rlhf_fast's fused ops (models/fused_layers.py: one C++ pass each way on CPU)."""
    from rlhf_fast.models.fused_layers import fuse_layers

    model = quantize_frozen_base(model, quant)
    fuse_layers(model)
    return model


def quantize_frozen_base(model: nn.Module, quant: str) -> nn.Module:
    """--quant: `model`'s linear layers (not lm_head) to int8 / int4 in place, as QLoRA's frozen
    base: LoRA adapters attached afterwards (attach_lora) train on top of the quantized
    products. "none" returns `model` unchanged."""
    from rlhf_fast.quant.model import BITS_BY_NAME, quantize_model

    if quant not in BITS_BY_NAME:
        raise ModelLoadError(f"--quant must be one of {', '.join(BITS_BY_NAME)}, got {quant!r}")
    if BITS_BY_NAME[quant] is not None:
        quantize_model(model, bits=BITS_BY_NAME[quant], group_size=QUANT_GROUP_SIZE)
        _copy_out_of_the_checkpoint(model)
    return model


@torch.no_grad()
def _copy_out_of_the_checkpoint(model: nn.Module) -> None:
    """Copies the tensors quantization left dense (embeddings, norms, lm_head, biases) out of
    the checkpoint's memory map. While any of them maps the file, every page of it that the
    quantization read stays resident: measured on a 120 MB fp32 model, 73 MB of file pages
    kept the int4 model's RSS above the dense one's through training."""
    from rlhf_fast.quant.linear import QuantLinear

    for module in model.modules():
        if isinstance(module, QuantLinear):  # its codes are fresh memory already
            continue
        for param in module.parameters(recurse=False):
            param.data = param.data.clone()  # tied parameters stay one object
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is not None:
                module._buffers[name] = buffer.clone()


def _refuse_quantized_dir(path: Path) -> None:
    """A `rlhf-fast quantize` directory holds int4/int8 codes where transformers looks for
    weights (every projection would be missing): training reads a dense model and quantizes it
    itself (--quant)."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return  # from_pretrained reports it
    entry = config.get("quantization") if isinstance(config, dict) else None
    if entry is not None:
        bits = entry.get("bits") if isinstance(entry, dict) else None
        raise ModelLoadError(
            f"{path}: a quantized model directory (int{bits}, rlhf-fast quantize): pass the dense "
            f"model it was made from, with --quant int{bits if bits in (4, 8) else 4}"
        )


def from_pretrained_checked(auto_class, path: Path, dtype: torch.dtype) -> nn.Module:
    """auto_class.from_pretrained(path) from safetensors only, without remote code; a tensor the
    model needs that the checkpoint lacks is an error. transformers would initialize it at
    random and only log it (and quiet_transformers hides that log): a truncated or mismatched
    export would train or chat with random layers. A tensor whose shape the config does not
    give is an error naming it (transformers' own points at the hidden log)."""
    _refuse_quantized_dir(path)
    try:
        model, info = auto_class.from_pretrained(
            path,
            dtype=dtype,
            local_files_only=True,
            trust_remote_code=False,
            use_safetensors=True,
            output_loading_info=True,
            ignore_mismatched_sizes=True,  # reported below, by name
        )
    except Exception as error:  # transformers raises many types: report each on one line
        raise ModelLoadError(f"{path}: cannot load the model ({_one_line(error)})") from None
    mismatched = sorted(info.get("mismatched_keys") or (), key=lambda entry: str(entry[0]))
    if mismatched:
        name, stored, expected = mismatched[0]
        raise ModelLoadError(
            f"{path}: {len(mismatched)} tensor(s) do not fit config.json, e.g. {name} has shape "
            f"{list(stored)} where the config gives {list(expected)}"
        )
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        shown = ", ".join(missing[:3]) + (
            f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        )
        raise ModelLoadError(
            f"{path}: the checkpoint lacks {len(missing)} tensor(s) the model needs ({shown}): "
            "they would be random"
        )
    return model


def load_causal_lm(
    model_dir: str | os.PathLike, *, dtype: str = "fp32", device: str = "cpu", quant: str = "none"
) -> nn.Module:
    """An AutoModelForCausalLM from a local directory (or an adapter dir: its base with the
    adapter merged), in eval mode with every parameter frozen; the caller picks what trains.
    quant: "int8" / "int4" quantizes the loaded weights (quantize_frozen_base)."""
    path = check_model_dir(model_dir)
    torch_dtype = resolve_dtype(dtype)
    device = resolve_device(device)
    if not (path / "config.json").is_file():
        merged = _load_adapter_merged(path, torch_dtype, device)
        return _ready(merged, quant)
    quiet_transformers()
    from transformers import AutoModelForCausalLM

    model = from_pretrained_checked(AutoModelForCausalLM, path, torch_dtype)
    model.requires_grad_(False)
    return _ready(model.to(device).eval(), quant)


def load_backbone(
    model_dir: str | os.PathLike, *, dtype: str = "fp32", device: str = "cpu", quant: str = "none"
) -> nn.Module:
    """The decoder of a causal LM directory without its LM head (AutoModel: LlamaModel,
    GPT2Model, ...), frozen, in eval mode: what the reward model reads hidden states from.
    quant: as load_causal_lm's."""
    path = check_model_dir(model_dir)
    if not (path / "config.json").is_file():  # an adapter dir: merge, then drop the LM head
        return load_causal_lm(path, dtype=dtype, device=device, quant=quant).base_model
    torch_dtype = resolve_dtype(dtype)
    device = resolve_device(device)
    quiet_transformers()
    from transformers import AutoModel

    model = from_pretrained_checked(AutoModel, path, torch_dtype)
    model.requires_grad_(False)
    return _ready(model.to(device).eval(), quant)


def _load_adapter_merged(adapter_dir: Path, dtype: torch.dtype, device: str) -> nn.Module:
    from peft import PeftModel

    name = next(k for k, v in DTYPES.items() if v == dtype)
    base = load_causal_lm(adapter_base(adapter_dir), dtype=name, device=device)
    try:
        model = PeftModel.from_pretrained(base, adapter_dir, is_trainable=False)
    except Exception as error:
        reason = _one_line(error)
        raise ModelLoadError(f"{adapter_dir}: cannot load the adapter ({reason})") from None
    model = model.merge_and_unload()
    model.requires_grad_(False)
    return model.eval()


# Files a tokenizer is saved as (fast, config, sentencepiece, BPE/WordPiece vocab, tiktoken).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "*.model", "vocab.json", "vocab.txt", "*.tiktoken"
)  # fmt: skip


def has_tokenizer_files(directory: Path) -> bool:
    return any(any(directory.glob(pattern)) for pattern in TOKENIZER_FILES)


def load_tokenizer(model_dir: str | os.PathLike):
    """The directory's tokenizer (an adapter dir without one: its base's), with a pad token:
    the EOS token when it has none (the collators never treat a trained EOS as padding)."""
    path = check_model_dir(model_dir)
    quiet_transformers()
    from transformers import AutoTokenizer

    has_own = any((path / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json"))
    source = path if has_own or (path / "config.json").is_file() else adapter_base(path)
    if not has_tokenizer_files(source):
        # transformers' own error here is several lines whose first ends in "from one of:"
        raise ModelLoadError(
            f"{source}: no tokenizer (no tokenizer.json or tokenizer_config.json; save the "
            "tokenizer beside the model)"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, local_files_only=True, trust_remote_code=False
        )
    except Exception as error:
        raise ModelLoadError(f"{source}: cannot load the tokenizer ({_one_line(error)})") from None
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ModelLoadError(f"{source}: the tokenizer has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token_id is None:
        raise ModelLoadError(f"{source}: the tokenizer has no EOS token (SFT trains it)")
    return tokenizer


def _is_projection(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    from rlhf_fast.quant.linear import QuantLinear

    return isinstance(module, (nn.Linear, Conv1D, QuantLinear))


def default_lora_targets(model: nn.Module) -> tuple[str, ...]:
    """The family's projections (LORA_TARGETS) when present in `model`, else every Linear /
    Conv1D leaf name except the output embedding and classification heads."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    leaves = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if _is_projection(m)}
    family = LORA_TARGETS.get(model_type)
    if family and leaves.intersection(family):
        return tuple(t for t in family if t in leaves)
    excluded = {"lm_head", "score", "embed_out", "output", "classifier", "value_head"}
    targets = tuple(sorted(leaves - excluded))
    if not targets:
        raise ModelLoadError(f"no linear layers to put LoRA on in {type(model).__name__}")
    return targets


def attach_lora(model: nn.Module, settings: LoraSettings) -> nn.Module:
    """`model` wrapped with trainable LoRA adapters (peft), every other weight frozen.

    The one place LoRA is attached. The adapters are plain peft ones (saved and loaded as peft
    directories); with settings.fused their layers run `rlhf_fast.lora.fuse`'s fused op
    (falling back to peft's forward, with a warning, where the op does not cover a layer).
    GPT-2's Conv1D stores weights transposed, hence fan_in_fan_out for it."""
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    from rlhf_fast.lora.qlora import qlora_config
    from rlhf_fast.quant.linear import QuantLinear

    if settings.r <= 0:
        raise ModelLoadError(f"--lora-r must be a positive integer, got {settings.r}")
    targets = settings.targets or default_lora_targets(model)
    found = {n.rsplit(".", 1)[-1]: m for n, m in model.named_modules() if _is_projection(m)}
    missing = [t for t in targets if t not in found]
    if missing:
        raise ModelLoadError(
            f"--lora-targets: {', '.join(missing)} not found in {type(model).__name__} "
            f"(its linear layers: {', '.join(sorted(found))})"
        )
    transposed = any(isinstance(found[t], Conv1D) for t in targets)  # QuantLinear: row-major
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(targets),
        fan_in_fan_out=transposed,
        bias="none",
    )
    if any(isinstance(found[t], QuantLinear) for t in targets):  # a --quant base (QLoRA)
        config = qlora_config(config)
    wrapped = get_peft_model(model, config)
    if settings.fused:
        from rlhf_fast.lora import fuse

        fuse(wrapped)
    return wrapped
