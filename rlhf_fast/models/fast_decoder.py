"""A lean prefill/decode path for Llama-family causal LMs (Llama, Mistral, Qwen2).

Why: a small model's decode step is bound by per-token overhead, not by bandwidth. The HF
forward of a 30-layer model runs ~15 modules per layer, each with Python bookkeeping, a
dynamic KV cache that grows by concatenation and masks rebuilt every step (~27 tokens/s on the
135M shape whatever the weight format). Here one token goes through all layers with a few
torch calls per layer: q/k/v and gate/up of a quantized model are fused into one weight each
(rows of int8/int4 weights are independent, so concatenating them along out_features is exact),
the KV cache is preallocated (static, grown by copying when full), RoPE's cos/sin are tables
computed once by the model's own rotary module (so every static rope scaling it knows gives
the same values), and prefill computes the logits of the last position only.

`FastDecoder(model)` holds no copy of dense weights (it reads the model's own tensors); it
copies quantized q/k/v and gate/up weights into fused ones. `decoder_for(model)` keeps one
per model and rebuilds it when the model's tensors change (an optimizer step bumps their
version counters). `unsupported_reason(model)` says why a model must use the HF loop instead.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

from rlhf_fast.models.decode_linear import decode_linear
from rlhf_fast.quant.activations import BF16_ROWS, runs_on_bf16
from rlhf_fast.quant.linear import QuantLinear
from rlhf_fast.quant.weight import QuantizedWeight

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
# Rope types whose inverse frequencies do not depend on the sequence length: their cos/sin can
# be tabulated once. "dynamic" and "longrope" rescale with the length and stay on the HF path.
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
CACHE_ROUNDING = 256  # KV-cache capacity grows in steps of this many positions


def _attr(module: nn.Module, path: str):
    for name in path.split("."):
        module = getattr(module, name, None)
        if module is None:
            return None
    return module


_LAYER_PROJECTIONS = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
)  # fmt: skip


def _projection_module(module: nn.Module | None, lora: bool) -> nn.Module | None:
    """The module whose weight a projection reads: with lora, a peft LoRA layer's base layer."""
    if lora and module is not None and hasattr(module, "lora_A"):
        return module.get_base_layer()
    return module


def unsupported_reason(model: nn.Module, *, lora: bool = False) -> str | None:
    """None when FastDecoder can run `model`; otherwise why not (one line). lora=True also
    accepts peft LoRA layers over the projections (train/rollout_decoder.py reads those)."""
    name = type(model).__name__
    if name not in SUPPORTED_ARCHITECTURES:
        return f"{name} is not one of {', '.join(SUPPORTED_ARCHITECTURES)}"
    config = model.config
    inner = getattr(model, "model", None)
    if inner is None or _attr(inner, "embed_tokens.weight") is None:
        return "no model.embed_tokens"
    if inner.embed_tokens.weight.device.type != "cpu":
        return "the lean path runs on the CPU only"
    rope_type = getattr(getattr(inner, "rotary_emb", None), "rope_type", None)
    if rope_type not in STATIC_ROPE_TYPES:
        return f"rope type {rope_type!r} is not one of {STATIC_ROPE_TYPES}"
    if getattr(config, "hidden_act", None) != "silu":
        return f"hidden_act {getattr(config, 'hidden_act', None)!r} is not 'silu'"
    for name, module in model.named_modules():
        if module._forward_hooks or module._forward_pre_hooks:
            # e.g. rlhf_fast.offload streams layer weights in through hooks: reading the
            # tensors directly would bypass them
            return f"module {name or type(model).__name__!r} has forward hooks"
    if any(t.device.type != "cpu" for t in _source_tensors(model)):
        return "some weights are not on the CPU (meta or another device)"
    if not isinstance(getattr(model, "lm_head", None), (nn.Linear, QuantLinear)):
        return "lm_head is neither nn.Linear nor QuantLinear"
    for index, layer in enumerate(inner.layers):
        for path in _LAYER_PROJECTIONS:
            if not isinstance(
                _projection_module(_attr(layer, path), lora), (nn.Linear, QuantLinear)
            ):
                return f"layers.{index}.{path} is neither nn.Linear nor QuantLinear"
        for norm in ("input_layernorm", "post_attention_layernorm"):
            if _attr(layer, f"{norm}.weight") is None:
                return f"layers.{index}.{norm} has no weight"
    return None


