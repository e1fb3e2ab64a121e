"""ops.token_logprobs (PPO's log p(token) and entropy) on every CPU backend against a float64
oracle: odd vocabularies, strided logits, every dtype, temperatures, extreme logits, the
backward against autograd through the float64 reference, and bad input."""

from __future__ import annotations

import warnings

import pytest
import torch
from backends_under_test import cpu_backend_params, using

from rlhf_fast import _native, ops

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (atol, rtol) of the log-probs and entropies against the float64 oracle of the *same* (rounded)
# logits: fp32 arithmetic over V terms; 16-bit logits add nothing (they are read exactly)
TOLERANCE = (2e-5, 2e-5)
# the gradient comes out in the logits' dtype: one rounding of it
GRAD_TOLERANCE = {
    torch.float32: (1e-6, 1e-5),
    torch.bfloat16: (1e-5, 2**-8),
    torch.float16: (1e-6, 2**-10),
}
# [B, T, V] and [N, V]: vocabularies not a multiple of 8 or 16 lanes, V = 1, one row, a row
# longer than the kernel's 2048-logit chunk (whose max lies in a later chunk)
SHAPES = [(2, 3, 37), (1, 1, 1), (1, 1, 16), (3, 17), (1, 5000), (2, 2, 4099)]


def oracle(logits, tokens, temperature):
    """log-probs and entropy in float64 (from the logits as given), with autograd."""
    z = logits.detach().double().requires_grad_(True)
    logprobs, entropy = ops.token_logprobs_reference(z, tokens, temperature, with_entropy=True)
    return z, logprobs, entropy


def random_case(shape, dtype, seed, scale=4.0):
    generator = torch.Generator().manual_seed(seed)
    logits = (torch.randn(shape, generator=generator) * scale).to(dtype)
    tokens = torch.randint(0, shape[-1], shape[:-1], generator=generator)
    grad = torch.randn(shape[:-1], generator=generator)
    return logits, tokens, grad


def check_against_oracle(backend, logits, tokens, grad, temperature):
    leaf = logits.detach().requires_grad_(True)  # keeps the strides of a view
    with using(backend) as name:
        logprobs, entropy = ops.token_logprobs(
            leaf, tokens, temperature, with_entropy=True, backend=name
        )
        (grad_logits,) = torch.autograd.grad(logprobs, leaf, grad)
    z, expected, expected_entropy = oracle(logits, tokens, temperature)
    (expected_grad,) = torch.autograd.grad(expected, z, grad.double())
    assert logprobs.dtype == entropy.dtype == torch.float32
    assert logprobs.shape == entropy.shape == tokens.shape
    assert not entropy.requires_grad
    slack = 0.0
    if name == "reference":
        # fp32 z - logsumexp(z) cancels: a few ulps of the largest |z| (1e-3 at 1e4), in the
        # log-probs and in the exponents of the gradient; the kernel works relative to the
        # row's max and keeps the tight bounds
        finite = logits.float()[torch.isfinite(logits.float())]
        slack = 4 * torch.finfo(torch.float32).eps * float(finite.abs().max()) / temperature
    atol, rtol = TOLERANCE
    torch.testing.assert_close(logprobs.double(), expected, atol=atol + slack, rtol=rtol)
    torch.testing.assert_close(entropy.double(), expected_entropy, atol=atol + slack, rtol=rtol)
    assert grad_logits.dtype == logits.dtype and grad_logits.shape == logits.shape
    atol, rtol = GRAD_TOLERANCE[logits.dtype]
    atol += slack * float(grad.abs().max()) / temperature
    torch.testing.assert_close(grad_logits.double(), expected_grad, atol=atol, rtol=rtol)


