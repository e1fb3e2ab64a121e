"""The 4-bit group-wise KV cache (offload/kv_cache.py): its round trip against an independent
per-group oracle, its size, its effect on logits (bounded, and the same through generate_batch's
block schedule as through plain HF decoding with the same cache), and bad input."""

from __future__ import annotations

import pytest
import torch

from rlhf_fast.offload import load_offloaded, prepare_offload
from rlhf_fast.offload.generate import generate_batch
from rlhf_fast.offload.kv_cache import (
    cache_bytes,
    compress4,
    compressed_cache,
    decompress4,
    kv_group,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _oracle(x: torch.Tensor, group: int) -> torch.Tensor:
    """Quantize-dequantize one group at a time with Python scalars (fp16 min and step)."""
    flat = x.float().reshape(-1, group)
    out = torch.empty_like(flat)
    for row in range(flat.shape[0]):
        values = flat[row].tolist()
        low = float(torch.tensor(min(values)).half())
        step = float(torch.tensor((max(values) - low) / 15).half())
        for k, value in enumerate(values):
            code = 0 if step == 0 else min(15, max(0, round((value - low) / step)))
            out[row, k] = low + code * step
    return out.reshape(x.shape)


@pytest.mark.parametrize(
    "shape, group, dtype",
    [((2, 3, 5, 64), 64, torch.float32), ((1, 2, 7, 128), 64, torch.bfloat16),
     ((3, 1, 4, 80), 80, torch.float32), ((2, 2, 3, 16), 16, torch.float32)],
)  # fmt: skip
def test_round_trip_matches_the_per_group_oracle(shape, group, dtype):
    generator = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=generator) * 3 + 1).to(dtype)
    x[..., :group] = 0.25  # a constant group: step 0
    assert kv_group(shape[-1]) == group
    packed, step, low = compress4(x, group)
    assert packed.dtype == torch.uint8 and packed.shape == (*shape[:-1], shape[-1] // 2)
    assert step.shape == low.shape == (*shape[:-1], shape[-1] // group)
    got = decompress4(packed, step, low, torch.float32)
    want = _oracle(x, group)
    # rounding to the nearest code may differ at exact ties (x between two codes): one step
    ties = (got - want).abs() > 1e-3
    assert ties.float().mean() < 0.01
    torch.testing.assert_close(got[~ties], want[~ties], atol=1e-5, rtol=1e-5)
    per_group_step = step.float().repeat_interleave(group, -1)
    assert ((got - x.float()).abs() <= per_group_step * 0.5 + 2e-2 * x.float().abs() + 1e-3).all()
    assert (got[..., :group] == 0.25).all()


@pytest.mark.parametrize(
    "head_dim, group_size, dtype",
    [(80, 64, torch.float32), (96, 32, torch.bfloat16), (6, 64, torch.float16),
     (128, 64, torch.float32)],
)  # fmt: skip
def test_cache_layer_over_growing_lengths_equals_the_oracle(head_dim, group_size, dtype):
    """Int4KVLayer.update over a prefill, single tokens and a chunk: the past comes back as
    the per-token oracle's round trip (each vector compressed once, when it arrived), the new
    tokens exactly, in the input dtype, with the length counted."""
    from rlhf_fast.offload.kv_cache import Int4KVLayer

    layer, group = Int4KVLayer(group_size), kv_group(head_dim, group_size)
    generator = torch.Generator().manual_seed(head_dim)
    past_keys, past_values, length = [], [], 0
    for tokens in (5, 1, 1, 3, 1):
        keys = (torch.randn(2, 3, tokens, head_dim, generator=generator) * 2).to(dtype)
        values = torch.randn(2, 3, tokens, head_dim, generator=generator).to(dtype)
        got_keys, got_values = layer.update(keys, values)
        length += tokens
        assert got_keys.dtype == got_values.dtype == dtype
        assert torch.equal(got_keys, torch.cat([*past_keys, keys], -2))
        assert torch.equal(got_values, torch.cat([*past_values, values], -2))
        assert layer.get_seq_length() == length
        past_keys.append(_oracle(keys, group).to(dtype))
        past_values.append(_oracle(values, group).to(dtype))


def test_bad_input():
    with pytest.raises(ValueError, match="head_dim must be even"):
        kv_group(63)
    with pytest.raises(ValueError, match="group_size"):
        kv_group(64, 3)
    with pytest.raises(ValueError, match="multiple"):
        compress4(torch.randn(2, 48), 32)
    with pytest.raises(TypeError, match="float"):
        compress4(torch.ones(2, 64, dtype=torch.int32), 64)


def _llama(layers=3):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=101, hidden_size=256, intermediate_size=384, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
        initializer_range=0.05, pad_token_id=0, eos_token_id=None, bos_token_id=None,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


@torch.no_grad()
def _decode_logits(model, ids, cache, prefill=8):
    out = [model(ids[:, :prefill], cache=cache, use_cache=True).logits]
    for t in range(prefill, ids.shape[1]):
        out.append(model(ids[:, t : t + 1], cache=cache, use_cache=True).logits)
    return torch.cat(out, 1)


def test_effect_on_logits_is_bounded_and_the_cache_is_7x_smaller():
    from transformers import DynamicCache

    model = _llama()
    ids = torch.randint(1, 101, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids).logits
    dense_cache, small_cache = DynamicCache(config=model.config), compressed_cache(model.config)
    dense = _decode_logits(model, ids, dense_cache)
    small = _decode_logits(model, ids, small_cache)
    torch.testing.assert_close(dense, full, atol=1e-4, rtol=1e-4)  # the harness is exact
    error = (small - full).abs()
    assert error[:, :8].max() < 1e-4  # the prefill sees its own keys unrounded
    assert error.max() > 1e-3  # later positions read the compressed past
    # bounded: mean error a tenth of the logits' spread, the top token mostly kept
    assert error.mean() < 0.1 * full.std(), (error.mean(), full.std())
    assert (small.argmax(-1) == full.argmax(-1)).float().mean() > 0.75
    assert cache_bytes(small_cache) * 7 <= cache_bytes(dense_cache)
    assert small_cache.get_seq_length() == 40


def test_block_schedule_with_the_compressed_cache_equals_hf_decoding(tmp_path):
    model = _llama(4)
    prepare_offload(model, tmp_path / "off")
    ids = torch.randint(1, 101, (4, 6), generator=torch.Generator().manual_seed(2))
    want = ids
    cache = compressed_cache(model.config)
    with torch.no_grad():
        logits = model(ids, cache=cache, use_cache=True).logits[:, -1]
        for _ in range(6):
            token = logits.argmax(-1, keepdim=True)
            want = torch.cat([want, token], 1)
            logits = model(token, cache=cache, use_cache=True).logits[:, -1]
    with load_offloaded(tmp_path / "off", resident_layers=1, prefetch=1) as lm:
        got = generate_batch(lm, ids, max_new_tokens=6, micro_batch=3, kv_bits=4)
        dense = generate_batch(lm, ids, max_new_tokens=6, micro_batch=3)
        with pytest.raises(ValueError, match="kv_bits"):
            generate_batch(lm, ids, max_new_tokens=1, kv_bits=8)
    assert torch.equal(got, want)
    assert dense.shape == got.shape


def test_kv_int4_in_the_offload_spec_and_the_policy_memory():
    from rlhf_fast.offload.policy import Calibration, evaluate, model_shapes
    from rlhf_fast.offload.session import parse_offload

    assert parse_offload("kv=int4,prefetch=2", 4) == {"kv_bits": 4, "prefetch": 2}
    assert parse_offload("kv=none", 4) == {"kv_bits": None}
    assert parse_offload("auto,kv=int4", 4) == {"kv_bits": 4}
    with pytest.raises(ValueError, match="kv=none\\|int4"):
        parse_offload("kv=int8", 4)
    shape = model_shapes(_llama().config, torch.float32)[None]
    calibration = Calibration(1e9, {"none": 1e-3}, {"none": 1e-4}, 1e-4, 1e-5)
    common = dict(compress=None, resident_layers=0, prefetch=1, micro_batch=4, batch=8,
                  context=1024)  # fmt: skip
    dense, small = evaluate(shape, calibration, **common), evaluate(shape, calibration, **common,
                                                                    kv_bits=4)  # fmt: skip
    kv = 8 * 1024 * shape.kv_bytes_per_token
    assert dense.memory_bytes - small.memory_bytes == pytest.approx(kv * (1 - 0.5625 / 4), rel=1e-3)
    assert small.kv_bits == 4 and "kv=int4" in small.describe()
