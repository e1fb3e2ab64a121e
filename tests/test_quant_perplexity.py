"""The perplexity study behind the quantization defaults, on a model trained for a few steps."""

from __future__ import annotations

import math
import random
import sys

import pytest
import torch
import torch.nn.functional as F

from rlhf_fast.quant import perplexity


def test_grammar_is_deterministic_per_seed():
    first = [perplexity.grammar_sentence(random.Random(3)) for _ in range(5)]
    again = [perplexity.grammar_sentence(random.Random(3)) for _ in range(5)]
    assert first == again and all(s.endswith(" .") for s in first)


def test_table_covers_every_format_and_int8_costs_almost_nothing():
    setup = perplexity.train_small_model(steps=30, hidden=64, layers=1, seq=32)
    table = perplexity.perplexity_table(setup)
    names = [name for name, _, _ in table]
    assert names == ["fp32"] + [name for name, *_ in perplexity.FORMATS]
    base = table[0][1]
    assert 1.0 < base < 512  # trained: far below the uniform guess over the vocabulary
    rises = dict((name, rise) for name, _, rise in table)
    assert abs(rises["int8"]) < 0.01
    # Coarser groups cannot be much better than finer ones on the same weights.
    assert rises["int4 g32"] < rises["int4 g128"] + 0.01


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def test_perplexity_is_exp_of_the_mean_token_loss_when_chunks_are_uneven():
    # 17 rows are scored in chunks of 16 and 1: the lone row must weigh 1/17, not 1/2.
    model = _tiny_llama()
    ids = torch.randint(0, 50, (17, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(input_ids=ids).logits.double()
    token_losses = F.cross_entropy(logits[:, :-1].reshape(-1, 50), ids[:, 1:].reshape(-1))
    assert perplexity.perplexity(model, ids) == pytest.approx(math.exp(token_losses), rel=1e-5)


@pytest.mark.parametrize("shape", [(0, 8), (4, 1), (8,)])
def test_perplexity_without_predicted_tokens_is_a_one_line_error(shape):
    with pytest.raises(ValueError, match="held_out"):
        perplexity.perplexity(_tiny_llama(), torch.zeros(shape, dtype=torch.long))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--steps", "0"], "--steps"),  # was OneCycleLR's ValueError traceback
        (["--hidden", "36"], "--hidden"),  # head size 9: RoPE's traceback after the corpus
        (["--hidden", "0"], "--hidden"),  # ZeroDivisionError traceback
    ],
)
def test_main_refuses_bad_sizes_in_one_line_before_any_work(argv, message, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["perplexity", *argv])
    with pytest.raises(SystemExit) as exit_info:
        perplexity.main()
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    assert message in stderr.strip().splitlines()[-1] and "Traceback" not in stderr


@pytest.mark.parametrize("sizes", [dict(steps=0), dict(hidden=36), dict(layers=0), dict(seq=1)])
def test_train_small_model_refuses_bad_sizes(sizes):
    with pytest.raises(ValueError, match=next(iter(sizes))):
        perplexity.train_small_model(**sizes)
