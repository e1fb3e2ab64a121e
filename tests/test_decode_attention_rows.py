"""decode_attention_rows (csrc/cpu/decode_layer_ops.cpp): B single-query rows against their KV
caches, each row's keys masked, compared with scaled_dot_product_attention in fp32 on the same
mask (the rollout decoder's SDPA path), and the decoder's steps with the op against without."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rlhf_fast import _native

pytestmark = pytest.mark.skipif(
    _native.cpp is None or not hasattr(torch.ops.rlhf_fast, "decode_attention_rows"),
    reason="the C++ extension is not built",
)
ops = torch.ops.rlhf_fast
# The op sums in fp32 and rounds once at the end; SDPA's reference runs on the same (rounded)
# inputs in fp32, so the gap is the output's own rounding.
TOLERANCE = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=1e-2, rtol=1e-2),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
}
DTYPES = list(TOLERANCE)


@pytest.fixture(autouse=True)
def poisoned_outputs():
    """Every output starts as NaN, so an element the kernel does not write fails."""
    _native.cpp.set_poison_outputs(True)
    yield
    _native.cpp.set_poison_outputs(False)


def reference(q, keys, values, key_mask, first, scale):
    """SDPA in fp32 over the columns [first, first + keys); a row with no visible key gives
    zeros (the op's definition; SDPA would give NaN)."""
    rows, heads, head_dim = q.shape
    end = first + key_mask.shape[1]
    out = F.scaled_dot_product_attention(
        q.float().unsqueeze(2), keys[:, :, first:end].float(), values[:, :, first:end].float(),
        attn_mask=key_mask[:, None, None, :], scale=scale, enable_gqa=True,
    ).reshape(rows, heads * head_dim)  # fmt: skip
    return out.masked_fill(~key_mask.any(1, keepdim=True), 0.0)


def rollout_mask(rows, capacity, first, end, window, generator):
    """As rollout_decoder._mask at a width-1 step at column end - 1: left padding of a different
    length per row (gaps before each row's prompt), the window, the query's own key visible."""
    pads = torch.randint(0, end, (rows,), generator=generator)
    key_valid = torch.arange(capacity)[None, :] >= pads[:, None]
    key = torch.arange(first, end)[None, :]
    visible = key_valid[:, first:end].clone()
    if window is not None:
        visible &= key > end - 1 - window
    return visible | (key == end - 1)


CASES = [
    # rows, heads, kv_heads, head_dim, capacity, end, window
    (8, 4, 4, 64, 64, 40, None),  # the PPO bench's shape
    (1, 4, 4, 64, 8, 1, None),  # one key
    (9, 8, 2, 40, 300, 300, None),
    (3, 6, 3, 64, 310, 173, 50),
    (5, 6, 3, 40, 32, 17, 4),
    (2, 8, 2, 64, 20, 20, 1),  # a window of one: only the query's own key
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows, heads, kv_heads, head_dim, capacity, end, window", CASES)
def test_matches_sdpa(dtype, rows, heads, kv_heads, head_dim, capacity, end, window):
    for seed in range(3):
        generator = torch.Generator().manual_seed(seed)
        first = 0 if window is None else max(0, end - window)
        key_mask = rollout_mask(rows, capacity, first, end, window, generator)
        keys = torch.randn(rows, kv_heads, capacity, head_dim, generator=generator).to(dtype)
        values = torch.randn(rows, kv_heads, capacity, head_dim, generator=generator).to(dtype)
        # q as the decoder passes it: the heads of a [B, 1, heads + kv_heads, D] block, strided
        block = torch.randn(rows, 1, heads + kv_heads, head_dim, generator=generator).to(dtype)
        q = block[:, 0, :heads]
        assert rows == 1 or not q.is_contiguous()  # one row: a size-1 dim is contiguous
        scale = head_dim**-0.5
        out = ops.decode_attention_rows(q, keys, values, key_mask, first, scale)
        assert out.dtype == dtype and out.shape == (rows, heads * head_dim)
        expected = reference(q, keys, values, key_mask, first, scale)
        torch.testing.assert_close(out.float(), expected, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_head_dim_and_mask(dtype):
    """q with a non-unit stride along head_dim, and a mask that is a strided view."""
    keys = torch.randn(4, 2, 30, 16).to(dtype)
    values = torch.randn(4, 2, 30, 16).to(dtype)
    q = torch.randn(4, 16, 4).to(dtype).transpose(1, 2)
    wide = torch.rand(4, 2 * 25) < 0.7
    key_mask = wide[:, ::2]
    key_mask[:, -1] = True
    out = ops.decode_attention_rows(q, keys, values, key_mask, 5, 0.3)
    torch.testing.assert_close(
        out.float(), reference(q, keys, values, key_mask, 5, 0.3), **TOLERANCE[dtype]
    )


def test_a_row_without_visible_keys_gives_zeros():
    keys, values = torch.randn(3, 1, 6, 8), torch.randn(3, 1, 6, 8)
    q = torch.randn(3, 2, 8)
    key_mask = torch.tensor([[True, False, True], [False, False, False], [False, True, False]])
    out = ops.decode_attention_rows(q, keys, values, key_mask, 2, 0.5)
    assert torch.equal(out[1], torch.zeros(16))
    torch.testing.assert_close(out, reference(q, keys, values, key_mask, 2, 0.5))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_keys_a_row_may_not_see_are_never_read(dtype):
    """NaN and inf in the caches at masked positions (another row's padding, say) must not
    reach the output: the kernel scores keys four at a time, masked ones included, so it has
    to drop those scores and skip their values, not weigh them by 0 (0 * inf is NaN)."""
    generator = torch.Generator().manual_seed(5)
    rows, heads, kv_heads, head_dim, capacity = 3, 4, 2, 64, 23
    key_mask = torch.rand(rows, capacity, generator=generator) > 0.4
    key_mask[:, -1] = True
    keys = torch.randn(rows, kv_heads, capacity, head_dim, generator=generator).to(dtype)
    values = torch.randn(rows, kv_heads, capacity, head_dim, generator=generator).to(dtype)
    q = torch.randn(rows, heads, head_dim, generator=generator).to(dtype)
    expected = reference(q, keys, values, key_mask, 0, 0.125)
    hidden = ~key_mask[:, None, :, None].expand_as(keys)
    keys, values = keys.masked_fill(hidden, float("nan")), values.masked_fill(hidden, float("inf"))
    out = ops.decode_attention_rows(q, keys, values, key_mask, 0, 0.125)
    torch.testing.assert_close(out.float(), expected, **TOLERANCE[dtype])


def test_large_scores_stay_finite():
    """Scores of several hundred: the softmax subtracts the row's largest visible score (a
    masked key's larger score must not be the one subtracted)."""
    keys = torch.full((1, 1, 4, 8), 10.0)
    keys[0, 0, 0] = 40.0  # masked out below
    values = torch.randn(1, 1, 4, 8)
    q = torch.full((1, 1, 8), 10.0)
    key_mask = torch.tensor([[False, True, True, True]])
    out = ops.decode_attention_rows(q, keys, values, key_mask, 0, 1.0)
    torch.testing.assert_close(out, values[0, 0, 1:].mean(0, keepdim=True))


def test_bad_arguments():
    q, keys, values = torch.randn(2, 4, 8), torch.zeros(2, 2, 6, 8), torch.zeros(2, 2, 6, 8)
    mask = torch.ones(2, 6, dtype=torch.bool)
    call = ops.decode_attention_rows
    with pytest.raises(ValueError, match="q must be"):
        call(q[0], keys, values, mask, 0, 0.5)
    with pytest.raises(TypeError, match="q must be"):
        call(q.double(), keys.double(), values.double(), mask, 0, 0.5)
    with pytest.raises(TypeError, match="keys"):
        call(q, keys.bfloat16(), values, mask, 0, 0.5)
    with pytest.raises(ValueError, match="keys must be"):
        call(q, torch.zeros(3, 2, 6, 8), values, mask, 0, 0.5)
    with pytest.raises(ValueError, match="keys must be"):
        call(q, torch.zeros(2, 2, 8, 6).transpose(2, 3), values, mask, 0, 0.5)
    with pytest.raises(ValueError, match="values must have the shape"):
        call(q, keys, torch.zeros(2, 2, 7, 8), mask, 0, 0.5)
    with pytest.raises(ValueError, match="multiple of"):
        call(torch.randn(2, 3, 8), keys, values, mask, 0, 0.5)
    with pytest.raises(TypeError, match="key_mask must be bool"):
        call(q, keys, values, mask.float(), 0, 0.5)
    with pytest.raises(ValueError, match="key_mask must be"):
        call(q, keys, values, mask[:1], 0, 0.5)
    with pytest.raises(ValueError, match="key_mask must be"):
        call(q, keys, values, mask[:, :0], 0, 0.5)
    with pytest.raises(ValueError, match="outside the cache"):
        call(q, keys, values, mask, 1, 0.5)
    with pytest.raises(ValueError, match="outside the cache"):
        call(q, keys, values, mask[:, :2], -1, 0.5)


def test_opcheck():
    q, keys, values = torch.randn(2, 4, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    mask = torch.rand(2, 4) < 0.6
    torch.library.opcheck(ops.decode_attention_rows.default, (q, keys, values, mask, 1, 0.5))


@pytest.mark.parametrize("family, extra", [("llama", {}), ("mistral", {"sliding_window": 3})])
def test_rollout_decoder_steps_with_and_without_the_op(monkeypatch, family, extra):
    """The decoder's logits at width-1 steps (left-padded rows of 1-7 prompt tokens, 4 heads
    on 2 KV heads, a window shorter than the steps) with the op against its SDPA path: equal
    within fp32 rounding in fp32; in bf16 no further from the fp32 model's logits than SDPA's
    (both are ~0.05 off on average, the bf16 rounding of every layer); and the op is what ran."""
    from test_rollout_decoder import PAD, PROMPTS, tiny_causal_lm, with_lora

    from rlhf_fast.train.rollout import left_pad
    from rlhf_fast.train.rollout_decoder import RolloutDecoder

    query, query_mask = left_pad(PROMPTS, PAD)
    tokens = torch.randint(3, 50, (len(PROMPTS), 5), generator=torch.Generator().manual_seed(0))
    calls = []
    op = ops.decode_attention_rows.default

    def counted(*args):
        calls.append(args[0].dtype)
        return op(*args)

    monkeypatch.setattr(torch.ops.rlhf_fast.decode_attention_rows, "default", counted)
    logits = {}
    for dtype in (torch.float32, torch.bfloat16):
        policy = with_lora(tiny_causal_lm(family, **extra).to(dtype))
        for native in (True, False):
            decoder = RolloutDecoder(policy)
            decoder.native_attention = native
            steps = [decoder.start(query, query_mask, 5)]
            steps += [decoder.step(tokens[:, column]) for column in range(5)]
            logits[dtype, native] = torch.stack(steps, 1).float()
    steps = 5 * len(decoder.layers)
    assert calls == [torch.float32] * steps + [torch.bfloat16] * steps
    fp32 = logits[torch.float32, False]
    torch.testing.assert_close(logits[torch.float32, True], fp32, atol=1e-4, rtol=1e-5)
    native_error = (logits[torch.bfloat16, True] - fp32).abs().mean()
    sdpa_error = (logits[torch.bfloat16, False] - fp32).abs().mean()
    assert native_error <= 1.05 * sdpa_error
