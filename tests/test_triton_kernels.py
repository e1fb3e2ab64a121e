"""The Triton kernels (kernels/, installed as rlhf_fast.kernels) against the references.

Without a GPU they run on CPU tensors under the Triton interpreter. `triton.jit` reads
TRITON_INTERPRET when a function is *decorated*, i.e. when its module is imported, and that
includes triton's own library functions (tl.zeros, ...): the variable must be set before
triton is first imported in the process. So it is set here, before any import of triton; if
something imported triton earlier without it, the module skips and says so (set
TRITON_INTERPRET=1 in the environment, or run this module alone). While the tests run the
variable stays set, since the dispatcher checks it per call; it is restored afterwards so other
test modules see the environment they expect.

The interpreter runs scans element by element, so shapes are small; chunked paths are reached
by shrinking the launchers' block-size caps rather than by growing the inputs.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os

import pytest
import torch

_saved_interpret = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"
try:
    pytest.importorskip("triton")
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(tl.zeros, InterpretedFunction):
        pytest.skip(
            "triton was imported before TRITON_INTERPRET=1 was set, so its kernels cannot run "
            "interpreted in this process; set TRITON_INTERPRET=1 in the environment",
            allow_module_level=True,
        )
    import rlhf_fast.kernels.gae as gae_kernels
    import rlhf_fast.kernels.rank_loss as rank_loss_kernels

    KERNELS = {gae_kernels: "_gae_kernel", rank_loss_kernels: "_rank_loss_kernel"}
    for _module, _name in KERNELS.items():
        if not isinstance(getattr(_module, _name), InterpretedFunction):
            importlib.reload(_module)  # imported earlier while the variable was unset
finally:
    if _saved_interpret is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = _saved_interpret

from rlhf_fast.ops import gae, gae_reference, rank_loss, rank_loss_reference  # noqa: E402

# Both sides upcast the same rounded inputs exactly, so for every dtype only the order of fp32
# additions differs (the scan re-associates GAE's sums); low precision needs no slack.
GAE_TOL = {
    torch.float32: dict(atol=2e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=2e-5, rtol=1e-5),
}
RANK_TOL = {
    torch.float32: dict(atol=1e-6, rtol=1e-5),
    torch.float16: dict(atol=1e-6, rtol=1e-5),
    torch.bfloat16: dict(atol=1e-6, rtol=1e-5),
}


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@contextlib.contextmanager
def poisoned_outputs():
    """Fill every float tensor that torch.empty / empty_like hands out with NaN, so an element
    a kernel forgets to write shows up as NaN instead of whatever the allocator had."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t: torch.Tensor) -> torch.Tensor:
        return t.fill_(math.nan) if t.is_floating_point() else t

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
        patch.setattr(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k)))
        yield


def test_kernels_run_in_the_interpreter():
    for module, name in KERNELS.items():
        assert isinstance(getattr(module, name), InterpretedFunction), module.__name__


def view_of(x: torch.Tensor, layout: str) -> torch.Tensor:
    """x itself, or an equal view with a row stride (slice of a wider tensor) or with a step
    of 2 along the last dimension."""
    if layout == "contiguous":
        return x.contiguous()
    batch, width = x.shape
    if layout == "row_stride":
        wide = torch.full((batch, width + 5), math.nan, dtype=x.dtype) if x.is_floating_point() \
            else torch.zeros((batch, width + 5), dtype=x.dtype)  # fmt: skip
        wide[:, 3 : 3 + width] = x
        view = wide[:, 3 : 3 + width]
    else:
        wide = torch.zeros((batch, 2 * width), dtype=x.dtype)
        wide[:, ::2] = x
        view = wide[:, ::2]
    assert not view.is_contiguous() or width <= 1
    return view


def random_mask(batch: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """Gaps anywhere, one row all false (when there are rows to spare), one all true."""
    mask = torch.rand(batch, width, generator=generator) > 0.35
    if batch >= 2:
        mask[0] = False
        mask[-1] = True
    return mask


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, tol: dict) -> None:
    assert actual.dtype == torch.float32 and actual.shape == expected.shape
    # No NaN where the reference has none (an unwritten, poisoned element), then every value.
    assert not (actual.isnan() & ~expected.isnan()).any()
    torch.testing.assert_close(actual, expected, **tol, equal_nan=True)


# --------------------------------------------------------------------------------------- GAE


