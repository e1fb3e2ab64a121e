"""Offloaded generation equals resident generation token for token (greedy), fp32 and int4.

The oracle is transformers' own `generate` on the same model held fully in memory (for int4:
the same model through rlhf_fast.quant.quantize_model, which uses the same quantizer as the
prepare step; fp32 activations here, the int4 activation rule in test_offload_bf16_rule.py).
Prompts are left-padded with gaps of different lengths, and the offloaded run
varies resident layers, prefetch depth and micro-batch size.
"""

from __future__ import annotations

import copy

import pytest
import torch

from rlhf_fast.offload import load_offloaded, prepare_offload
from rlhf_fast.offload.generate import generate_batch
from rlhf_fast.quant import quantize_model

NEW_TOKENS = 7


def _tiny_llama(layers: int = 5, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=None,
        bos_token_id=None, tie_word_embeddings=False, initializer_range=0.3,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def _prompts(batch: int = 5, length: int = 9):
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 97, (batch, length), generator=generator)
    mask = torch.ones_like(ids)
    for row, pad in enumerate([0, 3, 0, 1, 5][:batch]):
        mask[row, :pad] = 0
    return ids.masked_fill(mask == 0, 0), mask


def _reference(model, ids, mask):
    return model.generate(
        ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0
    )


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    model = _tiny_llama()
    root = tmp_path_factory.mktemp("offload")
    model.save_pretrained(root / "source")
    ids, mask = _prompts()
    return {
        "model": model,
        "from_model": prepare_offload(model, root / "from-model"),
        "from_dir": prepare_offload(root / "source", root / "from-dir"),
        "int4": prepare_offload(root / "source", root / "int4", compress=4, group_size=32),
        "int8": prepare_offload(root / "source", root / "int8", compress=8),
        "expected": _reference(model, ids, mask),
        "prompts": (ids, mask),
    }


@pytest.mark.parametrize(
    "source, resident, prefetch, micro_batch",
    [
        ("from_model", 0, 1, 5),
        ("from_model", 2, 0, 1),
        ("from_dir", 0, 3, 2),
        ("from_dir", 5, 1, 3),
        ("from_dir", 1, 2, 5),
    ],
)
def test_block_schedule_equals_resident_greedy(dense, source, resident, prefetch, micro_batch):
    ids, mask = dense["prompts"]
    with load_offloaded(dense[source], resident_layers=resident, prefetch=prefetch) as lm:
        out = generate_batch(lm, ids, mask, max_new_tokens=NEW_TOKENS, micro_batch=micro_batch)
        assert lm.streamer.bytes_read > 0 or resident == 5
    assert torch.equal(out, dense["expected"])


def test_hf_generate_through_hooks_equals_resident(dense):
    ids, mask = dense["prompts"]
    with load_offloaded(dense["from_dir"], resident_layers=2, prefetch=1, drop_cache=True) as lm:
        out = _reference(lm.model, ids, mask)
    assert torch.equal(out, dense["expected"])


@pytest.mark.parametrize("bits", [4, 8])
def test_compressed_streaming_equals_quantized_resident(dense, bits):
    ids, mask = dense["prompts"]
    quantized = quantize_model(copy.deepcopy(dense["model"]), bits, 32)
    expected = _reference(quantized, ids, mask)
    # fp32 activations (the opt-out of the int4 activation rule: test_offload_bf16_rule.py)
    with load_offloaded(dense[f"int{bits}"], resident_layers=1, prefetch=2, bf16_rows=None) as lm:
        from rlhf_fast.quant import QuantLinear

        assert isinstance(lm.layers[0].mlp.down_proj, QuantLinear)
        out = generate_batch(lm, ids, mask, max_new_tokens=NEW_TOKENS, micro_batch=2)
    assert torch.equal(out, expected)
    # the stream is compressed: far fewer bytes than the dense layers
    manifest_bytes = sum(lm.manifest["layer_bytes"])
    assert manifest_bytes < 0.6 * sum(
        p.numel() * 4 for n, p in dense["model"].named_parameters() if ".layers." in n
    )


def test_prequantized_model_streams_as_stored(dense, tmp_path):
    ids, mask = dense["prompts"]
    quantized = quantize_model(copy.deepcopy(dense["model"]), 4, 64)
    expected = _reference(quantized, ids, mask)
    prepare_offload(quantized, tmp_path / "q")
    with load_offloaded(tmp_path / "q", prefetch=1, bf16_rows=None) as lm:
        assert lm.layers[3].self_attn.q_proj.group_size == 64
        out = generate_batch(lm, ids, mask, max_new_tokens=NEW_TOKENS, micro_batch=3)
    assert torch.equal(out, expected)


