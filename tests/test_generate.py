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
