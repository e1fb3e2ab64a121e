"""Judge a policy on the demo task: sample answers to held-out questions, score them.

This is the "held-out judge score" of the demo's before/after table. Answers are sampled
from the policy as PPO trains it (temperature 1 by default: the distribution whose reward PPO
raises) or greedily (temperature 0), in batches, seeded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rlhf_fast.chat import eos_ids
from rlhf_fast.demo.task import verdict
from rlhf_fast.models.prompt_format import prompt_token_ids
from rlhf_fast.train.rollout import generate_rollouts


@dataclass
class JudgeReport:
    score: float  # mean judge score in [0, 1]
    correct: float  # share of answers with each property
    formatted: float
    polite: float
    ended: float  # share of answers that emitted EOS
    mean_length: float  # answer tokens, EOS included
    samples: list[tuple[str, str, float]] = field(default_factory=list)  # a few rows to show


def judge_policy(
    model: torch.nn.Module,
    tokenizer,
    questions: list[str],
    *,
    temperature: float = 1.0,
    max_new_tokens: int = 24,
    batch_size: int = 64,
    seed: int = 0,
    show: int = 4,
) -> JudgeReport:
    """Answer every question once and judge the answers (see rlhf_fast/demo/task.py)."""
    if not questions:
        raise ValueError("questions is empty: nothing to judge")
    generator = torch.Generator().manual_seed(seed)
    answers, ended, lengths = [], [], []
    for start in range(0, len(questions), batch_size):
        chunk = questions[start : start + batch_size]
        prompts = [prompt_token_ids(tokenizer, [{"role": "user", "content": q}]) for q in chunk]
        out = generate_rollouts(
            model,
            prompts,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_ids=sorted(eos_ids(model, tokenizer)),  # where chat stops an answer
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            generator=generator,
            score_reference=False,
        )
        for row in range(len(chunk)):
            tokens = out.response[row][out.response_mask[row]].tolist()
            answers.append(tokenizer.decode(tokens, skip_special_tokens=True))
        ended += out.ended.tolist()
        lengths += out.response_mask.sum(1).tolist()
    verdicts = [verdict(q, a) for q, a in zip(questions, answers, strict=True)]
    count = len(verdicts)
    return JudgeReport(
        score=sum(v.score for v in verdicts) / count,
        correct=sum(v.correct for v in verdicts) / count,
        formatted=sum(v.formatted for v in verdicts) / count,
        polite=sum(v.polite for v in verdicts) / count,
        ended=sum(ended) / count,
        mean_length=sum(lengths) / count,
        samples=[(questions[i], answers[i], verdicts[i].score) for i in range(min(show, count))],
    )
