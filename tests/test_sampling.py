"""Token draws (rlhf_fast/models/sampling.py): the inverse-CDF draw has the distribution of
torch.multinomial (frequencies within 5 sigma over 200k draws), never draws a zero-probability
token, repeats with a seed, and refuses rows it cannot draw from."""

from __future__ import annotations

import pytest
import torch

from rlhf_fast.models.sampling import sample_from_probs, sample_tokens

DRAWS = 200_000


def _frequencies_match(draws: torch.Tensor, probs: torch.Tensor) -> None:
    """Every entry expected >= 20 times within 5 sigma of it, the rarer ones pooled into one
    bin (a Poisson count of mean ~1 is not normal: 8 for 1.2 happens across 1000 entries),
    and no draw of a zero-probability entry."""
    counts = torch.bincount(draws.flatten(), minlength=probs.numel()).double()
    expected = probs.double() / probs.double().sum() * draws.numel()
    common = expected >= 20
    counts = torch.cat([counts[common], counts[~common].sum().reshape(1)])
    expected = torch.cat([expected[common], expected[~common].sum().reshape(1)])
    sigma = (expected * (1 - expected / draws.numel())).sqrt().clamp(min=1.0)
    z = (counts - expected).abs() / sigma
    worst = int(z.argmax())
    assert z[worst] <= 5, f"bin {worst}: {counts[worst]} draws, {expected[worst]:.1f} expected"
    assert torch.bincount(draws.flatten(), minlength=probs.numel())[probs == 0].sum() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_frequencies_follow_the_probabilities(dtype):
    probs = torch.tensor([0.5, 0.0, 0.2, 1e-3, 0.299, 0.0], dtype=dtype)
    generator = torch.Generator().manual_seed(0)
    draws = sample_from_probs(probs.expand(DRAWS, -1), generator)
    assert draws.shape == (DRAWS,) and draws.dtype == torch.long
    _frequencies_match(draws, probs.float())


def test_unnormalized_weights_odd_vocab_and_leading_dims():
    generator = torch.Generator().manual_seed(1)
    weights = torch.rand(37, generator=generator)
    weights *= torch.rand(37, generator=generator) > 0.3  # zeros in the middle of the row
    draws = sample_from_probs(weights.expand(4, DRAWS // 4, 37), generator)
    assert draws.shape == (4, DRAWS // 4)
    _frequencies_match(draws, weights)


def test_non_contiguous_rows_draw_each_row_from_its_own_probabilities():
    probs = torch.zeros(6, 3)
    probs[torch.arange(6), torch.tensor([2, 0, 1, 1, 0, 2])] = 1.0
    draws = sample_from_probs(probs.t().contiguous().t(), torch.Generator().manual_seed(2))
    assert draws.tolist() == [2, 0, 1, 1, 0, 2]


def test_a_seed_repeats_the_draws_and_another_seed_does_not():
    probs = torch.softmax(torch.randn(64, 1000, generator=torch.Generator().manual_seed(9)), -1)

    def draw(seed):
        return sample_from_probs(probs, torch.Generator().manual_seed(seed))

    assert torch.equal(draw(3), draw(3)) and not torch.equal(draw(3), draw(4))


@pytest.mark.parametrize(
    "probs",
    [
        torch.zeros(2, 4),
        torch.tensor([[0.5, float("nan")]]),
        torch.tensor([[float("inf"), 1.0]]),
        torch.empty(3, 0),
    ],  # fmt: skip
    ids=["all-zero", "nan", "inf", "empty"],
)
def test_rows_that_cannot_be_drawn_from_are_errors(probs):
    with pytest.raises(ValueError, match="probabilit"):
        sample_from_probs(probs)


def test_sample_tokens_greedy_top_k_and_temperature():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9, -1.0]]).expand(DRAWS, -1)
    generator = torch.Generator().manual_seed(5)
    assert (sample_tokens(logits, 0.0, 0, generator) == 1).all()  # greedy
    top2 = sample_tokens(logits, 1.0, 2, generator)
    assert set(top2.unique().tolist()) == {1, 3}  # only the two likeliest
    hot = sample_tokens(logits, 2.0, 0, generator)
    _frequencies_match(hot, torch.softmax(logits[0] / 2.0, -1))


