"""Batched lean decoding of PPO rollouts: B rows a step through a few torch calls per layer.

Why: a rollout feeds B rows one token at a time. The HF forward through peft costs ~15 modules
and their Python bookkeeping per layer, a dynamic KV cache grown by concatenation and masks
rebuilt every step; at a few rows that overhead is as large as the arithmetic (the PPO bench's
policy, 8 rows x 48 tokens, 1 thread on a busy machine: 380-510 ms of CPU per rollout through
HF + peft, 220-233 ms here). `RolloutDecoder` runs the same model as `fast_decoder.FastDecoder`
does for chat (Llama, Mistral, Qwen2 on the CPU), but B left-padded rows at once, with a static
KV cache [B, kv_heads, capacity, head_dim], per-row positions, and the policy's active LoRA
adapter:

  quant="none"          each adapted projection's weight is merged into a copy made for this
                        rollout, W + scale * B @ A (only the adapted matrices are copied; every
                        other weight is read in place, except that models whose q/k/v and
                        gate/up weights total <= FUSE_LIMIT_BYTES get one fused copy of each);
  quant="int8" / "int4" the frozen base's projections are quantized once (rlhf_fast.quant; kept
                        while the base's tensors are unchanged), q/k/v and gate/up fused, and the
                        adapter is added as a low-rank term scale * (x @ A.T) @ B.T: the tokens
                        are those of a quantized policy (the log-probs PPO stores must then be
                        recomputed by the fp32 policy, see rollout.py).

Left padding: a pad column is masked out as a key, and attends to itself only (a query that
sees no key would give NaN, and NaN values times a zero weight still poison the sum). Row r's
token at column c has position c - (pads of row r), as rollout.py's position ids.

`unsupported_reason(model)` says why a model must use the HF loop instead (GPT-2, OPT, BLOOM,
DoRA or merged adapters, LoRA outside the seven layer projections, ...).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

from rlhf_fast.models.decode_linear import decode_linear
from rlhf_fast.models.fast_decoder import _Projection as QuantProjection
from rlhf_fast.models.fast_decoder import _sliding_windows, read_decoder_shape
from rlhf_fast.models.fast_decoder import unsupported_reason as lean_unsupported_reason
from rlhf_fast.quant.linear import QuantLinear
from rlhf_fast.quant.model import BITS_BY_NAME

QUANT_CHOICES = tuple(BITS_BY_NAME)
_ATTENTION = ("q_proj", "k_proj", "v_proj")
_MLP = ("gate_proj", "up_proj")
# Fuse q/k/v and gate/up of dense models up to this many bytes of those weights (the copies
# live for one rollout): at a few rows a step costs its calls; big models are bound by GEMMs.
FUSE_LIMIT_BYTES = 64 << 20


def causal_lm_of(model: nn.Module) -> nn.Module:
    """The causal LM inside a peft model (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _is_lora_layer(module: nn.Module) -> bool:
    return hasattr(module, "lora_A") and hasattr(module, "get_base_layer")


def _lora_reason(name: str, layer: nn.Module) -> str | None:
    """Why this peft LoRA layer cannot be read as base + one low-rank term, or None."""
    if getattr(layer, "merged", False):
        return f"{name}: merged adapters"
    if getattr(layer, "fan_in_fan_out", False):
        return f"{name}: fan_in_fan_out LoRA"
    if layer.disable_adapters:
        return None
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if len(active) > 1:
        return f"{name}: several active adapters"
    if active and active[0] in getattr(layer, "lora_variant", {}):
        return f"{name}: DoRA or another LoRA variant"
    if active and getattr(layer, "lora_bias", {}).get(active[0], False):
        return f"{name}: lora_bias"
    return None


def unsupported_reason(model: nn.Module) -> str | None:
    """None when RolloutDecoder can run `model` (a causal LM, or a peft model of one, with its
    active adapter); otherwise why not (one line)."""
    lm = causal_lm_of(model)
    reason = lean_unsupported_reason(lm, lora=True)
    if reason is not None:
        return reason
    projections = {
        id(getattr(getattr(layer, part), name))
        for layer in lm.model.layers
        for part, names in (("self_attn", _ATTENTION + ("o_proj",)), ("mlp", _MLP + ("down_proj",)))
        for name in names
    }
    for name, module in lm.named_modules():
        if not _is_lora_layer(module):
            if (
                type(module).__module__.startswith("peft.")
                and "lora" in type(module).__name__.lower()
            ):
                return f"{name}: peft module {type(module).__name__} is not covered"
            continue
        if id(module) not in projections:
            return f"{name}: LoRA outside the layers' seven projections"
        reason = _lora_reason(name, module)
        if reason is not None:
            return reason
    return None


def _parts(module: nn.Module):
    """(base layer, active LoRA (A [r, in], B [out, r], scale) or None) of a projection."""
    if not _is_lora_layer(module):
        return module, None
    base = module.get_base_layer()
    if module.disable_adapters:
        return base, None
    active = [a for a in module.active_adapters if a in module.lora_A]
    if not active:
        return base, None
    adapter = active[0]
    return base, (
        module.lora_A[adapter].weight,
        module.lora_B[adapter].weight,
        float(module.scaling[adapter]),
    )


def merged_weight(weight: torch.Tensor, lora) -> torch.Tensor:
    """W + scale * B @ A in W's dtype (summed in fp32), or W itself without an adapter."""
    if lora is None:
        return weight
    a, b, scale = lora
    return torch.addmm(weight.float(), b.float(), a.float(), alpha=scale).to(weight.dtype)


# Quantized base projections, per first module of a fused group: (key, QuantProjection). The
# key holds the bits and the (identity, version) of every base weight, so an optimizer step on
# a trainable base or a reloaded model makes a new copy.
_QUANTIZED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _version(tensor: torch.Tensor) -> int:
    try:
        return tensor._version
    except RuntimeError:  # inference tensors have no version counter
        return -1


def _quantized_group(bases: list[nn.Module], bits: int) -> QuantProjection:
    key = (bits, tuple((id(b.weight), _version(b.weight)) for b in bases))
    cached = _QUANTIZED.get(bases[0])
    if cached is not None and cached[0] == key:
        return cached[1]
    with torch.no_grad():
        quantized = [QuantLinear.from_linear(b, bits=bits) for b in bases]
    projection = QuantProjection(quantized, fast_activations=True)
    _QUANTIZED[bases[0]] = (key, projection)
    return projection


class _Group:
    """Projections fed the same x (q/k/v, gate/up, or one alone): x [M, in] -> their outputs,
    concatenated [M, sum of out_features] (`fused`) or one tensor each.

    Dense bases: F.linear on the merged weights (copies only where an adapter sits), or with
    fuse=True one F.linear on their concatenation (a copy of the group). Quantized: one fused
    quantized call, then each adapter's low-rank term added to its slice."""

    def __init__(self, modules: list[nn.Module], bits: int | None, fuse: bool = False) -> None:
        parts = [_parts(m) for m in modules]
        bases = [base for base, _ in parts]
        self.sizes = [base.out_features for base in bases]
        self.quantized: QuantProjection | None = None
        self.dense: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        self.low_rank: list[tuple[int, int, torch.Tensor, torch.Tensor, float]] = []
        with torch.no_grad():
            if any(isinstance(b, QuantLinear) for b in bases) or bits is not None:
                dense = [b for b in bases if not isinstance(b, QuantLinear)]
                if bits is not None and len(dense) == len(bases):
                    self.quantized = _quantized_group(bases, bits)
                else:  # a quantized base (QLoRA): read as it is
                    self.quantized = QuantProjection(bases, fast_activations=True)
                offset = 0
                for size, (_, lora) in zip(self.sizes, parts, strict=True):
                    if lora is not None:
                        a, b, scale = lora
                        self.low_rank.append((offset, size, a.detach(), b.detach(), scale))
                    offset += size
            else:
                self.dense = [
                    (merged_weight(base.weight.detach(), lora), base.bias) for base, lora in parts
                ]
                if fuse and len(self.dense) > 1:
                    self.dense = [_concatenated(self.dense)]
        self.fused = self.quantized is not None or len(self.dense) == 1

    def __call__(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        if self.quantized is None:
            if len(self.dense) == 1:
                return decode_linear(x, *self.dense[0])
            return [decode_linear(x, w, b) for w, b in self.dense]
        y = self.quantized(x)
        for offset, size, a, b, scale in self.low_rank:
            low = F.linear(x.to(a.dtype), a)
            y[:, offset : offset + size].addmm_(low, b.t(), alpha=scale)
        return y


def _concatenated(dense: list[tuple[torch.Tensor, torch.Tensor | None]]):
    """One (weight, bias) for several dense projections of the same input."""
    weight = torch.cat([w for w, _ in dense])
    if all(b is None for _, b in dense):
        return weight, None
    return weight, torch.cat([
        torch.zeros(w.shape[0], dtype=w.dtype) if b is None else b.detach() for w, b in dense
    ])  # fmt: skip


def _fusable_bytes(layers: list[nn.Module]) -> int:
    """Bytes of the q/k/v and gate/up weights: what fusing the dense groups would copy."""
    total = 0
    for layer in layers:
        for part, names in (("self_attn", _ATTENTION), ("mlp", _MLP)):
            for name in names:
                base, _ = _parts(getattr(getattr(layer, part), name))
                weight = getattr(base, "weight", None)
                if isinstance(weight, torch.Tensor):
                    total += weight.numel() * weight.element_size()
    return total


class _Layer:
    def __init__(self, layer: nn.Module, window: int | None, bits: int | None, fuse: bool):
        attn, mlp = layer.self_attn, layer.mlp
        self.input_norm = layer.input_layernorm.weight
        self.post_norm = layer.post_attention_layernorm.weight
        self.eps = float(layer.input_layernorm.variance_epsilon)
        self.post_eps = float(layer.post_attention_layernorm.variance_epsilon)
        self.qkv = _Group([getattr(attn, n) for n in _ATTENTION], bits, fuse)
        self.o = _Group([attn.o_proj], bits)
        self.gate_up = _Group([getattr(mlp, n) for n in _MLP], bits, fuse)
        self.down = _Group([mlp.down_proj], bits)
        self.window = window


class RolloutDecoder:
    """`start(query, query_mask, max_new_tokens)` prefills B left-padded prompts and returns the
    logits [B, vocab] of each row's next token; each `step(tokens [B])` appends one token per
    row and returns the next logits. Built for one rollout: it reads the adapter's weights when
    constructed (see the module docstring for what it copies)."""

    def __init__(self, model: nn.Module, quant: str = "none") -> None:
        if quant not in QUANT_CHOICES:
            raise ValueError(f"quant must be one of {QUANT_CHOICES}, got {quant!r}")
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"RolloutDecoder cannot run this model: {reason}")
        lm = causal_lm_of(model)
        config, inner = lm.config, lm.model
        read_decoder_shape(self, config, inner)
        bits = BITS_BY_NAME.get(quant)
        windows = _sliding_windows(lm)
        # Small models: copy q/k/v and gate/up into one weight each (a decode step of a few
        # rows costs its calls, not its arithmetic); large ones read their weights in place.
        fuse = bits is None and _fusable_bytes(inner.layers) <= FUSE_LIMIT_BYTES
        self.layers = [
            _Layer(layer, windows[i], bits, fuse) for i, layer in enumerate(inner.layers)
        ]
        self.lm_head = _Group([lm.lm_head], None)
        ops = torch.ops.rlhf_fast
        norms = [self.norm] + [w for x in self.layers for w in (x.input_norm, x.post_norm)]
        self.native_norm = hasattr(ops, "decode_add_rms_norm") and all(
            w.dtype == self.dtype for w in norms
        )
        self.native_silu_mul = hasattr(ops, "decode_silu_mul")
        # Width-1 steps: one C++ call for the B rows' attention (~150 us of SDPA on the PPO
        # bench's 8 rows x 4 heads x 64 keys, for ~65k multiply-adds).
        self.native_attention = hasattr(ops, "decode_attention_rows")

    def _add_norm(self, x: torch.Tensor, delta, weight: torch.Tensor, eps: float):
        """x += delta (in place, when given), then RMSNorm(x) * weight as the HF module."""
        if self.native_norm:
            return torch.ops.rlhf_fast.decode_add_rms_norm.default(x, delta, weight, eps)
        if delta is not None:
            x.add_(delta)
        if x.dtype == torch.float32:
            return F.rms_norm(x, (self.hidden,), weight, eps)
        # As the HF module: normalise in fp32, round to the model's dtype, then scale.
        return weight * F.rms_norm(x.float(), (self.hidden,), None, eps).to(x.dtype)

    def _silu_mul(self, layer: _Layer, h: torch.Tensor) -> torch.Tensor:
        gate_up = layer.gate_up(h)
        if not isinstance(gate_up, torch.Tensor):
            gate, up = gate_up
            return F.silu(gate).mul_(up)
        if self.native_silu_mul:
            return torch.ops.rlhf_fast.decode_silu_mul.default(gate_up)
        inner = gate_up.shape[-1] // 2
        return F.silu(gate_up[:, :inner]).mul_(gate_up[:, inner:])

    def _tables(self, capacity: int) -> None:
        positions = torch.arange(capacity).unsqueeze(0)
        cos, sin = self.rotary(torch.empty(1, dtype=self.dtype), positions)
        half = self.head_dim // 2
        self.cos = cos[0].contiguous()
        # rotate_half(x) * sin == flip_halves(x) * signed_sin, flip_halves(x) = [x2, x1]
        self.signed_sin = torch.cat([-sin[0, :, :half], sin[0, :, half:]], dim=-1).contiguous()

    def _rope(self, qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """qk [B, T, heads, head_dim] rotated by cos, signed sin [B, T, 1, head_dim]."""
        half = self.head_dim // 2
        flipped = torch.cat([qk[..., half:], qk[..., :half]], dim=-1)
        return torch.addcmul(qk * cos, flipped, sin)

    def _attention(self, layer: _Layer, index: int, h: torch.Tensor, rope, start: int,
                   mask: torch.Tensor, first: int) -> torch.Tensor:  # fmt: skip
        cos, sin = rope
        rows, width = cos.shape[:2]
        heads, kv_heads, head_dim = self.heads, self.kv_heads, self.head_dim
        qkv = layer.qkv(h)
        if isinstance(qkv, torch.Tensor):
            qk, v = qkv.split([(heads + kv_heads) * head_dim, kv_heads * head_dim], dim=-1)
        else:
            q, k, v = qkv
            qk = torch.cat([q, k], dim=-1)
        qk = self._rope(qk.reshape(rows, width, heads + kv_heads, head_dim), cos, sin)
        keys, values = self.cache[index]
        end = start + width
        keys[:, :, start:end] = qk[:, :, heads:].transpose(1, 2)
        values[:, :, start:end] = v.view(rows, width, kv_heads, head_dim).transpose(1, 2)
        if width == 1 and self.native_attention and qk.dtype == keys.dtype:
            out = torch.ops.rlhf_fast.decode_attention_rows.default(
                qk[:, 0, :heads], keys, values, mask.view(rows, end - first), first, self.scale
            )
            return layer.o(out)
        query = qk[:, :, :heads].transpose(1, 2)  # [B, heads, T, head_dim]
        out = F.scaled_dot_product_attention(
            query, keys[:, :, first:end], values[:, :, first:end], attn_mask=mask,
            scale=self.scale, enable_gqa=kv_heads != heads,
        )  # fmt: skip
        return layer.o(out.transpose(1, 2).reshape(rows * width, heads * head_dim))

    def _mask(self, start: int, end: int, first: int, window: int | None) -> torch.Tensor:
        """[B, 1, T, keys]: causal over the columns first..end-1, within the window, real keys
        only; every query sees itself (a pad query would otherwise see nothing)."""
        query = torch.arange(start, end).unsqueeze(1)
        key = torch.arange(first, end).unsqueeze(0)
        visible = key <= query
        if window is not None:
            visible &= key > query - window
        visible = visible & self.key_valid[:, None, first:end]
        return (visible | (key == query)).unsqueeze(1)

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, start: int) -> torch.Tensor:
        rows, width = ids.shape
        end = start + width
        x = F.embedding(ids, self.embed).reshape(rows * width, self.hidden)  # updated in place
        rope = (self.cos[positions].unsqueeze(2), self.signed_sin[positions].unsqueeze(2))
        masks: dict[int | None, tuple[torch.Tensor, int]] = {}
        delta = None
        for index, layer in enumerate(self.layers):
            if layer.window not in masks:
                first = 0 if layer.window is None else max(0, end - layer.window - width + 1)
                masks[layer.window] = (self._mask(start, end, first, layer.window), first)
            mask, first = masks[layer.window]
            h = self._add_norm(x, delta, layer.input_norm, layer.eps)
            attended = self._attention(layer, index, h, rope, start, mask, first)
            if index == len(self.layers) - 1 and width > 1:
                # only the last column's logits are wanted
                x = x.add_(attended).view(rows, width, self.hidden)[:, -1].contiguous()
                attended = None
            h = self._add_norm(x, attended, layer.post_norm, layer.post_eps)
            delta = layer.down(self._silu_mul(layer, h))
        return self.lm_head(self._add_norm(x, delta, self.norm, self.norm_eps))

    @torch.inference_mode()
    def start(self, query: torch.Tensor, query_mask: torch.Tensor, max_new_tokens: int):
        """Prefill the left-padded prompts query [B, Q] (query_mask [B, Q] bool, true on prompt
        tokens); room for max_new_tokens more. Returns the logits [B, vocab]."""
        if query.dim() != 2 or query.shape != query_mask.shape or query.shape[1] == 0:
            raise ValueError(
                f"query and query_mask must be [B, Q] with Q >= 1, got {tuple(query.shape)} and "
                f"{tuple(query_mask.shape)}"
            )
        rows, width = query.shape
        capacity = width + max(1, max_new_tokens)
        self._tables(capacity)
        shape = (rows, self.kv_heads, capacity, self.head_dim)
        self.cache = [
            (torch.zeros(shape, dtype=self.dtype), torch.zeros(shape, dtype=self.dtype))
            for _ in self.layers
        ]
        self.key_valid = torch.ones(rows, capacity, dtype=torch.bool)
        self.key_valid[:, :width] = query_mask
        positions = (query_mask.long().cumsum(-1) - 1).clamp(min=0)
        self.next_position = positions[:, -1:] + 1
        self.length = width
        return self._forward(query, positions, 0)

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append tokens [B] (one per row); the logits [B, vocab] of the next position."""
        if self.length >= self.cache[0][0].shape[2]:
            raise ValueError("step(): the cache is full (more steps than max_new_tokens)")
        logits = self._forward(tokens.reshape(-1, 1), self.next_position, self.length)
        self.length += 1
        self.next_position = self.next_position + 1
        return logits