def _sliding_windows(model: nn.Module) -> list[int | None]:
    """Per layer, how many positions (the query's own included) a query sees, or None: all."""
    config = model.config
    layers = len(model.model.layers)
    window = getattr(config, "sliding_window", None)
    if type(model).__name__ == "Qwen2ForCausalLM":
        types = getattr(config, "layer_types", None) or ["full_attention"] * layers
        return [window if kind == "sliding_attention" else None for kind in types]
    return [window] * layers


class _Projection:
    """y = x @ W.T (+ b) for one or several linear layers fed the same x, outputs concatenated.

    Quantized layers of one format are fused into one QuantizedWeight (a single kernel call
    reads them all); dense layers are read in place (fusing them would copy the weights) and
    their outputs concatenated. `fast_activations` runs quantized GEMMs on bf16 activations
    where the kernels are faster with them (int4 from 32 rows up: bf16 weight tiles and
    torch's bf16 GEMM; quant/activations.py's rule, shared with the HF forward of chat --int4
    and the streamed model) and, up to 16 rows, on activations quantized per 32 / 128 columns
    (rlhf_fast::decode_gemv_*: int8 activations for int4 weights, int16 for int8; integer dot
    products, 2-4x the fp32 kernels)."""

    def __init__(self, modules: list[nn.Module], fast_activations: bool) -> None:
        self.out_features = sum(m.out_features for m in modules)
        self.fast_activations = fast_activations
        quantized = [m for m in modules if isinstance(m, QuantLinear)]
        formats = {(m.bits, m.group_size) for m in quantized}
        self.qweight: QuantizedWeight | None = None
        self._gemv = None
        self.dense: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        self.modules: list[nn.Module] = []
        if len(quantized) == len(modules) and len(formats) == 1:
            self.qweight, self.bias = _fuse_quantized(quantized)
            self._op = _quantized_op(self.qweight)
            self._gemv = _decode_gemv_op(self.qweight) if fast_activations else None
        elif not quantized:
            self.dense = [(m.weight, m.bias) for m in modules]
        else:  # a mix of formats (a layer skipped by quantize_model): each module on its own
            self.modules = modules

    def _quantized(self, x: torch.Tensor) -> torch.Tensor:
        qweight, rows = self.qweight, x.shape[0]
        if self._gemv is not None and rows <= 16:
            return self._gemv(x, qweight, self.bias)
        if self.fast_activations and qweight.bits == 8 and rows >= 32:
            # int8 codes are exact in bf16: torch's bf16 GEMM on them, then the channel scales
            # (our int8 kernels have no many-row path that reuses a dequantized tile).
            codes = qweight.data.to(torch.bfloat16)
            y = F.linear(x.to(torch.bfloat16), codes).float().mul_(qweight.scales)
            y = y if self.bias is None else y.add_(self.bias)
            return y.to(x.dtype)
        # int4 from BF16_ROWS rows: the project's one int4 activation rule (quant/activations.py)
        if self.fast_activations and runs_on_bf16(x, qweight.bits, BF16_ROWS):
            return self._op(x.to(torch.bfloat16), qweight, self.bias).to(x.dtype)
        return self._op(x, qweight, self.bias)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.qweight is not None:
            return self._quantized(x)
        if self.dense:
            if len(self.dense) == 1:
                return decode_linear(x, *self.dense[0])
            return torch.cat([decode_linear(x, w, b) for w, b in self.dense], dim=-1)
        return torch.cat([m(x) for m in self.modules], dim=-1)


