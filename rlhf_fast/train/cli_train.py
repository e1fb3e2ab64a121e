"""`rlhf-fast train --stage sft|rm|ppo|all --model DIR --data FILE --output DIR [...]`, and
`rlhf-fast train` with no arguments: the built-in demo (rlhf_fast/demo/pipeline.py).

The config is layered: defaults, then the run directory's config.yaml when resuming, then
`--config run.yaml`, then the flags given on the command line (one flag per TrainConfig
field, `lora_r` -> `--lora-r`); a resumed run keeps its stage, model, data and directory (a
flag that changes one is an error). `--dry-run` prints the resolved config and stops. Every input
error (bad flag or config key, missing model directory, malformed data line, unreadable
checkpoint) is one line on stderr and exit code 2, before any training.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import warnings
from pathlib import Path

from rlhf_fast.train import config as config_module
from rlhf_fast.train.config import CHOICES, FIELDS, STAGES, ConfigError, TrainConfig, field_type

PROG = "rlhf-fast train"
_POSITIONAL_LIKE = ("stage", "model", "data", "output")  # shown first in --help
_METAVARS = {
    "model": "DIR", "data": "FILE", "output": "DIR", "lora_targets": "NAME",
    "reward_model": "DIR", "sft_data": "FILE", "rm_data": "FILE", "ptx_data": "FILE",
    "kl_estimator": "K", "offload": "auto|SPEC", "max_memory": "cpu=SIZE",
}  # fmt: skip


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "train",
        help="train a stage: sft, rm, ppo, or all three; no arguments: the built-in demo",
        description=(
            "Train the InstructGPT recipe on a local model directory: sft (loss on the "
            "answers), rm (reward model on ranked answers or direct scores), ppo (--model "
            "SFT_DIR --reward-model RM_DIR --data PROMPTS.jsonl), or all (--sft-data, --rm-data, "
            "--data PROMPTS.jsonl: SFT -> RM -> PPO). Flags override --config run.yaml. With no "
            "arguments: the built-in demo (SFT -> RM -> PPO on a tiny model, a few minutes on "
            "a CPU; RLHF_FAST_DEMO_SCALE=0.1 runs a tenth of it)."
        ),
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", metavar="RUN.yaml", help="config file (flags override it)")
    parser.add_argument("--resume", metavar="DIR", help="continue a run (its dir or checkpoint)")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    for name in (*_POSITIONAL_LIKE, *(n for n in FIELDS if n not in _POSITIONAL_LIKE)):
        _add_field_flag(parser, name)


def _add_field_flag(parser: argparse.ArgumentParser, name: str) -> None:
    flag = "--" + name.replace("_", "-")
    help_text = FIELDS[name].metadata["help"]
    default = FIELDS[name].default
    if default not in (None, False):
        help_text += f" ({default})"
    base, _ = field_type(name)
    if name == "stage":
        parser.add_argument(flag, choices=STAGES, help=help_text)
    elif name in CHOICES:
        parser.add_argument(flag, choices=CHOICES[name], help=help_text)
    elif base is bool:
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
    elif base is list:
        parser.add_argument(flag, nargs="+", metavar=_METAVARS.get(name, "X"), help=help_text)
    else:
        metavar = _METAVARS.get(name, name.split("_")[-1].upper())
        parser.add_argument(flag, type=base, metavar=metavar, help=help_text)


def _resume_run_dir(path: Path) -> Path:
    """The run directory of `--resume PATH` (a run dir or one of its checkpoint dirs)."""
    if (path / "config.yaml").is_file():
        return path
    if (path.parent.parent / "config.yaml").is_file():  # RUN/checkpoints/step-N
        return path.parent.parent
    raise ConfigError(f"--resume {path}: no config.yaml here (not a run directory)")


# What makes a run that run: a resumed run takes other settings (a longer --max-steps), but
# another stage, model, data or directory would continue its checkpoint on something else.
_RUN_IDENTITY = ("stage", "model", "data", "reward_model", "sft_data", "rm_data", "output")


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    """Defaults <- the resumed run's config.yaml <- --config file <- flags."""
    config = TrainConfig()
    resume = getattr(args, "resume", None)
    if resume is not None:
        run_dir = _resume_run_dir(Path(resume))
        config = config_module.load(run_dir / "config.yaml", config)
        config.output = str(run_dir)
    stored = config
    if getattr(args, "config", None) is not None:
        config = config_module.load(args.config, config)
    flags = {name: getattr(args, name) for name in FIELDS if hasattr(args, name)}
    config = config_module.apply(config, flags, "command line")
    if resume is not None:
        for name in _RUN_IDENTITY:
            value, own = getattr(config, name), getattr(stored, name)
            same_path = name != "stage" and Path(str(value)).resolve() == Path(str(own)).resolve()
            if value != own and not same_path:
                raise ConfigError(
                    f"--resume {resume}: --{name.replace('_', '-')} {value} is not the run's "
                    f"({own}); start another run for it (--output DIR)"
                )
    return config_module.validate(config)


def _no_arguments(args: argparse.Namespace) -> bool:
    return not any(hasattr(args, name) for name in (*FIELDS, "config", "resume", "dry_run"))


def _trained(result, kind: str = "") -> str:
    """'trained 1 step', 'trained 40 PPO steps'; a resumed run already past a lowered
    --max-steps trains nothing, and says so instead of counting the earlier run's steps."""
    if result.step > result.total_steps:
        return (f"nothing to train: the run is at step {result.step}, past --max-steps "
                f"{result.total_steps}; exported again")  # fmt: skip
    return f"trained {_steps(result.step, kind)}"


