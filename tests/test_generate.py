"""models/generate.py: the HF loop on a peft LoRA model passes the KV cache under the name its
inner model takes (`cache`, transformers >= 5.24), not the deprecated one; SamplingConfig
refuses NaN and infinite values."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model
from test_fast_decoder import sequence, tiny_model

from rlhf_fast import lora
from rlhf_fast.models.generate import (
    SamplingConfig,
    apply_repetition_penalty,
    generate_tokens,
    sample_next_token,
)

NAN = float("nan")


def test_a_peft_model_generates_as_its_merged_model_without_deprecated_keywords():
    model = get_peft_model(
        tiny_model("llama"),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False),
    )
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.3)
    lora.fuse(model)
    model.eval()
    merged = copy.deepcopy(model).merge_and_unload()
    config = SamplingConfig(temperature=0.0, max_new_tokens=12)
    prompt = sequence(9).tolist()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tokens = list(generate_tokens(model, prompt, config))
    assert not [w for w in caught if "past_key_values" in str(w.message)]
    assert tokens == list(generate_tokens(merged, prompt, config, decoder="hf"))
    assert len(set(tokens)) > 3


@pytest.mark.parametrize("field", ["temperature", "top_p", "repetition_penalty"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_sampling_config_refuses_non_finite_values(field, value):
    """NaN passed every range check (comparisons with it are false): a NaN repetition penalty
    made greedy decoding pick a penalized token (argmax takes NaN as the largest)."""
    with pytest.raises(ValueError, match=field):
        SamplingConfig(**{field: value})


def test_a_nan_penalty_cannot_reach_greedy_decoding():
    logits = torch.tensor([5.0, 1.0, 0.5, 3.0])
    with pytest.raises(ValueError, match="repetition_penalty"):
        sample_next_token(logits, torch.tensor([2]), SamplingConfig(0, repetition_penalty=NAN))


def test_a_batch_of_prompts_is_refused_not_joined_into_one():
    """input_ids [2, T] was flattened into one prompt of 2T tokens and answered silently."""
    model = tiny_model("llama")
    config = SamplingConfig(temperature=0.0, max_new_tokens=3)
    for bad in (torch.ones(2, 4, dtype=torch.long), torch.ones(1, 1, 4, dtype=torch.long)):
        with pytest.raises(ValueError, match=r"input_ids must be one prompt"):
            list(generate_tokens(model, bad, config))
    assert len(list(generate_tokens(model, torch.ones(1, 4, dtype=torch.long), config))) == 3
    assert len(list(generate_tokens(model, [1, 1, 1, 1], config))) == 3


def test_logits_of_several_rows_are_refused_not_misread():
    """sample_next_token and apply_repetition_penalty take one row [V]: [B, V] logits had their
    rows indexed by token id (the penalty) and argmax taken over the flattened batch."""
    logits = torch.randn(3, 8)
    context = torch.tensor([1])
    with pytest.raises(ValueError, match=r"logits must be \[V\]"):
        sample_next_token(logits, context, SamplingConfig(temperature=0))
    with pytest.raises(ValueError, match=r"logits must be \[V\]"):
        apply_repetition_penalty(logits, context, 1.3)
    assert 0 <= sample_next_token(logits[0], context, SamplingConfig(temperature=0)) < 8


# ------------------------------------------------- mutation-testing additions (hand-computed)


def test_sample_next_token_draws_from_the_tempered_nucleus():
    """logits [2, 1, 0, -1] at temperature 0.5 are softmax([4, 2, 0, -2]) = [.867, .117, .016,
    .002]; top_p 0.9 keeps the first two (0.867 < 0.9 <= 0.984): softmax([4, 2]) over them.
    Each seeded draw equals the draw of the same seed from those probabilities."""
    from rlhf_fast.models.sampling import sample_from_probs

    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    config = SamplingConfig(temperature=0.5, top_p=0.9)
    expected = torch.zeros(4)
    expected[:2] = torch.softmax(torch.tensor([4.0, 2.0]), -1)
    for seed in range(300):
        got = sample_next_token(logits, torch.tensor([], dtype=torch.long), config,
                                torch.Generator().manual_seed(seed))  # fmt: skip
        want = int(sample_from_probs(expected, torch.Generator().manual_seed(seed)))
        assert got == want, seed


def test_top_p_keeps_a_first_token_that_reaches_p_exactly_alone():
    import math

    from rlhf_fast.models.generate import filter_top_k, filter_top_p

    logits = torch.tensor([0.0, math.log(2), 0.0])  # probabilities [0.25, 0.5, 0.25], exact
    kept = torch.isfinite(filter_top_p(logits, 0.5))
    assert kept.tolist() == [False, True, False]
    assert torch.isfinite(filter_top_p(logits, 0.75)).tolist() == [True, True, False]
    assert torch.equal(filter_top_k(logits, 3), logits)


def test_the_first_new_token_is_penalized_for_the_prompt():
    model = tiny_model("llama").eval()
    prompt = sequence(7)
    with torch.no_grad():
        raw = model(prompt.reshape(1, -1)).logits[0, -1]
    # make the prompt hold the unpenalized favourite, so that the penalty must move the choice
    prompt = torch.cat([prompt, raw.argmax().reshape(1)])
    with torch.no_grad():
        raw = model(prompt.reshape(1, -1)).logits[0, -1]
    penalty = 50.0
    by_hand = raw.clone()
    for token in set(prompt.tolist()):
        value = raw[token]
        by_hand[token] = value / penalty if value > 0 else value * penalty
    config = SamplingConfig(temperature=0.0, repetition_penalty=penalty, max_new_tokens=1)
    for decoder in ("hf", "fast"):
        got = list(generate_tokens(model, prompt, config, decoder=decoder))
        assert got == [int(by_hand.argmax())], decoder


def test_a_seed_repeats_the_draws_at_a_temperature_below_one():
    model = tiny_model("llama").eval()
    config = SamplingConfig(temperature=0.7, max_new_tokens=16)
    runs = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)  # the global generator must not matter
        runs.append(list(generate_tokens(model, sequence(5), config, seed=11, decoder="hf")))
    assert runs[0] == runs[1] and len(runs[0]) == 16
