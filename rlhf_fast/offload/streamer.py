"""LayerStreamer: swaps decoder layers' tensors in from their shards, one read ahead of use.

Resident layers are read once and stay bound to their modules. Streamed layers own no memory:
their parameters are meta placeholders until `acquire(i)` binds them to views of one of
`prefetch + 1` preallocated slot buffers, and `release(i)` puts the placeholders back and frees
the slot. A single background thread reads the next streamed layers (in execution order,
wrapping around to the next step's first layers) into free slots while the current layer
computes, so disk reads overlap compute; `prefetch=0` reads synchronously inside acquire (the
no-overlap baseline). Acquires nest (a count per layer), so a block of micro-batches can hold
a layer across several forward calls whose hooks acquire it again.

The bytes it holds are fixed at construction: resident layers + slots (`held_bytes`).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import nn

from rlhf_fast.offload.shards import ShardLayout, read_into


class _Binding:
    """The (module, attribute) slots of one layer and their meta placeholders."""

    def __init__(self, layer: nn.Module, names: Sequence[str]) -> None:
        self.targets = []
        for name in names:
            module_name, _, attr = name.rpartition(".")
            module = layer.get_submodule(module_name) if module_name else layer
            is_parameter = attr in module._parameters
            if not is_parameter and attr not in module._buffers:
                raise ValueError(f"shard tensor {name!r} names no parameter or buffer")
            placeholder = getattr(module, attr)
            self.targets.append((name, module, attr, is_parameter, placeholder))

    def bind(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, module, attr, is_parameter, _ in self.targets:
            tensor = tensors[name]
            if is_parameter:
                module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
            else:
                module._buffers[attr] = tensor

    def unbind(self) -> None:
        for _, module, attr, is_parameter, placeholder in self.targets:
            store = module._parameters if is_parameter else module._buffers
            store[attr] = placeholder


class LayerStreamer:
    """Binds layer i's tensors on acquire(i) and prefetches the layers that follow it."""

    def __init__(
        self,
        layers: Sequence[nn.Module],
        layouts: Sequence[ShardLayout],
        resident: set[int],
        *,
        prefetch: int = 1,
        drop_cache: bool = False,
    ) -> None:
        if prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {prefetch}")
        self.layers, self.layouts = list(layers), list(layouts)
        self.drop_cache = drop_cache
        self.bindings = [
            _Binding(layer, [entry.name for entry in layout.tensors])
            for layer, layout in zip(self.layers, self.layouts, strict=True)
        ]
        self.resident = sorted(resident)
        self.streamed = [i for i in range(len(self.layers)) if i not in resident]
        self.resident_buffers = {}
        for index in self.resident:
            buffer = torch.empty(self.layouts[index].data_bytes, dtype=torch.uint8)
            read_into(self.layouts[index], buffer, drop_cache=drop_cache)
            self.bindings[index].bind(self.layouts[index].views(buffer))
            self.resident_buffers[index] = buffer
        slot_bytes = max((self.layouts[i].data_bytes for i in self.streamed), default=0)
        slots = min(prefetch + 1, len(self.streamed))
        self.slots = [torch.empty(slot_bytes, dtype=torch.uint8) for _ in range(slots)]
        self.prefetch = prefetch
        self._free = list(range(slots))
        self._pending: dict[int, tuple[int, Future]] = {}  # layer -> (slot, read)
        self._held: dict[int, tuple[int, int]] = {}  # layer -> (slot, acquire count)
        self._lock = threading.Lock()
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="rlhf-fast-offload")
        self._closed = False
        self.bytes_read = 0

    @property
    def held_bytes(self) -> int:
        """Bytes of layer weights this streamer keeps in RAM (constant while it is open)."""
        resident = sum(b.numel() for b in self.resident_buffers.values())
        return resident + sum(slot.numel() for slot in self.slots)

    def _read(self, index: int, slot: int) -> None:
        read_into(self.layouts[index], self.slots[slot], drop_cache=self.drop_cache)

    def _schedule(self, index: int) -> bool:
        """Starts reading streamed layer `index` into a free slot; False when none is free."""
        if index in self._pending or index in self._held:
            return True
        if not self._free:
            return False
        slot = self._free.pop(0)
        self._pending[index] = (slot, self._reader.submit(self._read, index, slot))
        self.bytes_read += self.layouts[index].data_bytes
        return True

    def _prefetch_after(self, index: int) -> None:
        if self.prefetch == 0 or not self.streamed:
            return
        position = next((k for k, i in enumerate(self.streamed) if i > index), 0)
        for step in range(min(self.prefetch, len(self.streamed))):
            following = self.streamed[(position + step) % len(self.streamed)]
            if following != index and not self._schedule(following):
                break

    def acquire(self, index: int) -> None:
        if self._closed:
            raise RuntimeError("offload streamer is closed")
        if index not in self.streamed:
            return
        with self._lock:
            if index in self._held:
                slot, count = self._held[index]
                self._held[index] = (slot, count + 1)
                return
            if index not in self._pending and not self._schedule(index):
                self._evict_prefetched()
                self._schedule(index)
            slot, read = self._pending.pop(index)
        try:
            read.result()
        except BaseException:
            with self._lock:
                self._free.append(slot)
            raise
        with self._lock:
            self._held[index] = (slot, 1)
            self.bindings[index].bind(self.layouts[index].views(self.slots[slot]))
            self._prefetch_after(index)

    def _evict_prefetched(self) -> None:
        """Frees the slots of reads nobody asked for yet (an out-of-order acquire needs one)."""
        for index, (slot, read) in list(self._pending.items()):
            read.cancel() or read.exception()
            del self._pending[index]
            self._free.append(slot)
            if self._free:
                return

    def release(self, index: int) -> None:
        with self._lock:
            if index not in self._held:
                return
            slot, count = self._held[index]
            if count > 1:
                self._held[index] = (slot, count - 1)
                return
            del self._held[index]
            self.bindings[index].unbind()
            self._free.append(slot)
            self._prefetch_after(index)

    def close(self) -> None:
        """Waits for reads in flight, stops the thread, unbinds every streamed layer."""
        if self._closed:
            return
        self._closed = True
        self._reader.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            for index in list(self._held):
                self.bindings[index].unbind()
            self._held.clear()
            self._pending.clear()

    def __enter__(self) -> LayerStreamer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
