"""Shared pieces of the trainer tests: toy data files, configs and parameter comparison.

The toy preference is separable by construction: answer k of a prompt holds (K-1-k) copies of
the marker word "sunny" among random filler words, so the best answer has the most markers and
every pair of a ranking is ordered by a rule a reward model can learn from the tokens.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from rlhf_fast.train.config import TrainConfig

WORDS = "the quick brown fox jumps over lazy dog hello weather".split()
MARKER = "sunny"


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def sft_records(count: int = 8) -> list[dict]:
    """Prompts that differ, one fixed answer: easy to fit in a few steps."""
    return [
        {"prompt": f"What is {WORDS[i % len(WORDS)]} {i}?", "response": "It is sunny and warm."}
        for i in range(count)
    ]


def ranked_records(count: int = 48, responses: int = 3, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for _ in range(count):
        answers = []
        for rank in range(responses):
            words = rng.sample(WORDS, 3)
            for _ in range(responses - 1 - rank):
                words.insert(rng.randrange(len(words) + 1), MARKER)
            answers.append(" ".join(words))
        records.append({"prompt": f"Say {rng.choice(WORDS)}", "responses": answers})
    return records


def scored_records(count: int = 24, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for _ in range(count):
        markers = rng.randrange(3)
        words = rng.sample(WORDS, 3) + [MARKER] * markers
        rng.shuffle(words)
        records.append({"prompt": "Say it", "response": " ".join(words), "score": float(markers)})
    return records


def config(stage: str, model: Path, data: Path, output: Path, **overrides) -> TrainConfig:
    values = dict(
        stage=stage,
        model=str(model),
        data=str(data),
        output=str(output),
        device="cpu",
        lr=1e-2,
        batch_size=4,
        max_steps=4,
        save_every=0,
        eval_fraction=0.0,
        max_length=64,
    )
    values.update(overrides)
    return TrainConfig(**values)


def trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same_parameters(first: dict, second: dict, atol: float = 1e-6) -> None:
    assert first.keys() == second.keys()
    for name in first:
        torch.testing.assert_close(first[name], second[name], atol=atol, rtol=1e-6, msg=name)


def pipeline_data(root: Path) -> dict[str, Path]:
    """The three inputs of `--stage all` in `root`: SFT answers, rankings, and prompts."""
    return {
        "sft": write_jsonl(root / "sft.jsonl", sft_records(6)),
        "ranked": write_jsonl(root / "ranked.jsonl", ranked_records(8)),
        "prompts": write_jsonl(root / "prompts.jsonl", [{"prompt": f"Say {w}"} for w in "abcd"]),
    }


# `rlhf-fast train` flags that keep a whole pipeline on a tiny model to a few seconds
SMALL_RUN_FLAGS = ["--device", "cpu", "--max-steps", "2", "--ppo-steps", "2", "--batch-size",
                   "2", "--max-new-tokens", "4", "--save-every", "0", "--eval-fraction", "0",
                   "--lr", "1e-3", "--max-length", "48"]  # fmt: skip


def record_step_gradients(monkeypatch) -> list[dict[int, torch.Tensor]]:
    """A list that gets, at each optimizer step of the training loop, the gradients it clips
    ({parameter index: gradient}); the clipping itself is skipped."""
    steps = []

    def capture(params, max_norm):
        steps.append({i: p.grad.clone() for i, p in enumerate(params) if p.grad is not None})
        return torch.tensor(0.0)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", capture)
    return steps


def assert_same_step_gradients(steps: list[dict[int, torch.Tensor]]) -> None:
    """Every recorded step's gradients equal the first's (to 1e-5 of its largest entry)."""
    whole = steps[0]
    scale = max(float(g.abs().max()) for g in whole.values())  # some entries are near 0
    for other in steps[1:]:
        assert other.keys() == whole.keys() and whole
        for index, expected in whole.items():
            torch.testing.assert_close(other[index], expected, rtol=0, atol=1e-5 * scale)
