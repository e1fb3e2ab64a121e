"""Save and load quantized models as ordinary Hugging Face directories.

A quantized directory holds config.json (with a `quantization` entry written by
quantize_model), model.safetensors (each QuantLinear as `<name>.qdata`, `<name>.scales`,
`<name>.offsets` (int4), `<name>.qshape` and `<name>.bias`; every other tensor as usual, tied
copies once), the generation config and the tokenizer files when given. Never pickle.

Loading builds the model on the meta device, swaps in empty QuantLinear shells, and assigns the
memory-mapped tensors of the file to it: nothing is allocated twice and no float copy of the
quantized layers ever exists.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from rlhf_fast.quant.linear import QuantLinear, dense_weight, is_quantizable
from rlhf_fast.quant.model import DEFAULT_SKIP, FORMAT, quantize_model, replace_module
from rlhf_fast.quant.weight import INT4_BLOCK

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
_QUANT_SUFFIXES = (".qdata", ".scales", ".offsets", ".qshape")


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _model_dir(model_dir: str | os.PathLike) -> Path:
    path = Path(model_dir)
    if not path.exists():
        raise FileNotFoundError(f"{path}: model directory does not exist")
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a directory (expected a model directory)")
    if not (path / CONFIG_FILE).is_file():
        raise FileNotFoundError(
            f"{path / CONFIG_FILE}: missing (not a Hugging Face model directory)"
        )
    return path


def read_quantization(model_dir: str | os.PathLike) -> dict | None:
    """The `quantization` entry of a model directory's config.json, or None for a dense model."""
    config_file = _model_dir(model_dir) / CONFIG_FILE
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{config_file}: not valid JSON ({_one_line(error)})") from None
    entry = config.get("quantization") if isinstance(config, dict) else None
    if entry is None:
        return None
    known = isinstance(entry, dict) and entry.get("format") == FORMAT
    if not known or entry.get("bits") not in (4, 8):
        raise ValueError(
            f"{config_file}: 'quantization' entry {entry!r} is not an rlhf_fast int4/int8 format"
        )
    # The loader builds int4 layers with this group size (absent: 32, the default).
    group_size = entry.get("group_size", 32 if entry["bits"] == 4 else -1)
    if entry["bits"] == 4:
        valid = type(group_size) is int and group_size > 0 and group_size % INT4_BLOCK == 0
    else:
        valid = type(group_size) is int and group_size == -1
    if not valid:
        wanted = f"a positive multiple of {INT4_BLOCK}" if entry["bits"] == 4 else "-1"
        raise ValueError(
            f"{config_file}: 'quantization' group_size must be {wanted} for "
            f"int{entry['bits']}, got {group_size!r}"
        )
    return entry


# ---------------------------------------------------------------------------------------- save