def _fuse_quantized(modules: list[QuantLinear]):
    weights = [m.qweight for m in modules]
    first = weights[0]
    if any(w.in_features != first.in_features for w in weights):
        raise ValueError("fused projections must share in_features")
    if len(weights) == 1:
        fused = first
    else:
        offsets = None if first.offsets is None else torch.cat([w.offsets for w in weights])
        fused = QuantizedWeight(
            first.bits, first.group_size,
            (sum(w.out_features for w in weights), first.in_features),
            torch.cat([w.data for w in weights]), torch.cat([w.scales for w in weights]),
            offsets,
        )  # fmt: skip
    biases = [m.bias for m in modules]
    if all(b is None for b in biases):
        return fused, None
    parts = [
        torch.zeros(m.out_features, dtype=torch.float32) if b is None else b.float()
        for m, b in zip(modules, biases, strict=True)
    ]
    return fused, torch.cat(parts).contiguous()


def _quantized_op(qweight: QuantizedWeight):
    """The registered C++ op called directly (the checks of ops.quant_matmul cost more than a
    small GEMV's arithmetic at decode); ops.quant_matmul where the C++ kernels are missing."""
    import importlib

    from rlhf_fast import ops

    # rlhf_fast.ops re-exports the function under the module's name: import the module itself.
    if "cpp" not in importlib.import_module("rlhf_fast.ops.quant_matmul").KERNELS:
        return lambda x, w, b: ops.quant_matmul(x, w, b)
    if qweight.bits == 8:
        op = torch.ops.rlhf_fast.quant_matmul_int8.default
        return lambda x, w, b: op(x, w.data, w.scales, b)
    op = torch.ops.rlhf_fast.quant_matmul_int4.default
    return lambda x, w, b: op(x, w.data, w.scales, w.offsets, w.group_size, w.in_features, b)


def _decode_gemv_op(qweight: QuantizedWeight):
    """rlhf_fast::decode_gemv_int4/int8 (quantized activations), None where not built."""
    if not hasattr(torch.ops.rlhf_fast, "decode_gemv_int4") or qweight.device.type != "cpu":
        return None
    if qweight.bits == 8:
        op = torch.ops.rlhf_fast.decode_gemv_int8.default
        return lambda x, w, b: op(x, w.data, w.scales, b)
    op = torch.ops.rlhf_fast.decode_gemv_int4.default
    return lambda x, w, b: op(x, w.data, w.scales, w.offsets, w.group_size, w.in_features, b)


def _one_row_call(projection: _Projection):
    """projection(x) for one row, as a closure over its tensors: a decode step makes ~120 such
    calls, and attribute lookups and branches cost as much as a small GEMV's dispatch."""
    if projection.qweight is None or projection._gemv is None:
        return projection
    qweight, bias = projection.qweight, projection.bias
    if qweight.bits == 8:
        op8 = torch.ops.rlhf_fast.decode_gemv_int8.default
        data, scales = qweight.data, qweight.scales
        return lambda x: op8(x, data, scales, bias)
    op4 = torch.ops.rlhf_fast.decode_gemv_int4.default
    data, scales, offsets = qweight.data, qweight.scales, qweight.offsets
    group_size, in_features = qweight.group_size, qweight.in_features
    return lambda x: op4(x, data, scales, offsets, group_size, in_features, bias)


class _Layer:
    def __init__(self, layer: nn.Module, window: int | None, fast_activations: bool) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        self.input_norm = layer.input_layernorm.weight
        self.post_norm = layer.post_attention_layernorm.weight
        self.eps = float(layer.input_layernorm.variance_epsilon)
        self.post_eps = float(layer.post_attention_layernorm.variance_epsilon)
        self.qkv = _Projection([attn.q_proj, attn.k_proj, attn.v_proj], fast_activations)
        self.o = _Projection([attn.o_proj], fast_activations)
        self.gate_up = _Projection([mlp.gate_proj, mlp.up_proj], fast_activations)
        self.down = _Projection([mlp.down_proj], fast_activations)
        self.one_row = [_one_row_call(p) for p in (self.qkv, self.o, self.gate_up, self.down)]
        self.window = window


