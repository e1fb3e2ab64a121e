"""Training through streamed layers: each decoder layer is checkpointed, and its backward
streams the layer in again (in reverse order) to recompute it.

A streamed layer's weights live in a slot buffer only between the streamer's acquire and
release; the slot is then refilled with another layer. Autograd must therefore never keep a
reference to them past the layer's forward: its own saved tensors, and also tensors that
autograd Functions stash on `ctx` (the fused LoRA op keeps its frozen base there, quant_matmul
its QuantizedWeight), would silently read another layer's bytes in backward. So the layer runs
inside `_StreamedLayer`, a reentrant checkpoint: the forward runs without a graph (the model's
hooks acquire and release the layer around it) and keeps only the layer's inputs; its
backward acquires the layer again (reading ahead towards layer 0 while this one computes),
rebuilds the layer's graph from the saved inputs, back-propagates through it, and only then
releases the layer. Nothing of the layer survives its backward, so no freed or refilled slot is
ever read, and an exception anywhere in between still releases it.

What the recompute restores so that it repeats the forward exactly: the RNG state (dropout),
and which peft adapters were active or disabled (PPO runs the policy and the critic through
the same layers with different adapters, then one backward over both graphs). The layer's
trainable tensors (LoRA A and B) are inputs of the Function, so they get gradients even where
the layer's input does not require one (layer 0, after a frozen embedding).

Memory of a training step: the held weights (resident layers + `prefetch + 1` slots), one
input per decoder layer ([batch, tokens, hidden] each), one layer's full activations during its
recompute and backward, and the logits.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from rlhf_fast.offload.streamer import LayerStreamer


def _adapter_state(layer: nn.Module) -> list[tuple[nn.Module, object, bool]]:
    """(module, active adapter(s), disabled) of every peft tuner layer inside `layer`.

    Read and restored through peft's attributes directly: its set_adapter() would also flip
    requires_grad of the adapters, which the trainer owns."""
    return [
        (module, module._active_adapter, module._disable_adapters)
        for module in layer.modules()
        if hasattr(module, "_active_adapter") and hasattr(module, "_disable_adapters")
    ]


def _adapter_state_now(state: list[tuple[nn.Module, object, bool]]):
    return [(module, module._active_adapter, module._disable_adapters) for module, _, _ in state]


def _set_adapter_state(state: list[tuple[nn.Module, object, bool]]) -> None:
    for module, active, disabled in state:
        module._active_adapter, module._disable_adapters = active, disabled


_TENSOR = object()  # marks where a positional argument was a tensor (saved on ctx instead)


class _Recompute:
    """What one checkpointed call needs to run its layer again in backward."""

    def __init__(self, streamer, index, run, layer, args) -> None:
        self.streamer, self.index, self.run = streamer, index, run
        self.adapters = _adapter_state(layer)
        self.args = [_TENSOR if torch.is_tensor(a) else a for a in args]
        self.cpu_rng = torch.get_rng_state()
        devices = {a.device for a in args if torch.is_tensor(a) and a.device.type == "cuda"}
        self.cuda_rng = {d: torch.cuda.get_rng_state(d) for d in devices}

    def call(self, tensors: list[torch.Tensor]) -> torch.Tensor | tuple:
        """The layer's output: its hidden states, or a tuple whose first entry they are
        (BLOOM's layer returns (hidden states, attention weights or None))."""
        remaining = list(tensors)
        output = self.run(*[remaining.pop(0) if a is _TENSOR else a for a in self.args])
        hidden = output[0] if isinstance(output, tuple) and output else output
        if not torch.is_tensor(hidden):
            raise TypeError(f"offload training: decoder layer returned {type(output).__name__}")
        return output


def _hidden(output: torch.Tensor | tuple) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


class _StreamedLayer(torch.autograd.Function):
    """Inputs: the layer's positional tensors (`num_args` of them), then its trainable ones.
    Output: the layer's; of a tuple, only the first entry (the hidden states) is
    differentiable (the others, attention weights, carry no gradient)."""

    @staticmethod
    def forward(ctx, recompute: _Recompute, num_args: int, *tensors):
        ctx.recompute, ctx.num_args = recompute, num_args
        ctx.save_for_backward(*tensors)
        output = recompute.call(list(tensors[:num_args]))  # no graph: forward runs without grad
        if isinstance(output, tuple):
            ctx.mark_non_differentiable(*[t for t in output[1:] if torch.is_tensor(t)])
        return output

    @staticmethod
    def backward(ctx, grad_output, *_):
        recompute = ctx.recompute
        saved = ctx.saved_tensors
        inputs = [t.detach().requires_grad_(t.requires_grad) for t in saved[: ctx.num_args]]
        params = list(saved[ctx.num_args :])
        recompute.streamer.acquire(recompute.index, direction=-1)
        try:
            current = _adapter_state_now(recompute.adapters)
            devices = list(recompute.cuda_rng)
            with torch.random.fork_rng(devices=devices, device_type="cuda"):
                torch.set_rng_state(recompute.cpu_rng)
                for device, state in recompute.cuda_rng.items():
                    torch.cuda.set_rng_state(state, device)
                _set_adapter_state(recompute.adapters)
                try:
                    with torch.enable_grad():
                        output = _hidden(recompute.call(inputs))
                finally:
                    _set_adapter_state(current)
            wanted = [t for t in inputs if t.requires_grad] + params
            grads = [None] * len(wanted)
            if wanted and output.requires_grad:
                grads = list(torch.autograd.grad(output, wanted, grad_output, allow_unused=True))
        finally:
            recompute.streamer.release(recompute.index)
        input_grads = [grads.pop(0) if t.requires_grad else None for t in inputs]
        return (None, None, *input_grads, *grads)


def streamed_checkpoint(streamer: LayerStreamer, index: int, layer: nn.Module, run, *args):
    """Runs `run(*args)` (layer `index`'s forward, its keyword arguments bound) as a streamed
    checkpoint (see the module docstring). Installed as the layer's checkpoint function."""
    keywords = getattr(run, "keywords", None) or {}
    for name, value in keywords.items():
        if torch.is_tensor(value) and value.requires_grad:
            raise ValueError(
                f"offload training: keyword argument {name!r} of decoder layer {index} requires "
                "a gradient; only positional inputs can carry one through the checkpoint"
            )
    tensors = [a for a in args if torch.is_tensor(a)]
    params = [p for p in layer.parameters() if p.requires_grad]
    recompute = _Recompute(streamer, index, run, layer, list(args))
    return _StreamedLayer.apply(recompute, len(tensors), *tensors, *params)


def enable_streamed_training(streamer: LayerStreamer, layers: nn.ModuleList) -> None:
    """Checkpoints every decoder layer through `streamed_checkpoint` (transformers calls a
    layer's `_gradient_checkpointing_func` in training mode with gradients enabled)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    for index, layer in enumerate(layers):
        if not isinstance(layer, GradientCheckpointingLayer):
            raise ValueError(
                f"offload training: {type(layer).__name__} does not support checkpointing "
                "(transformers' GradientCheckpointingLayer), which streaming needs"
            )
        layer.gradient_checkpointing = True
        layer._gradient_checkpointing_func = functools.partial(
            streamed_checkpoint, streamer, index, layer
        )
