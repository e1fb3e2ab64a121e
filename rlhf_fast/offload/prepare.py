"""prepare_offload: split a causal LM into an offload directory (see shards.py), once.

The source is a Hugging Face model directory (safetensors, read through memory maps one layer
at a time, so a model larger than RAM can be prepared) or a model already in memory. With
`compress=4` or `8`, every linear weight inside the decoder layers is quantized with
rlhf_fast.quant's formats on the way (embeddings and lm_head stay as stored), and the shards
hold the compressed tensors that QuantLinear / ops.quant_matmul consume directly.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from rlhf_fast.offload.shards import FORMAT_VERSION, MANIFEST, RESIDENT_FILE, layer_file
from rlhf_fast.quant.linear import _conv1d_class, is_quantizable
from rlhf_fast.quant.weight import quantize_weight


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(qualified name, list) of the model's decoder layers: the ModuleList with one entry per
    `config.num_hidden_layers` (model.layers for Llama, transformer.h for GPT-2, ...)."""
    count = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == count and count:
            return name, module
    raise ValueError(
        f"{type(model).__name__}: no ModuleList of config.num_hidden_layers={count} decoder layers"
    )


def _source_tensors(model_dir: Path) -> tuple[list[str], Callable[[str], torch.Tensor]]:
    """Keys and a memory-mapped getter over the directory's safetensors file(s)."""
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors weights (never pickle)")
    handles, where = [], {}
    for file in files:
        handle = safe_open(str(file), framework="pt", device="cpu")
        handles.append(handle)
        for key in handle.keys():
            where[key] = handle
    return list(where), lambda key: where[key].get_tensor(key)


def _model_keys(model: nn.Module, keys: list[str], model_dir: Path) -> dict[str, str]:
    """{stored key: the model's name for it}, renamed as transformers' loader renames them
    (GPT-NeoX stores its head as `embed_out`, the model's `lm_head`; a checkpoint saved from a
    base model lacks the `transformer.` / `model.` prefix; old `gamma` / `beta` names). Keys
    that transformers converts (fused or split tensors) are refused: ValueError."""
    try:  # the loader's own renaming (semi-public: peft uses get_model_conversion_mapping)
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            rename_source_key,
        )
    except ImportError:  # a transformers without it: names as stored
        return {key: key for key in keys}
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    expected, prefix = model.state_dict(), getattr(model, "base_model_prefix", None) or None
    names = {}
    for key in keys:
        name, converted = rename_source_key(key, renamings, converters, prefix, expected)
        if name not in expected and key in expected:  # as transformers: the name was right
            name, converted = rename_source_key(key, [], [], prefix, expected)
        if converted is not None:
            raise ValueError(
                f"{model_dir}: {key} is converted (fused or split) by transformers on load; "
                "prepare_offload needs the model loaded in memory for this checkpoint"
            )
        names[key] = name
    return names


def source_files(model_dir: str | os.PathLike) -> dict[str, list[int]]:
    """{file name: [size, mtime_ns]} of a model directory's weights and config: recorded in the
    manifest so that shards of weights saved over since are not reused (session._prepared)."""
    model_dir = Path(model_dir)
    files = [*sorted(model_dir.glob("*.safetensors")), model_dir / "config.json"]
    stats = {file.name: file.stat() for file in files if file.is_file()}
    return {name: [stat.st_size, stat.st_mtime_ns] for name, stat in stats.items()}


def _skeleton(model_dir: Path) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=False)


_FORMAT_PARTS = ("qdata", "scales", "offsets", "qshape")  # a QuantizedWeight's stored tensors


def _format_keys(keys) -> set[str]:
    """The keys that are parts of an already quantized weight (a source quantized before:
    `<module>.qdata` and its siblings), whose dtypes belong to the format, never cast."""
    quantized = {key[: -len(".qdata")] for key in keys if key.endswith(".qdata")}
    return {f"{module}.{part}" for module in quantized for part in _FORMAT_PARTS}


def _has_module(layer: nn.Module, name: str) -> bool:
    """Whether the module that `name` (relative to `layer`) belongs to exists."""
    try:
        layer.get_submodule(name.rpartition(".")[0])
    except AttributeError:
        return False
    return True


def _compressed(
    layer: nn.Module, name: str, tensor: torch.Tensor, bits: int | None, group_size: int
) -> dict[str, torch.Tensor]:
    """{relative name: tensor} to store for one of a layer's tensors (quantized if it should)."""
    module_name, _, attr = name.rpartition(".")
    module = layer.get_submodule(module_name) if module_name else layer
    if bits is None or attr != "weight" or not is_quantizable(module):
        return {name: tensor}
    conv1d = _conv1d_class()
    dense = tensor.t() if conv1d is not None and isinstance(module, conv1d) else tensor
    return quantize_weight(dense.float(), bits, group_size).state_dict(module_name)


