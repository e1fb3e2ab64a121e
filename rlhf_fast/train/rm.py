"""Reward-model stage: K-wise ranking loss (InstructGPT) or MSE on direct scores.

Ranked data ({"prompt", "responses": [best, ..., worst]} or chosen/rejected pairs, K=2): all K
answers of each prompt of a micro-batch go through the model in ONE forward pass of B*K rows
(RankCollator), and `rlhf_fast.ops.rank_loss(scores [B, K], present)` averages
-logsigmoid(r_i - r_j) over every valid pair i < j. Direct scores ({"prompt", "response",
"score"}) train with MSE. `rm_loss: auto` picks from the data.

Reported: accuracy (share of valid pairs with r_i > r_j) and mean margin r_i - r_j, on the
training micro-batches and on the held-out examples; MSE for direct scores.

Export: RUN_DIR/reward_model/ (adapter form) and with merge RUN_DIR/merged/ (merged form);
the directory format is documented in rlhf_fast/models/reward.py.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F

from rlhf_fast.models.load import attach_lora, load_backbone
from rlhf_fast.models.reward import RewardModel, load_reward_model, save_reward_model
from rlhf_fast.ops import rank_loss
from rlhf_fast.train.config import ConfigError, TrainConfig
from rlhf_fast.train.data import (
    RankCollator,
    ScoreCollator,
    ScoreExample,
    encode_ranking,
    encode_scored,
    read_rm,
    split_held_out,
)
from rlhf_fast.train.loop import Stage
from rlhf_fast.train.sft import lora_settings

REWARD_DIR = "reward_model"
MERGED_DIR = "merged"
EVAL_BATCH = 8


def read_data(config: TrainConfig) -> tuple[TrainConfig, list, list]:
    """(config with rm_loss resolved, train, held_out); DataError on the first bad line,
    ConfigError when the data kind does not fit rm_loss (ranked: 'rank', scores: 'mse')."""
    examples = read_rm(config.data)
    scored = isinstance(examples[0], ScoreExample)
    if config.rm_loss == "rank" and scored:
        raise ConfigError(f"{config.data}: direct scores train with --rm-loss mse, not rank")
    if config.rm_loss == "mse" and not scored:
        raise ConfigError(f"{config.data}: ranked answers train with --rm-loss rank, not mse")
    config = dataclasses.replace(config, rm_loss="mse" if scored else "rank")
    return (config, *split_held_out(examples, config.eval_fraction, config.seed))


def pair_statistics(scores: torch.Tensor, present: torch.Tensor) -> tuple[int, int, float]:
    """(correctly ordered pairs, valid pairs, sum of margins r_i - r_j) over pairs i < j of
    each row with both answers present; rows are best first."""
    better, worse = torch.triu_indices(scores.shape[1], scores.shape[1], 1, device=scores.device)
    valid = present[:, better] & present[:, worse]
    margins = (scores[:, better] - scores[:, worse])[valid]
    return int((margins > 0).sum()), int(valid.sum()), float(margins.sum())


def _rank_scores(model: RewardModel, batch: dict) -> torch.Tensor:
    present = batch["present"]
    scores = model(batch["input_ids"], batch["attention_mask"])
    return scores.view(present.shape)


def _rank_loss(model: RewardModel, batch: dict):
    scores = _rank_scores(model, batch)
    loss = rank_loss(scores, batch["present"])
    correct, pairs, margin = pair_statistics(scores.detach(), batch["present"])
    values = {"tokens": int(batch["attention_mask"].sum())}
    if pairs:
        values.update(accuracy=correct / pairs, margin=margin / pairs)
    return loss, values


def _mse_loss(model: RewardModel, batch: dict):
    predicted = model(batch["input_ids"], batch["attention_mask"])
    loss = F.mse_loss(predicted, batch["scores"].float())
    return loss, {"tokens": int(batch["attention_mask"].sum())}


def build(config: TrainConfig, tokenizer, train: list, held_out: list, device: str) -> Stage:
    """Encode the examples, load the decoder with LoRA + a value head, return the Stage."""
    scored = isinstance(train[0], ScoreExample)
    encode = encode_scored if scored else encode_ranking
    encoded = [encode(tokenizer, example, config.max_length) for example in train]
    held_encoded = [encode(tokenizer, example, config.max_length) for example in held_out]
    backbone = load_backbone(config.model, dtype=config.dtype, device=device, quant=config.quant)
    torch.manual_seed(config.seed)
    if config.full_finetune:  # every weight trains; exported in merged form
        model = RewardModel(backbone.requires_grad_(True)).to(device)
    else:
        model = RewardModel(attach_lora(backbone, lora_settings(config))).to(device)
    collate = (ScoreCollator if scored else RankCollator)(tokenizer.pad_token_id)
    step_loss = _mse_loss if scored else _rank_loss

    def evaluate() -> dict[str, float]:
        with torch.no_grad():
            if scored:
                return _evaluate_mse(model, collate, held_encoded, device)
            return _evaluate_rank(model, collate, held_encoded, device)

    return Stage(
        "rm",
        model,
        encoded,
        collate,
        lambda batch: step_loss(model, batch),
        evaluate if held_encoded else None,
        count=row_count if scored else pair_count,
    )


def pair_count(batch: dict) -> int:
    """The pairs rank_loss averages over: K(K-1)/2 per prompt of K answers."""
    answers = batch["present"].sum(1)
    return int((answers * (answers - 1) // 2).sum())


def row_count(batch: dict) -> int:
    return int(batch["scores"].numel())


def _batches(collate, items: list, device: str):
    for start in range(0, len(items), EVAL_BATCH):
        batch = collate(items[start : start + EVAL_BATCH])
        yield {k: v.to(device) for k, v in batch.items()}


def _evaluate_rank(model, collate, items, device) -> dict[str, float]:
    correct = pairs = 0
    margin = loss = 0.0
    for batch in _batches(collate, items, device):
        scores = _rank_scores(model, batch)
        batch_correct, batch_pairs, batch_margin = pair_statistics(scores, batch["present"])
        loss += rank_loss(scores, batch["present"]).item() * batch_pairs
        correct, pairs, margin = correct + batch_correct, pairs + batch_pairs, margin + batch_margin
    pairs = max(pairs, 1)
    return {"loss": loss / pairs, "accuracy": correct / pairs, "margin": margin / pairs}


def _evaluate_mse(model, collate, items, device) -> dict[str, float]:
    total, count = 0.0, 0
    for batch in _batches(collate, items, device):
        predicted = model(batch["input_ids"], batch["attention_mask"])
        total += F.mse_loss(predicted, batch["scores"].float(), reduction="sum").item()
        count += predicted.numel()
    return {"loss": total / max(count, 1)}


def export(model: RewardModel, tokenizer, run_dir: Path, config: TrainConfig) -> dict[str, Path]:
    """Write reward_model/ (adapter form) and with config.merge merged/ (merged form)."""
    paths = {"reward_model": run_dir / REWARD_DIR}
    save_reward_model(model, paths["reward_model"], base_model=config.model, tokenizer=tokenizer)
    if config.merge:
        paths["merged"] = run_dir / MERGED_DIR
        if config.quant != "none":  # int4/int8 codes cannot absorb the adapter: a dense copy
            model = load_reward_model(paths["reward_model"], dtype=config.dtype)
        save_reward_model(
            model, paths["merged"], base_model=config.model, tokenizer=tokenizer, merge=True
        )
    return paths