def _tensors_to_save(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with tied copies dropped (tie_weights restores them) and no shared storage
    (safetensors refuses it)."""
    state = model.state_dict()
    tied = getattr(model, "get_expanded_tied_weights_keys", None)
    for target in tied(all_submodels=True) if tied is not None else ():
        state.pop(target, None)
    tensors, storages = {}, set()
    for key, tensor in state.items():
        tensor = tensor.detach().to("cpu").contiguous()
        storage = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if storage in storages:
            tensor = tensor.clone()
        storages.add(storage)
        tensors[key] = tensor
    return tensors


def _replace_dir(staged: Path, out_dir: Path) -> None:
    """Moves a finished temp dir into place; an old model dir there is replaced, any other
    non-empty directory is left alone."""
    if out_dir.exists():
        if not out_dir.is_dir():
            raise FileExistsError(f"{out_dir}: exists and is not a directory")
        if any(out_dir.iterdir()) and not (out_dir / CONFIG_FILE).is_file():
            raise FileExistsError(f"{out_dir}: exists, is not empty and is not a model directory")
        old = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
        out_dir.rename(old)
        try:
            staged.rename(out_dir)
        except BaseException:
            old.rename(out_dir)  # the old model back under its name, not a hidden one
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        staged.rename(out_dir)


def save_quantized(model: nn.Module, tokenizer, out_dir: str | os.PathLike) -> Path:
    """Writes a quantized model (and the tokenizer, if not None) to `out_dir`, atomically."""
    from safetensors.torch import save_file

    config = getattr(model, "config", None)
    if config is None or not isinstance(getattr(config, "quantization", None), dict):
        raise ValueError("model has no config.quantization entry: run quantize_model first")
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staged = out_dir.with_name(f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}")
    staged.mkdir()
    try:
        config.save_pretrained(staged)
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None:
            generation_config.save_pretrained(staged)
        save_file(_tensors_to_save(model), staged / WEIGHTS_FILE, metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(staged)
        _replace_dir(staged, out_dir)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return out_dir


# ---------------------------------------------------------------------------------------- load


def _open_weights(weights_file: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, memory-mapped (pages are read when first touched)."""
    from safetensors import safe_open

    if not weights_file.is_file():
        raise FileNotFoundError(f"{weights_file}: missing (quantized weights)")
    try:
        with safe_open(str(weights_file), framework="pt", device="cpu") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:  # safetensors raises its own error types for a bad header
        raise ValueError(
            f"{weights_file}: not a readable safetensors file ({_one_line(error)})"
        ) from None


def _build_skeleton(model_dir: Path, dtype: torch.dtype | None) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    return model


def _install_shells(
    model: nn.Module, tensors: dict[str, torch.Tensor], entry: dict, weights_file: Path
) -> None:
    """Replaces each layer that the file stores quantized with an empty QuantLinear (meta)."""
    names = sorted(key[: -len(".qdata")] for key in tensors if key.endswith(".qdata"))
    for name in names:
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            raise ValueError(
                f"{weights_file}: {name}.qdata names no layer of {type(model).__name__}"
            ) from None
        if not is_quantizable(layer):
            raise ValueError(f"{weights_file}: {name} is a {type(layer).__name__}, not a linear")
        qdata = tensors[f"{name}.qdata"]
        bits = {torch.int8: 8, torch.uint8: 4}.get(qdata.dtype)
        if bits is None:
            raise ValueError(
                f"{weights_file}: {name}.qdata has dtype {qdata.dtype}, not int8/uint8"
            )
        if bits != entry["bits"]:
            raise ValueError(
                f"{weights_file.parent / CONFIG_FILE}: 'quantization' says int{entry['bits']} "
                f"but {weights_file.name} stores {name} as int{bits}"
            )
        out_features, in_features = dense_weight(layer).shape
        bias = getattr(layer, "bias", None)
        with torch.device("meta"):
            shell = QuantLinear(
                in_features, out_features, bits, entry.get("group_size", 32) if bits == 4 else -1,
                bias=bias is not None, bias_dtype=bias.dtype if bias is not None else torch.float32,
            )  # fmt: skip
        replace_module(model, name, shell)


def _check_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], weights_file: Path) -> None:
    expected = model.state_dict()
    tied = set(model.get_expanded_tied_weights_keys(all_submodels=True))
    missing = sorted(set(expected) - set(tensors) - tied)
    unexpected = sorted(set(tensors) - set(expected))
    for problem, keys in (("missing tensor", missing), ("unexpected tensor", unexpected)):
        if keys:
            more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
            raise ValueError(f"{weights_file}: {problem} {keys[0]}{more} for this config")
    for key, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ValueError(
                f"{weights_file}: tensor {key} has shape {tuple(tensor.shape)}, "
                f"expected {tuple(expected[key].shape)} for this config"
            )
        if key.endswith(".qshape"):
            layer = model.get_submodule(key.rpartition(".")[0])
            stored, wanted = tuple(tensor.tolist()), (layer.out_features, layer.in_features)
            if stored != wanted:
                raise ValueError(
                    f"{weights_file}: tensor {key} says {stored}, the config gives {wanted}"
                )


def _materialize_buffers(model: nn.Module) -> None:
    """Non-persistent buffers (rotary inv_freq) are not in the file: build them for real and
    let the model's own initializer fill them."""
    for name, buffer in list(model.named_buffers()):
        if buffer.is_meta:
            owner = model.get_submodule(name.rpartition(".")[0])
            owner.to_empty(device="cpu", recurse=False)
            model._init_weights(owner)


