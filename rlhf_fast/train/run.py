"""One stage end to end: check inputs, build, train (or resume), export.

Everything that can be wrong with the inputs (model directory, data lines, the checkpoint to
resume) is checked before the model is loaded, and before any training step. The run
directory gets config.yaml (the resolved config), metrics.jsonl, checkpoints/ and the exports.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rlhf_fast.models.load import check_max_length, load_tokenizer, resolve_device
from rlhf_fast.train import config as config_module
from rlhf_fast.train.checkpoint import load_checkpoint
from rlhf_fast.train.config import TrainConfig
from rlhf_fast.train.loop import TrainResult, train
from rlhf_fast.train.metrics import is_main_process

CONFIG_FILE = "config.yaml"


@dataclass
class StageOutcome:
    config: TrainConfig  # as resolved for this run
    run_dir: Path
    result: TrainResult
    exports: dict[str, Path] = field(default_factory=dict)  # empty when stopped early
    seconds: float = 0.0


def default_run_dir(stage: str) -> Path:
    """runs/<stage>-<timestamp>, or with -2, -3, ... when a run of the same second has it."""
    path = Path("runs") / f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}"
    candidate, number = path, 1
    while candidate.exists():
        number += 1
        candidate = path.with_name(f"{path.name}-{number}")
    return candidate


def _stage_module(stage: str):
    from rlhf_fast.train import rm, sft

    return {"sft": sft, "rm": rm}[stage]


def run_stage(
    config: TrainConfig,
    *,
    resume: str | Path | None = None,
    stop_after: int | None = None,
) -> StageOutcome:
    """Train config.stage into config.output (resolved to a directory) and export the result.
    `stop_after=N` stops after step N without exporting, as an interrupted run would."""
    if config.stage == "ppo":
        from rlhf_fast.train.ppo import run_ppo

        return run_ppo(config, resume=resume, stop_after=stop_after)
    if config.stage == "all":
        from rlhf_fast.train.pipeline import run_all

        return run_all(config, resume=resume)
    started = time.perf_counter()
    config = config_module.validate(config)
    run_dir = Path(config.output) if config.output else default_run_dir(config.stage)
    config = dataclasses.replace(config, output=str(run_dir))
    stage_module = _stage_module(config.stage)
    check_max_length(config.model, config.max_length)
    config, train_examples, held_out = stage_module.read_data(config)
    checkpoint = load_checkpoint(resume) if resume is not None else None
    tokenizer = load_tokenizer(config.model)
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    stage = stage_module.build(config, tokenizer, train_examples, held_out, device)
    if is_main_process():
        run_dir.mkdir(parents=True, exist_ok=True)
        config_module.write(config, run_dir / CONFIG_FILE)
    try:
        result = train(
            stage, config, run_dir, device=device, resume=checkpoint, stop_after=stop_after
        )
        exports = {}
        if result.step >= result.total_steps and is_main_process():
            exports = stage_module.export(stage.model, tokenizer, run_dir, config)
    finally:
        if config.offload:  # the streamed base's reader thread and slots
            from rlhf_fast.offload.training import close_streamed

            close_streamed(stage.model)
    return StageOutcome(config, run_dir, result, exports, time.perf_counter() - started)
