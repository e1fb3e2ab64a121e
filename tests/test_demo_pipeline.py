"""The demo pipeline (rlhf_fast/demo/pipeline.py) on a tiny preset: every stage's directory is
a run directory as DESIGN.md describes it (config.yaml included), and the PPO stage can be
continued with `rlhf-fast train --resume`."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from rlhf_fast.demo import task
from rlhf_fast.demo.pipeline import DemoPreset, run_demo

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tiny_preset() -> DemoPreset:
    preset = DemoPreset().scaled(0.01)
    small = {"batch_size": 4, "max_steps": 2}
    return dataclasses.replace(
        preset,
        sizes=task.DemoSizes(sft=16, rm=16, ppo_prompts=16, eval_prompts=16),
        sft={**preset.sft, **small},
        rm={**preset.rm, **small},
        ppo={**preset.ppo, **small, "mini_batch_size": 2, "max_new_tokens": 4},
        eval_questions=4,
    )


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    return run_demo(tmp_path_factory.mktemp("demo") / "run", _tiny_preset())


def test_every_stage_directory_holds_its_resolved_config(demo_run):
    """RUN/ppo had no config.yaml: the demo built its PPO stage by hand, past run_ppo."""
    for stage in ("sft", "rm", "ppo"):
        path = demo_run.run_dir / stage / "config.yaml"
        assert path.is_file(), stage
        config = yaml.safe_load(path.read_text())
        assert config["stage"] == stage and config["output"] == str(demo_run.run_dir / stage)
    ppo = yaml.safe_load((demo_run.run_dir / "ppo" / "config.yaml").read_text())
    assert ppo["reward_model"] == str(demo_run.run_dir / "rm" / "reward_model")
    assert ppo["max_steps"] == 2 and ppo["max_new_tokens"] == 4


def test_report_is_consistent(demo_run):
    assert demo_run.chat_model == demo_run.run_dir / "ppo" / "merged"
    assert (demo_run.chat_model / "config.json").is_file()
    assert 0 <= demo_run.sft.judge <= 1 and 0 <= demo_run.ppo.judge <= 1
    assert demo_run.sft.kl == 0.0  # the SFT policy is the reference
    assert len(demo_run.samples) == 4


def test_ppo_stage_resumes_from_the_command_line(demo_run, capsys):
    from rlhf_fast.cli import main

    assert main(["train", "--resume", str(demo_run.run_dir / "ppo")]) == 0, capsys.readouterr()
    assert "trained 2 PPO steps" in capsys.readouterr().out
