"""kill -9 in the middle of a PPO step, then `rlhf-fast train --resume`: the resumed run ends
with the same adapters and heads as an uninterrupted one (to fp32 rounding).

The PPO run is a real `python -m rlhf_fast.cli train --stage ppo` process. The test hook
RLHF_FAST_TEST_PPO_PAUSE (rlhf_fast/train/ppo.py) parks it inside step 4, after that step's
first optimizer update: its adapters and optimizer moments are half-updated in memory, step 3
is logged but not checkpointed (checkpoints every 2 steps), so the resume has to go back to
step 2, drop the logged rows past it and redo steps 3 and 4. The tiny models and data are
those of tests/test_ppo_stage.py (its `stages` fixture).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file
from test_ppo_stage import stages  # noqa: F401  (the fixture: tiny SFT model and RM)
from train_helpers import assert_same_parameters

from rlhf_fast.cli import main
from rlhf_fast.train.checkpoint import CHECKPOINTS_DIR, load_checkpoint
from rlhf_fast.train.ppo import PAUSE_ENV

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STEPS, SAVE_EVERY, KILLED_IN = 5, 2, 4
ROOT = Path(__file__).resolve().parent.parent


def ppo_args(stages, output: Path) -> list[str]:  # noqa: F811
    return ["train", "--stage", "ppo", "--model", str(stages["sft"]),
            "--reward-model", str(stages["rm"]), "--data", str(stages["prompts"]),
            "--output", str(output), "--device", "cpu", "--seed", "0",
            "--max-steps", str(STEPS), "--save-every", str(SAVE_EVERY), "--batch-size", "4",
            "--max-new-tokens", "6", "--max-length", "64", "--lr", "1e-3", "--ppo-epochs", "2",
            "--mini-batch-size", "2", "--sample-every", "1"]  # fmt: skip


def start_paused_run(args: list[str], marker: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, PAUSE_ENV: f"{KILLED_IN}:{marker}", "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}  # fmt: skip
    with open(log, "wb") as output:  # a file, not a pipe: a full pipe would block the run
        return subprocess.Popen(
            [sys.executable, "-m", "rlhf_fast.cli", *args], cwd=ROOT, env=env,
            stdout=output, stderr=subprocess.STDOUT,
        )  # fmt: skip


def wait_for(marker: Path, process: subprocess.Popen, log: Path, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout  # generous: the machine may be shared and slow
    while not marker.exists():
        if process.poll() is not None:
            raise AssertionError(f"the PPO run exited ({process.returncode}) before pausing:\n"
                                 f"{log.read_text()[-2000:]}")  # fmt: skip
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"the PPO run did not reach step {KILLED_IN} in {timeout} s")
        time.sleep(0.05)


def logged_steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_kill_mid_step_then_resume_equals_uninterrupted(stages, tmp_path):  # noqa: F811
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main(ppo_args(stages, whole)) == 0

    marker, log = tmp_path / "paused", tmp_path / "killed_run.log"
    process = start_paused_run(ppo_args(stages, cut), marker, log)
    try:
        wait_for(marker, process, log)
        # Demonstrably inside step 4: step 3 logged, nothing of step 4, checkpoint 2 the newest.
        assert logged_steps(cut) == [1, 2, 3]
        assert sorted(p.name for p in (cut / CHECKPOINTS_DIR).iterdir()) == ["step-00000002"]
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=30) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert not (cut / "adapter").exists()  # the killed run exported nothing

    assert main(["train", "--resume", str(cut)]) == 0
    assert logged_steps(cut) == list(range(1, STEPS + 1))  # step 3's first row dropped
    samples = [json.loads(line)["step"] for line in (cut / "samples.jsonl").open()]
    assert samples == sorted(samples) and set(samples) == set(range(1, STEPS + 1))

    a, b = load_checkpoint(whole), load_checkpoint(cut)
    assert a.step == b.step == STEPS
    assert_same_parameters(a.trainable, b.trainable, atol=1e-6)  # policy, critic adapters, head
    assert a.position == b.position
    assert a.extra["kl_controller"] == pytest.approx(b.extra["kl_controller"])
    adapter = "adapter/adapter_model.safetensors"
    assert_same_parameters(load_file(whole / adapter), load_file(cut / adapter), atol=1e-6)
    rewards = [[json.loads(line)["reward"] for line in (run / "metrics.jsonl").open()]
               for run in (whole, cut)]  # fmt: skip
    assert rewards[1] == pytest.approx(rewards[0], abs=1e-5)


def test_pause_hook_rejects_a_malformed_value(monkeypatch):
    from rlhf_fast.train.ppo import _pause_request

    monkeypatch.delenv(PAUSE_ENV, raising=False)
    assert _pause_request() is None
    monkeypatch.setenv(PAUSE_ENV, "4:/tmp/marker")
    assert _pause_request() == (4, Path("/tmp/marker"))
    for bad in ("4", "x:/tmp/m", "4:"):
        monkeypatch.setenv(PAUSE_ENV, bad)
        with pytest.raises(ValueError, match=PAUSE_ENV):
            _pause_request()
