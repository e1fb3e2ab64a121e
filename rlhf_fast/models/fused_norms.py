"""fuse_rms_norms: the RMSNorm modules of Llama, Qwen2 and Mistral models run ops.rms_norm.

HF's module is seven torch ops forward and about ten backward (~1 ms a norm on the h256 PPO
bench, 2 norms per layer + 1, in every forward and backward of every role); ops.rms_norm is one
C++ pass each way on CPU (and HF's formula, its reference, elsewhere). The module stays HF's
own (parameters, names, state_dict, repr); only its forward is replaced, on the instance, as
rlhf_fast.lora.fuse does for LoRA layers. Modules of other classes, and Gemma-style norms
(1 + weight), are left alone: only classes whose forward is exactly LlamaRMSNorm's are fused.
"""

from __future__ import annotations

import types

from torch import nn

from rlhf_fast import ops

# HF classes whose forward is LlamaRMSNorm's line for line (checked by tests/test_fused_norms.py
# against the installed transformers)
FUSABLE = frozenset({"LlamaRMSNorm", "Qwen2RMSNorm", "MistralRMSNorm"})
_FUSED_FLAG = "_rlhf_fast_rms_norm_fused"


def _fused_forward(self: nn.Module, hidden_states):
    return ops.rms_norm(hidden_states, self.weight, self.variance_epsilon)


def fuse_rms_norms(model: nn.Module) -> int:
    """Replaces the forward of every fusable RMSNorm in `model` (idempotent); returns how many
    modules it fused."""
    count = 0
    for module in model.modules():
        if type(module).__name__ in FUSABLE and not getattr(module, _FUSED_FLAG, False):
            module.forward = types.MethodType(_fused_forward, module)
            setattr(module, _FUSED_FLAG, True)
            count += 1
    return count


def unfuse_rms_norms(model: nn.Module) -> int:
    """Puts the class's own forward back; returns how many modules it restored."""
    count = 0
    for module in model.modules():
        if getattr(module, _FUSED_FLAG, False):
            del module.forward
            delattr(module, _FUSED_FLAG)
            count += 1
    return count
