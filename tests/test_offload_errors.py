"""Offload failures: a missing or truncated shard is a one-line `FILE: what` error, and an
exception in the middle of a streamed forward leaves no reader thread, open file or bound layer.
"""

from __future__ import annotations

import os
import threading

import pytest
import torch

from rlhf_fast.offload import ShardError, load_offloaded, prepare_offload
from rlhf_fast.offload.generate import generate_batch
from rlhf_fast.offload.shards import layer_file


@pytest.fixture(scope="module")
def offload_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    return prepare_offload(LlamaForCausalLM(config).eval(), tmp_path_factory.mktemp("o") / "off")


def _copy(src, dst):
    dst.mkdir()
    for path in src.iterdir():
        (dst / path.name).write_bytes(path.read_bytes())
    return dst


def _reader_threads():
    return [t for t in threading.enumerate() if t.name.startswith("rlhf-fast-offload")]


def _open_shards():
    names = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            names.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass
    return [name for name in names if name.endswith(".safetensors")]


def test_missing_shard_is_a_one_line_error(offload_dir, tmp_path):
    broken = _copy(offload_dir, tmp_path / "b")
    (broken / layer_file(2)).unlink()
    with pytest.raises(ShardError) as error:
        load_offloaded(broken)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(str(broken / layer_file(2))) and "missing" in message


@pytest.mark.parametrize("keep", [5, 40, -7])
def test_truncated_shard_is_a_one_line_error(offload_dir, tmp_path, keep):
    broken = _copy(offload_dir, tmp_path / "b")
    path = broken / layer_file(1)
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    with pytest.raises(ShardError, match="truncated|corrupt") as error:
        load_offloaded(broken)
    assert "\n" not in str(error.value) and str(path) in str(error.value)


def test_not_an_offload_dir(tmp_path):
    with pytest.raises(ShardError, match="offload.json: missing"):
        load_offloaded(tmp_path)


def test_shard_truncated_while_streaming_fails_the_step_cleanly(offload_dir, tmp_path):
    broken = _copy(offload_dir, tmp_path / "b")
    lm = load_offloaded(broken, prefetch=1)
    path = broken / layer_file(3)
    path.write_bytes(path.read_bytes()[:-10])
    with lm, pytest.raises(ShardError, match="truncated"):
        generate_batch(lm, torch.randint(0, 50, (2, 3)), max_new_tokens=2)
    assert not _reader_threads()
    assert not _open_shards()


def test_exception_mid_stream_leaks_no_thread_file_or_binding(offload_dir):
    before = len(_reader_threads())
    lm = load_offloaded(offload_dir, resident_layers=1, prefetch=2)
    assert len(_reader_threads()) <= before + 1

    def explode(module, args, output):
        raise RuntimeError("injected failure in layer 2")

    lm.layers[2].register_forward_hook(explode)
    with lm, pytest.raises(RuntimeError, match="injected"):
        generate_batch(lm, torch.randint(0, 50, (3, 4)), max_new_tokens=3, micro_batch=2)
    assert len(_reader_threads()) == before
    assert not _open_shards()
    streamed = [i for i in range(4) if i not in lm.streamer.resident]
    for index in streamed:
        assert all(p.is_meta for p in lm.layers[index].parameters()), index
    with pytest.raises(RuntimeError, match="closed"):
        lm.streamer.acquire(streamed[0])


def test_hf_forward_exception_releases_the_layer(offload_dir):
    with load_offloaded(offload_dir, prefetch=1) as lm:
        handle = lm.layers[1].register_forward_hook(
            lambda *_: (_ for _ in ()).throw(RuntimeError("boom"))
        )
        with pytest.raises(RuntimeError, match="boom"):
            lm.model(torch.randint(0, 50, (1, 3)))
        handle.remove()
        assert not lm.streamer._held  # the always-called hook released layer 1
        out = lm.model(torch.randint(0, 50, (1, 3))).logits  # and the model still works
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("truncate", [False, True])
def test_o_direct_read_refused_after_a_short_read(offload_dir, tmp_path, monkeypatch, truncate):
    """File systems that refuse an unaligned O_DIRECT read (EINVAL) instead of returning 0 at
    the end of a file: after a short read, a one-line ShardError (truncated when it is)."""
    import errno

    from rlhf_fast.offload import shards

    broken = _copy(offload_dir, tmp_path / "b")
    path = broken / layer_file(1)
    layout = shards.read_layout(path)
    if truncate:
        path.write_bytes(path.read_bytes()[:-100])
    calls = []

    def short_then_refused(fd, buffers, offset):
        calls.append(offset)
        if len(calls) == 1:
            return len(buffers[0]) // 2 + 1  # a short read: the next offset is unaligned
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(shards.os, "preadv", short_then_refused)
    buffer = shards.aligned_buffer(shards.direct_bytes(layout))
    if buffer.data_ptr() % shards.DIRECT_ALIGN or not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT read here")
    message = "truncated" if truncate else "read failed: .*Invalid argument"
    with pytest.raises(ShardError, match=message) as error:
        shards.read_into(layout, buffer, drop_cache=True)
    assert len(calls) == 2 and "\n" not in str(error.value) and str(path) in str(error.value)


