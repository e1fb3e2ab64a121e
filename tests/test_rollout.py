"""rlhf_fast.train.rollout on a tiny peft-wrapped Llama: masks and EOS handling, log-probs
equal to a separate full forward, reference log-probs equal to the base model's, left padding
invisible to the result, seeded sampling."""

from __future__ import annotations

import pytest
import torch

from rlhf_fast.train.ppo_math import token_logprobs
from rlhf_fast.train.rollout import generate_rollouts, left_pad, response_logprobs

VOCAB, PAD = 97, 0


def tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        pad_token_id=PAD, bos_token_id=1, eos_token_id=2, initializer_range=0.3,
    )  # fmt: skip
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def models():
    """(policy: peft LoRA with non-zero adapters, base: an untouched copy of its base)."""
    from peft import LoraConfig, get_peft_model

    base_copy = tiny_llama()
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                        init_lora_weights=False)  # fmt: skip
    policy = get_peft_model(tiny_llama(), config).eval()
    return policy, base_copy


PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17], [18]]
# A third of the vocabulary ends an answer: rows of a random model then end at varied steps.
EOS_IDS = list(range(2, VOCAB, 3))


def rollout(policy, seed=0, **overrides):
    settings = dict(pad_token_id=PAD, eos_token_ids=EOS_IDS, max_new_tokens=12, temperature=1.0,
                    generator=torch.Generator().manual_seed(seed))  # fmt: skip
    settings.update(overrides)
    return generate_rollouts(policy, PROMPTS, **settings)


def test_masks_and_eos(models):
    policy, _ = models
    for seed in range(6):
        out = rollout(policy, seed)
        batch, width = out.response.shape
        assert out.query.shape == out.query_mask.shape == (4, 7)
        assert out.response_mask.shape == out.logprobs.shape == out.ref_logprobs.shape
        is_eos = torch.isin(out.response, torch.tensor(EOS_IDS))
        for row in range(batch):
            valid = out.response_mask[row]
            length = int(valid.sum())
            assert valid[:length].all() and not valid[length:].any()  # a prefix
            eos_positions = torch.nonzero(is_eos[row, :length]).flatten().tolist()
            if out.ended[row]:
                assert eos_positions == [length - 1]  # the first EOS is the last valid token
            else:
                assert eos_positions == [] and length == 12
            assert (out.response[row, length:] == PAD).all()
            assert (out.logprobs[row, length:] == 0).all()
        assert width == int(out.response_mask.sum(1).max())  # stops once every row has ended


def test_some_rows_end_and_some_do_not(models):
    policy, _ = models
    outs = [rollout(policy, seed, max_new_tokens=3) for seed in range(8)]
    ended = torch.cat([o.ended for o in outs])
    assert ended.any() and not ended.all()


def test_logprobs_equal_a_full_forward(models):
    policy, _ = models
    for temperature in (1.0, 0.7):
        out = rollout(policy, 1, temperature=temperature)
        again = response_logprobs(policy, out.query, out.query_mask, out.response,
                                  out.response_mask, temperature)  # fmt: skip
        torch.testing.assert_close(out.logprobs, again, atol=1e-5, rtol=0)
        assert (out.logprobs[out.response_mask] < 0).all()