def run_gae(rewards, values, mask, gamma, lam):
    with poisoned_outputs():
        advantages, returns = gae_kernels.gae_triton(rewards, values, mask, gamma, lam)
    for out in (advantages, returns):
        assert out.is_contiguous() and out.dtype == torch.float32
    return advantages, returns


def gae_case(batch, steps, seed, masked, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    rewards = torch.randn(batch, steps, generator=generator).to(dtype)
    values = torch.randn(batch, steps, generator=generator).to(dtype)
    mask = random_mask(batch, steps, generator) if masked else None
    if mask is not None:  # padding is never read: make it NaN and inf to prove it
        rewards = rewards.masked_fill(~mask, math.nan)
        values = values.masked_fill(~mask, math.inf)
    return rewards, values, mask


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("batch,steps", [(1, 1), (1, 37), (3, 1), (4, 37), (2, 130)])
@pytest.mark.parametrize("masked", [False, True])
def test_gae_matches_reference(batch, steps, seed, masked):
    rewards, values, mask = gae_case(batch, steps, seed, masked)
    gamma, lam = [(1.0, 0.95), (0.99, 0.9), (0.5, 1.0)][seed]
    expected = gae_reference(rewards, values, mask, gamma=gamma, lam=lam)
    actual = run_gae(rewards, values, mask, gamma, lam)
    for a, e in zip(actual, expected, strict=True):
        assert not e.isnan().any()
        assert_matches(a, e, GAE_TOL[torch.float32])


@pytest.mark.parametrize("seed", [0, 1])
def test_gae_many_chunks(monkeypatch, seed):
    """Chunks of 8 steps: the carry crosses chunk boundaries, gaps, and whole invalid chunks."""
    monkeypatch.setattr(gae_kernels, "_MAX_BLOCK_T", 8)
    rewards, values, mask = gae_case(5, 37, seed, masked=True)
    mask[2, 8:24] = False  # two whole chunks of row 2 without a valid step
    mask[3, 36] = False  # the last step invalid: the episode's tail value is still 0
    expected = gae_reference(rewards, values, mask, gamma=0.99, lam=0.95)
    actual = run_gae(rewards, values, mask, 0.99, 0.95)
    for a, e in zip(actual, expected, strict=True):
        assert_matches(a, e, GAE_TOL[torch.float32])
    assert (actual[0][0] == 0).all() and (actual[1][0] == 0).all()  # the all-false row


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gae_dtypes(dtype):
    rewards, values, mask = gae_case(3, 37, seed=5, masked=True, dtype=dtype)
    expected = gae_reference(rewards, values, mask, gamma=0.99, lam=0.95)
    actual = run_gae(rewards, values, mask, 0.99, 0.95)
    for a, e in zip(actual, expected, strict=True):
        assert_matches(a, e, GAE_TOL[dtype])


@pytest.mark.parametrize("layout", ["row_stride", "step_2"])
def test_gae_non_contiguous(layout):
    rewards, values, mask = gae_case(3, 37, seed=7, masked=True)
    expected = gae_reference(rewards, values, mask, gamma=0.99, lam=0.95)
    views = view_of(rewards, layout), view_of(values, "row_stride"), view_of(mask, layout)
    actual = run_gae(*views, 0.99, 0.95)
    for a, e in zip(actual, expected, strict=True):
        assert_matches(a, e, GAE_TOL[torch.float32])


@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (0, 0)])
def test_gae_empty(shape):
    advantages, returns = run_gae(torch.zeros(shape), torch.zeros(shape), None, 1.0, 0.95)
    assert advantages.shape == returns.shape == shape


def test_gae_through_dispatcher():
    rewards, values, mask = gae_case(4, 37, seed=11, masked=True)
    expected = gae(rewards, values, mask.int(), gamma=0.99, lam=0.9, backend="reference")
    actual = gae(rewards, values, mask.int(), gamma=0.99, lam=0.9, backend="triton")
    for a, e in zip(actual, expected, strict=True):
        assert_matches(a, e, GAE_TOL[torch.float32])


# --------------------------------------------------------------------------------- rank loss


def run_rank_loss(rewards, mask):
    with poisoned_outputs():
        loss, grad = rank_loss_kernels.rank_loss_triton(rewards, mask)
    assert loss.shape == () and loss.dtype == torch.float32
    assert grad.shape == rewards.shape and grad.dtype == torch.float32
    return loss, grad


def reference_loss_and_grad(rewards, mask):
    leaf = rewards.detach().float().requires_grad_()
    loss = rank_loss_reference(leaf, mask)
    loss.backward()
    return loss.detach(), leaf.grad


