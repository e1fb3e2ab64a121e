"""ops.rank_loss (and its gradient) on every CPU backend against a float64 oracle."""

from __future__ import annotations

import pytest
import torch
from backends_under_test import cpu_backend_params, using
from oracles import rank_loss_float64

from rlhf_fast import ops

SHAPES = [(1, 2), (3, 2), (7, 4), (33, 9), (17, 16), (5, 17), (2, 33), (4, 1)]
# fp32 inputs: fp32 accumulation and polynomial exp/log; 16-bit inputs are rounded before
# both computations, so the same tolerance holds.
TOLERANCE = {"atol": 2e-5, "rtol": 2e-4}


def make_present(kind: str, batch: int, k: int, generator: torch.Generator):
    if kind == "none":
        return None
    if kind == "ragged":  # rows with different K, including rows with 0 or 1 response
        counts = torch.randint(0, k + 1, (batch,), generator=generator)
        return torch.arange(k)[None, :] < counts[:, None]
    if kind == "gaps":
        return torch.rand(batch, k, generator=generator) > 0.3
    if kind == "all_absent":
        return torch.zeros(batch, k, dtype=torch.bool)
    raise ValueError(kind)


def loss_and_grad(rewards, mask, backend, scale=1.0):
    rewards = rewards.detach().clone().requires_grad_(True)
    loss = ops.rank_loss(rewards, mask, backend=backend)
    (loss * scale).backward()
    return loss.detach(), rewards.grad


@pytest.mark.parametrize("backend", cpu_backend_params())
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("mask_kind", ["none", "ragged", "gaps", "all_absent"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_matches_float64_oracle(backend, shape, mask_kind, dtype):
    for seed in (0, 1):
        generator = torch.Generator().manual_seed(seed)
        rewards = (3 * torch.randn(*shape, generator=generator)).to(dtype)
        mask = make_present(mask_kind, *shape, generator)
        with using(backend) as name:
            loss, grad = loss_and_grad(rewards, mask, name)
        expected_loss, expected_grad = rank_loss_float64(rewards, mask)
        assert loss.dtype == torch.float32 and loss.dim() == 0
        assert grad.dtype == dtype and grad.shape == rewards.shape
        torch.testing.assert_close(loss.double(), expected_loss, **TOLERANCE)
        grad_tolerance = TOLERANCE if dtype == torch.float32 else {"atol": 1e-2, "rtol": 1e-2}
        torch.testing.assert_close(grad.double(), expected_grad, **grad_tolerance)


@pytest.mark.parametrize("backend", cpu_backend_params())
def test_gradient_matches_autograd_through_reference(backend):
    generator = torch.Generator().manual_seed(3)
    rewards = torch.randn(29, 9, generator=generator)
    mask = make_present("ragged", 29, 9, generator)
    _, expected = loss_and_grad(rewards, mask, "reference", scale=2.5)
    with using(backend) as name:
        _, grad = loss_and_grad(rewards, mask, name, scale=2.5)
    torch.testing.assert_close(grad, expected, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("backend", cpu_backend_params())
def test_huge_margins_are_stable(backend):
    rewards = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, 5e3], [3.0, 3.0, 3.0]])
    with using(backend) as name:
        loss, grad = loss_and_grad(rewards, None, name)
    expected_loss, expected_grad = rank_loss_float64(rewards, None)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    torch.testing.assert_close(loss.double(), expected_loss, atol=1e-2, rtol=1e-5)
    torch.testing.assert_close(grad.double(), expected_grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("backend", cpu_backend_params())
def test_absent_responses_are_never_read(backend):
    generator = torch.Generator().manual_seed(4)
    rewards = torch.randn(21, 7, generator=generator)
    mask = make_present("gaps", 21, 7, generator)
    poisoned = rewards.masked_fill(~mask, float("nan"))
    with using(backend) as name:
        loss, grad = loss_and_grad(poisoned, mask, name)
    expected_loss, expected_grad = rank_loss_float64(rewards, mask)
    torch.testing.assert_close(loss.double(), expected_loss, **TOLERANCE)
    torch.testing.assert_close(grad.double(), expected_grad, **TOLERANCE)


@pytest.mark.parametrize("backend", cpu_backend_params())
def test_no_valid_pair_gives_zero_loss_and_gradient(backend):
    rewards = torch.full((6, 4), float("nan"))
    mask = torch.zeros(6, 4, dtype=torch.bool)
    mask[:, 0] = True  # one response per prompt: no pair anywhere
    with using(backend) as name:
        loss, grad = loss_and_grad(rewards.masked_fill(mask, 1.0), mask, name)
    assert loss.item() == 0.0
    assert torch.equal(grad, torch.zeros(6, 4))


@pytest.mark.parametrize("backend", cpu_backend_params())
def test_nan_reward_of_a_present_response_propagates(backend):
    rewards = torch.randn(20, 3)
    rewards[13, 1] = float("nan")
    with using(backend) as name:
        loss, _ = loss_and_grad(rewards, None, name)
    assert torch.isnan(loss)


@pytest.mark.parametrize("backend", cpu_backend_params())
def test_non_contiguous_views(backend):
    generator = torch.Generator().manual_seed(6)
    wide = torch.randn(40, 30, generator=generator)
    for rewards in (wide[3:28, 2:11], wide[:9, :25].t(), wide[::3, ::2]):
        with using(backend) as name:
            loss, grad = loss_and_grad(rewards, None, name)
        expected_loss, expected_grad = rank_loss_float64(rewards, None)
        torch.testing.assert_close(loss.double(), expected_loss, **TOLERANCE)
        torch.testing.assert_close(grad.double(), expected_grad, **TOLERANCE)


def test_pairwise_case_is_the_usual_chosen_rejected_loss():
    chosen, rejected = torch.randn(64), torch.randn(64)
    expected = -torch.nn.functional.logsigmoid(chosen - rejected).mean()
    loss = ops.rank_loss(torch.stack([chosen, rejected], dim=1))
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-5)