def _lm_head(model: nn.Module, fast_activations: bool) -> nn.Module:
    """The model's lm_head; with fast activations, an int8 (per channel) copy of a dense one in a
    quantized model. quantize_model skips lm_head (tied embeddings stay usable), but at decode
    it is the largest matrix read per token (49152 x 576 fp32 = 113 MB on the 135M shape: more
    than all its int4 layers); int8 per channel changes its weights by < 1% relative."""
    head = model.lm_head
    quantized = any(isinstance(m, QuantLinear) for m in model.model.layers.modules())
    if fast_activations and quantized and isinstance(head, nn.Linear):
        return QuantLinear.from_linear(head, bits=8)
    return head


def _source_tensors(model: nn.Module) -> list[torch.Tensor]:
    return [*model.parameters(), *model.buffers()]


def _version(tensor: torch.Tensor) -> int:
    """The in-place modification counter; inference tensors (made under inference_mode) have
    none, and cannot be modified outside it."""
    try:
        return tensor._version
    except RuntimeError:
        return -1


def read_decoder_shape(target: object, config, inner: nn.Module) -> None:
    """Sets the attributes a decode loop reads off a Llama-style model (embedding, dtype,
    widths, heads, attention scale, rotary module, final norm) on `target`."""
    target.embed = inner.embed_tokens.weight
    target.dtype = target.embed.dtype
    target.hidden = config.hidden_size
    target.heads = config.num_attention_heads
    target.kv_heads = getattr(config, "num_key_value_heads", None) or target.heads
    target.head_dim = getattr(config, "head_dim", None) or target.hidden // target.heads
    target.scale = target.head_dim**-0.5
    target.rotary = inner.rotary_emb
    target.norm = inner.norm.weight
    target.norm_eps = float(inner.norm.variance_epsilon)


