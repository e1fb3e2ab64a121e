"""LayerStreamer: swaps decoder layers' tensors in from their shards, one read ahead of use.

Resident layers are read once and stay bound to their modules. Streamed layers own no memory:
their parameters are meta placeholders until `acquire(i)` binds them to views of one of
`prefetch + 1` preallocated slot buffers, and `release(i)` puts the placeholders back and frees
the slot. A single background thread reads the next streamed layers (in execution order,
wrapping around to the next step's first layers) into free slots while the current layer
computes, so disk reads overlap compute; `prefetch=0` reads synchronously inside acquire (the
no-overlap baseline). Acquires nest (a count per layer), so a block of micro-batches can hold
a layer across several forward calls whose hooks acquire it again.

Training walks the layers forward, then backward (offload/backward.py re-streams each layer in
reverse to recompute it): `acquire(i, direction=-1)` reads ahead towards layer 0, and a forward
acquire with `turn=True` reads ahead past the last layer into the backward order (the last
layers again) instead of wrapping to the first. A freed slot remembers which layer it holds, so
acquiring that layer again before the slot is reused costs no read (the turns at both ends).

The bytes it holds are fixed at construction: resident layers + slots (`held_bytes`).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import nn

from rlhf_fast.offload.shards import ShardLayout, aligned_buffer, direct_bytes, read_into


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

    def bind_shaped(self) -> None:
        """Binds zero-stride CPU stand-ins of the right shape and dtype (no memory): for code
        that reads a weight's device, dtype or shape while it is not loaded (peft, adding
        LoRA adapters). Never for a forward: every value is 0."""
        for _, module, attr, is_parameter, placeholder in self.targets:
            stand_in = torch.zeros((), dtype=placeholder.dtype).expand(placeholder.shape)
            if is_parameter:
                module._parameters[attr] = nn.Parameter(stand_in, requires_grad=False)
            else:
                module._buffers[attr] = stand_in

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

        # buffers sized and aligned for O_DIRECT reads when reading bypasses the page cache
        def size(layout: ShardLayout) -> int:
            return direct_bytes(layout) if drop_cache else layout.data_bytes

        def new_buffer(nbytes: int) -> torch.Tensor:
            return aligned_buffer(nbytes) if drop_cache else torch.empty(nbytes, dtype=torch.uint8)

        for index in self.resident:
            buffer = new_buffer(size(self.layouts[index]))
            data = read_into(self.layouts[index], buffer, drop_cache=drop_cache)
            self.bindings[index].bind(self.layouts[index].views(data))
            self.resident_buffers[index] = buffer
        slot_bytes = max((size(self.layouts[i]) for i in self.streamed), default=0)
        slots = min(prefetch + 1, len(self.streamed))
        self.slots = [new_buffer(slot_bytes) for _ in range(slots)]
        self._data: list[torch.Tensor | None] = [None] * slots  # each slot's data section
        self.prefetch = prefetch
        self._free = list(range(slots))
        self._pending: dict[int, tuple[int, Future]] = {}  # layer -> (slot, read)
        self._held: dict[int, tuple[int, int]] = {}  # layer -> (slot, acquire count)
        self._contents: list[int | None] = [None] * slots  # the layer a slot holds, once read
        self._direction, self._turn = 1, False
        self._lock = threading.Lock()
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="rlhf-fast-offload")
        self._closed = False
        self.bytes_read = 0
        # where a step's time goes (benchmarks print them): seconds acquire() blocked on a read
        # (compute waiting for I/O) and seconds the reads took (on the reader thread)
        self.wait_seconds = 0.0
        self.read_seconds = 0.0

    @property
    def held_bytes(self) -> int:
        """Bytes of layer weights this streamer keeps in RAM (constant while it is open)."""
        resident = sum(b.numel() for b in self.resident_buffers.values())
        return resident + sum(slot.numel() for slot in self.slots)

    def _read(self, index: int, slot: int) -> None:
        started = time.perf_counter()
        self._data[slot] = read_into(
            self.layouts[index], self.slots[slot], drop_cache=self.drop_cache
        )
        self.read_seconds += time.perf_counter() - started

    def _schedule(self, index: int) -> bool:
        """Starts reading streamed layer `index` into a free slot; False when none is free."""
        if index in self._pending or index in self._held:
            return True
        if not self._free:
            return False
        kept = [slot for slot in self._free if self._contents[slot] == index]
        if kept:  # freed but not yet overwritten: no read
            self._free.remove(kept[0])
            done: Future = Future()
            done.set_result(None)
            self._pending[index] = (kept[0], done)
            return True
        # overwrite the slot whose layer is needed last (or an empty one)
        upcoming = self._following(index)
        slot = max(
            self._free,
            key=lambda s: (
                len(upcoming) + 1
                if self._contents[s] not in upcoming
                else upcoming.index(self._contents[s])
            ),
        )
        self._free.remove(slot)
        self._contents[slot] = None
        self._pending[index] = (slot, self._reader.submit(self._read, index, slot))
        self.bytes_read += self.layouts[index].data_bytes
        return True

    def _following(self, index: int) -> list[int]:
        """Streamed layers in the order they are expected after `index` (one round)."""
        streamed = self.streamed
        after = [i for i in streamed if i > index]
        before = [i for i in streamed if i < index]
        if self._direction < 0:  # backward: towards layer 0, then the next forward
            return before[::-1] + streamed
        if self._turn:  # a training forward: past the last layer comes the backward
            return after + streamed[::-1]
        return after + before + ([index] if index in streamed else [])

    def _prefetch_after(self, index: int) -> None:
        if self.prefetch == 0 or not self.streamed:
            return
        for following in self._following(index)[: self.prefetch + 1]:
            if following in self._held:
                continue
            if not self._schedule(following):
                break

    def acquire(self, index: int, *, direction: int = 1, turn: bool = False) -> None:
        """Binds layer `index` (reading it if it is not read ahead). `direction` -1: the
        walk goes towards layer 0 (backward); `turn`: a training forward (see the docstring)."""
        if self._closed:
            raise RuntimeError("offload streamer is closed")
        if index not in self.streamed:
            return
        with self._lock:
            self._direction, self._turn = direction, turn
            if index in self._held:
                slot, count = self._held[index]
                self._held[index] = (slot, count + 1)
                return
            if index not in self._pending and not self._schedule(index):
                self._evict_prefetched()
                if not self._schedule(index):  # every slot holds an acquired layer
                    raise RuntimeError(
                        f"offload: layer {index} needs a slot, but all {len(self._data)} hold "
                        f"acquired layers {sorted(self._held)}: at most prefetch + 1 streamed "
                        "layers can be acquired at once"
                    )
            slot, read = self._pending.pop(index)
        started = time.perf_counter()
        try:
            read.result()
        except BaseException:
            with self._lock:
                self._free.append(slot)
            raise
        self.wait_seconds += time.perf_counter() - started
        with self._lock:
            self._held[index] = (slot, 1)
            self._contents[slot] = index
            self.bindings[index].bind(self.layouts[index].views(self._data[slot]))
            self._prefetch_after(index)

    def holds(self, index: int) -> bool:
        """Whether layer `index` is acquired (bound, and not yet released)."""
        with self._lock:
            return index in self._held

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

    @contextlib.contextmanager
    def shaped_stand_ins(self):
        """Context: every streamed layer not in use shows zero-stride stand-ins of its tensors
        (see `_Binding.bind_shaped`), so code that inspects weights (peft creating adapters on
        the weights' device and dtype) works; meta placeholders are back afterwards."""
        with self._lock:
            if self._held:
                raise RuntimeError(f"layers {sorted(self._held)} are in use")
            idle = list(self.streamed)
            for index in idle:
                self.bindings[index].bind_shaped()
        try:
            yield
        finally:
            for index in idle:
                self.bindings[index].unbind()

    def close(self) -> None:
        """Waits for reads in flight, stops the thread, unbinds every streamed layer and frees
        the slot buffers (the model and its OffloadedLM reference each other, so they would
        otherwise live until a garbage collection finds the cycle)."""
        if self._closed:
            return
        self._closed = True
        self._reader.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            for index in list(self._held):
                self.bindings[index].unbind()
            self._held.clear()
            self._pending.clear()
            self.slots, self._data = [], []

    def __enter__(self) -> LayerStreamer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
