"""fuse_layers: the RMSNorms, SwiGLU MLPs and rotary embeddings of Llama, Qwen2 and Mistral
models run rlhf_fast's fused ops (ops.rms_norm, ops.silu_mul, ops.rotary_embedding) in forward
and backward.

HF computes each of them as a chain of small torch ops, every one a pass over the activations:
a norm is ~17 ops forward and backward (~0.8 ms at [512, 256] fp32 on the dev VM), the MLP's
silu(gate) * up 5 passes over the layer's largest tensors (~1-2 ms at [512, 688]), the rotary
embedding of q and k ~10 (~0.8 ms at 512 tokens of 4 + 2 heads of 64). The fused
ops are one C++ pass each way on CPU, and HF's own formula elsewhere (their references). The
modules stay HF's own (parameters, names, state_dict, repr); only their forward is replaced,
on the instance, as rlhf_fast.lora.fuse does for LoRA layers, so LoRA adapters on the MLP's
projections keep working. Only classes whose forward is exactly Llama's (checked against the
installed transformers by tests/test_fused_layers.py) and MLPs whose activation is SiLU are
fused; anything else (Gemma-style 1 + weight norms, GELU MLPs, ...) is left alone. Attention
is fused by replacing the whole forward with `_attention_forward`, a copy of HF's with the
rotary step on the fused op; so it is fused only when the class's forward is, character for
character, the one that function mirrors (ATTENTION_SOURCES: a hash per class, of transformers
5.24): another transformers version keeps HF's attention, the norms and MLPs still fused.
Within it, the softmax attention of CPU training and scoring passes (no past keys, no mask or
a bool one) is ops.short_attention instead of SDPA (`_short_attention_applies`).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import sys
import types

import torch
from torch import nn

from rlhf_fast import ops

FUSABLE_NORMS = frozenset({"LlamaRMSNorm", "Qwen2RMSNorm", "MistralRMSNorm"})
FUSABLE_MLPS = frozenset({"LlamaMLP", "Qwen2MLP", "MistralMLP"})
SILU_ACTIVATIONS = frozenset({"SiLU", "SiLUActivation"})
# sha256 prefixes of the forwards `_attention_forward` mirrors; the value: how the class passes
# the sliding window to the attention function (Llama: not at all)
ATTENTION_SOURCES = {
    "LlamaAttention": ("e080b5cc468cd0a5", None),
    "Qwen2Attention": ("958fda1e108c1fe8", "module"),  # self.sliding_window (per layer type)
    "MistralAttention": ("574be7fb3f193570", "config"),  # config.sliding_window
}
_FUSED_FLAG = "_rlhf_fast_layer_fused"


def _rms_norm_forward(self: nn.Module, hidden_states):
    return ops.rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _swiglu_mlp_forward(self: nn.Module, x):
    return self.down_proj(ops.silu_mul(self.gate_proj(x), self.up_proj(x)))


# torch's CPU flash-attention backward in bf16/fp16 pays a fixed cost per (batch, head) that
# dominates short sequences: fwd+bwd at [8, 4, 64, 64] takes 5.8 ms in bf16, 2.0 ms through fp32
# and back (torch 2.13, dev VM); from ~256 keys on, bf16 is the faster again. Training passes
# go to ops.short_attention (below) instead; this is for the SDPA calls it does not take (a
# float mask, dropout, queries over a cache's past keys).
SHORT_KEYS_IN_FP32 = 256


def _widen_for_cpu_sdpa(implementation: str, query, key) -> bool:
    """Whether a 16-bit CPU SDPA with gradients runs faster in fp32 (see SHORT_KEYS_IN_FP32)."""
    return (
        implementation == "sdpa"
        and query.device.type == "cpu"
        and query.dtype in (torch.bfloat16, torch.float16)
        and key.shape[-2] < SHORT_KEYS_IN_FP32
        and torch.is_grad_enabled()
        and (query.requires_grad or key.requires_grad)
    )


# ops.short_attention replaces SDPA for training and scoring passes (as many queries as keys)
# up to this many keys; SHORT_ATTENTION = False keeps HF's path (for A/B measurements). It
# beat SDPA up to 512 keys (fwd+bwd 2.0-2.4x at 1 thread, [B, 4, T, 64], B * T = 1024); the cap
# is the fp32 probabilities it keeps for the backward (4 T^2 bytes per batch row and head).
SHORT_ATTENTION = True
SHORT_ATTENTION_MAX_KEYS = 256


def _short_attention_applies(module: nn.Module, query, key, attention_mask, kwargs) -> bool:
    """Whether this call is one ops.short_attention computes as HF's sdpa path does: CPU, no
    past keys (Tq == Tk), no dropout, and no mask (HF's sdpa then passes is_causal=True) or a
    boolean one (which already holds causality, sliding windows and padding)."""
    return (
        SHORT_ATTENTION
        and module.config._attn_implementation == "sdpa"
        and query.device.type == "cpu"
        and query.shape[-2] == key.shape[-2] <= SHORT_ATTENTION_MAX_KEYS
        and (not module.training or module.attention_dropout == 0.0)
        and (
            attention_mask is None
            or attention_mask.dtype == torch.bool
            and attention_mask.dim() == 4
            and attention_mask.shape[-2:] == (query.shape[-2], key.shape[-2])
        )
        and getattr(module, "is_causal", True)
        and kwargs.get("is_causal", True) is not False
        and kwargs.get("position_bias") is None
        and kwargs.get("softcap") is None
        and not kwargs.get("output_attentions", False)
    )


def _attention_forward(
    self: nn.Module,
    hidden_states,
    position_embeddings=None,
    attention_mask=None,
    cache=None,
    past_key_values=None,  # the name HF deprecates for `cache`, still accepted there
    **kwargs,
):
    """HF's Llama/Qwen2/Mistral attention forward (transformers 5.24) with the rotary step on
    ops.rotary_embedding, applied to q and k in the projections' [B, T, H, D] layout, training
    and scoring passes of up to SHORT_ATTENTION_MAX_KEYS keys on ops.short_attention
    (`_short_attention_applies`), other short 16-bit CPU attentions under autograd computed in
    fp32 (`_widen_for_cpu_sdpa`); under torch.autocast, HF's forward itself."""
    cache = cache if cache is not None else past_key_values
    if torch.is_autocast_enabled(hidden_states.device.type):
        # HF's rotary multiplies autocast's bf16 q/k by fp32 cos/sin (promoting them to fp32);
        # the fused op takes one dtype: HF's own forward gives HF's numbers
        return type(self).forward(
            self, hidden_states, position_embeddings, attention_mask, cache=cache, **kwargs
        )
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    cos, sin = position_embeddings
    query_states = ops.rotary_embedding(self.q_proj(hidden_states).view(hidden_shape), cos, sin)
    key_states = ops.rotary_embedding(self.k_proj(hidden_states).view(hidden_shape), cos, sin)
    query_states, key_states = query_states.transpose(1, 2), key_states.transpose(1, 2)
    value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    if cache is not None:
        key_states, value_states = cache.update(
            key_states, value_states, self.layer_idx, kwargs=kwargs
        )
    modeling = sys.modules[type(self).__module__]
    attention_interface = modeling.ALL_ATTENTION_FUNCTIONS.get_interface(
        self.config._attn_implementation, modeling.eager_attention_forward
    )
    window = ATTENTION_SOURCES[type(self).__name__][1]
    if window == "module":
        kwargs["sliding_window"] = self.sliding_window
    elif window == "config":
        kwargs["sliding_window"] = getattr(self.config, "sliding_window", None)
    if _short_attention_applies(self, query_states, key_states, attention_mask, kwargs):
        attn_output = ops.short_attention(
            query_states,
            key_states,
            value_states,
            attention_mask,
            is_causal=attention_mask is None,
            scale=self.scaling,
        )
        # the op's output is a [B, H, T, D] view of a [B, T, H, D] buffer: this is a view too
        attn_output = attn_output.transpose(1, 2).reshape(*input_shape, -1)
        return self.o_proj(attn_output), None
    dtype = query_states.dtype
    if _widen_for_cpu_sdpa(self.config._attn_implementation, query_states, key_states):
        query_states, key_states, value_states = (
            query_states.float(),
            key_states.float(),
            value_states.float(),
        )
        if attention_mask is not None and attention_mask.is_floating_point():
            attention_mask = attention_mask.float()
    attn_output, attn_weights = attention_interface(
        self,
        query_states,
        key_states,
        value_states,
        attention_mask,
        dropout=0.0 if not self.training else self.attention_dropout,
        scaling=self.scaling,
        **kwargs,
    )
    attn_output = attn_output.to(dtype).reshape(*input_shape, -1).contiguous()
    return self.o_proj(attn_output), attn_weights


@functools.cache
def _mirrored(cls: type) -> bool:
    """Whether cls.forward is the source `_attention_forward` copies (see the docstring)."""
    expected = ATTENTION_SOURCES.get(cls.__name__)
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    return expected is not None and hashlib.sha256(source.encode()).hexdigest()[:16] == expected[0]


def _fused_forward(module: nn.Module):
    """The fused forward for `module`, or None when it is not one we fuse."""
    name = type(module).__name__
    if name in FUSABLE_NORMS:
        return _rms_norm_forward
    if name in FUSABLE_MLPS and type(getattr(module, "act_fn", None)).__name__ in SILU_ACTIVATIONS:
        return _swiglu_mlp_forward
    if name in ATTENTION_SOURCES and _mirrored(type(module)):
        return _attention_forward
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