@pytest.mark.parametrize("vocab", [256, 512, 1000, 1025])  # whole blocks, and a tail block
def test_many_blocks_with_zero_blocks_and_zero_edges(vocab):
    generator = torch.Generator().manual_seed(vocab)
    weights = torch.rand(vocab, generator=generator) ** 4  # uneven: a few carry most mass
    weights[256:512] = 0.0  # a whole zero block (when there is one)
    weights[::255] = 0.0  # zeros at block edges
    weights[-1] = 0.05  # the very last entry (the tail's end) can win
    draws = sample_from_probs(weights.expand(DRAWS // 5, -1), generator)
    _frequencies_match(draws, weights)


def test_a_single_row_gives_a_scalar_and_agrees_with_the_one_level_search():
    probs = torch.softmax(torch.randn(3000, generator=torch.Generator().manual_seed(8)) * 3, -1)
    generator = torch.Generator().manual_seed(7)
    token = sample_from_probs(probs, generator)
    assert token.shape == () and 0 <= int(token) < 3000
    # the same uniform through one fp64 running sum of the whole row lands on the same entry
    uniform = torch.rand((1, 1), generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    cdf = probs.double().cumsum(-1)
    assert int(torch.searchsorted(cdf, uniform[0] * cdf[-1], right=True)) == int(token)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vocab", [2, 300])  # the tail block alone, and a whole block + tail
def test_low_precision_weights_keep_a_small_entry_beside_a_large_one(dtype, vocab):
    """A block's sum rounded to bf16 (1 + 0.00176 -> 1.0) would leave its small entry no mass
    at all; the sums must be taken in fp32 as the docstring says."""
    weights = torch.zeros(vocab, dtype=dtype)
    weights[0], weights[1] = 1.0, 0.00176
    if vocab > 256:
        weights[-1] = 1.0  # another block carries the rest
    draws = sample_from_probs(weights.expand(DRAWS, -1), torch.Generator().manual_seed(11))
    _frequencies_match(draws, weights.double())


@pytest.mark.parametrize("vocab", [5, 256, 300])
def test_zero_rows_give_zero_draws(vocab):
    """An empty batch (reshape(0, -1, BLOCK) is ambiguous: it raised for vocab >= BLOCK)."""
    assert sample_from_probs(torch.rand(0, vocab)).shape == (0,)
    assert sample_from_probs(torch.rand(2, 0, vocab)).shape == (2, 0)
    assert sample_tokens(torch.randn(0, vocab), 1.0, 3, None).shape == (0,)


# ------------------------------------------------- mutation-testing additions (hand-computed)


def test_top_k_of_one_is_greedy_at_any_temperature():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9, -1.0], [5.0, 4.9, 0.0, 0.0, 0.0]])
    generator = torch.Generator().manual_seed(3)
    for _ in range(50):
        assert sample_tokens(logits, 5.0, 1, generator).tolist() == [1, 0]


def test_search_ties_and_an_overshoot_land_on_a_positive_step():
    from rlhf_fast.models.sampling import _search

    cdf = torch.tensor([[0.0, 0.5, 1.0, 1.0, 1.0]], dtype=torch.float64)  # weights 0, .5, .5, 0, 0
    # a target on a running sum belongs to the next entry: the zero-weight first never wins
    assert _search(cdf, torch.tensor([[0.0]], dtype=torch.float64)).item() == 1
    assert _search(cdf, torch.tensor([[0.5]], dtype=torch.float64)).item() == 2
    # a last-ulp overshoot of the total stays on the last positive entry, not a zero tail
    assert _search(cdf, torch.tensor([[1.0]], dtype=torch.float64)).item() == 2