@pytest.mark.parametrize("backend", cpu_backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_float64_oracle(backend, dtype, shape):
    logits, tokens, grad = random_case(shape, dtype, seed=sum(shape))
    for temperature in (1.0, 0.7):
        check_against_oracle(backend, logits, tokens, grad, temperature)


@pytest.mark.parametrize("backend", cpu_backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_logits(backend, dtype):
    # a slice along T of a bigger [B, T, V] (as PPO trims padding columns), a transposed view
    # (unit stride along V, B and T swapped), and a slice along V (stride 2 along V: copied)
    big, tokens, grad = random_case((3, 9, 53), dtype, seed=11)
    check_against_oracle(backend, big[:, 2:7], tokens[:, 2:7].contiguous(), grad[:, 2:7], 1.3)
    swapped = big.transpose(0, 1)
    assert not swapped.is_contiguous()
    check_against_oracle(backend, swapped, tokens.T, grad.T.contiguous(), 1.0)
    every_other = big[..., ::2]
    check_against_oracle(backend, every_other, tokens.clamp(max=26), grad, 0.9)


@pytest.mark.parametrize("backend", cpu_backend_params())
def test_extreme_logits(backend):
    # 1e4 and -1e4 beside each other, -inf entries (never the token), a row where one logit
    # dominates (p of the token ~ 1: its gradient is 1 - p), and a row of equal logits
    inf = float("inf")
    rows = torch.tensor(
        [
            [1e4, -1e4, 0.0, 1e4 - 1.0, 5.0],
            [3.0, -inf, 1.0, -inf, 2.0],
            [80.0, 0.0, -3.0, 1.0, 0.5],
            [1.0, 1.0, 1.0, 1.0, 1.0],
            [-1e4, -1e4 + 2.0, -1e4 - 5.0, -inf, -1e4],
        ]
    )
    tokens = torch.tensor([3, 4, 0, 2, 1])
    grad = torch.tensor([1.0, -0.5, 2.0, 1.0, 0.25])
    for temperature in (1.0, 0.5, 3.0):
        check_against_oracle(backend, rows, tokens, grad, temperature)


@pytest.mark.parametrize("backend", cpu_backend_params())
def test_minus_inf_token_gives_minus_inf(backend):
    logits = torch.tensor([[0.0, float("-inf"), 1.0]])
    with using(backend) as name:
        logprobs = ops.token_logprobs(logits, torch.tensor([1]), backend=name)
    assert logprobs.item() == float("-inf")


@pytest.mark.parametrize("backend", cpu_backend_params())
def test_empty_batch_and_without_entropy(backend):
    logits, tokens, _ = random_case((0, 4, 9), torch.float32, seed=1)
    with using(backend) as name:
        assert ops.token_logprobs(logits, tokens, backend=name).shape == (0, 4)
        logits, tokens, _ = random_case((2, 3, 9), torch.float32, seed=2)
        alone = ops.token_logprobs(logits, tokens, 0.8, backend=name)
        both, _ = ops.token_logprobs(logits, tokens, 0.8, with_entropy=True, backend=name)
    torch.testing.assert_close(alone, both, atol=0, rtol=0)


def test_float64_runs_on_the_reference_and_passes_gradcheck():
    generator = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 3, 7, generator=generator, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 7, (2, 3), generator=generator)
    torch.autograd.gradcheck(lambda z: ops.token_logprobs(z, tokens, 0.7), (logits,))


@pytest.mark.skipif(_native.cpp is None, reason="C++ extension not loaded")
def test_cpp_backend_gradcheck_in_float32():
    # finite differences of the fused forward in fp32 against its fused backward
    generator = torch.Generator().manual_seed(6)
    logits = torch.randn(3, 11, generator=generator, requires_grad=True)
    tokens = torch.randint(0, 11, (3,), generator=generator)
    with warnings.catch_warnings():  # "not double precision": on purpose, hence the tolerances
        warnings.simplefilter("ignore", UserWarning)
        torch.autograd.gradcheck(
            lambda z: ops.token_logprobs(z, tokens, 0.8, backend="cpp"), (logits,),
            eps=1e-2, atol=2e-3, rtol=2e-3,
        )  # fmt: skip


def test_bad_inputs_raise_one_line_errors():
    logits, tokens = torch.randn(2, 3, 5), torch.zeros(2, 3, dtype=torch.long)
    cases = [
        ((torch.randn(5), tokens[0, :1]), ValueError, "logits must be"),
        ((torch.randn(1, 2, 3, 5), tokens), ValueError, "logits must be"),
        ((torch.randn(2, 3, 0), tokens), ValueError, "V > 0"),
        ((logits, tokens[:, :2]), ValueError, "tokens must have shape"),
        ((logits, tokens.float()), TypeError, "tokens must be an integer"),
        ((logits.long(), tokens), TypeError, "logits must be float"),
        ((logits, tokens + 5), ValueError, r"tokens must be in \[0, 5\)"),
        ((logits, tokens - 1), ValueError, r"tokens must be in \[0, 5\)"),
        ((logits, tokens, 0.0), ValueError, "temperature must be"),
        ((logits, tokens, -1.0), ValueError, "temperature must be"),
        ((logits, tokens, float("nan")), ValueError, "temperature must be"),
        (("logits", tokens), TypeError, "logits must be a torch.Tensor"),
    ]
    for args, error, message in cases:
        with pytest.raises(error, match=message) as caught:
            ops.token_logprobs(*args)
        assert "\n" not in str(caught.value)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        ops.token_logprobs(logits.double(), tokens, backend="cpp" if _native.cpp else None)


@pytest.mark.skipif(_native.cpp is None, reason="C++ extension not loaded")
def test_the_cpp_op_checks_its_arguments():
    logits, tokens = torch.randn(2, 3, 5), torch.zeros(2, 3, dtype=torch.long)
    op = torch.ops.rlhf_fast.token_logprobs
    with pytest.raises(ValueError, match="tokens must be in"):
        op(logits, tokens + 7, 1.0)
    with pytest.raises(ValueError, match="unit stride along V"):
        op(logits.transpose(1, 2), torch.zeros(2, 5, dtype=torch.long), 1.0)
    with pytest.raises(TypeError, match="tokens must be int64"):
        op(logits, tokens.int(), 1.0)
    with pytest.raises(ValueError, match="temperature"):
        op(logits, tokens, 0.0)
    _, _, stats = op(logits, tokens, 1.0)
    with pytest.raises(ValueError, match="stats must be"):
        torch.ops.rlhf_fast.token_logprobs_backward(
            torch.ones(2, 3), logits, tokens, stats[:, :2].contiguous(), 1.0
        )


@pytest.mark.skipif(_native.cpp is None, reason="C++ extension not loaded")
def test_opcheck():
    generator = torch.Generator().manual_seed(8)
    logits = torch.randn(2, 3, 19, generator=generator)
    tokens = torch.randint(0, 19, (2, 3), generator=generator)
    torch.library.opcheck(torch.ops.rlhf_fast.token_logprobs.default, (logits, tokens, 0.9))
    _, _, stats = torch.ops.rlhf_fast.token_logprobs(logits, tokens, 0.9)
    torch.library.opcheck(
        torch.ops.rlhf_fast.token_logprobs_backward.default,
        (torch.randn(2, 3, generator=generator), logits, tokens, stats, 0.9),
    )


@pytest.mark.skipif(_native.cpp is None, reason="C++ extension not loaded")
def test_double_backward_is_refused_not_silently_missing():
    logits = torch.randn(2, 6, generator=torch.Generator().manual_seed(0)).requires_grad_()
    tokens = torch.tensor([1, 4])
    logprobs = ops.token_logprobs(logits, tokens, backend="cpp")
    with pytest.raises(RuntimeError, match="first-order only"):
        torch.autograd.grad(logprobs.sum(), logits, create_graph=True)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_ppo_entropy_metric_runs_the_fused_entropy(temperature):
    # ppo_math.entropy_from_logits: logits without gradient (PPO's metric) go through the op;
    # the same logits with gradient through the differentiable composition: equal results
    from rlhf_fast.train.ppo_math import entropy_from_logits

    logits, _, _ = random_case((3, 4, 301), torch.float32, seed=9)
    mask = torch.tensor([[1, 1, 0, 1], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    metric = entropy_from_logits(logits, mask, temperature)
    differentiable = entropy_from_logits(logits.requires_grad_(True), mask, temperature)
    assert differentiable.requires_grad and not metric.requires_grad
    z = logits.detach().double() / temperature
    expected = torch.distributions.Categorical(logits=z).entropy()[mask].mean()
    torch.testing.assert_close(metric.double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(differentiable.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", cpu_backend_params())
def test_nan_logits_poison_only_their_row(backend):
    logits, tokens, _ = random_case((4, 40), torch.float32, seed=12)
    logits[0, 5] = float("nan")  # not the token
    logits[1, tokens[1]] = float("nan")  # the token
    logits[2, :] = float("-inf")  # no finite logit: log p is -inf - -inf
    with using(backend) as name:
        logprobs, entropy = ops.token_logprobs(logits, tokens, with_entropy=True, backend=name)
    assert logprobs[:3].isnan().all() and entropy[:3].isnan().all()
    expected, expected_entropy = ops.token_logprobs_reference(
        logits[3:].double(), tokens[3:], with_entropy=True
    )
    torch.testing.assert_close(logprobs[3:].double(), expected, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(entropy[3:].double(), expected_entropy, atol=2e-5, rtol=2e-5)