def _fresh_adapters(base):
    """base with peft's default LoRA init (B = 0): a policy equal to its reference."""
    from peft import LoraConfig, get_peft_model

    from rlhf_fast.lora.qlora import qlora_config

    config = qlora_config(LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    return get_peft_model(base, config).eval()


@pytest.mark.parametrize("decoder", ["lean", "hf"])
@pytest.mark.parametrize("base", ["bf16", "int4"])
def test_logprobs_are_the_full_forwards_where_sampling_rounds_otherwise(decoder, base):
    """A 16-bit policy samples through the KV cache (and the lean decoder through merged
    16-bit weights, or int8-quantized activations over an int4 base): those logits round
    otherwise than the full forward that scores the reference and that PPO trains with. The
    stored log-probs were the sampling ones: with B = 0 (policy == reference) the KL was noise
    of either sign (per-token |k1| up to ~1e-2 on a 256-wide Llama in bf16), and the ratios
    were off 1 before any update. They must be the full forward's, so that the KL is exactly 0."""
    from rlhf_fast.quant import quantize_model

    if base == "int4" and decoder == "hf":
        pytest.skip("the HF loop runs the training forward's code on a quantized base")
    model = tiny_llama(3)
    model = model.to(torch.bfloat16) if base == "bf16" else quantize_model(model, bits=4)
    policy = _fresh_adapters(model)
    for seed in range(3):
        out = rollout(policy, seed, decoder=decoder, max_new_tokens=16)
        again = response_logprobs(policy, out.query, out.query_mask, out.response,
                                  out.response_mask)  # fmt: skip
        assert torch.equal(out.logprobs, again)
        assert torch.equal(out.logprobs, out.ref_logprobs)  # KL(policy || itself) = 0


def test_reference_is_the_base_model(models):
    policy, base = models
    out = rollout(policy, 2)
    expected = response_logprobs(base, out.query, out.query_mask, out.response, out.response_mask)
    torch.testing.assert_close(out.ref_logprobs, expected, atol=1e-5, rtol=0)
    # the adapters do change the model, and they are back on after the rollout
    assert (out.ref_logprobs - out.logprobs).abs().max() > 1e-3
    after = response_logprobs(policy, out.query, out.query_mask, out.response, out.response_mask)
    torch.testing.assert_close(after, out.logprobs, atol=1e-5, rtol=0)


def test_explicit_reference_model(models):
    policy, base = models
    out = rollout(policy, 2, reference=base)
    torch.testing.assert_close(out.ref_logprobs, rollout(policy, 2).ref_logprobs, atol=1e-5,
                               rtol=0)  # fmt: skip
    with pytest.raises(ValueError, match="disabled"):
        generate_rollouts(base, PROMPTS, pad_token_id=PAD, eos_token_ids=2, max_new_tokens=2)
    plain = generate_rollouts(base, PROMPTS, pad_token_id=PAD, eos_token_ids=2, max_new_tokens=2,
                              score_reference=False)  # fmt: skip
    assert plain.ref_logprobs is None and plain.response.shape[0] == len(PROMPTS)


def test_left_padding_does_not_change_answers(models):
    """Greedy answers in a padded batch equal those of each prompt generated alone."""
    policy, _ = models
    batched = rollout(policy, temperature=0.0, eos_token_ids=[2])
    for row, prompt in enumerate(PROMPTS):
        alone = generate_rollouts(policy, [prompt], pad_token_id=PAD, eos_token_ids=[2],
                                  max_new_tokens=12, temperature=0.0)  # fmt: skip
        length = int(alone.response_mask.sum())
        assert batched.response[row, :length].tolist() == alone.response[0, :length].tolist()
        torch.testing.assert_close(
            batched.logprobs[row, :length], alone.logprobs[0, :length], atol=1e-5, rtol=0
        )


def test_seeded_sampling_and_top_k(models):
    policy, _ = models
    first, second, other = rollout(policy, 7), rollout(policy, 7), rollout(policy, 8)
    assert torch.equal(first.response, second.response)
    assert not torch.equal(first.response, other.response)
    greedy = rollout(policy, temperature=0.0)
    top1 = rollout(policy, 3, top_k=1)
    assert torch.equal(greedy.response, top1.response)


def test_training_mode_is_restored(models):
    policy, _ = models
    policy.train()
    try:
        rollout(policy)
        assert policy.training
    finally:
        policy.eval()


def tiny_family(family):
    import transformers

    common = dict(vocab_size=VOCAB, pad_token_id=PAD, bos_token_id=1, eos_token_id=2)
    if family == "gpt2":
        config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, **common)
        cls = transformers.GPT2LMHeadModel
    elif family == "bloom":
        config = transformers.BloomConfig(hidden_size=32, n_layer=2, n_head=4, **common)
        cls = transformers.BloomForCausalLM
    else:
        config = transformers.OPTConfig(hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                                        num_attention_heads=4, word_embed_proj_dim=32,
                                        max_position_embeddings=64, **common)  # fmt: skip
        cls = transformers.OPTForCausalLM
    config.initializer_range = 0.3
    torch.manual_seed(0)
    return cls(config).eval()


@pytest.mark.parametrize("family", ["gpt2", "bloom", "opt"])
def test_other_families_padding_and_logprobs(family):
    """Absolute positions (GPT-2, OPT) and ALiBi (BLOOM): padding stays invisible."""
    model = tiny_family(family)
    settings = dict(pad_token_id=PAD, eos_token_ids=[2], max_new_tokens=6, temperature=0.0,
                    score_reference=False)  # fmt: skip
    batched = generate_rollouts(model, PROMPTS, **settings)
    for row, prompt in enumerate(PROMPTS):
        alone = generate_rollouts(model, [prompt], **settings)
        mine = batched.response[row][batched.response_mask[row]]
        assert mine.tolist() == alone.response[0][alone.response_mask[0]].tolist()
    again = response_logprobs(model, batched.query, batched.query_mask, batched.response,
                              batched.response_mask)  # fmt: skip
    torch.testing.assert_close(batched.logprobs, again, atol=1e-5, rtol=0)


def test_token_logprobs_gather():
    logits = torch.randn(2, 3, 5)
    tokens = torch.randint(0, 5, (2, 3))
    expected = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)
    torch.testing.assert_close(token_logprobs(logits, tokens), expected)


def test_bad_input():
    with pytest.raises(ValueError, match="prompts"):
        left_pad([[1], []], PAD)
    ids, mask = left_pad([[4, 5], [6]], PAD)
    assert ids.tolist() == [[4, 5], [PAD, 6]] and mask.tolist() == [[True, True], [False, True]]