class FastDecoder:
    """Prefill and one-token steps of a supported model (see `unsupported_reason`).

    `prefill(ids)` starts a new sequence (the cache is reset) and returns the logits of its
    last position ([vocab], the model's dtype); each `step(token)` appends one token and
    returns the next logits. The cache grows by itself past its capacity.
    """

    def __init__(
        self, model: nn.Module, capacity: int = CACHE_ROUNDING, *, fast_activations: bool = True
    ) -> None:
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"FastDecoder cannot run this model: {reason}")
        config, inner = model.config, model.model
        self.model_ref = weakref.ref(model)
        read_decoder_shape(self, config, inner)
        windows = _sliding_windows(model)
        with torch.inference_mode():
            self.layers = [
                _Layer(layer, windows[i], fast_activations) for i, layer in enumerate(inner.layers)
            ]
            self.lm_head = _Projection([_lm_head(model, fast_activations)], fast_activations)
        # One-token steps through the C++ per-layer ops (decode_layer_ops.cpp) when they are
        # built and every tensor they read has the activations' dtype.
        norms = [self.norm] + [
            w for layer in self.layers for w in (layer.input_norm, layer.post_norm)
        ]
        self.native_step = hasattr(torch.ops.rlhf_fast, "decode_attention") and all(
            w.dtype == self.dtype for w in norms
        )
        self.fingerprint = self._fingerprint(model)
        self.capacity = 0
        self.length = 0
        self._allocate(capacity)

    @staticmethod
    def _fingerprint(model: nn.Module) -> tuple:
        return tuple((id(t), _version(t)) for t in _source_tensors(model))

    def is_current(self, model: nn.Module) -> bool:
        """False once the model's tensors were replaced or modified in place."""
        return self.model_ref() is model and self.fingerprint == self._fingerprint(model)

    @torch.inference_mode()
    def _allocate(self, capacity: int) -> None:
        """(Re)allocates the KV cache and RoPE tables for `capacity` positions, keeping the
        cached positions."""
        capacity = -(-max(capacity, 1) // CACHE_ROUNDING) * CACHE_ROUNDING
        if capacity <= self.capacity:
            return
        shape = (1, self.kv_heads, capacity, self.head_dim)
        old = getattr(self, "cache", None)
        self.cache = []
        for index in range(len(self.layers)):
            keys = torch.empty(shape, dtype=self.dtype)
            values = torch.empty(shape, dtype=self.dtype)
            if old is not None and self.length:
                keys[:, :, : self.length] = old[index][0][:, :, : self.length]
                values[:, :, : self.length] = old[index][1][:, :, : self.length]
            self.cache.append((keys, values))
        positions = torch.arange(capacity).unsqueeze(0)
        probe = torch.empty(1, dtype=self.dtype)
        cos, sin = self.rotary(probe, positions)
        half = self.head_dim // 2
        # rotate_half(x) * sin == flip_halves(x) * signed_sin, flip_halves(x) = [x2, x1]
        self.cos = cos[0].contiguous()
        self.signed_sin = torch.cat([-sin[0, :, :half], sin[0, :, half:]], dim=-1).contiguous()
        self.capacity = capacity

    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, (self.hidden,), weight, eps)
        # As the HF module: normalise in fp32, round to the model's dtype, then scale.
        normed = F.rms_norm(x.float(), (self.hidden,), None, eps).to(x.dtype)
        return weight * normed

    def _rope(self, qk: torch.Tensor, start: int) -> torch.Tensor:
        """qk [T, heads, head_dim] of positions start .. start + T - 1, rotated."""
        rows = qk.shape[0]
        cos = self.cos[start : start + rows].unsqueeze(1)
        sin = self.signed_sin[start : start + rows].unsqueeze(1)
        half = self.head_dim // 2
        flipped = torch.cat([qk[..., half:], qk[..., :half]], dim=-1)
        return torch.addcmul(qk * cos, flipped, sin)

    def _attention(self, layer: _Layer, index: int, x: torch.Tensor, start: int) -> torch.Tensor:
        rows = x.shape[0]
        heads, kv_heads, head_dim = self.heads, self.kv_heads, self.head_dim
        qkv = layer.qkv(x)
        qk = qkv[:, : (heads + kv_heads) * head_dim].view(rows, heads + kv_heads, head_dim)
        qk = self._rope(qk, start)
        values_new = qkv[:, (heads + kv_heads) * head_dim :].view(rows, kv_heads, head_dim)
        keys, values = self.cache[index]
        end = start + rows
        keys[0, :, start:end] = qk[:, heads:].transpose(0, 1)
        values[0, :, start:end] = values_new.transpose(0, 1)
        first = 0 if layer.window is None else max(0, end - layer.window - rows + 1)
        query = qk[:, :heads].transpose(0, 1).unsqueeze(0)  # [1, heads, T, head_dim]
        mask, causal = None, rows > 1
        if rows > 1 and (start > 0 or first > 0 or layer.window is not None):
            mask = self._mask(start, end, first, layer.window)
            causal = False
        out = F.scaled_dot_product_attention(
            query, keys[:, :, first:end], values[:, :, first:end],
            attn_mask=mask, is_causal=causal, scale=self.scale, enable_gqa=kv_heads != heads,
        )  # fmt: skip
        return layer.o(out[0].transpose(0, 1).reshape(rows, heads * head_dim))

    @staticmethod
    def _mask(start: int, end: int, first: int, window: int | None) -> torch.Tensor:
        """Queries start..end-1 over keys first..end-1: causal, and within the window."""
        query = torch.arange(start, end).unsqueeze(1)
        key = torch.arange(first, end).unsqueeze(0)
        visible = key <= query
        if window is not None:
            visible &= key > query - window
        return visible

    def _forward(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        x = F.embedding(ids, self.embed)
        last = len(self.layers) - 1
        for index, layer in enumerate(self.layers):
            h = self._rms_norm(x, layer.input_norm, layer.eps)
            x = x + self._attention(layer, index, h, start)
            if index == last:
                x = x[-1:]  # only the last position's logits are wanted
            h = self._rms_norm(x, layer.post_norm, layer.post_eps)
            gate_up = layer.gate_up(h)
            inner = gate_up.shape[-1] // 2
            act = F.silu(gate_up[:, :inner]).mul_(gate_up[:, inner:])
            x = x + layer.down(act)
        x = self._rms_norm(x, self.norm, self.norm_eps)
        return self.lm_head(x)[0]

    def _native_step(self, token: int, position: int) -> torch.Tensor:
        """One token through every layer with the C++ per-layer ops: 8 calls a layer."""
        ops = torch.ops.rlhf_fast
        add_rms_norm, attention = ops.decode_add_rms_norm.default, ops.decode_attention.default
        silu_mul = ops.decode_silu_mul.default
        heads, kv_heads = self.heads, self.kv_heads
        x = F.embedding(torch.tensor([token]), self.embed)  # a new tensor: updated in place
        delta = None
        for index, layer in enumerate(self.layers):
            keys, values = self.cache[index]
            qkv_proj, o_proj, gate_up_proj, down_proj = layer.one_row
            h = add_rms_norm(x, delta, layer.input_norm, layer.eps)
            attended = attention(
                qkv_proj(h), self.cos, self.signed_sin, keys, values, position, heads, kv_heads,
                layer.window or 0, self.scale,
            )  # fmt: skip
            h = add_rms_norm(x, o_proj(attended), layer.post_norm, layer.post_eps)
            delta = down_proj(silu_mul(gate_up_proj(h)))
        return self.lm_head(add_rms_norm(x, delta, self.norm, self.norm_eps))[0]

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor | list[int]) -> torch.Tensor:
        """Starts a sequence with `ids` (1-D or [1, T]); the logits of its last position
        ([vocab])."""
        ids = torch.as_tensor(ids, dtype=torch.long)
        if ids.dim() > 2 or (ids.dim() == 2 and ids.shape[0] != 1):
            raise ValueError(f"ids must be one sequence (1-D or [1, T]), got {tuple(ids.shape)}")
        ids = ids.reshape(-1)
        if ids.numel() == 0:
            raise ValueError("ids is empty: prefill needs at least one token")
        self.length = 0
        self._allocate(ids.numel())
        logits = self._forward(ids, 0)
        self.length = ids.numel()
        return logits

    @torch.inference_mode()
    def step(self, token: int) -> torch.Tensor:
        """Appends one token; the logits of the next position ([vocab])."""
        if self.length == 0:
            raise ValueError("step() before prefill(): no sequence was started")
        if self.length >= self.capacity:
            self._allocate(self.length + 1)
        if self.native_step:
            logits = self._native_step(token, self.length)
        else:
            logits = self._forward(torch.tensor([token]), self.length)
        self.length += 1
        return logits


_DECODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def decoder_for(model: nn.Module, capacity: int = CACHE_ROUNDING) -> FastDecoder:
    """The FastDecoder of `model`, built on first use and rebuilt when its tensors changed;
    its cache holds at least `capacity` positions. ValueError if the model is unsupported."""
    decoder = _DECODERS.get(model)
    if decoder is None or not decoder.is_current(model):
        decoder = None  # let the old fused weights go before the new ones are built
        _DECODERS.pop(model, None)
        decoder = FastDecoder(model, capacity)
        _DECODERS[model] = decoder
    else:
        decoder._allocate(capacity)
    return decoder
