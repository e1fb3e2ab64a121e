"""The registered torch ops: schema, fake (meta) implementations, torch.compile tracing."""

from __future__ import annotations

import pytest
import torch

from rlhf_fast import _native, ops

pytestmark = pytest.mark.skipif(_native.cpp is None, reason="C++ extension not loaded")


def gae_samples():
    generator = torch.Generator().manual_seed(0)
    for shape in [(1, 1), (5, 33), (17, 9)]:
        rewards = torch.randn(shape, generator=generator)
        values = torch.randn(shape, generator=generator)
        mask = torch.rand(shape, generator=generator) > 0.3
        yield (rewards, values, mask, 0.99, 0.95)
        yield (rewards.bfloat16(), values.bfloat16(), None, 1.0, 0.9)


def rank_loss_samples():
    generator = torch.Generator().manual_seed(1)
    for shape in [(1, 2), (19, 9), (3, 17)]:
        rewards = torch.randn(shape, generator=generator)
        yield (rewards, torch.rand(shape, generator=generator) > 0.2)
        yield (rewards.half(), None)


@pytest.mark.parametrize("args", list(gae_samples()))
def test_opcheck_gae(args):
    torch.library.opcheck(torch.ops.rlhf_fast.gae.default, args)


@pytest.mark.parametrize("args", list(rank_loss_samples()))
def test_opcheck_rank_loss(args):
    torch.library.opcheck(torch.ops.rlhf_fast.rank_loss.default, args)


def test_ops_trace_under_torch_compile():
    def step(rewards, values, mask, scores):
        advantages, returns = ops.gae(rewards, values, mask, backend="cpp")
        return advantages.sum() + returns.sum() + ops.rank_loss(scores, backend="cpp")

    rewards, values = torch.randn(6, 20), torch.randn(6, 20)
    mask = torch.rand(6, 20) > 0.2
    scores = torch.randn(6, 4, requires_grad=True)
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(
        compiled(rewards, values, mask, scores), step(rewards, values, mask, scores)
    )
