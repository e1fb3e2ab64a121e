"""`rlhf-fast train --stage all`: SFT -> RM -> PPO, each stage's output feeding the next.

    RUN/sft/      --stage sft on --sft-data, merged (RUN/sft/merged is the SFT model)
    RUN/rm/       --stage rm on --rm-data, on top of RUN/sft/merged (adapter form, so PPO
                  shares the base with it)
    RUN/ppo/      --stage ppo on the prompts of --data, from RUN/sft/merged with the reward
                  model RUN/rm/reward_model; RUN/ppo/merged is the chat-ready model

Every input (model directory, the three data files, PPO-ptx data) is read and checked before
the first stage starts. The flags apply to every stage, except `ppo_steps` / `ppo_lr`, which
replace max_steps / lr for PPO when set. `--resume RUN` skips the stages that finished (their
exports completed) and resumes the one that was interrupted from its newest checkpoint.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from rlhf_fast.models.load import check_max_length
from rlhf_fast.train import config as config_module
from rlhf_fast.train.checkpoint import has_checkpoint
from rlhf_fast.train.config import ConfigError, TrainConfig
from rlhf_fast.train.data import read_prompts, read_sft


def check_inputs(config: TrainConfig) -> None:
    """Every input of the three stages, or the first error (before anything trains)."""
    check_max_length(config.model, config.max_length)
    for name in ("sft_data", "rm_data", "data"):
        if not getattr(config, name):
            raise ConfigError(f"--stage all needs --{name.replace('_', '-')} FILE")
    from rlhf_fast.train import rm

    read_sft(config.sft_data)
    rm.read_data(dataclasses.replace(config, data=config.rm_data))  # the kind fits --rm-loss
    read_prompts(config.data)
    if config.ptx_coef > 0 and config.ptx_data:
        read_sft(config.ptx_data)


def stage_configs(config: TrainConfig, root: Path) -> dict[str, TrainConfig]:
    """The config of each stage under RUN = root."""
    sft_model = str(root / "sft" / "merged")
    sft = dataclasses.replace(
        config, stage="sft", data=config.sft_data, output=str(root / "sft"), merge=True
    )
    rm = dataclasses.replace(
        config, stage="rm", model=sft_model, data=config.rm_data, output=str(root / "rm"),
        merge=False,
    )  # fmt: skip
    ppo = dataclasses.replace(
        config,
        stage="ppo",
        model=sft_model,
        data=config.data,
        reward_model=str(root / "rm" / "reward_model"),
        output=str(root / "ppo"),
        max_steps=config.ppo_steps or config.max_steps,
        lr=config.ppo_lr or config.lr,
        ptx_data=config.ptx_data or config.sft_data,
        merge=True,
    )
    return {"sft": sft, "rm": rm, "ppo": ppo}


_FINAL_EXPORT = {"sft": "merged", "rm": "reward_model", "ppo": "merged"}
# Written into a stage's directory once its exports are complete: an export directory alone
# may be one that a kill cut short (such a stage resumes from its final checkpoint and exports
# again, training no step).
DONE_FILE = ".stage_done"


def run_all(config: TrainConfig, *, resume=None):
    """Run the three stages into config.output; returns the PPO stage's StageOutcome with
    `.stages` = {stage: StageOutcome or None when skipped as already done}."""
    from rlhf_fast.train.run import CONFIG_FILE, default_run_dir, run_stage

    started = time.perf_counter()
    config = config_module.validate(config)
    root = Path(resume) if resume is not None else Path(config.output or default_run_dir("all"))
    config = dataclasses.replace(config, output=str(root))
    check_inputs(config)
    root.mkdir(parents=True, exist_ok=True)
    config_module.write(config, root / CONFIG_FILE)
    outcomes = {}
    for name, stage_config in stage_configs(config, root).items():
        stage_dir = Path(stage_config.output)
        if (stage_dir / DONE_FILE).is_file() and (stage_dir / _FINAL_EXPORT[name]).is_dir():
            outcomes[name] = None  # finished before the interruption
            continue
        stage_resume = stage_dir if has_checkpoint(stage_dir) else None
        outcomes[name] = run_stage(stage_config, resume=stage_resume)
        if outcomes[name].exports:
            (stage_dir / DONE_FILE).write_text("exports complete\n")
    last = outcomes["ppo"]
    if last is None:
        from rlhf_fast.train.loop import TrainResult
        from rlhf_fast.train.run import StageOutcome

        last = StageOutcome(config, root / "ppo", TrainResult(0, 0))
        last.exports = {"merged": root / "ppo" / "merged", "adapter": root / "ppo" / "adapter"}
    last.stages = outcomes
    last.all_dir = root
    last.seconds = time.perf_counter() - started
    return last
