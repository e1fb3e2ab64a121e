"""fuse_layers: the RMSNorms and SwiGLU MLPs of Llama, Qwen2 and Mistral models run rlhf_fast's
fused ops (ops.rms_norm, ops.silu_mul) in forward and backward.

HF computes each of them as a chain of small torch ops, every one a pass over the activations:
a norm is ~17 ops forward and backward (~0.8 ms at [512, 256] fp32 on the dev VM), the MLP's
silu(gate) * up 5 passes over the layer's largest tensors (~1-2 ms at [512, 688]). The fused
ops are one C++ pass each way on CPU, and HF's own formula elsewhere (their references). The
modules stay HF's own (parameters, names, state_dict, repr); only their forward is replaced,
on the instance, as rlhf_fast.lora.fuse does for LoRA layers, so LoRA adapters on the MLP's
projections keep working. Only classes whose forward is exactly Llama's (checked against the
installed transformers by tests/test_fused_layers.py) and MLPs whose activation is SiLU are
fused; anything else (Gemma-style 1 + weight norms, GELU MLPs, ...) is left alone.
"""

from __future__ import annotations

import types

from torch import nn

from rlhf_fast import ops

FUSABLE_NORMS = frozenset({"LlamaRMSNorm", "Qwen2RMSNorm", "MistralRMSNorm"})
FUSABLE_MLPS = frozenset({"LlamaMLP", "Qwen2MLP", "MistralMLP"})
SILU_ACTIVATIONS = frozenset({"SiLU", "SiLUActivation"})
_FUSED_FLAG = "_rlhf_fast_layer_fused"


def _rms_norm_forward(self: nn.Module, hidden_states):
    return ops.rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _swiglu_mlp_forward(self: nn.Module, x):
    return self.down_proj(ops.silu_mul(self.gate_proj(x), self.up_proj(x)))


def _fused_forward(module: nn.Module):
    """The fused forward for `module`, or None when it is not one we fuse."""
    name = type(module).__name__
    if name in FUSABLE_NORMS:
        return _rms_norm_forward
    if name in FUSABLE_MLPS and type(getattr(module, "act_fn", None)).__name__ in SILU_ACTIVATIONS:
        return _swiglu_mlp_forward
    return None


def fuse_layers(model: nn.Module) -> int:
    """Replaces the forward of every fusable norm and MLP in `model` (idempotent); returns how
    many modules it fused."""
    count = 0
    for module in model.modules():
        forward = _fused_forward(module)
        if forward is not None and not getattr(module, _FUSED_FLAG, False):
            module.forward = types.MethodType(forward, module)
            setattr(module, _FUSED_FLAG, True)
            count += 1
    return count


def is_fused(module: nn.Module) -> bool:
    return getattr(module, _FUSED_FLAG, False)


def unfuse_layers(model: nn.Module) -> int:
    """Puts the classes' own forwards back; returns how many modules it restored."""
    count = 0
    for module in model.modules():
        if is_fused(module):
            del module.forward
            delattr(module, _FUSED_FLAG)
            count += 1
    return count