def _is_format_tensor(key: str, quantized: set[str]) -> bool:
    prefix, _, suffix = key.rpartition(".")
    return prefix in quantized and f".{suffix}" in _QUANT_SUFFIXES


def load_quantized(
    model_dir: str | os.PathLike,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = torch.float32,
) -> nn.Module:
    """Loads a directory written by save_quantized. Float tensors (embeddings, norms, biases,
    lm_head) are cast to `dtype` (None keeps them as stored); quantized layers stay as stored."""
    path = _model_dir(model_dir)
    entry = read_quantization(path)
    if entry is None:
        raise ValueError(f"{path / CONFIG_FILE}: no 'quantization' entry (a dense model?)")
    weights_file = path / WEIGHTS_FILE
    tensors = _open_weights(weights_file)
    model = _build_skeleton(path, dtype)
    _install_shells(model, tensors, entry, weights_file)
    _check_tensors(model, tensors, weights_file)
    quantized = {name for name, module in model.named_modules() if isinstance(module, QuantLinear)}
    for key, tensor in tensors.items():
        cast = dtype is not None and tensor.is_floating_point()
        if cast and not _is_format_tensor(key, quantized):
            tensors[key] = tensor.to(dtype)
    model.load_state_dict(tensors, strict=False, assign=True)
    for name in quantized:
        try:
            model.get_submodule(name).qweight.validate(name)
        except ValueError as error:
            raise ValueError(f"{weights_file}: {error}") from None
    _materialize_buffers(model)
    model.tie_weights()
    everything = itertools.chain(model.named_parameters(), model.named_buffers())
    leftover = [name for name, tensor in everything if tensor.is_meta]
    if leftover:
        raise ValueError(f"{weights_file}: {leftover[0]} was not loaded (still on the meta device)")
    generation_file = path / "generation_config.json"
    if generation_file.is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(path)
    return model.to(device).eval()


def _float_dtype(dtype: object) -> torch.dtype | str | None:
    """None, "auto" or a floating torch.dtype; a name ("bfloat16") becomes the dtype, so the
    quantized path (tensor.to) accepts what transformers accepts for a dense one."""
    if dtype is None or dtype == "auto":
        return dtype
    parsed = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(parsed, torch.dtype) or not parsed.is_floating_point:
        raise ValueError(
            "dtype must be None, 'auto', a floating torch.dtype or its name ('bfloat16'), "
            f"got {dtype!r}"
        )
    return parsed


def load_model(
    model_dir: str | os.PathLike,
    quantize: int | None = None,
    group_size: int = 32,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str | None = torch.float32,
    *,
    skip: Iterable[str] = DEFAULT_SKIP,
    clip_search: bool = False,
) -> nn.Module:
    """Loads any causal LM directory for inference, in eval mode.

    A quantized directory (config.json has a `quantization` entry) loads as stored; `quantize`
    may then only repeat its bits. A dense directory (safetensors only) loads in `dtype`
    ("auto": as stored) and, with quantize=4 or 8, is quantized on load.
    """
    path = _model_dir(model_dir)
    if quantize not in (None, 4, 8):
        raise ValueError(f"quantize must be None, 4 or 8, got {quantize!r}")
    dtype = _float_dtype(dtype)
    entry = read_quantization(path)
    if entry is not None:
        if quantize is not None and quantize != entry["bits"]:
            raise ValueError(
                f"{path}: already quantized to int{entry['bits']}, cannot load it as int{quantize}"
            )
        return load_quantized(path, device, None if dtype == "auto" else dtype)
    if not any(path.glob("*.safetensors")):
        raise FileNotFoundError(
            f"{path}: no *.safetensors weights (only safetensors are loaded, never pickle)"
        )
    from transformers import AutoModelForCausalLM

    from rlhf_fast.models.load import from_pretrained_checked  # lazy: models imports quant

    # a tensor the checkpoint lacks is an error (transformers would make it random, and log it)
    model = from_pretrained_checked(AutoModelForCausalLM, path, dtype)
    if quantize is not None:
        quantize_model(model, quantize, group_size, skip=skip, clip_search=clip_search)
    return model.to(device).eval()