def test_acquiring_more_layers_than_slots_is_a_clear_error(offload_dir):
    with load_offloaded(offload_dir, resident_layers=0, prefetch=1) as lm:  # 2 slots
        streamer = lm.streamer
        streamer.acquire(0)
        streamer.acquire(1)
        with pytest.raises(RuntimeError, match=r"layer 2 needs a slot, but all 2 hold .*\[0, 1\]"):
            streamer.acquire(2)
        streamer.release(1)
        streamer.acquire(2)  # a freed slot serves it
        streamer.release(2)
        streamer.release(0)
    assert not _reader_threads()


def test_reacquiring_a_layer_whose_slot_a_prefetch_overwrote_reads_it_again(offload_dir):
    """A released layer's slot remembers the layer (acquiring it again costs no read) until a
    read-ahead takes the slot. Layer 1 released, layer 2 read ahead into its slot, then layer 1
    acquired again (which evicts that read-ahead): layer 1 must be read again, not bound to
    the slot's bytes, which are layer 2's now (same shapes: nothing would fail, only compute
    with the wrong weights)."""
    with load_offloaded(offload_dir, resident_layers=4) as whole:
        truth = [
            {n: p.clone() for n, p in layer.named_parameters()} for layer in whole.streamer.layers
        ]
    with load_offloaded(offload_dir, resident_layers=0, prefetch=1) as lm:  # 2 slots
        streamer = lm.streamer
        streamer.acquire(0)
        streamer.acquire(1)
        streamer.release(1)  # its slot is free again; the read-ahead of layer 2 takes it
        assert sorted(streamer._pending) == [2]
        for _, read in list(streamer._pending.values()):
            read.result()  # layer 2's bytes are in the slot (no race with the reader)
        streamer.acquire(1)
        for name, expected in truth[1].items():
            actual = dict(streamer.layers[1].named_parameters())[name]
            assert torch.equal(actual, expected), name
        streamer.release(1)
        streamer.release(0)
    assert not _reader_threads()


def test_close_frees_the_slot_buffers(offload_dir):
    import weakref

    lm = load_offloaded(offload_dir, resident_layers=1, prefetch=1)
    generate_batch(lm, torch.randint(0, 50, (2, 3)), max_new_tokens=2)
    slots = [weakref.ref(slot) for slot in lm.streamer.slots]
    assert slots
    lm.close()
    assert all(slot() is None for slot in slots)  # no garbage collection needed
    assert lm.streamer.held_bytes == sum(b.numel() for b in lm.streamer.resident_buffers.values())


@pytest.mark.parametrize("refused", ["open", "first read"])
def test_o_direct_refused_falls_back_to_a_buffered_read(offload_dir, monkeypatch, refused):
    """File systems without O_DIRECT (tmpfs before Linux 6.6, some network file systems)
    refuse it with EINVAL at open or at the first read: the layer is then read buffered (the
    same bytes) and its pages evicted after, and no file descriptor is left open."""
    import errno

    from rlhf_fast.offload import shards

    layout = shards.read_layout(offload_dir / layer_file(1))
    plain = shards.read_into(layout, torch.empty(layout.data_bytes, dtype=torch.uint8)).clone()
    real_open, evicted = os.open, []

    def no_direct_open(path, flags, *args):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    def no_direct_read(fd, buffers, offset):
        raise OSError(errno.EINVAL, "Invalid argument")

    if refused == "open":
        monkeypatch.setattr(shards.os, "open", no_direct_open)
    else:
        monkeypatch.setattr(shards.os, "preadv", no_direct_read)
    real_advise = os.posix_fadvise
    monkeypatch.setattr(
        shards.os, "posix_fadvise", lambda fd, *a: evicted.append(a) or real_advise(fd, *a)
    )
    buffer = shards.aligned_buffer(shards.direct_bytes(layout))
    got = shards.read_into(layout, buffer, drop_cache=True)
    assert torch.equal(got, plain)
    assert got.data_ptr() == buffer.data_ptr()  # the buffered read: from the buffer's start
    assert evicted == [(0, 0, os.POSIX_FADV_DONTNEED)]
    assert not _open_shards()
