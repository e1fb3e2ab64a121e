"""quantize_model: swap a causal LM's Linear / Conv1D layers for QuantLinear, in place."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from rlhf_fast.quant.linear import QuantLinear, is_quantizable

FORMAT = "rlhf_fast"
DEFAULT_SKIP = ("lm_head",)
# The compression names of the CLI flags (--quant, --rollout-quant, --offload compress=) -> bits
BITS_BY_NAME = {"none": None, "int8": 8, "int4": 4}


def is_skipped(name: str, skip: Iterable[str]) -> bool:
    """True when a qualified module name matches one of `skip`: a name component equal to the
    pattern ("lm_head", "mlp"), a dotted prefix ("model.layers.0"), or an fnmatch pattern on the
    full name or on any component ("*.layers.0.*", "*_proj")."""
    components = name.split(".")
    for pattern in skip:
        if fnmatch.fnmatchcase(name, pattern) or name.startswith(pattern + "."):
            return True
        if any(fnmatch.fnmatchcase(component, pattern) for component in components):
            return True
    return False


def quantizable_layers(
    model: nn.Module, skip: Iterable[str] = DEFAULT_SKIP
) -> Iterator[tuple[str, nn.Module]]:
    """(qualified name, module) of every nn.Linear / Conv1D that quantize_model would replace,
    in module order; a module reachable under several names is listed under each."""
    skip = tuple(skip)
    for name, module in model.named_modules(remove_duplicate=False):
        if name and is_quantizable(module) and not is_skipped(name, skip):
            yield name, module


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child_name = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child_name, new)


def _untie_quantized_targets(model: nn.Module, quantized: set[str]) -> None:
    """A tied output embedding that was quantized is no longer the input embedding: drop the
    tie from the config so that tie_weights() (now or after loading) leaves it alone."""
    tied = getattr(model, "get_expanded_tied_weights_keys", None)
    if tied is None:
        return
    for target, source in tied(all_submodels=True).items():
        for key in (target, source):
            module_name = key.rpartition(".")[0]
            if module_name in quantized:
                model.config.tie_word_embeddings = False
    if hasattr(model, "all_tied_weights_keys"):
        model.all_tied_weights_keys = tied(all_submodels=True)


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    bits: int = 4,
    group_size: int = 32,
    skip: Iterable[str] = DEFAULT_SKIP,
    clip_search: bool = False,
) -> nn.Module:
    """Replaces every nn.Linear / Conv1D whose name does not match `skip` with a QuantLinear.

    Works on any transformers causal LM (module replacement only); embeddings are never
    Linear layers and `lm_head` is skipped by default, so tied embeddings keep working.
    Records `model.config.quantization` and returns the model.
    """
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if isinstance(skip, str):
        skip = (skip,)
    skip = tuple(skip)
    replacements: dict[int, QuantLinear] = {}
    quantized: set[str] = set()
    for name, module in list(quantizable_layers(model, skip)):
        if id(module) not in replacements:
            replacements[id(module)] = QuantLinear.from_linear(
                module, bits, group_size, clip_search
            )
        replace_module(model, name, replacements[id(module)])
        quantized.add(name)
    config = getattr(model, "config", None)
    if config is not None:
        _untie_quantized_targets(model, quantized)
        config.quantization = {
            "bits": bits,
            "group_size": -1 if bits == 8 else group_size,
            "skip": list(skip),
            "format": FORMAT,
        }
    return model
