"""ops.sample_logits: the C++ draw equals the reference's token for token with the same
uniforms (a differing token only where the uniform sits within rounding of a boundary), its
log-probs equal log_softmax's, its draws follow softmax(logits / temperature) restricted to
the top k, weight-0 tokens are never drawn, and bad input is refused with one line."""

from __future__ import annotations

import pytest
import torch

from rlhf_fast.models.sampling import sample_tokens, sample_tokens_and_logprobs
from rlhf_fast.ops import backends, sample_logits, sample_logits_reference

CPP = backends("cpu")["sample_logits"]["cpp"]
needs_cpp = pytest.mark.skipif(not CPP.available, reason=f"C++ backend: {CPP.reason}")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _uniforms(rows: int, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(rows, dtype=torch.float64, generator=generator)


def _boundary_distance(logits, uniforms, temperature, top_k, token) -> torch.Tensor:
    """Per row, how far (as a share of the row's mass, in fp64) the uniform lies from the
    nearer edge of `token`'s interval of the reference's inverse CDF."""
    z = logits.double() / temperature
    weights = torch.softmax(z, -1)
    if 0 < top_k < z.shape[-1]:
        kth = torch.topk(logits.double(), top_k, -1).values[:, -1:]
        weights = weights.masked_fill(logits.double() < kth, 0.0)
    cdf = weights.cumsum(-1) / weights.sum(-1, keepdim=True)
    upper = cdf.gather(1, token[:, None]).squeeze(1)
    lower = upper - (weights.gather(1, token[:, None]).squeeze(1) / weights.sum(-1))
    return torch.minimum((uniforms - lower).abs(), (uniforms - upper).abs())


def _assert_same_draws(logits, uniforms, temperature, top_k):
    ours, ours_lp = sample_logits(logits, uniforms, temperature, top_k, backend="cpp")
    want, want_lp = sample_logits_reference(logits, uniforms, temperature, top_k)
    assert ours.dtype == torch.int64 and ours_lp.dtype == torch.float32
    differ = ours != want
    if differ.any():  # only a uniform at a boundary may land on either side of it
        near = _boundary_distance(logits[differ], uniforms[differ], temperature, top_k,
                                  ours[differ])  # fmt: skip
        assert (near < 1e-5).all(), f"rows {differ.nonzero().flatten().tolist()} differ"
    # the log-prob of our token, whichever it is
    z = logits.float() / temperature
    expected = torch.log_softmax(z, -1).gather(1, ours[:, None]).squeeze(1)
    torch.testing.assert_close(ours_lp, expected, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(ours_lp[~differ], want_lp[~differ], atol=2e-5, rtol=1e-5)


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [1, 7, 255, 256, 257, 2000, 33001])
@pytest.mark.parametrize("top_k", [0, 1, 3, -1])
def test_cpp_draws_the_reference_tokens(dtype, vocab, top_k):
    generator = torch.Generator().manual_seed(vocab * 10 + max(top_k, 0))
    top_k = vocab - 1 if top_k == -1 else top_k  # every token but one
    rows = 13
    logits = (torch.randn(rows, vocab, generator=generator) * 4).to(dtype)
    for temperature in (0.3, 1.0, 2.5):
        _assert_same_draws(logits, _uniforms(rows, generator), temperature, top_k)


@needs_cpp
def test_masked_logits_non_contiguous_rows_and_ties():
    generator = torch.Generator().manual_seed(5)
    wide = torch.randn(24, 3000, generator=generator) * 2
    wide[:, 100:900] = float("-inf")  # a gap of forbidden tokens inside each row
    wide[3, :] = float("-inf")
    wide[3, 2999] = 0.0  # one allowed token, in the last block
    logits = wide[::2, 50:2050]  # strided rows, offset columns
    assert not logits.is_contiguous()
    _assert_same_draws(logits, _uniforms(12, generator), 0.8, 0)
    transposed = wide[4:12, :500].t().contiguous().t()  # unit stride along rows, not along V
    _assert_same_draws(transposed, _uniforms(8, generator), 1.0, 5)
    tied = torch.zeros(4, 300)
    tied[:, 7] = tied[:, 200] = 5.0  # a tie at the k-th largest: both kept
    tokens, _ = sample_logits(tied, torch.tensor([0.2, 0.4, 0.6, 0.9], dtype=torch.float64), 1.0, 1)
    assert set(tokens.tolist()) == {7, 200}


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES)
def test_extreme_uniforms_never_draw_a_zero_weight_token(dtype):
    logits = torch.full((4, 700), float("-inf"))
    logits[:, [3, 301, 650]] = torch.tensor([1.0, 2.0, 0.5])
    logits = logits.to(dtype)
    below_one = 1.0 - 2.0**-53
    uniforms = torch.tensor([0.0, below_one, 0.0, below_one], dtype=torch.float64)
    tokens, logprobs = sample_logits(logits, uniforms, 1.0, 0, backend="cpp")
    assert tokens.tolist() == [3, 650, 3, 650]
    assert torch.isfinite(logprobs).all()
    tokens, _ = sample_logits(logits, uniforms, 1.0, 2, backend="cpp")  # 650 is outside the top 2
    assert tokens.tolist() == [3, 301, 3, 301]


