"""`rlhf-fast train --stage ppo|all` and `rlhf-fast train` with no arguments (the demo, at a
small scale): run directories, exports that plain transformers loads, and the one-line errors
that name the command making a missing input."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_families import FAMILIES, make_family_dir
from train_helpers import SMALL_RUN_FLAGS, pipeline_data

from rlhf_fast.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return pipeline_data(tmp_path_factory.mktemp("ppo_cli"))


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()[-1]
    return err


def _all_args(model, data, output) -> list[str]:
    return ["train", "--stage", "all", "--model", str(model), "--sft-data", str(data["sft"]),
            "--rm-data", str(data["ranked"]), "--data", str(data["prompts"]),
            "--output", str(output), *SMALL_RUN_FLAGS]  # fmt: skip


@pytest.mark.parametrize("family", FAMILIES)
def test_stage_all_end_to_end(family, data, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    model = make_family_dir(tmp_path / "model", family, chat_template=True)
    output = tmp_path / "run"
    assert main(_all_args(model, data, output)) == 0
    out = capsys.readouterr().out
    assert f"rlhf-fast chat {output / 'ppo' / 'merged'}" in out
    for stage in ("sft", "rm", "ppo"):
        assert (output / stage / "metrics.jsonl").is_file()
    assert (output / "rm" / "reward_model" / "reward_config.json").is_file()
    ppo_config = (output / "ppo" / "config.yaml").read_text()
    assert f"model: {output / 'sft' / 'merged'}" in ppo_config  # each stage feeds the next
    merged = AutoModelForCausalLM.from_pretrained(output / "ppo" / "merged")
    assert merged(torch.tensor([[1, 2, 3]])).logits.shape[-1] == merged.config.vocab_size
    record = json.loads((output / "ppo" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["step"] == 2 and "reward" in record and "kl" in record
    # --resume of a finished run skips every stage
    assert main(["train", "--stage", "all", "--resume", str(output)]) == 0
    assert "ppo: done earlier" in capsys.readouterr().out


def test_stage_all_checks_every_input_first(data, tmp_path, capsys):
    model = make_family_dir(tmp_path / "model", "llama", chat_template=True)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi"}\n{"nope": 1}\n')
    args = _all_args(model, data, tmp_path / "run")
    args[args.index("--data") + 1] = str(bad)
    assert main(args) == 2
    assert f"{bad}:2:" in _error(capsys)
    assert not (tmp_path / "run" / "sft").exists()  # nothing trained


def test_stage_all_checks_the_rm_loss_against_the_rm_data_first(data, tmp_path, capsys):
    # ranked answers with --rm-loss mse were refused only when the RM stage started, after
    # the whole SFT stage had trained
    model = make_family_dir(tmp_path / "model", "llama", chat_template=True)
    args = [*_all_args(model, data, tmp_path / "run"), "--rm-loss", "mse"]
    assert main(args) == 2
    assert "ranked answers train with --rm-loss rank, not mse" in _error(capsys)
    assert not (tmp_path / "run" / "sft").exists()  # nothing trained


def test_ppo_missing_reward_model_dir_names_the_command(data, tmp_path, capsys):
    model = make_family_dir(tmp_path / "model", "llama", chat_template=True)
    args = ["train", "--stage", "ppo", "--model", str(model), "--data", str(data["prompts"]),
            "--reward-model", str(tmp_path / "rm"), "--output", str(tmp_path / "run"),
            *SMALL_RUN_FLAGS]  # fmt: skip
    assert main(args) == 2
    err = _error(capsys)
    assert f"--reward-model {tmp_path / 'rm'}: no such directory" in err
    assert f"rlhf-fast train --stage rm --model {model}" in err
    (tmp_path / "rm").mkdir()
    assert main(args) == 2
    assert "reward_config.json: missing (not a reward-model directory)" in _error(capsys)


def test_no_arguments_runs_the_demo(tmp_path, monkeypatch, capsys):
    from transformers import AutoModelForCausalLM

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RLHF_FAST_DEMO_SCALE", "0.02")
    assert main(["train"]) == 0
    out = capsys.readouterr().out
    for row in ("reward model held-out accuracy", "held-out judge score", "mean RM reward",
                "KL to the reference", "SFT policy", "PPO policy"):  # fmt: skip
        assert row in out
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert run_dir.name.startswith("demo-")
    chat_model = run_dir / "ppo" / "merged"
    assert f"rlhf-fast chat runs/{run_dir.name}/ppo/merged" in out
    assert AutoModelForCausalLM.from_pretrained(chat_model) is not None


def test_bad_demo_scale_is_one_line(monkeypatch, capsys):
    monkeypatch.setenv("RLHF_FAST_DEMO_SCALE", "lots")
    assert main(["train"]) == 2
    assert "RLHF_FAST_DEMO_SCALE must be a number" in _error(capsys)


def test_stage_all_resumes_after_a_kill_during_its_first_checkpoint(data, tmp_path, capsys,
                                                                    monkeypatch):  # fmt: skip
    """A kill -9 while the SFT stage writes its first checkpoint leaves only a .tmp-* leftover
    in RUN/sft/checkpoints: `--resume RUN` (what the interrupted run tells the user to do)
    must start that stage over, not fail on 'no complete checkpoint'."""
    from rlhf_fast.train import checkpoint as ckpt

    model = make_family_dir(tmp_path / "model", "llama", chat_template=True)
    output = tmp_path / "run"

    def killed(directory, tensor_files, state):
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "_write_files", killed)
    assert main(_all_args(model, data, output)) == 130
    monkeypatch.undo()
    leftover = output / "sft" / "checkpoints" / ".tmp-step-00000002-0badf00d"
    leftover.mkdir(parents=True)  # what the kill leaves (an exception cleans it up)
    (leftover / ckpt.TRAINABLE_FILE).write_bytes(b"\0" * 10)
    capsys.readouterr()
    assert main(["train", "--stage", "all", "--resume", str(output)]) == 0, _error(capsys)
    assert (output / "ppo" / "merged").is_dir()
    assert not leftover.exists()
    for stage in ("sft", "rm", "ppo"):  # one uninterrupted run's rows, the killed ones dropped
        lines = (output / stage / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["step"] for line in lines] == [1, 2], stage


def test_stage_all_resume_redoes_an_export_a_kill_cut_short(data, tmp_path, capsys):
    """A kill -9 while PPO writes RUN/ppo/merged leaves that directory half-written: --resume
    must not report the stage done (with a chat model that does not load), it must export
    again from the final checkpoint."""
    from transformers import AutoModelForCausalLM

    model = make_family_dir(tmp_path / "model", "llama", chat_template=True)
    output = tmp_path / "run"
    assert main(_all_args(model, data, output)) == 0
    merged = output / "ppo" / "merged"
    for file in merged.iterdir():  # as if killed while the files were being written
        if file.name != "config.json":
            file.unlink()
    for marker in (output / "ppo").glob(".stage*"):
        marker.unlink()  # what the kill leaves: the export started, the stage never ended
    capsys.readouterr()
    assert main(["train", "--stage", "all", "--resume", str(output)]) == 0, _error(capsys)
    assert "ppo: done earlier" not in capsys.readouterr().out
    assert AutoModelForCausalLM.from_pretrained(merged) is not None
    lines = (output / "ppo" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]  # no step trained again
