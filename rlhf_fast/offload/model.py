"""load_offloaded: a causal LM built from an offload directory whose layers stream from disk.

The model is built on the meta device from the directory's config; embeddings, final norm and
lm_head (resident.safetensors) are loaded for real; `resident_layers` decoder layers (spread
evenly over the depth, so that reads of the streamed ones overlap their compute too) are read
once; the others are bound by a LayerStreamer around each forward through hooks on the layer
(a pre-hook acquires, an always-called forward hook releases, even when the layer raises).
Any HF forward therefore works unchanged (`model(...)`, `generate_tokens(..., decoder="hf")`);
`offload.generate.generate_batch` adds FlexGen's block schedule on top.

Activations (int4 layers): by default the project's int4 activation rule (quant/activations.py)
holds: int4 products of at least `bf16_rows` = BF16_ROWS (32) rows (prefill, large decode
batches) run on bf16 activations outside autograd, where the C++ int4 kernel multiplies bf16
weight tiles with torch's bf16 GEMM (at 128 rows of the 1.57B shape's MLP: 7.0 ms instead of
20.5 ms with fp32 activations). The streamed model then equals the resident quantized model
under the same rule (`quant.activations.set_int4_activations`; chat --int4 sets it) token for
token under greedy decoding; `bf16_rows=None` is the opt-out (fp32 activations: equal to the
fp32-activation resident model). Training turns the rule off (`enable_training`), and so do
PPO rollouts (offload/rollout.py): their stored log-probs must be the training forward's.

Training (LoRA on the frozen streamed base): `enable_training()` checkpoints every decoder layer
so that its backward streams it in again (offload/backward.py); adapters are attached inside
`stand_ins()` (offload/lora.py), since peft places them on the device of weights that are not
loaded.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch
from torch import nn

from rlhf_fast.offload.prepare import decoder_layers
from rlhf_fast.offload.shards import (
    MANIFEST,
    RESIDENT_FILE,
    ShardError,
    layer_file,
    load_file,
    read_layout,
    read_manifest,
)
from rlhf_fast.offload.streamer import LayerStreamer
from rlhf_fast.quant.activations import BF16_ROWS, set_int4_activations
from rlhf_fast.quant.linear import QuantLinear
from rlhf_fast.quant.model import replace_module


def spread(count: int, total: int) -> set[int]:
    """`count` of range(total), evenly spaced (count=total: all; 0: none)."""
    count = max(0, min(count, total))
    return {int((k + 0.5) * total / count) for k in range(count)} if count else set()


def _install_quant_shells(layer: nn.Module, layout, where: str) -> None:
    """QuantLinear shells (meta) for each `<name>.qdata` of a layer shard."""
    shapes = {entry.name: entry for entry in layout.tensors}
    for key, entry in shapes.items():
        if not key.endswith(".qdata"):
            continue
        name = key[: -len(".qdata")]
        old = layer.get_submodule(name)
        bits = {torch.int8: 8, torch.uint8: 4}.get(entry.dtype)
        scales = shapes.get(f"{name}.scales")
        if bits is None or scales is None:
            raise ShardError(f"{where}: {key} is not an int8/int4 quantized weight")
        rank = 1 if bits == 8 else 2  # int8: a scale per row; int4: per row and group
        if len(entry.shape) != 2 or len(scales.shape) != rank or 0 in scales.shape:
            raise ShardError(
                f"{where}: {name} has codes of shape {list(entry.shape)} and scales of shape "
                f"{list(scales.shape)} (expected 2-D codes and {rank}-D scales)"
            )
        out_features, packed = entry.shape
        group_size = -1 if bits == 8 else packed * 2 // scales.shape[1]
        in_features = old.in_features if hasattr(old, "in_features") else old.weight.shape[0]
        bias = getattr(old, "bias", None)
        with torch.device("meta"):
            shell = QuantLinear(
                in_features, out_features, bits, max(group_size, 32), bias=bias is not None,
                bias_dtype=bias.dtype if bias is not None else torch.float32,
            )  # fmt: skip
        shell.group_size = group_size
        replace_module(layer, name, shell)


def _check_stored(where: str, name: str, stored, expected: torch.Tensor, shape: bool) -> None:
    """A stored tensor (`stored`: dtype and shape) fits the model's `expected` one: floats for
    floats and integers for integers (a file's integers bound as float weights would compute
    silently), and with `shape` the same shape; else ShardError `FILE: what`."""
    if shape and list(stored.shape) != list(expected.shape):
        raise ShardError(
            f"{where}: {name} has shape {list(stored.shape)}, the model's "
            f"{list(expected.shape)} (prepared for another model? prepare again)"
        )
    if stored.dtype.is_floating_point != expected.is_floating_point():
        raise ShardError(
            f"{where}: {name} has dtype {stored.dtype}, the model's {expected.dtype} "
            "(a corrupt or foreign file? prepare again)"
        )


def _check_layer_shard(layer: nn.Module, layout, where: str) -> None:
    """Each tensor of a layer's shard is one of the layer's, of its shape and kind of dtype
    (quantized weights: of the shapes their shells derive from the shard and the config), and
    each parameter is in the shard; else ShardError `FILE: what` (a shard prepared for another
    model, or by a transformers version that named the modules otherwise)."""
    parameters, buffers = dict(layer.named_parameters()), dict(layer.named_buffers())
    for entry in layout.tensors:
        if entry.name in parameters:
            _check_stored(where, entry.name, entry, parameters[entry.name], shape=True)
        elif entry.name in buffers:
            _check_stored(where, entry.name, entry, buffers[entry.name], shape=True)
        else:
            raise ShardError(
                f"{where}: tensor {entry.name} is not in {type(layer).__name__} (prepared for "
                "another model or transformers version? prepare again)"
            )
    stored = {entry.name for entry in layout.tensors}
    missing = [name for name in [*parameters, *_persistent_buffers(layer)] if name not in stored]
    if missing:  # a buffer would otherwise be made up by the model's initializer, silently
        raise ShardError(f"{where}: missing tensor {missing[0]}")


def _persistent_buffers(layer: nn.Module) -> list[str]:
    """Names of the buffers a state dict of `layer` holds (a quantized weight's scales,
    offsets and shape), not the non-persistent ones built from the config (rotary inv_freq)."""
    return [
        f"{prefix}.{name}" if prefix else name
        for prefix, module in layer.named_modules()
        for name, buffer in module._buffers.items()
        if buffer is not None and name not in module._non_persistent_buffers_set
    ]


def _materialize_remaining(model: nn.Module, streamed_names: set[str]) -> None:
    """Non-persistent buffers (rotary inv_freq) are in no file: build them with the model's
    own initializer, except the streamed layers' tensors (they stay meta until bound). The
    initializer redoes the owner's loaded tensors too (Gemma's embedding owns `embed_scale`
    and the embedding weight): those are put back."""
    for name, buffer in list(model.named_buffers()):
        if buffer.is_meta and name not in streamed_names:
            owner = model.get_submodule(name.rpartition(".")[0])
            own = {**owner._parameters, **owner._buffers}
            loaded = {k: t.detach() for k, t in own.items() if t is not None and not t.is_meta}
            owner.to_empty(device="cpu", recurse=False)
            model._init_weights(owner)
            for key, tensor in loaded.items():
                store = owner._parameters if key in owner._parameters else owner._buffers
                store[key].data = tensor


def _refuse_graph(layer: nn.Module, args, index: int) -> None:
    """A streamed layer outside the training-mode checkpoint (offload/backward.py) must build
    no autograd graph: the graph would keep views of its slot buffer, which the next layers
    overwrite before the backward reads them (silently wrong gradients)."""
    inputs = any(torch.is_tensor(a) and a.requires_grad for a in args)
    if inputs or any(p.requires_grad for p in layer.parameters()):
        raise RuntimeError(
            f"offload: gradients through streamed decoder layer {index} need training mode "
            "(model.train()), where it is checkpointed and streamed again in the backward; "
            "in eval mode use torch.no_grad()"
        )


class OffloadedLM:
    """`model` (an HF causal LM whose decoder layers stream) and the streamer behind it."""

    def __init__(self, model: nn.Module, streamer: LayerStreamer, manifest: dict, hooks) -> None:
        self.model, self.streamer, self.manifest, self._hooks = model, streamer, manifest, hooks
        self.policy = None  # the offload Policy that chose this placement, when one did
        model.rlhf_fast_offload = self  # how the trainer and chat find the streamer

    @property
    def layers(self) -> nn.ModuleList:
        return decoder_layers(self.model)[1]

    @property
    def resident_bytes(self) -> int:
        """Bytes held in RAM for weights: non-layer tensors + resident layers + slots."""
        return self.manifest["resident_bytes"] + self.streamer.held_bytes

    def enable_training(self) -> None:
        """Forward and backward in training mode stream the layers (see offload/backward.py)."""
        from rlhf_fast.offload.backward import enable_streamed_training

        # the training forward runs its layers without a graph and the backward recomputes them
        # with one: both must run the same (fp32) products
        set_int4_activations(self.model, None)
        enable_streamed_training(self.streamer, self.layers)

    def stand_ins(self):
        """Context: unloaded layers show shaped CPU stand-ins (LayerStreamer.shaped_stand_ins)."""
        return self.streamer.shaped_stand_ins()

    def close(self) -> None:
        self.streamer.close()
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def __enter__(self) -> OffloadedLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load_offloaded(
    offload_dir: str | os.PathLike,
    *,
    resident_layers: int = 0,
    prefetch: int = 1,
    drop_cache: bool = False,
    bf16_rows: int | None = BF16_ROWS,
) -> OffloadedLM:
    """Opens an offload directory written by prepare_offload (see the module docstring).

    Every shard's header is checked here, so a missing or truncated file fails before the first
    token with `FILE: what is wrong`. `bf16_rows`: the int4 activation rule's threshold (None:
    fp32 activations).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if bf16_rows is not None and (not isinstance(bf16_rows, int) or bf16_rows < 1):
        raise ValueError(f"bf16_rows must be None or an int >= 1, got {bf16_rows!r}")
    path = Path(offload_dir)
    manifest = read_manifest(path)
    if not 0 <= resident_layers <= manifest["num_layers"]:  # spread() would clamp it silently
        raise ValueError(
            f"resident_layers must be in [0, {manifest['num_layers']}] (the model's layers), "
            f"got {resident_layers}"
        )
    layouts = [read_layout(path / layer_file(i)) for i in range(manifest["num_layers"])]
    dtype = getattr(torch, manifest["dtype"])
    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    prefix, layers = decoder_layers(model)
    if len(layers) != len(layouts):
        raise ShardError(
            f"{path / MANIFEST}: num_layers {len(layouts)}, the model's config has {len(layers)}"
        )
    for index, (layer, layout) in enumerate(zip(layers, layouts, strict=True)):
        _install_quant_shells(layer, layout, str(path / layer_file(index)))
        _check_layer_shard(layer, layout, str(path / layer_file(index)))
    resident = load_file(path / RESIDENT_FILE)
    expected = model.state_dict()
    for name, tensor in resident.items():
        if name in expected:
            _check_stored(str(path / RESIDENT_FILE), name, tensor, expected[name], shape=True)
    model.load_state_dict(resident, strict=False, assign=True)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    streamed_names = {
        f"{prefix}.{i}.{entry.name}" for i, layout in enumerate(layouts) for entry in layout.tensors
    }
    _materialize_remaining(model, streamed_names)
    missing = [
        name
        for name, tensor in model.named_parameters()
        if tensor.is_meta and name not in streamed_names
    ]
    if missing:
        raise ShardError(f"{path / RESIDENT_FILE}: missing tensor {missing[0]}")
    streamer = LayerStreamer(
        layers, layouts, spread(resident_layers, len(layers)), prefetch=prefetch,
        drop_cache=drop_cache,
    )  # fmt: skip

    def acquire(layer: nn.Module, args, index: int) -> None:
        # a training forward is followed by a backward that walks the layers in reverse
        checkpointed = getattr(layer, "gradient_checkpointing", False)
        training = layer.training and checkpointed and torch.is_grad_enabled()
        # the backward's recompute holds its layer until the gradients are computed: allowed
        if torch.is_grad_enabled() and not training and index in streamer.streamed:
            if not streamer.holds(index):
                _refuse_graph(layer, args, index)
        streamer.acquire(index, turn=training)

    hooks = []
    for index, layer in enumerate(layers):
        hooks.append(layer.register_forward_pre_hook(functools.partial(acquire, index=index)))
        hooks.append(
            layer.register_forward_hook(lambda *_, i=index: streamer.release(i), always_call=True)
        )
    set_int4_activations(model, bf16_rows)
    model.eval()
    model.requires_grad_(False)  # a frozen base: only adapters added later train
    return OffloadedLM(model, streamer, manifest, hooks)