BAD_INPUTS = [
    (lambda r, m: ops.rank_loss(r[0]), ValueError, "rewards must be 2-D"),
    (lambda r, m: ops.rank_loss(r.long()), TypeError, "rewards must be float32"),
    (lambda r, m: ops.rank_loss(r.numpy()), TypeError, "rewards must be a torch.Tensor"),
    (lambda r, m: ops.rank_loss(r, m[:, :2]), ValueError, "mask must have the shape"),
    (lambda r, m: ops.rank_loss(r, m.half()), TypeError, "mask must be bool"),
    (lambda r, m: ops.rank_loss(r, backend="cuda"), ops.BackendUnavailableError, "no 'cuda'"),
    (lambda r, m: ops.rank_loss(r, backend="CPP"), ValueError, "backend must be one of"),
]


@pytest.mark.parametrize("call,error,message", BAD_INPUTS)
def test_bad_inputs(call, error, message):
    rewards, mask = torch.randn(5, 3), torch.ones(5, 3, dtype=torch.bool)
    with pytest.raises(error, match=message):
        call(rewards, mask)


@pytest.mark.skipif(not hasattr(torch.ops.rlhf_fast, "rank_loss"), reason="no C++ extension")
def test_raw_op_rejects_bad_inputs():
    rewards = torch.randn(4, 3)
    with pytest.raises(ValueError, match="mask must have shape"):
        torch.ops.rlhf_fast.rank_loss(rewards, torch.ones(4, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="rewards must be 2-D"):
        torch.ops.rlhf_fast.rank_loss(rewards[0], None)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_fused_backward_refuses_create_graph(backend, monkeypatch):
    # The fused gradient is computed in the forward and only scaled in backward: under
    # create_graph=True it had no dependence on the rewards, so a gradient penalty added to
    # the loss was silently ignored (the reference differentiates it). It must refuse.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if ops.backends()["rank_loss"][backend].available is False:
        pytest.skip(f"rank_loss backend {backend} unavailable here")
    rewards = torch.randn(3, 4, generator=torch.Generator().manual_seed(0)).requires_grad_()
    loss = ops.rank_loss(rewards, backend=backend)
    with pytest.raises(RuntimeError, match="first-order only"):
        torch.autograd.grad(loss, rewards, create_graph=True)
    (grad,) = torch.autograd.grad(ops.rank_loss(rewards, backend=backend), rewards)
    (expected,) = torch.autograd.grad(ops.rank_loss(rewards, backend="reference"), rewards)
    torch.testing.assert_close(grad, expected)
