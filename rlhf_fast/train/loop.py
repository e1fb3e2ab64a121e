"""The optimizer loop the SFT and reward-model stages share.

A stage hands over a `Stage`: the module to train, its encoded training examples, a collate
function, a loss function and an evaluation function. The loop owns everything else: AdamW
over the trainable parameters, warmup then cosine/linear/constant learning rate, gradient
accumulation and clipping, metrics, progress, periodic evaluation, checkpoints and resume.

Data order: each epoch visits a permutation of the examples seeded by (seed, epoch); the data
position is (epoch, index into that permutation), so a resumed run picks the very next example.
Micro-batches run on across epoch ends. One optimizer step = `grad_accum` micro-batches.

Resume restores the trainable parameters, optimizer, scheduler, data position and every RNG
state of the checkpoint, so 2 steps + resume + 2 steps equals 4 uninterrupted steps.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from rlhf_fast.train import checkpoint as ckpt
from rlhf_fast.train.config import TrainConfig
from rlhf_fast.train.metrics import MetricsLog, Progress, is_main_process, weighted_mean

LossFn = Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, float]]]


@dataclass
class Stage:
    name: str
    model: nn.Module  # its parameters with requires_grad are trained
    examples: list  # encoded training examples, the collate function's items
    collate: Callable[[list], dict[str, torch.Tensor]]
    loss: LossFn  # (loss, metrics of the micro-batch; "tokens" is summed, others averaged)
    evaluate: Callable[[], dict[str, float]] | None = None
    # How many terms the loss of a micro-batch averages over (answer tokens, pairs, rows):
    # micro-batches are weighted by it, so that grad_accum micro-batches give the gradient of
    # the mean over all of the step's terms. None: every micro-batch counts the same.
    count: Callable[[dict[str, torch.Tensor]], int] | None = None


@dataclass
class TrainResult:
    step: int
    total_steps: int
    metrics: dict[str, float] = field(default_factory=dict)  # the last step's
    eval_metrics: dict[str, float] = field(default_factory=dict)  # the last evaluation's
    checkpoint: Path | None = None


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def total_steps(config: TrainConfig, num_examples: int) -> int:
    if config.max_steps:
        return config.max_steps
    per_epoch = math.ceil(num_examples / config.batch_size)
    return max(1, math.ceil(config.epochs * per_epoch / config.grad_accum))


def lr_factor(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    """Multiplier of the peak lr at scheduler step s: linear warmup, then the schedule's decay
    (cosine or linear to 0 at `total`, or constant)."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if schedule == "linear":
            return 1.0 - progress
        return 1.0

    return factor


