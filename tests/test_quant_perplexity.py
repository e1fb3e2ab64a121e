"""The perplexity study behind the quantization defaults, on a model trained for a few steps."""

from __future__ import annotations

import random

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