@needs_cpp
def test_draws_follow_the_restricted_softmax():
    draws = 100_000
    logits = torch.tensor([[2.0, 0.0, -1.0, 1.5, float("-inf"), 0.5, -3.0]])
    generator = torch.Generator().manual_seed(3)
    for temperature, top_k in ((1.0, 0), (0.5, 3), (2.0, 0)):
        tokens, _ = sample_logits(logits.expand(draws, -1), _uniforms(draws, generator),
                                  temperature, top_k, backend="cpp")  # fmt: skip
        probs = torch.softmax(logits[0] / temperature, -1)
        if top_k:
            probs = probs.masked_fill(logits[0] < torch.topk(logits[0], top_k).values[-1], 0.0)
            probs = probs / probs.sum()
        counts = torch.bincount(tokens, minlength=7).double()
        expected = probs.double() * draws
        sigma = (expected * (1 - probs.double())).sqrt().clamp(min=1.0)
        assert ((counts - expected).abs() <= 5 * sigma).all(), (counts, expected)
        assert counts[probs == 0].sum() == 0


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=needs_cpp)])
def test_rows_without_a_distribution_are_named(backend):
    for bad in (float("nan"), float("inf")):
        logits = torch.randn(3, 50)
        logits[2, 17] = bad
        with pytest.raises(ValueError, match="logits row 2 has no distribution"):
            sample_logits(logits, torch.zeros(3, dtype=torch.float64), 1.0, backend=backend)
    logits = torch.randn(3, 50)
    logits[1] = float("-inf")
    with pytest.raises(ValueError, match="logits row 1 has no distribution"):
        sample_logits(logits, torch.zeros(3, dtype=torch.float64), 1.0, 4, backend=backend)


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=needs_cpp)])
def test_bad_arguments_are_refused(backend):
    logits, uniforms = torch.randn(2, 9), torch.full((2,), 0.5, dtype=torch.float64)
    cases = [
        ((logits, uniforms.float(), 1.0, 0), TypeError, "uniforms must be float64"),
        ((logits, uniforms[:1], 1.0, 0), ValueError, r"uniforms must have shape \(2,\)"),
        ((logits, uniforms + 1.0, 1.0, 0), ValueError, r"uniforms must be in \[0, 1\)"),
        ((logits, uniforms, 0.0, 0), ValueError, "temperature must be finite and > 0"),
        ((logits, uniforms, float("nan"), 0), ValueError, "temperature must be finite"),
        ((logits, uniforms, 1.0, -1), ValueError, "top_k must be an int >= 0"),
        ((logits, uniforms, 1.0, True), ValueError, "top_k must be an int >= 0"),
        ((logits[0], uniforms, 1.0, 0), ValueError, r"logits must be \[B, V\]"),
        ((logits[:, :0], uniforms, 1.0, 0), ValueError, r"logits must be \[B, V\]"),
        ((logits.long(), uniforms, 1.0, 0), TypeError, "logits must be float32"),
    ]
    for args, error, message in cases:
        with pytest.raises(error, match=message):
            sample_logits(*args, backend=backend)


def test_sample_tokens_and_logprobs_repeat_with_a_seed_and_greedy_at_zero():
    logits = torch.randn(6, 400, generator=torch.Generator().manual_seed(8)) * 2

    def draw(seed):
        return sample_tokens_and_logprobs(logits, 0.9, 20, torch.Generator().manual_seed(seed))

    first, again, other = draw(1), draw(1), draw(2)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])
    expected = torch.log_softmax(logits / 0.9, -1).gather(1, first[0][:, None]).squeeze(1)
    torch.testing.assert_close(first[1], expected, atol=2e-5, rtol=1e-5)
    greedy, greedy_lp = sample_tokens_and_logprobs(logits, 0.0, 0, None)
    assert torch.equal(greedy, logits.argmax(-1))
    torch.testing.assert_close(greedy_lp, torch.log_softmax(logits, -1).amax(-1))
    assert torch.equal(sample_tokens(logits, 0.9, 20, torch.Generator().manual_seed(1)), first[0])


@needs_cpp
def test_opcheck_schema_and_fake():
    logits = torch.randn(5, 300, generator=torch.Generator().manual_seed(4))
    uniforms = torch.rand(5, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    for args in ((logits, uniforms, 0.7, 0), (logits.bfloat16(), uniforms, 1.3, 17)):
        torch.library.opcheck(torch.ops.rlhf_fast.sample_logits.default, args)
