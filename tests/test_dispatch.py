"""Backend choice: automatic pick, the backend argument, RLHF_FAST_BACKEND, and what happens
when the C++ extension is missing."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import rlhf_fast
from rlhf_fast import _native, ops
from rlhf_fast.ops import _dispatch

needs_cpp = pytest.mark.skipif(_native.cpp is None, reason="C++ extension not loaded")


@needs_cpp
def test_automatic_pick_on_cpu_is_cpp():
    assert _dispatch.choose("gae", torch.device("cpu"), None) == "cpp"
    assert _dispatch.choose("rank_loss", torch.device("cpu"), None) == "cpp"


def test_automatic_pick_never_fails_on_other_devices():
    assert _dispatch.choose("gae", torch.device("meta"), None) == "reference"


def test_candidates_fastest_first_and_only_implemented_ones():
    # On a GPU the hand-written CUDA kernels come before Triton; ops without a GPU backend
    # must not list one (the pick would then try a backend the op does not have).
    assert _dispatch.candidates("gae", "cuda") == ("cuda", "triton", "reference")
    assert _dispatch.candidates("rank_loss", "cuda") == ("triton", "reference")
    assert _dispatch.candidates("rms_norm", "cuda") == ("reference",)
    assert _dispatch.candidates("gae", "cpu") == ("cpp", "reference")
    assert _dispatch.candidates("gae", "meta") == ("reference",)


def test_triton_on_cpu_only_when_interpreted(monkeypatch):
    if _dispatch._triton_missing():
        pytest.skip("triton is not installed")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    reason = _dispatch.unavailable_reason("triton", torch.device("cpu"))
    assert reason is not None and "TRITON_INTERPRET=1" in reason
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _dispatch.unavailable_reason("triton", torch.device("cpu")) is None


def test_environment_variable_overrides_the_pick(monkeypatch):
    monkeypatch.setenv(_dispatch.ENV_VAR, "reference")
    assert _dispatch.choose("gae", torch.device("cpu"), None) == "reference"
    # An explicit argument still wins over the variable.
    monkeypatch.setenv(_dispatch.ENV_VAR, "cuda")
    assert _dispatch.choose("gae", torch.device("cpu"), "reference") == "reference"


def test_environment_variable_naming_a_missing_backend_is_an_error(monkeypatch):
    monkeypatch.setenv(_dispatch.ENV_VAR, "cuda")
    with pytest.raises(ops.BackendUnavailableError, match="'cuda' is unavailable"):
        ops.gae(torch.randn(2, 3), torch.randn(2, 3))
    # rank_loss has no CUDA kernel at all: the variable does not apply to it.
    ops.rank_loss(torch.randn(2, 3))
    monkeypatch.setenv(_dispatch.ENV_VAR, "nonsense")
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.rank_loss(torch.randn(2, 3))


@pytest.mark.parametrize("value", ["nonsense", "CPP", " cpp", "cuda"])
def test_errors_caused_by_the_environment_variable_name_it(monkeypatch, value):
    # No backend argument was passed: an error that only says "backend" points nowhere.
    monkeypatch.setenv(_dispatch.ENV_VAR, value)
    with pytest.raises((ValueError, ops.BackendUnavailableError)) as error:
        ops.gae(torch.randn(2, 3), torch.randn(2, 3))
    assert _dispatch.ENV_VAR in str(error.value) and repr(value) in str(error.value)
    # An explicit argument's error is about the argument.
    with pytest.raises(ValueError) as error:
        ops.gae(torch.randn(2, 3), torch.randn(2, 3), backend="nonsense")
    assert _dispatch.ENV_VAR not in str(error.value)


def test_backends_report():
    report = rlhf_fast.backends()
    assert set(report) >= {"gae", "rank_loss"}
    assert report["gae"]["reference"].available
    assert report["gae"]["cpp"].available == (_native.cpp is not None)
    cuda_report = rlhf_fast.backends("cuda")
    if not torch.cuda.is_available():
        assert not cuda_report["gae"]["cuda"].available
        assert cuda_report["gae"]["cuda"].reason


def test_missing_extension_falls_back_to_reference_with_one_warning():
    """Simulate a failed build: the package imports, warns once, and runs on the reference."""
    script = (
        "import sys, warnings\n"
        "sys.modules['rlhf_fast._C'] = None\n"  # makes `import rlhf_fast._C` fail
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import torch, rlhf_fast\n"
        "    from rlhf_fast import ops\n"
        "    ops.gae(torch.randn(2, 5), torch.randn(2, 5))\n"
        "    ops.rank_loss(torch.randn(2, 3))\n"
        "ours = [w for w in caught if 'C++ kernels could not be loaded' in str(w.message)]\n"
        "assert len(ours) == 1, [str(w.message) for w in caught]\n"
        "assert rlhf_fast.backends()['gae']['cpp'].available is False\n"
        "try:\n"
        "    ops.gae(torch.randn(2, 5), torch.randn(2, 5), backend='cpp')\n"
        "except ops.BackendUnavailableError as error:\n"
        "    print('refused:', error)\n"
    )
    env = dict(os.environ)
    env.pop(_dispatch.ENV_VAR, None)
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "refused:" in result.stdout and "C++ extension not loaded" in result.stdout


def test_doctor_command_lists_backends():
    result = subprocess.run(
        [sys.executable, "-m", "rlhf_fast.cli", "doctor"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert f"rlhf-fast {rlhf_fast.__version__}" in result.stdout
    rows = {tuple(line.split()[:3]) for line in result.stdout.splitlines() if line[:1].isalpha()}
    expected = "cpp" if _native.cpp is not None else "reference"
    assert ("gae", "cpu", expected) in rows
    assert ("rank_loss", "cpu", expected) in rows