def _check_replaceable(out_dir: Path) -> None:
    """prepare_offload replaces `out_dir` only if it is absent, empty or an offload directory
    (it holds a manifest): never a directory of the user's, nor the model directory itself."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise FileExistsError(f"{out_dir}: exists and is not a directory")
    if (out_dir / MANIFEST).is_file() or not any(out_dir.iterdir()):
        return
    raise FileExistsError(
        f"{out_dir}: exists and is not an offload directory (no {MANIFEST}); "
        "choose another path or remove it"
    )


def _remove_abandoned_staging(out_dir: Path) -> None:
    """Delete the staging directories (`.NAME.tmp-PID-XXXXXXXX`, beside out_dir) of earlier
    prepares of out_dir whose process is gone: a kill -9 mid-way leaves one, as large as the
    shards written so far. A live process's (another prepare of the same directory) stays."""
    for path in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):
        pid = path.name.rsplit(".tmp-", 1)[1].split("-")[0]
        if path.is_dir() and pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def prepare_offload(
    source: str | os.PathLike | nn.Module,
    offload_dir: str | os.PathLike,
    *,
    compress: int | None = None,
    group_size: int = 32,
    dtype: torch.dtype | None = None,
) -> Path:
    """Writes `offload_dir` (atomically: temp dir + rename) from a model dir or a model. An
    existing `offload_dir` is replaced only if it is an offload directory or empty (else
    FileExistsError, before any work).

    compress: None (as stored), 4 or 8 (decoder-layer linears quantized). dtype: cast float
    tensors that stay dense, never the scales of weights quantized here or in the source (None:
    keep them as stored). Returns the directory.
    """
    from safetensors.torch import save_file

    if compress not in (None, 4, 8):
        raise ValueError(f"compress must be None, 4 or 8, got {compress!r}")
    _check_replaceable(Path(offload_dir))
    fingerprint = None
    if isinstance(source, nn.Module):
        model = source
        state = model.state_dict()
        tied = getattr(model, "get_expanded_tied_weights_keys", None)
        skip = set(tied(all_submodels=True)) if tied is not None else set()
        keys = [key for key in state if key not in skip]
        get, origin = state.__getitem__, type(model).__name__
    else:
        model_dir = Path(source)
        if not (model_dir / "config.json").is_file():
            raise FileNotFoundError(f"{model_dir / 'config.json'}: missing (not a model directory)")
        fingerprint = source_files(model_dir)  # before reading: a later change shows
        stored_keys, get_stored = _source_tensors(model_dir)
        model, origin = _skeleton(model_dir), str(model_dir.resolve())
        stored_as = {new: old for old, new in _model_keys(model, stored_keys, model_dir).items()}
        keys = list(stored_as)

        def get(key: str) -> torch.Tensor:
            return get_stored(stored_as[key])

    prefix, layers = decoder_layers(model)
    formats = _format_keys(keys)
    out_dir = Path(offload_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_staging(out_dir)
    staged = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    staged.mkdir()

    def prepared(tensor: torch.Tensor, dense: bool = True) -> torch.Tensor:
        if dtype is not None and dense and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        return tensor.detach().to("cpu").contiguous()

    try:
        per_layer: list[dict[str, torch.Tensor]] = [{} for _ in layers]
        resident: dict[str, torch.Tensor] = {}
        for key in keys:
            head, _, rest = key.partition(prefix + ".")
            index, _, name = rest.partition(".")
            if head == "" and index.isdigit() and int(index) < len(layers):
                if not _has_module(layers[int(index)], name):
                    continue  # a tensor the model has no module for (old rotary_emb.inv_freq)
                per_layer[int(index)][name] = None  # filled one layer at a time below
            else:
                resident[key] = prepared(get(key), key not in formats).clone()
        save_file(resident, staged / RESIDENT_FILE, metadata={"format": "pt"})
        layer_bytes = []
        for index, names in enumerate(per_layer):
            tensors = {}
            for name in names:
                full = f"{prefix}.{index}.{name}"
                stored = _compressed(layers[index], name, get(full), compress, group_size)
                # else a quantized format (now or in the source): its own dtypes
                dense = list(stored) == [name] and full not in formats
                tensors.update({key: prepared(value, dense) for key, value in stored.items()})
            save_file(tensors, staged / layer_file(index), metadata={"format": "pt"})
            layer_bytes.append(sum(t.numel() * t.element_size() for t in tensors.values()))
        float_dtypes = {t.dtype for t in resident.values() if t.is_floating_point()}
        manifest = {
            "version": FORMAT_VERSION,
            "source": origin,
            "source_files": fingerprint,  # None: prepared from a model in memory
            "layers_prefix": prefix,
            "num_layers": len(layers),
            "dtype": str(next(iter(float_dtypes), torch.float32)).removeprefix("torch."),
            "compress": None if compress is None else {"bits": compress, "group_size": group_size},
            "layer_bytes": layer_bytes,
            "resident_bytes": sum(t.numel() * t.element_size() for t in resident.values()),
        }
        model.config.save_pretrained(staged)
        (staged / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if out_dir.exists():
            _check_replaceable(out_dir)  # again: it may have been written to meanwhile
            shutil.rmtree(out_dir)
        staged.rename(out_dir)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return out_dir
