"""The C++ ops' output pool (csrc/cpu/output_pool.h): outputs of 1 MiB and more come from a pool
of freed blocks. They must behave as any CPU tensor (resize_ included), and a bad
$RLHF_FAST_OUTPUT_POOL_MB is a warning naming it, never a silent change of the pool's size."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from rlhf_fast import _native, ops

pytestmark = pytest.mark.skipif(_native.cpp is None, reason="C++ kernels not built")


def _pooled_gae(rows: int = 512, steps: int = 1024):
    """A [rows, steps] fp32 GAE output: 2 MiB, above the pool's 1 MiB threshold."""
    generator = torch.Generator().manual_seed(0)
    rewards = torch.randn(rows, steps, generator=generator)
    values = torch.randn(rows, steps, generator=generator)
    return ops.gae(rewards, values, backend="cpp")


@pytest.mark.parametrize("grow", [True, False])
def test_a_pooled_output_resizes_like_any_tensor(grow):
    advantages, _ = _pooled_gae()
    kept = advantages.clone()
    # Storage from the pool was not resizable ("Trying to resize storage that is not
    # resizable"), unlike an output of the reference backend.
    rows = advantages.shape[0] * (2 if grow else 1) // (1 if grow else 2)
    advantages.resize_(rows, advantages.shape[1])
    common = min(rows, kept.shape[0])
    assert torch.equal(advantages[:common], kept[:common])
    advantages.fill_(1.0)  # the grown part is writable memory
    assert bool((advantages == 1.0).all())


def test_freed_pooled_outputs_are_reused_and_rewritten():
    first, _ = _pooled_gae()
    address = first.data_ptr()
    del first
    second, returns = _pooled_gae()
    reference, reference_returns = ops.gae(*_inputs(), backend="reference")
    assert second.data_ptr() == address  # the freed block came back from the pool
    torch.testing.assert_close(second, reference)
    torch.testing.assert_close(returns, reference_returns)


def _inputs(rows: int = 512, steps: int = 1024):
    generator = torch.Generator().manual_seed(0)
    return torch.randn(rows, steps, generator=generator), torch.randn(
        rows, steps, generator=generator
    )


def _import_with(value: str) -> subprocess.CompletedProcess:
    env = {**os.environ, _native.OUTPUT_POOL_ENV: value}
    return subprocess.run(
        [sys.executable, "-W", "always", "-c", "import rlhf_fast._native"],
        env=env, capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip


@pytest.mark.parametrize("value", ["0", "64", "256", "000000000064"])
def test_a_whole_number_of_mib_is_taken_without_a_warning(value):
    assert _native.OUTPUT_POOL_ENV not in _import_with(value).stderr


@pytest.mark.parametrize("value", ["abc", "-1", "1e3", "64MB", "", "99999999999999999999"])
def test_a_bad_pool_size_is_a_warning_naming_it(value):
    stderr = _import_with(value).stderr
    assert f"${_native.OUTPUT_POOL_ENV}={value!r}" in stderr
    assert "default 256" in stderr
