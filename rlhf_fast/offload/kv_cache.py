"""A KV cache held in 4 bits: FlexGen's group-wise asymmetric compression of keys and values.

Each cached key or value vector (one token, one KV head, `head_dim` numbers) is cut into groups
of `group_size` consecutive numbers (64, as FlexGen; the whole head_dim when 64 does not divide
it). A group stores its minimum and its step (max - min) / 15 in fp16 and each number as the
4-bit code round((x - min) / step), two codes per byte (low nibble: even index). That is
0.5 + 4 / group_size bytes a number instead of 4 (fp32) or 2 (bf16): 7.1x / 3.6x smaller at
group 64. Decoding is x ~ min + code * step, off by at most step / 2 (+ fp16 rounding of
min and step).

`Int4KVLayer` is a transformers cache layer: attention calls `update(new_keys, new_values)`,
which stores the new tokens compressed and returns the whole past decompressed followed by the
new tokens exactly (this step's queries see their own keys and values unrounded). The
decompressed copy is a temporary of the attention call, never stored, so the cache holds only
the compressed bytes. `compressed_cache(config)` builds a DynamicCache whose layers are these.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

LEVELS = 15  # 4 bits


def compressed_fraction(element_size: int, group_size: int = 64) -> float:
    """Bytes of the compressed cache per byte of the uncompressed one."""
    return (0.5 + 4 / group_size) / element_size


def kv_group(head_dim: int, group_size: int = 64) -> int:
    """The group length used for vectors of `head_dim` numbers."""
    if group_size < 2 or group_size % 2:
        raise ValueError(f"group_size must be an even number >= 2, got {group_size}")
    if head_dim % 2:
        raise ValueError(f"head_dim must be even to pack two 4-bit codes a byte, got {head_dim}")
    return group_size if head_dim % group_size == 0 else head_dim


def compress4(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes uint8 [..., D/2], step fp16 [..., D/group], minimum fp16 [..., D/group])."""
    if not x.is_floating_point():
        raise TypeError(f"x must be a float tensor, got {x.dtype}")
    size = x.shape[-1]
    if size % group or group % 2:
        raise ValueError(f"last dim {size} is not a multiple of the even group {group}")
    groups = x.float().reshape(*x.shape[:-1], size // group, group)
    low = groups.amin(-1, keepdim=True).half()
    step = ((groups.amax(-1, keepdim=True) - low.float()) / LEVELS).half()
    safe = step.float().clamp(min=torch.finfo(torch.float16).tiny)
    codes = ((groups - low.float()) / safe).round_().clamp_(0, LEVELS).to(torch.uint8)
    codes = codes.reshape(*x.shape[:-1], size)
    return codes[..., 0::2] | (codes[..., 1::2] << 4), step.squeeze(-1), low.squeeze(-1)


def decompress4(
    packed: torch.Tensor, step: torch.Tensor, low: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """The inverse of compress4 (up to rounding), in `dtype`."""
    codes = torch.stack([packed & 15, packed >> 4], dim=-1).reshape(*packed.shape[:-1], -1)
    groups = codes.reshape(*step.shape, -1).float()
    values = groups * step.float().unsqueeze(-1) + low.float().unsqueeze(-1)
    return values.reshape(codes.shape).to(dtype)


class Int4KVLayer(DynamicLayer):
    """One attention layer's cache, keys and values compressed (see the module docstring)."""

    def __init__(self, group_size: int = 64) -> None:
        super().__init__()
        self.group_size = group_size
        self.parts: dict[str, list[torch.Tensor]] = {}
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.dtype = key_states.dtype
        self.group = kv_group(key_states.shape[-1], self.group_size)
        self.parts = {"keys": [], "values": []}

    def _append(self, name: str, states: torch.Tensor) -> torch.Tensor:
        """Stores `states` [B, H, T, D] compressed; returns past (decompressed) + states."""
        compressed = compress4(states, self.group)
        if not self.parts[name]:
            self.parts[name] = list(compressed)
            return states
        past = decompress4(*self.parts[name], states.dtype)
        pairs = zip(self.parts[name], compressed, strict=True)
        self.parts[name] = [torch.cat([old, new], dim=-2) for old, new in pairs]
        return torch.cat([past, states], dim=-2)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        keys = self._append("keys", key_states)
        values = self._append("values", value_states)
        self.length += key_states.shape[-2]
        return keys, values

    def get_seq_length(self) -> int:
        return self.length

    @property
    def stored_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for part in self.parts.values() for t in part)

    def reset(self) -> None:
        self.parts, self.length = {}, 0
        super().reset()

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a compressed KV cache cannot be cropped")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("a compressed KV cache cannot be repeated")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("a compressed KV cache cannot be reindexed")


def compressed_cache(config, group_size: int = 64) -> DynamicCache:
    """A DynamicCache for `config` whose every layer is an Int4KVLayer."""
    cache = DynamicCache(config=config)
    if any(type(layer) is not DynamicLayer for layer in cache.layers):
        raise ValueError("4-bit KV cache: only full-attention layers (no sliding windows)")
    cache.layers = [Int4KVLayer(group_size) for _ in cache.layers]
    return cache


def cache_bytes(cache: DynamicCache) -> int:
    """Bytes the cache holds (compressed layers: their codes, steps and minima)."""
    total = 0
    for layer in cache.layers:
        if isinstance(layer, Int4KVLayer):
            total += layer.stored_bytes
        elif layer.is_initialized and layer.keys is not None:
            total += (layer.keys.numel() + layer.values.numel()) * layer.keys.element_size()
    return total