def rank_case(batch, responses, seed, masked, dtype=torch.float32, scale=2.0):
    generator = torch.Generator().manual_seed(seed)
    rewards = (scale * torch.randn(batch, responses, generator=generator)).to(dtype)
    mask = random_mask(batch, responses, generator) if masked else None
    if mask is not None:
        rewards = rewards.masked_fill(~mask, math.nan)
    return rewards, mask


def check_rank_loss(rewards, mask, tol=RANK_TOL[torch.float32]):
    expected_loss, expected_grad = reference_loss_and_grad(rewards, mask)
    loss, grad = run_rank_loss(rewards, mask)
    assert_matches(loss, expected_loss, tol)
    assert_matches(grad, expected_grad, tol)
    return loss, grad


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("batch,responses", [(1, 2), (6, 2), (5, 9), (3, 17), (2, 64)])
@pytest.mark.parametrize("masked", [False, True])
def test_rank_loss_matches_reference(batch, responses, seed, masked):
    rewards, mask = rank_case(batch, responses, seed, masked)
    loss, grad = check_rank_loss(rewards, mask)
    assert not loss.isnan() and not grad.isnan().any()


@pytest.mark.parametrize("responses", [9, 17])
def test_rank_loss_chunked_responses(monkeypatch, responses):
    """Chunks of 4 responses: pairs that straddle chunks, seen from both ends."""
    monkeypatch.setattr(rank_loss_kernels, "_MAX_CHUNK_K", 4)
    rewards, mask = rank_case(3, responses, seed=3, masked=True)
    check_rank_loss(rewards, mask)
    check_rank_loss(rank_case(2, responses, seed=4, masked=False)[0], None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_rank_loss_dtypes(dtype):
    rewards, mask = rank_case(5, 9, seed=5, masked=True, dtype=dtype)
    check_rank_loss(rewards, mask, RANK_TOL[dtype])


@pytest.mark.parametrize("layout", ["row_stride", "step_2"])
def test_rank_loss_non_contiguous(layout):
    rewards, mask = rank_case(4, 9, seed=6, masked=True)
    check_rank_loss(view_of(rewards, layout), view_of(mask, layout))


def test_rank_loss_without_pairs():
    """All-false mask, one response per row, K = 1, B = 0: loss 0, gradient 0."""
    rewards = torch.full((3, 5), math.nan)
    for mask in (torch.zeros(3, 5, dtype=torch.bool), torch.eye(3, 5, dtype=torch.bool)):
        loss, grad = run_rank_loss(rewards, mask)
        assert loss.item() == 0.0 and (grad == 0).all()
    for shape in ((4, 1), (0, 3), (3, 0)):
        loss, grad = run_rank_loss(torch.randn(shape), None)
        assert loss.item() == 0.0 and grad.shape == shape and (grad == 0).all()


def test_rank_loss_large_margins():
    rewards = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, 3.0], [5e3, 5e3, -5e3]])
    loss, grad = check_rank_loss(rewards, None)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


def test_rank_loss_nan_at_present_response_is_nan():
    rewards, mask = rank_case(3, 5, seed=8, masked=False)
    rewards[1, 2] = math.nan
    loss, _ = run_rank_loss(rewards, mask)
    assert loss.isnan()


def test_rank_loss_deterministic():
    rewards, mask = rank_case(64, 9, seed=9, masked=True)
    first, second = run_rank_loss(rewards, mask), run_rank_loss(rewards, mask)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rank_loss_through_dispatcher_backward(dtype):
    rewards, mask = rank_case(5, 9, seed=10, masked=True, dtype=dtype)
    grads = {}
    for backend in ("reference", "triton"):
        leaf = rewards.detach().clone().requires_grad_()
        loss = rank_loss(leaf, mask, backend=backend)
        (3.0 * loss).backward()  # backward must scale the fused gradient by grad_output
        grads[backend] = (loss.detach(), leaf.grad)
    assert grads["triton"][1].dtype == dtype
    torch.testing.assert_close(grads["triton"][0], grads["reference"][0], **RANK_TOL[dtype])
    # Both gradients were rounded to `dtype` once, from fp32 values within RANK_TOL.
    low = dict(atol=1e-3, rtol=1e-3) if dtype == torch.float16 else RANK_TOL[dtype]
    torch.testing.assert_close(grads["triton"][1], grads["reference"][1], **low, equal_nan=True)
