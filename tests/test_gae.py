"""ops.gae on every CPU backend against an independent float64 oracle and the reference."""

from __future__ import annotations

import pytest
import torch
from backends_under_test import cpu_backend_params, using
from oracles import gae_float64

from rlhf_fast import ops

SHAPES = [(1, 1), (1, 37), (5, 1), (17, 33), (3, 100), (40, 257)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_mask(kind: str, batch: int, steps: int, generator: torch.Generator):
    if kind == "none":
        return None
    if kind == "right_padded":
        lengths = torch.randint(0, steps + 1, (batch,), generator=generator)
        return torch.arange(steps)[None, :] < lengths[:, None]
    if kind == "gaps":  # holes anywhere, and some rows with no valid step at all
        mask = torch.rand(batch, steps, generator=generator) > 0.35
        mask[::4] = False
        return mask
    if kind == "all_false":
        return torch.zeros(batch, steps, dtype=torch.bool)
    raise ValueError(kind)


def assert_matches_oracle(advantages, returns, rewards, values, mask, gamma, lam, atol=2e-4):
    expected_adv, expected_ret = gae_float64(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(advantages.double(), expected_adv, atol=atol, rtol=1e-4)
    torch.testing.assert_close(returns.double(), expected_ret, atol=atol, rtol=1e-4)


def random_inputs(batch, steps, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    rewards = torch.randn(batch, steps, generator=generator).to(dtype)
    values = (2 * torch.randn(batch, steps, generator=generator)).to(dtype)
    return rewards, values, generator


@pytest.mark.parametrize("backend", cpu_backend_params())
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("mask_kind", ["none", "right_padded", "gaps", "all_false"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_float64_oracle(backend, shape, mask_kind, dtype):
    for seed in (0, 1):
        rewards, values, generator = random_inputs(*shape, dtype, seed)
        mask = make_mask(mask_kind, *shape, generator)
        gamma, lam = (0.99, 0.95) if seed == 0 else (1.0, 0.9)
        with using(backend) as name:
            advantages, returns = ops.gae(rewards, values, mask, gamma=gamma, lam=lam, backend=name)
        assert advantages.dtype == returns.dtype == torch.float32
        assert advantages.shape == returns.shape == rewards.shape
        # Inputs are rounded to `dtype` before both computations: only fp32 accumulation differs.
        assert_matches_oracle(advantages, returns, rewards, values, mask, gamma, lam)


@pytest.mark.parametrize("backend", cpu_backend_params())
@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.5, 0.0), (0.0, 0.7), (0.97, 0.3)])
def test_discount_extremes(backend, gamma, lam):
    rewards, values, generator = random_inputs(9, 70, torch.float32, 3)
    mask = make_mask("gaps", 9, 70, generator)
    with using(backend) as name:
        advantages, returns = ops.gae(rewards, values, mask, gamma=gamma, lam=lam, backend=name)
    assert_matches_oracle(advantages, returns, rewards, values, mask, gamma, lam, atol=5e-4)


@pytest.mark.parametrize("backend", cpu_backend_params())
def test_non_contiguous_views(backend):
    generator = torch.Generator().manual_seed(5)
    wide_rewards = torch.randn(21, 90, generator=generator)
    wide_values = torch.randn(90, 21, generator=generator)
    rewards = wide_rewards[:, 7:70]  # row stride 90, unit time stride
    values = wide_values[7:70].t()  # time stride 21: not unit
    mask = (torch.rand(21, 63 * 2, generator=generator) > 0.3)[:, ::2]
    assert not rewards.is_contiguous() and not values.is_contiguous()
    with using(backend) as name:
        advantages, returns = ops.gae(rewards, values, mask, gamma=0.99, lam=0.95, backend=name)
    assert_matches_oracle(advantages, returns, rewards, values, mask, 0.99, 0.95)


@pytest.mark.parametrize("backend", cpu_backend_params())
def test_padding_is_never_read(backend):
    rewards, values, generator = random_inputs(19, 45, torch.float32, 7)
    mask = make_mask("gaps", 19, 45, generator)
    poisoned_rewards = rewards.masked_fill(~mask, float("nan"))
    poisoned_values = values.masked_fill(~mask, float("inf"))
    with using(backend) as name:
        advantages, returns = ops.gae(poisoned_rewards, poisoned_values, mask, backend=name)
    assert_matches_oracle(advantages, returns, rewards, values, mask, 1.0, 0.95)


@pytest.mark.parametrize("backend", cpu_backend_params())
def test_equals_reversed_loop_with_right_padding(backend):
    """With right padding (and zeros after the end) GAE is the reversed loop of trl/OpenRLHF."""
    rewards, values, generator = random_inputs(12, 50, torch.float32, 11)
    mask = make_mask("right_padded", 12, 50, generator)
    rewards, values = rewards * mask, values * mask
    gamma, lam = 0.99, 0.95
    last, reversed_advantages = torch.zeros(12), []
    for t in reversed(range(50)):
        next_values = values[:, t + 1] if t < 49 else torch.zeros(12)
        last = rewards[:, t] + gamma * next_values - values[:, t] + gamma * lam * last
        reversed_advantages.append(last)
    loop_advantages = torch.stack(reversed_advantages[::-1], dim=1)
    with using(backend) as name:
        advantages, returns = ops.gae(rewards, values, mask, gamma=gamma, lam=lam, backend=name)
    torch.testing.assert_close(advantages, loop_advantages * mask, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(returns, (loop_advantages + values) * mask, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", cpu_backend_params())
@pytest.mark.parametrize("shape", [(0, 5), (4, 0), (0, 0)])
def test_empty(backend, shape):
    rewards = torch.zeros(shape)
    with using(backend) as name:
        advantages, returns = ops.gae(rewards, rewards.clone(), backend=name)
    assert advantages.shape == returns.shape == shape


@pytest.mark.parametrize("backend", cpu_backend_params())
def test_mixed_dtypes_and_integer_mask(backend):
    rewards, values, generator = random_inputs(6, 20, torch.float32, 13)
    mask = make_mask("gaps", 6, 20, generator)
    with using(backend) as name:
        advantages, _ = ops.gae(rewards, values.bfloat16(), mask.long(), backend=name)
    expected_adv, _ = gae_float64(rewards, values.bfloat16(), mask, 1.0, 0.95)
    torch.testing.assert_close(advantages.double(), expected_adv, atol=2e-4, rtol=1e-4)


def test_no_gradient_flows():
    rewards = torch.randn(3, 8, requires_grad=True)
    advantages, returns = ops.gae(rewards, torch.randn(3, 8))
    assert not advantages.requires_grad and not returns.requires_grad


BAD_INPUTS = [
    (lambda r, v, m: ops.gae(r, v[:, :-1]), ValueError, "values must have the shape"),
    (lambda r, v, m: ops.gae(r[0], v[0]), ValueError, "rewards must be 2-D"),
    (lambda r, v, m: ops.gae(r.long(), v), TypeError, "rewards must be float32"),
    (lambda r, v, m: ops.gae(r, v.double()), TypeError, "values must be float32"),
    (lambda r, v, m: ops.gae(r.tolist(), v), TypeError, "rewards must be a torch.Tensor"),
    (lambda r, v, m: ops.gae(r, v, m[:, :-1]), ValueError, "mask must have the shape"),
    (lambda r, v, m: ops.gae(r, v, m.float()), TypeError, "mask must be bool"),
    (lambda r, v, m: ops.gae(r, v, m.to("meta")), ValueError, "mask is on meta"),
    (lambda r, v, m: ops.gae(r, v.to("meta")), ValueError, "values is on meta"),
    (lambda r, v, m: ops.gae(r, v, gamma=float("nan")), ValueError, "gamma must be finite"),
    (lambda r, v, m: ops.gae(r, v, lam="0.9"), TypeError, "lam must be a float"),
    (lambda r, v, m: ops.gae(r, v, gamma=True), TypeError, "gamma must be a float"),
    (lambda r, v, m: ops.gae(r, v, backend="fortran"), ValueError, "backend must be one of"),
    (lambda r, v, m: ops.gae(r, v, backend="cuda"), ops.BackendUnavailableError, "cuda"),
]


@pytest.mark.parametrize("call,error,message", BAD_INPUTS)
def test_bad_inputs(call, error, message):
    rewards, values = torch.randn(4, 6), torch.randn(4, 6)
    mask = torch.ones(4, 6, dtype=torch.bool)
    with pytest.raises(error, match=message):
        call(rewards, values, mask)


@pytest.mark.skipif(not hasattr(torch.ops.rlhf_fast, "gae"), reason="C++ extension not loaded")
def test_raw_op_rejects_bad_inputs():
    """Direct torch.ops calls skip the Python checks; the C++ side must still refuse."""
    rewards = torch.randn(4, 6)
    with pytest.raises(ValueError, match="values must have the shape"):
        torch.ops.rlhf_fast.gae(rewards, rewards[:, :3], None, 1.0, 0.9)
    with pytest.raises(ValueError, match="mask must have shape"):
        torch.ops.rlhf_fast.gae(rewards, rewards, torch.ones(4, 5, dtype=torch.bool), 1.0, 0.9)
    with pytest.raises(TypeError, match="mask must be bool"):
        torch.ops.rlhf_fast.gae(rewards, rewards, torch.ones(4, 6), 1.0, 0.9)
    with pytest.raises(TypeError, match="rewards must be float32"):
        torch.ops.rlhf_fast.gae(rewards.double(), rewards.double(), None, 1.0, 0.9)


@pytest.mark.parametrize("backend", cpu_backend_params())
def test_large_outputs_reused_from_the_pool_stay_independent(backend):
    """Outputs of >= 1 MiB come from a pool of freed blocks: a reused block must be fully
    rewritten (outputs are NaN-poisoned here), and live outputs must never be handed out."""
    shape = (300, 1000)
    first_inputs = random_inputs(*shape, torch.float32, 21)
    second_inputs = random_inputs(*shape, torch.float32, 22)
    with using(backend) as name:
        kept = ops.gae(*first_inputs[:2], backend=name)
        kept_copy = [t.clone() for t in kept]
        for _ in range(3):  # later calls reuse the blocks freed by the previous iteration
            advantages, returns = ops.gae(*second_inputs[:2], backend=name)
    for output, copy in zip(kept, kept_copy, strict=True):
        assert torch.equal(output, copy)
    assert advantages.data_ptr() not in (kept[0].data_ptr(), kept[1].data_ptr())
    expected = ops.gae_reference(*second_inputs[:2])
    torch.testing.assert_close(advantages, expected[0], atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(returns, expected[1], atol=2e-4, rtol=1e-4)
