"""`rlhf-fast train`: config layering, --dry-run, the run directory, the summary, and the
documented one-line errors (exit 2) for bad flags, config keys, model dirs and data lines."""

from __future__ import annotations

import json

import pytest
import yaml
from tiny_families import make_family_dir
from train_helpers import ranked_records, sft_records, write_jsonl

from rlhf_fast.cli import main
from rlhf_fast.train.config import TrainConfig, apply, validate

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return {
        "model": make_family_dir(root / "model", "llama", chat_template=True),
        "sft": write_jsonl(root / "sft.jsonl", sft_records(6)),
        "ranked": write_jsonl(root / "ranked.jsonl", ranked_records(8)),
    }


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, err  # one line
    return err


def test_ppo_needs_a_reward_model(files, capsys):
    # The PPO and all stages and the no-argument demo are tested in tests/test_ppo_cli.py.
    assert main(["train", "--stage", "ppo", "--model", str(files["model"]), "--data", "x"]) == 2
    assert "--stage ppo needs --reward-model DIR" in _error(capsys)


def test_unknown_flag_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--stage", "sft", "--learning-rate", "1"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --learning-rate" in capsys.readouterr().err


def test_missing_model_dir(files, tmp_path, capsys):
    args = ["train", "--stage", "sft", "--data", str(files["sft"]), "--output", str(tmp_path)]
    assert main([*args, "--model", str(tmp_path / "nope")]) == 2
    assert _error(capsys).endswith("nope: model directory does not exist")
    assert main([*args, "--model", str(tmp_path)]) == 2
    assert "no config.json" in _error(capsys)


def test_malformed_data_line_stops_before_training(files, tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps(sft_records(1)[0]) + "\n" + '{"prompt": "hi"}\n')
    output = tmp_path / "run"
    code = main(["train", "--stage", "sft", "--model", str(files["model"]), "--data", str(data),
                 "--output", str(output)])  # fmt: skip
    assert code == 2
    assert f"{data}:2:" in _error(capsys)
    assert not output.exists()  # nothing was trained or written