def _steps(count: int, kind: str = "") -> str:
    return f"{count} {kind}step{'' if count == 1 else 's'}"


def _summary(outcome) -> list[str]:
    result, exports = outcome.result, outcome.exports
    lines = [f"{_trained(result)} in {outcome.seconds:.1f} s; run directory: {outcome.run_dir}"]
    if result.eval_metrics:
        shown = ", ".join(f"{k} {v:.4g}" for k, v in result.eval_metrics.items())
        lines.append(f"held-out: {shown}")
    for name, path in exports.items():
        lines.append(f"{name}: {path}")
    if outcome.config.stage in ("ppo", "all"):
        return _ppo_summary(outcome)
    if outcome.config.stage == "sft":
        model = exports.get("merged", exports.get("adapter"))
        lines.append(f"next: rlhf-fast train --stage rm --model {model} --data RANKINGS.jsonl")
        if "merged" in exports:
            lines.append(f"  or: rlhf-fast chat {exports['merged']}")
    else:
        reward = exports.get("reward_model", exports.get("merged"))
        lines.append(
            f"next: rlhf-fast train --stage ppo --model {outcome.config.model} "
            f"--reward-model {reward} --data PROMPTS.jsonl"
        )
    return lines


def _ppo_summary(outcome) -> list[str]:
    lines = []
    stages = getattr(outcome, "stages", None)
    if stages is not None:
        lines.append(f"all stages done in {outcome.seconds:.1f} s; run directory: "
                     f"{outcome.all_dir}")  # fmt: skip
        for name, stage in stages.items():
            done = "done earlier" if stage is None else _steps(stage.result.step)
            lines.append(f"  {name}: {done} ({outcome.all_dir / name})")
    else:
        lines.append(f"{_trained(outcome.result, 'PPO ')} in {outcome.seconds:.1f} s; "
                     f"run directory: {outcome.run_dir}")  # fmt: skip
    metrics = outcome.result.metrics
    if metrics:
        shown = ", ".join(f"{k} {metrics[k]:.4g}" for k in ("reward", "kl") if k in metrics)
        lines.append(f"last step: {shown}")
    for name, path in outcome.exports.items():
        lines.append(f"{name}: {path}")
    if "merged" in outcome.exports:
        lines.append(f"next: rlhf-fast chat {outcome.exports['merged']}")
    return lines


def run_demo() -> int:
    from rlhf_fast.demo.pipeline import format_report, run_demo

    try:
        report = run_demo()
    except KeyboardInterrupt:
        print(f"\n{PROG}: demo interrupted", file=sys.stderr)
        return 130
    except ValueError as error:  # a bad RLHF_FAST_DEMO_SCALE
        print(f"{PROG}: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except OSError as error:  # runs/ not writable here, a full disk
        print(f"{PROG}: error: {_os_error(error)}", file=sys.stderr)
        return 2
    print(format_report(report))
    return 0


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local directories only: never wait on a hub
    # transformers' deprecation notices about its own internals (peft calls them) say nothing
    # the user can act on; they would only break up the progress output.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\.")
    if _no_arguments(args):
        return run_demo()
    from rlhf_fast.models.load import ModelLoadError
    from rlhf_fast.train.checkpoint import CheckpointError
    from rlhf_fast.train.data import DataError, TemplateError
    from rlhf_fast.train.ppo import RewardError

    run_dir = getattr(args, "resume", None)  # named by the interruption message
    try:
        config = resolve_config(args)
        if getattr(args, "dry_run", False):
            sys.stdout.write(config_module.to_yaml(config))
            return 0
        if config.output is None:  # chosen now, so that an interruption can name it
            from rlhf_fast.train.run import default_run_dir

            config = dataclasses.replace(config, output=str(default_run_dir(config.stage)))
        run_dir = config.output
        _refuse_to_overwrite(config, resuming=hasattr(args, "resume"))
        from rlhf_fast.train.run import run_stage

        outcome = run_stage(config, resume=getattr(args, "resume", None))
    except (
        ConfigError, ModelLoadError, CheckpointError, DataError, TemplateError, RewardError
    ) as error:  # fmt: skip
        print(f"{PROG}: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader of our output left: cli.main exits quietly
        raise
    except OSError as error:  # the disk: full, read-only, permissions
        print(f"{PROG}: error: {_os_error(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        where = f"--resume {run_dir}" if run_dir else "--resume RUN_DIR"
        print(f"\n{PROG}: interrupted; continue with {where}", file=sys.stderr)
        return 130
    print("\n".join(_summary(outcome)))
    return 0


def _refuse_to_overwrite(config: TrainConfig, resuming: bool) -> None:
    if not config.output:
        return
    # the run directory is made after the model is built (minutes for a large one): a path it
    # can never be fails now, not then
    for path in (Path(config.output), *Path(config.output).parents):
        if path.exists() and not path.is_dir():
            raise ConfigError(f"--output {config.output}: {path} is a file, not a directory")
    if resuming:
        return
    from rlhf_fast.train.checkpoint import has_checkpoint

    subdirs = ("sft", "rm", "ppo") if config.stage == "all" else ("",)
    if any(has_checkpoint(Path(config.output) / sub) for sub in subdirs):
        raise ConfigError(
            f"--output {config.output} already holds a run: --resume {config.output} to "
            "continue it, or choose another --output"
        )


def _one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _os_error(error: OSError) -> str:
    where = f"{error.filename}: " if error.filename else ""
    return where + (error.strerror or _one_line(error))