class EpochSampler:
    """Batches of indices from a per-epoch permutation seeded by (seed, epoch).

    rank / world_size shard each batch's indices across data-parallel processes (every rank
    walks the same permutation and takes its share, so positions stay in step)."""

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if size <= 0:
            raise ValueError("no training examples")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self._cache: tuple[int, torch.Tensor] | None = None

    def permutation(self, epoch: int) -> torch.Tensor:
        if self._cache is None or self._cache[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._cache = (epoch, torch.randperm(self.size, generator=generator))
        return self._cache[1]

    def next_batch(self, position: dict) -> tuple[list[int], dict]:
        epoch, index = position["epoch"], position["index"]
        if index >= self.size:
            epoch, index = epoch + 1, 0
        order = self.permutation(epoch)
        end = min(self.size, index + self.batch_size * self.world_size)
        indices = order[index:end].tolist()[self.rank :: self.world_size]
        return indices, {"epoch": epoch, "index": end}


def micro_weights(stage: Stage, batches: list[dict]) -> list[float]:
    """Each micro-batch's share of the step's loss terms (see Stage.count); equal shares
    without a count, or when no micro-batch has a term."""
    counts = [stage.count(batch) for batch in batches] if stage.count is not None else []
    total = sum(counts)
    if total <= 0:
        return [1.0 / len(batches)] * len(batches)
    return [count / total for count in counts]


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def _restore(checkpoint: ckpt.Checkpoint, model: nn.Module, optimizer, scheduler) -> None:
    params = trainable_parameters(model)
    missing = sorted(set(params) - set(checkpoint.trainable))
    unexpected = sorted(set(checkpoint.trainable) - set(params))
    if missing or unexpected:
        name = (missing or unexpected)[0]
        what = "lacks" if missing else "has an unknown"
        raise ckpt.CheckpointError(
            f"{checkpoint.path}: does not match this model (it {what} parameter {name}); "
            "same --model and LoRA settings as the run it comes from?"
        )
    with torch.no_grad():
        for name, param in params.items():
            saved = checkpoint.trainable[name]
            if saved.shape != param.shape:
                raise ckpt.CheckpointError(
                    f"{checkpoint.path}: {name} has shape {tuple(saved.shape)}, "
                    f"the model's is {tuple(param.shape)}"
                )
            param.copy_(saved)
    try:
        optimizer.load_state_dict(checkpoint.optimizer)
        scheduler.load_state_dict(checkpoint.scheduler)
    except (KeyError, ValueError, TypeError) as error:
        raise ckpt.CheckpointError(f"{checkpoint.path}: bad optimizer state ({error})") from None


def _mean_metrics(parts: list[dict[str, float]], weights: list[float]) -> dict[str, float]:
    """The step's metrics: "tokens" summed; the others (means over a micro-batch's terms)
    averaged with the micro-batches' weights, as the gradient is (over the micro-batches that
    report the key: a micro-batch without pairs has no accuracy)."""
    merged: dict[str, float] = {}
    for key in {k for part in parts for k in part}:
        pairs = [(p[key], w) for p, w in zip(parts, weights, strict=True) if key in p]
        merged[key] = sum(value for value, _ in pairs) if key == "tokens" else weighted_mean(pairs)
    return merged


def train(
    stage: Stage,
    config: TrainConfig,
    run_dir: str | Path,
    *,
    device: torch.device | str,
    resume: ckpt.Checkpoint | None = None,
    stop_after: int | None = None,
) -> TrainResult:
    """Run the optimizer loop to total_steps (or `stop_after` steps, as if interrupted)."""
    run_dir, device = Path(run_dir), torch.device(device)
    params = trainable_parameters(stage.model)
    optimizer = torch.optim.AdamW(
        list(params.values()), lr=config.lr, weight_decay=config.weight_decay
    )
    total = total_steps(config, len(stage.examples))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_factor(config.schedule, config.warmup_steps, total)
    )
    sampler = EpochSampler(len(stage.examples), config.batch_size, config.seed)
    step, position = 0, {"epoch": 0, "index": 0}
    if resume is not None:
        _restore(resume, stage.model, optimizer, scheduler)
        step, position = resume.step, dict(resume.position)
        ckpt.restore_rng(resume.rng["json"], resume.rng["tensors"])  # last: nothing draws after
    # rows past `step` are a killed or earlier run's (a fresh start: all of them), dropped,
    # and so are (set aside) its checkpoints past it
    if is_main_process():
        ckpt.set_aside_later(run_dir, step)
    metrics_log = MetricsLog(run_dir, resume_step=step)
    progress = Progress(total, initial=step, description=stage.name)
    result = TrainResult(step=step, total_steps=total)
    try:
        while step < total and (stop_after is None or step < stop_after):
            started = time.perf_counter()
            stage.model.train()
            optimizer.zero_grad(set_to_none=True)
            parts, batches = [], []
            for _ in range(config.grad_accum):
                indices, position = sampler.next_batch(position)
                batches.append(stage.collate([stage.examples[i] for i in indices]))
            weights = micro_weights(stage, batches)
            for batch, weight in zip(batches, weights, strict=True):
                batch = _to_device(batch, device)
                loss, values = stage.loss(batch)
                (loss * weight).backward()
                parts.append({"loss": loss.item(), **values})
            grad_norm = None
            if config.max_grad_norm > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    list(params.values()), config.max_grad_norm
                ).item()
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            step += 1
            values = _mean_metrics(parts, weights)
            seconds = time.perf_counter() - started
            values["tok/s"] = values.get("tokens", 0) / max(seconds, 1e-9)
            record = {"step": step, "epoch": position["epoch"], "lr": lr, **values}
            if grad_norm is not None:
                record["grad_norm"] = grad_norm
            if stage.evaluate is not None and (
                step == total or (config.eval_every and step % config.eval_every == 0)
            ):
                stage.model.eval()
                result.eval_metrics = stage.evaluate()
                record.update({f"eval_{k}": v for k, v in result.eval_metrics.items()})
            evaluated = any(key.startswith("eval_") for key in record)
            if step % config.log_every == 0 or step == total or evaluated:
                metrics_log.log(record)
            shown = {k: v for k, v in record.items() if k in _SHOWN}
            progress.update(step, shown)
            result.metrics = values
            if (config.save_every and step % config.save_every == 0) or step == total:
                if is_main_process():
                    result.checkpoint = ckpt.save_checkpoint(
                        run_dir,
                        step=step,
                        position=position,
                        trainable=params,
                        optimizer=optimizer,
                        scheduler=scheduler,
                        keep=config.keep_checkpoints,
                    )
    finally:
        progress.close()
        metrics_log.close()
    stage.model.eval()
    result.step = step
    return result


_SHOWN = ("loss", "accuracy", "eval_loss", "eval_accuracy", "tok/s")