def test_config_file_flags_override_and_unknown_keys(files, tmp_path, capsys):
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(f"stage: rm\nmodel: {files['model']}\ndata: x.jsonl\nlr: 0.5\nlora_r: 4\n")
    assert main(["train", "--config", str(run_yaml), "--lr", "0.25", "--dry-run"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert (resolved["stage"], resolved["lr"], resolved["lora_r"]) == ("rm", 0.25, 4)
    assert set(resolved) == set(TrainConfig.__dataclass_fields__)

    run_yaml.write_text("stage: sft\nlearning_rate: 0.1\n")
    assert main(["train", "--config", str(run_yaml)]) == 2
    assert "run.yaml: unknown key 'learning_rate'" in _error(capsys)
    run_yaml.write_text("lr: fast\n")
    assert main(["train", "--config", str(run_yaml)]) == 2
    assert "'lr' must be float" in _error(capsys)
    # PyYAML (YAML 1.1) reads 1e-5 without a dot as the string '1e-5': still a float here
    run_yaml.write_text(f"model: {files['model']}\ndata: x.jsonl\nlr: 1e-5\nkl_horizon: 5E+3\n")
    assert main(["train", "--config", str(run_yaml), "--dry-run"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert (resolved["lr"], resolved["kl_horizon"]) == (1e-5, 5000.0)
    run_yaml.write_text("lr: 1e-5x\n")
    assert main(["train", "--config", str(run_yaml)]) == 2
    assert "'lr' must be float, got '1e-5x'" in _error(capsys)


def test_config_validation_messages():
    with pytest.raises(ValueError, match="batch_size must be positive"):
        validate(apply(TrainConfig(model="m", data="d"), {"batch_size": 0}, "x"))
    with pytest.raises(ValueError, match="dtype must be one of fp32, bf16"):
        validate(TrainConfig(model="m", data="d", dtype="fp16"))
    with pytest.raises(ValueError, match="x: 'merge' must be bool"):
        apply(TrainConfig(), {"merge": "yes"}, "x")
    # max_length 1 passed as "positive", then the encoder raised a traceback after loading
    with pytest.raises(ValueError, match="max_length must be >= 2"):
        validate(TrainConfig(model="m", data="d", max_length=1))
    # an adaptive controller starting at 0 stays at 0 (it multiplies): no KL penalty ever
    with pytest.raises(ValueError, match="kl_target > 0 .* needs kl_coef > 0"):
        validate(TrainConfig(model="m", data="d", kl_target=6.0, kl_coef=0.0))
    # horizon <= rows / 5: a KL under target turned the coefficient negative after one step
    with pytest.raises(ValueError, match=r"kl_horizon must be > batch_size / 5 = 12.8"):
        validate(TrainConfig(model="m", data="d", kl_target=6.0, kl_horizon=12.8, batch_size=64))
    validate(TrainConfig(model="m", data="d", kl_target=6.0, kl_horizon=12.9, batch_size=64))
    # a NaN passed "<= 0" and reached the KL controller, which raised a traceback mid-run
    for value in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="kl_horizon must be a finite number > 0"):
            validate(apply(TrainConfig(model="m", data="d"), {"kl_horizon": value}, "x"))


@pytest.mark.parametrize("seed", [-1, 2**32, 10**23])
def test_a_seed_out_of_range_is_a_config_error(seed):
    # 10**23 crashed in torch.Generator.manual_seed ("Overflow when unpacking long long") after
    # the model was built; PPO seeds a generator with seed * 1_000_003 + step * 7919
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*32\)"):
        validate(TrainConfig(model="m", data="d", seed=seed))


@pytest.mark.parametrize("stage", ["ppo", "all"])
def test_answers_as_long_as_max_length_are_a_config_error(stage):
    # A rollout is prompt + answer within max_length: max_new_tokens >= max_length left the
    # prompt one token and ran past a learned position table (GPT-2: an IndexError traceback
    # from the embedding at the first rollout, after every model had loaded).
    paths = dict(model="m", data="d", reward_model="r", sft_data="s", rm_data="k")
    for new_tokens in (64, 65):
        with pytest.raises(ValueError, match="max_new_tokens .* must be < max_length 64"):
            validate(TrainConfig(stage=stage, max_length=64, max_new_tokens=new_tokens, **paths))
    validate(TrainConfig(stage=stage, max_length=64, max_new_tokens=63, **paths))
    validate(TrainConfig(stage="sft", max_length=64, max_new_tokens=64, **paths))  # unused there


@pytest.mark.parametrize("flag", [{"max_memory": "cpu=1GiB"}, {"offload_dir": "/tmp/x"}])
def test_offload_settings_without_offload_are_refused(flag):
    # they were silently ignored: the whole base loaded past the budget the user set
    with pytest.raises(ValueError, match=f"--{next(iter(flag)).replace('_', '-')}.*--offload"):
        validate(TrainConfig(model="m", data="d", **flag))


def test_sft_then_rm_through_the_cli(files, tmp_path, capsys):
    sft_dir, rm_dir = tmp_path / "sft", tmp_path / "rm"
    common = ["--device", "cpu", "--max-steps", "3", "--save-every", "2", "--max-length", "64"]
    assert main(["train", "--stage", "sft", "--model", str(files["model"]), "--data",
                 str(files["sft"]), "--output", str(sft_dir), "--merge", *common]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert f"next: rlhf-fast train --stage rm --model {sft_dir / 'merged'}" in out
    assert f"rlhf-fast chat {sft_dir / 'merged'}" in out
    for name in ("config.yaml", "metrics.jsonl", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors", "merged/config.json",
                 "merged/model.safetensors", "checkpoints/step-00000003/state.json"):  # fmt: skip
        assert (sft_dir / name).is_file(), name
    assert not list(sft_dir.rglob("*.bin")) and not list(sft_dir.rglob("*.pt"))  # no pickle
    assert len((sft_dir / "metrics.jsonl").read_text().splitlines()) == 3
    assert yaml.safe_load((sft_dir / "config.yaml").read_text())["max_steps"] == 3

    assert main(["train", "--stage", "rm", "--model", str(sft_dir / "merged"), "--data",
                 str(files["ranked"]), "--output", str(rm_dir), *common]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert str(rm_dir / "reward_model") in out
    config = json.loads((rm_dir / "reward_model" / "reward_config.json").read_text())
    assert config["backbone"] == "adapter" and config["base_model"] == str(sft_dir / "merged")

    # The same output again without --resume would mix two runs: refused.
    assert main(["train", "--stage", "rm", "--model", str(sft_dir / "merged"), "--data",
                 str(files["ranked"]), "--output", str(rm_dir), *common]) == 2  # fmt: skip
    assert "--resume" in _error(capsys)


def test_broken_or_pickled_weights_are_one_line_errors(files, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(files["model"], broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    args = ["train", "--stage", "sft", "--data", str(files["sft"]), "--device", "cpu"]
    assert main([*args, "--model", str(broken), "--output", str(tmp_path / "a")]) == 2
    assert f"{broken}: cannot load the model" in _error(capsys)

    pickled = tmp_path / "pickled"  # only a pickle checkpoint: refused, never unpickled
    shutil.copytree(files["model"], pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    assert main([*args, "--model", str(pickled), "--output", str(tmp_path / "b")]) == 2
    assert f"{pickled}: cannot load the model" in _error(capsys)


@pytest.mark.parametrize("family", ["gpt2", "opt"])
def test_max_length_beyond_a_learned_position_table(family, files, tmp_path, capsys):
    from rlhf_fast.models.load import check_max_length

    model = make_family_dir(tmp_path / family, family)  # 256 learned positions
    capsys.readouterr()  # the save's progress bar
    output = tmp_path / "run"
    args = ["train", "--stage", "sft", "--model", str(model), "--data", str(files["sft"])]
    assert main([*args, "--max-length", "300", "--output", str(output)]) == 2
    assert f"--max-length 300 exceeds the 256 positions of {model}" in _error(capsys)
    assert not output.exists()
    check_max_length(model, 256)  # fits
    check_max_length(files["model"], 10_000)  # rotary positions: no table to overflow


@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_output_that_cannot_be_a_directory_is_one_line(files, tmp_path, where, capsys):
    """--output naming a file (or a path under one) raised FileExistsError / NotADirectoryError
    with a traceback from the run directory's mkdir."""
    taken = tmp_path / "taken"
    taken.write_text("not a directory\n")
    output = taken if where == "a file" else taken / "run"
    args = ["train", "--stage", "sft", "--model", str(files["model"]), "--data", str(files["sft"])]
    assert main([*args, "--output", str(output), "--max-steps", "1"]) == 2
    error = _error(capsys)
    assert error == f"rlhf-fast train: error: --output {output}: {taken} is a file, not a directory"


def test_an_os_error_while_training_is_one_line(files, tmp_path, monkeypatch, capsys):
    """A full or read-only disk while writing the run is the user's to fix, not a traceback."""
    from rlhf_fast.train import run

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "run" / "config.yaml"))

    monkeypatch.setattr(run.config_module, "write", full)
    args = ["train", "--stage", "sft", "--model", str(files["model"]), "--data", str(files["sft"])]
    assert main([*args, "--output", str(tmp_path / "run"), "--max-steps", "1"]) == 2
    expected = f"{tmp_path / 'run' / 'config.yaml'}: No space left on device"
    assert _error(capsys) == f"rlhf-fast train: error: {expected}"


def test_demo_in_a_read_only_directory_is_one_line(monkeypatch, capsys):
    """`rlhf-fast train` (the demo) writes runs/demo-<time>/ under the working directory."""
    from rlhf_fast.demo import pipeline

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied", "runs")

    monkeypatch.setattr(pipeline, "run_demo", read_only)
    assert main(["train"]) == 2
    assert _error(capsys) == "rlhf-fast train: error: runs: Permission denied"


def test_a_closed_output_pipe_is_not_a_disk_error(files, monkeypatch, capsys):
    """`rlhf-fast train ... --dry-run | head -1`: BrokenPipeError is an OSError, but not one to
    report as 'error: Broken pipe' (exit 2); cli.main exits quietly with 141."""
    from rlhf_fast.train import config

    def closed(*args, **kwargs):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(config, "to_yaml", closed)
    monkeypatch.setattr("os.dup2", lambda *args: None)  # keep pytest's stdout
    args = ["train", "--stage", "sft", "--model", str(files["model"]), "--data", str(files["sft"])]
    assert main([*args, "--dry-run"]) == 141
    assert capsys.readouterr().err == ""


def test_resume_keeps_the_runs_stage_model_and_data(files, tmp_path, capsys):
    """`--resume RUN --data OTHER.jsonl` went on from the checkpoint's data position in another
    file (and `--stage rm` read an SFT run's data as rankings): a resumed run is its own."""
    run_dir = tmp_path / "run"
    args = ["--model", str(files["model"]), "--data", str(files["sft"])]
    common = ["--device", "cpu", "--max-steps", "1", "--max-length", "64"]
    assert main(["train", "--stage", "sft", *args, "--output", str(run_dir), *common]) == 0
    capsys.readouterr()
    other = write_jsonl(tmp_path / "other.jsonl", sft_records(6))
    for flag, value, stored in [
        ("--data", str(other), str(files["sft"])),
        ("--stage", "rm", "sft"),
        ("--model", str(tmp_path), str(files["model"])),
        ("--output", str(tmp_path / "elsewhere"), str(run_dir)),
    ]:
        assert main(["train", "--resume", str(run_dir), flag, value]) == 2
        assert _error(capsys) == (
            f"rlhf-fast train: error: --resume {run_dir}: {flag} {value} is not the run's "
            f"({stored}); start another run for it (--output DIR)"
        )
    # the run's own values, and settings such as a longer run, are fine
    assert main(["train", "--resume", str(run_dir), "--stage", "sft", "--max-steps", "2"]) == 0
    assert "trained 2 steps" in capsys.readouterr().out


def test_default_run_directories_of_one_second_do_not_collide(tmp_path, monkeypatch):
    # Without --output a run goes to runs/<stage>-<timestamp to the second>: a second run
    # started in the same second (tiny models finish in one) took the first's directory,
    # dropped its metrics.jsonl rows and replaced its checkpoints and exports.
    from rlhf_fast.train import run

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(run.time, "strftime", lambda _: "20260101-000000")
    first = run.default_run_dir("sft")
    assert first == run.Path("runs/sft-20260101-000000")
    first.mkdir(parents=True)
    second = run.default_run_dir("sft")
    assert second != first and not second.exists()
    second.mkdir()
    assert run.default_run_dir("sft") not in (first, second)
    assert run.default_run_dir("rm") == run.Path("runs/rm-20260101-000000")


def test_a_run_resumes_from_another_directory_and_says_what_it_did(
    files, tmp_path, monkeypatch, capsys
):
    """config.yaml kept paths as typed: a run started with `--model ../base` could not be
    resumed from another directory. The summary also said "trained 1 steps", and a resume
    with a lower --max-steps "trained N steps" while it trained none."""
    import shutil

    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(files["model"], tmp_path / "base")
    shutil.copy(files["sft"], work / "sft.jsonl")
    monkeypatch.chdir(work)
    common = ["--device", "cpu", "--max-length", "64", "--save-every", "1"]
    assert main(["train", "--model", "../base", "--data", "sft.jsonl", "--output", "run",
                 "--max-steps", "1", *common]) == 0  # fmt: skip
    assert "trained 1 step in" in capsys.readouterr().out
    stored = yaml.safe_load((work / "run" / "config.yaml").read_text())
    assert stored["model"] == str(tmp_path / "base") and stored["data"] == str(work / "sft.jsonl")
    assert stored["output"] == str(work / "run")
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--resume", str(work / "run"), "--max-steps", "2"]) == 0
    assert "trained 2 steps in" in capsys.readouterr().out
    assert main(["train", "--resume", str(work / "run"), "--max-steps", "1"]) == 0
    assert "nothing to train: the run is at step 2, past --max-steps 1" in capsys.readouterr().out


def test_an_interrupted_run_names_the_directory_to_resume(files, tmp_path, monkeypatch, capsys):
    from rlhf_fast.train import run

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(run, "train", interrupted)
    monkeypatch.chdir(tmp_path)
    args = [
        "train",
        "--model",
        str(files["model"]),
        "--data",
        str(files["sft"]),
        "--max-steps",
        "1",
    ]
    assert main([*args, "--output", "mine"]) == 130
    assert capsys.readouterr().err.strip().endswith("interrupted; continue with --resume mine")
    assert main(args) == 130  # the default run directory, chosen before training
    err = capsys.readouterr().err.strip()
    assert err.split("--resume ")[1].startswith("runs/sft-"), err


def test_a_run_directory_given_for_a_model_names_the_model_inside(files, tmp_path, capsys):
    """--model runs/sft and --reward-model runs/rm said only "no config.json" and
    "reward_config.json: missing", not where the model they hold is."""
    import shutil

    run = tmp_path / "sft-run"
    shutil.copytree(files["model"], run / "merged")
    args = ["train", "--stage", "sft", "--data", str(files["sft"]), "--output", str(tmp_path / "o")]
    assert main([*args, "--model", str(run)]) == 2
    expected = f"{run}: a run directory, not a model; its model is {run / 'merged'}"
    assert _error(capsys) == f"rlhf-fast train: error: {expected}"
    rm_run = tmp_path / "rm-run"
    (rm_run / "reward_model").mkdir(parents=True)
    (rm_run / "reward_model" / "reward_config.json").write_text("{}")
    from rlhf_fast.models.load import ModelLoadError
    from rlhf_fast.models.reward import read_reward_config

    with pytest.raises(ModelLoadError, match="its reward model is .*rm-run/reward_model$"):
        read_reward_config(rm_run)
