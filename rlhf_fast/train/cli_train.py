"""`rlhf-fast train --stage sft|rm --model DIR --data FILE --output DIR [...]`.

The config is layered: defaults, then the run directory's config.yaml when resuming, then
`--config run.yaml`, then the flags given on the command line (one flag per TrainConfig
field, `lora_r` -> `--lora-r`). `--dry-run` prints the resolved config and stops. Every input
error (bad flag or config key, missing model directory, malformed data line, unreadable
checkpoint) is one line on stderr and exit code 2, before any training.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from rlhf_fast.train import config as config_module
from rlhf_fast.train.config import CHOICES, FIELDS, STAGES, ConfigError, TrainConfig, field_type

PROG = "rlhf-fast train"
_POSITIONAL_LIKE = ("stage", "model", "data", "output")  # shown first in --help
_METAVARS = {"model": "DIR", "data": "FILE", "output": "DIR", "lora_targets": "NAME"}


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "train",
        help="train a stage: sft (supervised fine-tuning) or rm (reward model)",
        description=(
            "Train one stage of the InstructGPT recipe on a local model directory: sft "
            "(loss on the answers) or rm (reward model on ranked answers or direct scores). "
            "Flags override --config run.yaml. With no arguments: the built-in demo (not "
            "available yet)."
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
        parser.add_argument(flag, choices=(*STAGES, "ppo", "all"), help=help_text)
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


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    """Defaults <- the resumed run's config.yaml <- --config file <- flags."""
    config = TrainConfig()
    resume = getattr(args, "resume", None)
    if resume is not None:
        run_dir = _resume_run_dir(Path(resume))
        config = config_module.load(run_dir / "config.yaml", config)
        config.output = str(run_dir)
    if getattr(args, "config", None) is not None:
        config = config_module.load(args.config, config)
    flags = {name: getattr(args, name) for name in FIELDS if hasattr(args, name)}
    return config_module.validate(config_module.apply(config, flags, "command line"))


def _no_arguments(args: argparse.Namespace) -> bool:
    return not any(hasattr(args, name) for name in (*FIELDS, "config", "resume", "dry_run"))


def _summary(outcome) -> list[str]:
    result, exports = outcome.result, outcome.exports
    lines = [f"trained {result.step} steps in {outcome.seconds:.1f} s; run directory: "
             f"{outcome.run_dir}"]  # fmt: skip
    if result.eval_metrics:
        shown = ", ".join(f"{k} {v:.4g}" for k, v in result.eval_metrics.items())
        lines.append(f"held-out: {shown}")
    for name, path in exports.items():
        lines.append(f"{name}: {path}")
    if outcome.config.stage == "sft":
        model = exports.get("merged", exports.get("adapter"))
        lines.append(f"next: rlhf-fast train --stage rm --model {model} --data RANKINGS.jsonl")
        if "merged" in exports:
            lines.append(f"  or: rlhf-fast chat {exports['merged']}")
    else:
        lines.append(
            "next: the PPO stage (a later issue) loads the reward model from "
            f"{exports.get('merged', exports.get('reward_model'))}"
        )
    return lines


def run(args: argparse.Namespace) -> int:
    if _no_arguments(args):
        print(
            f"{PROG}: error: the built-in demo (no arguments) is not available yet; "
            "run: rlhf-fast train --stage sft|rm --model DIR --data FILE [--output DIR]",
            file=sys.stderr,
        )
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local directories only: never wait on a hub
    # transformers' deprecation notices about its own internals (peft calls them) say nothing
    # the user can act on; they would only break up the progress output.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\.")
    from rlhf_fast.models.load import ModelLoadError
    from rlhf_fast.train.checkpoint import CheckpointError
    from rlhf_fast.train.data import DataError, TemplateError

    try:
        config = resolve_config(args)
        if getattr(args, "dry_run", False):
            sys.stdout.write(config_module.to_yaml(config))
            return 0
        _refuse_to_overwrite(config, resuming=hasattr(args, "resume"))
        from rlhf_fast.train.run import run_stage

        outcome = run_stage(config, resume=getattr(args, "resume", None))
    except (ConfigError, ModelLoadError, CheckpointError, DataError, TemplateError) as error:
        print(f"{PROG}: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted; continue with --resume", file=sys.stderr)
        return 130
    print("\n".join(_summary(outcome)))
    return 0


def _refuse_to_overwrite(config: TrainConfig, resuming: bool) -> None:
    if resuming or not config.output:
        return
    checkpoints = Path(config.output) / "checkpoints"
    if checkpoints.is_dir() and any(checkpoints.iterdir()):
        raise ConfigError(
            f"--output {config.output} already holds a run: --resume {config.output} to "
            "continue it, or choose another --output"
        )


def _one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