def test_eos_rows_are_padded_and_generation_stops(dense):
    ids, mask = dense["prompts"]
    expected = dense["expected"]
    eos = int(expected[0, ids.shape[1] + 1])  # row 0 produces it at its second new token
    with load_offloaded(dense["from_model"]) as lm:
        out = generate_batch(lm, ids, mask, max_new_tokens=NEW_TOKENS, eos_token_id=eos)
    row = out[0, ids.shape[1] :]
    assert row[1] == eos and (row[2:] == 0).all()


def test_gpt2_fallback_forward_matches_resident_logits(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=97, n_embd=32, n_layer=3, n_head=2, pad_token_id=0)
    model = GPT2LMHeadModel(config).eval()
    ids, mask = _prompts()
    prepare_offload(model, tmp_path / "gpt2")
    with load_offloaded(tmp_path / "gpt2", prefetch=1) as lm:
        got = lm.model(input_ids=ids, attention_mask=mask).logits
    want = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_bad_arguments(dense):
    with load_offloaded(dense["from_model"]) as lm:
        with pytest.raises(ValueError, match="input_ids"):
            generate_batch(lm, torch.zeros(3, dtype=torch.long), max_new_tokens=1)
        with pytest.raises(ValueError, match="attention_mask"):
            generate_batch(
                lm, torch.ones(2, 3, dtype=torch.long), torch.ones(2, 4), max_new_tokens=1
            )
    with pytest.raises(ValueError, match="compress"):
        prepare_offload(dense["model"], "/nonexistent/x", compress=3)


def test_one_token_prompts(dense):
    ids = torch.tensor([[5], [17]])
    expected = _reference(dense["model"], ids, torch.ones_like(ids))
    with load_offloaded(dense["from_model"], prefetch=1) as lm:
        out = generate_batch(lm, ids, max_new_tokens=NEW_TOKENS, micro_batch=1)
    assert torch.equal(out, expected)


def test_sampling_is_seeded_and_independent_of_micro_batching(dense):
    ids, mask = dense["prompts"]
    with load_offloaded(dense["from_model"], resident_layers=1, prefetch=1) as lm:
        runs = [
            generate_batch(
                lm,
                ids,
                mask,
                max_new_tokens=NEW_TOKENS,
                micro_batch=mb,
                temperature=0.8,
                seed=7,
            )  # fmt: skip
            for mb in (1, 5)
        ]
        top1 = generate_batch(
            lm, ids, mask, max_new_tokens=NEW_TOKENS, temperature=1.0, top_k=1, seed=3
        )
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], dense["expected"])  # it did sample
    assert torch.equal(top1, dense["expected"])


def test_compute_threads_are_capped_during_generation_and_restored(dense, monkeypatch):
    ids, mask = dense["prompts"]
    seen = []
    before = torch.get_num_threads()
    with load_offloaded(dense["from_model"], prefetch=1) as lm:
        hook = lm.layers[0].register_forward_hook(lambda *_: seen.append(torch.get_num_threads()))
        out = generate_batch(lm, ids, mask, max_new_tokens=2, compute_threads=1)
        hook.remove()
        assert set(seen) == {1} and torch.get_num_threads() == before
        with pytest.raises(ValueError, match="compute_threads"):
            generate_batch(lm, ids, mask, max_new_tokens=1, compute_threads=0)
        from rlhf_fast.offload.generate import THREADS_ENV, streaming_threads

        monkeypatch.setenv(THREADS_ENV, "3")
        assert streaming_threads() == 3
        monkeypatch.setenv(THREADS_ENV, "zero")
        with pytest.raises(ValueError, match=THREADS_ENV):
            generate_batch(lm, ids, mask, max_new_tokens=1)
        assert torch.get_num_threads() == before
    assert torch.equal(out, dense["expected"][:, : ids.shape[1] + 2])


def test_generation_runs_on_the_thread_count_its_policy_chose(dense, monkeypatch):
    from rlhf_fast.offload.generate import THREADS_ENV, candidate_threads
    from rlhf_fast.offload.policy import Policy

    ids, mask = dense["prompts"]
    before = torch.get_num_threads()
    seen = []
    try:
        torch.set_num_threads(3)
        monkeypatch.delenv(THREADS_ENV, raising=False)
        assert candidate_threads() == (2, 3)
        monkeypatch.setenv(THREADS_ENV, "1")
        assert candidate_threads() == (1,)  # pinned: the policy has nothing to choose
        monkeypatch.delenv(THREADS_ENV)
        with load_offloaded(dense["from_model"], prefetch=1) as lm:
            lm.layers[0].register_forward_hook(lambda *_: seen.append(torch.get_num_threads()))
            lm.policy = Policy(None, 0, 1, ids.shape[0], ids.shape[0], threads=3)
            out = generate_batch(lm, ids, mask, max_new_tokens=2)
            assert set(seen) == {3}
            seen.clear()
            generate_batch(lm, ids, mask, max_new_tokens=1, compute_threads=1)  # overrides it
            assert set(seen) == {1}
            seen.clear()
            lm.policy = None  # no policy: one fewer than torch has
            generate_batch(lm, ids, mask, max_new_tokens=1)
            assert set(seen) == {2} and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
    assert torch.equal(out, dense["expected"][:, : ids.shape[1] + 2])


def test_direct_reads_equal_buffered_reads_and_catch_truncation(dense, tmp_path):
    import shutil

    from rlhf_fast.offload.shards import (
        ShardError,
        aligned_buffer,
        direct_bytes,
        layer_file,
        read_into,
        read_layout,
    )

    layout = read_layout(dense["int4"] / layer_file(2))
    plain = read_into(layout, torch.empty(layout.data_bytes, dtype=torch.uint8)).clone()
    direct = read_into(layout, aligned_buffer(direct_bytes(layout)), drop_cache=True)
    assert torch.equal(direct, plain)
    # it was the O_DIRECT read: the data starts past the aligned offset below it
    assert direct.data_ptr() % 4096 == layout.data_offset % 4096 != 0
    views = layout.views(direct)
    assert {k: v.dtype for k, v in views.items()} == {
        k: v.dtype for k, v in layout.views(plain).items()
    }
    # a misaligned or short buffer falls back to the buffered read (same bytes)
    odd = torch.empty(layout.data_bytes + 1, dtype=torch.uint8)[1:]
    assert torch.equal(read_into(layout, odd, drop_cache=True), plain)
    # a file cut after its header was read: the direct read names it
    copy_path = tmp_path / "cut.safetensors"
    shutil.copy(layout.path, copy_path)
    cut = read_layout(copy_path)
    with open(copy_path, "r+b") as handle:
        handle.truncate(cut.data_offset + cut.data_bytes - 100)
    with pytest.raises(ShardError, match="cut.safetensors: truncated"):
        read_into(cut, aligned_buffer(direct_bytes(cut)), drop_cache=True)


# ------------------------------------------------- mutation-testing additions (hand-computed)


def test_a_batch_whose_rows_all_ended_stops_at_any_of_several_eos_ids(dense):
    ids, mask = dense["prompts"]
    expected = dense["expected"]
    eos = int(expected[0, ids.shape[1] + 1])  # row 0's second new token
    with load_offloaded(dense["from_model"]) as lm:
        # -1 is never drawn: the second id of the list must end the row
        out = generate_batch(
            lm, ids[:1], mask[:1], max_new_tokens=NEW_TOKENS, eos_token_id=[-1, eos]
        )
        assert torch.equal(out, expected[:1, : ids.shape[1] + 2])  # no pad column after the end
        none = generate_batch(lm, ids, mask, max_new_tokens=0)
    assert torch.equal(none, ids) and none.data_ptr() != ids.data_ptr()  # a copy


def test_the_schedule_runs_a_sliding_window_model_up_to_exactly_its_window():
    from transformers import MistralConfig, MistralForCausalLM

    from rlhf_fast.offload.generate import _scheduled

    config = MistralConfig(
        vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, sliding_window=16,
    )  # fmt: skip
    model = MistralForCausalLM(config)
    # a query attends to the last 16 positions, itself included: at length 16 that is all
    assert _scheduled(model, 16) and not _scheduled(model, 17)


def test_a_zero_thread_count_in_the_environment_is_refused(monkeypatch):
    from rlhf_fast.offload.generate import THREADS_ENV, streaming_threads

    monkeypatch.setenv(THREADS_ENV, "3")
    assert streaming_threads() == 3
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv(THREADS_ENV, bad)
        with pytest.raises(ValueError, match=THREADS_ENV):
            streaming_threads()


def test_more_resident_layers_than_the_model_has_is_an_error(dense):
    """load_offloaded(resident_layers=N) beyond the model's depth was clamped silently."""
    from rlhf_fast.offload.shards import read_manifest

    layers = read_manifest(dense["from_model"])["num_layers"]
    with load_offloaded(dense["from_model"], resident_layers=layers) as lm:  # all: fine
        assert len(lm.streamer.resident) == layers
    for bad in (layers + 1, -1):
        with pytest.raises(ValueError, match=rf"resident_layers must be in \[0, {layers}\]"):
            load_offloaded(dense["from_model"], resident_layers=bad)
