"""`rlhf-fast train` with no arguments: the built-in demo, SFT -> RM -> PPO on CPU.

    RUN/base/     the demo tokenizer (BPE trained on the task's text) + a tiny random Llama
    RUN/data/     sft.jsonl, rm.jsonl (K-wise rankings by the judge), prompts.jsonl,
                  eval_prompts.jsonl (questions no other file asks)
    RUN/sft/      SFT, every weight (the base is random: an adapter alone could not learn)
    RUN/rm/       reward model on RUN/sft/merged, every weight trained (LoRA alone stayed near
                  80% held-out accuracy on this tiny model); PPO therefore loads it beside the
                  shared base (`--stage all` with LoRA RMs shares one base for all four roles)
    RUN/ppo/      PPO; RUN/ppo/merged is the chat-ready model

It ends with a before/after table: the RM's held-out accuracy, and for the SFT policy (the
reference) and the PPO policy the held-out judge score and mean RM reward of answers sampled
at temperature 1 to the evaluation questions, and the KL of each to the reference.

`RLHF_FAST_DEMO_SCALE` (default 1) scales every step count and data size, for tests.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf_fast.chat import eos_ids
from rlhf_fast.demo import task
from rlhf_fast.demo.model import DemoModelConfig, build_model_dir
from rlhf_fast.models.prompt_format import prompt_token_ids
from rlhf_fast.train import config as config_module
from rlhf_fast.train.config import TrainConfig
from rlhf_fast.train.data import read_prompts
from rlhf_fast.train.ppo import PPOTrainer
from rlhf_fast.train.ppo_models import POLICY, PPOModels, build_ppo_models
from rlhf_fast.train.rollout import generate_rollouts
from rlhf_fast.train.run import CONFIG_FILE, run_stage
from rlhf_fast.train.sft import lora_settings

SCALE_ENV = "RLHF_FAST_DEMO_SCALE"


@dataclass(frozen=True)
class DemoPreset:
    """Hyper-parameters of the demo, tuned to finish in a few minutes on 2 CPU cores."""

    seed: int = 0
    sizes: task.DemoSizes = task.DemoSizes()
    sft: dict = dataclasses.field(
        default_factory=lambda: dict(
            lr=3e-3, batch_size=32, max_steps=1200, full_finetune=True,
            schedule="linear", warmup_steps=20, eval_fraction=0.05,
        )
    )  # fmt: skip
    # 1200 steps: at 800 the held-out accuracy moved between 90.5% and 96.9% with nothing but
    # the kernels' rounding (summation order, SIMD level); at 1200 it was 97.0-97.5% (AVX-512
    # and AVX2), for ~40 s more
    rm: dict = dataclasses.field(
        default_factory=lambda: dict(
            lr=1e-3, batch_size=16, max_steps=1200, full_finetune=True,
            schedule="cosine", warmup_steps=10, eval_fraction=0.1,
        )
    )  # fmt: skip
    # No score clip: this reward model's scores span about -10..+13, and a clip at 5 made every
    # good answer score the same (scratch, same SFT and RM: judge 0.40 -> 0.45 clipped at 5,
    # 0.40 -> 0.62 unclipped at lr 6e-4; lr 1e-3 drifted to KL 6 and longer, worse answers).
    ppo: dict = dataclasses.field(
        default_factory=lambda: dict(
            lr=6e-4, batch_size=32, max_steps=48, lora_r=16, lora_alpha=32.0,
            schedule="constant", ppo_epochs=2, mini_batch_size=16, max_new_tokens=16,
            kl_coef=0.05, score_clip=0.0, missing_eos_penalty=1.0, sample_every=4,
        )
    )  # fmt: skip
    eval_questions: int = 128

    def scaled(self, scale: float) -> DemoPreset:
        """Step counts and data sizes times `scale` (at least 2 steps; tests use ~0.05)."""
        if scale == 1:
            return self

        def steps(values: dict) -> dict:
            return {**values, "max_steps": max(2, math.ceil(values["max_steps"] * scale)),
                    "warmup_steps": 0}  # fmt: skip

        counts = dataclasses.astuple(self.sizes)
        sizes = task.DemoSizes(*(max(16, math.ceil(count * scale)) for count in counts))
        # the evaluation asks eval_questions (128) different questions at most, and the eval
        # split has only 369: more evaluation prompts would be unused, or impossible from 2.9x
        sizes = dataclasses.replace(
            sizes, eval_prompts=min(sizes.eval_prompts, self.sizes.eval_prompts)
        )
        return dataclasses.replace(
            self, sizes=sizes, sft=steps(self.sft), rm=steps(self.rm), ppo=steps(self.ppo),
            eval_questions=min(self.eval_questions, sizes.eval_prompts),
        )  # fmt: skip


@dataclass
class PolicyReport:
    judge: float  # mean judge score in [0, 1]
    reward: float  # mean RM score
    kl: float  # mean over answers of the summed per-token k1 KL to the reference
    ended: float  # share of answers that emitted EOS
    length: float  # mean answer tokens


@dataclass
class DemoReport:
    run_dir: Path
    rm_accuracy: float
    sft: PolicyReport
    ppo: PolicyReport
    chat_model: Path
    seconds: float
    stage_seconds: dict
    samples: list  # (question, SFT answer, PPO answer)


def demo_scale() -> float:
    raw = os.environ.get(SCALE_ENV, "1")
    try:
        scale = float(raw)
    except ValueError:
        raise ValueError(f"{SCALE_ENV} must be a number, got {raw!r}") from None
    if not 0 < scale <= 10:
        raise ValueError(f"{SCALE_ENV} must be in (0, 10], got {scale}")
    return scale


@torch.no_grad()
def evaluate_policy(
    models: PPOModels, questions: list[str], *, reference: bool, seed: int, max_new_tokens: int
) -> tuple[PolicyReport, list[str]]:
    """Sample one answer (temperature 1) per question from the PPO policy, or from the SFT
    model (reference=True: adapters disabled), and judge, score and measure it."""
    tokenizer = models.tokenizer
    models.use(POLICY)
    prompts = [prompt_token_ids(tokenizer, [{"role": "user", "content": q}]) for q in questions]
    generator = torch.Generator().manual_seed(seed)
    with models.reference() if reference else _nothing():
        out = generate_rollouts(
            models.model, prompts, pad_token_id=tokenizer.pad_token_id,
            eos_token_ids=sorted(eos_ids(models.model, tokenizer)), max_new_tokens=max_new_tokens,
            generator=generator, score_reference=not reference,
        )  # fmt: skip
    mask = out.response_mask
    answers = [tokenizer.decode(out.response[r][mask[r]], skip_special_tokens=True)
               for r in range(len(questions))]  # fmt: skip
    texts = [([{"role": "user", "content": q}], a, bool(e))
             for q, a, e in zip(questions, answers, out.ended.tolist(), strict=True)]  # fmt: skip
    scores = models.scores(out.sequences, out.attention_mask, texts)
    kl = 0.0 if reference else float(((out.logprobs - out.ref_logprobs) * mask).sum(1).mean())
    judged = [task.judge(q, a) for q, a in zip(questions, answers, strict=True)]
    report = PolicyReport(
        judge=sum(judged) / len(judged),
        reward=float(scores.mean()),
        kl=kl,
        ended=float(out.ended.float().mean()),
        length=float(mask.sum(1).float().mean()),
    )
    return report, answers


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _config(stage: str, values: dict, **paths) -> TrainConfig:
    return TrainConfig(stage=stage, device="cpu", save_every=0, max_length=96, **values, **paths)


def run_demo(output: str | Path | None = None, preset: DemoPreset | None = None) -> DemoReport:
    """Build the demo's model and data under `output`, run SFT -> RM -> PPO, evaluate."""
    started = time.perf_counter()
    preset = preset or DemoPreset().scaled(demo_scale())
    root = Path(output or Path("runs") / f"demo-{time.strftime('%Y%m%d-%H%M%S')}")
    root.mkdir(parents=True, exist_ok=True)
    base = build_model_dir(root / "base", task.task_texts(preset.seed), DemoModelConfig())
    data = task.write_demo_data(root / "data", preset.seed, preset.sizes)
    seconds = {}

    clock = time.perf_counter()
    sft = run_stage(_config("sft", preset.sft, model=str(base), data=str(data.sft),
                            output=str(root / "sft"), merge=True, seed=preset.seed))  # fmt: skip
    seconds["sft"] = time.perf_counter() - clock
    sft_model = sft.exports["merged"]

    clock = time.perf_counter()
    rm = run_stage(_config("rm", preset.rm, model=str(sft_model), data=str(data.rm),
                           output=str(root / "rm"), seed=preset.seed))  # fmt: skip
    seconds["rm"] = time.perf_counter() - clock
    rm_accuracy = rm.result.eval_metrics.get("accuracy", float("nan"))

    clock = time.perf_counter()
    ppo_config = _config("ppo", preset.ppo, model=str(sft_model), data=str(data.prompts),
                         reward_model=str(rm.exports["reward_model"]), output=str(root / "ppo"),
                         merge=True, seed=preset.seed)  # fmt: skip
    # built here rather than by run_ppo (the SFT policy is judged before PPO trains), so this
    # writes what run_ppo would: the validated config, which --resume RUN/ppo reads
    ppo_config = config_module.validate(ppo_config)
    (root / "ppo").mkdir(parents=True, exist_ok=True)
    config_module.write(ppo_config, root / "ppo" / CONFIG_FILE)
    models = build_ppo_models(sft_model, ppo_config.reward_model, lora_settings(ppo_config),
                              seed=preset.seed)  # fmt: skip
    questions = [e.messages[-1]["content"] for e in read_prompts(data.eval_prompts)]
    questions = questions[: preset.eval_questions]
    max_new = ppo_config.max_new_tokens
    before, sft_answers = evaluate_policy(models, questions, reference=True, seed=1,
                                          max_new_tokens=max_new)  # fmt: skip
    trainer = PPOTrainer(ppo_config, models, read_prompts(data.prompts), root / "ppo")
    torch.manual_seed(preset.seed)
    trainer.train()
    after, ppo_answers = evaluate_policy(models, questions, reference=False, seed=1,
                                         max_new_tokens=max_new)  # fmt: skip
    exports = trainer.export()
    seconds["ppo"] = time.perf_counter() - clock
    samples = list(zip(questions, sft_answers, ppo_answers, strict=True))[:4]
    return DemoReport(root, rm_accuracy, before, after, exports["merged"],
                      time.perf_counter() - started, seconds, samples)  # fmt: skip


def format_report(report: DemoReport) -> str:
    """The before/after table and how to chat with the result."""
    s, p = report.sft, report.ppo
    rows = [
        ("held-out judge score (0..1)", f"{s.judge:.3f}", f"{p.judge:.3f}"),
        ("mean RM reward", f"{s.reward:+.3f}", f"{p.reward:+.3f}"),
        ("KL to the reference (nats/answer)", f"{s.kl:.3f}", f"{p.kl:.3f}"),
        ("answers that end (EOS)", f"{s.ended:.0%}", f"{p.ended:.0%}"),
        ("mean answer tokens", f"{s.length:.1f}", f"{p.length:.1f}"),
    ]
    width = max(len(r[0]) for r in rows)
    times = ", ".join(f"{k} {v:.0f} s" for k, v in report.stage_seconds.items())
    lines = [
        "",
        f"demo finished in {report.seconds:.0f} s ({times}); run directory: {report.run_dir}",
        f"reward model held-out accuracy: {report.rm_accuracy:.1%}",
        "",
        f"{'':<{width}}  {'SFT policy':>10}  {'PPO policy':>10}",
        *(f"{name:<{width}}  {a:>10}  {b:>10}" for name, a, b in rows),
        "",
        "samples (held-out question: SFT answer | PPO answer):",
        *(f"  {q}: {a!r} | {b!r}" for q, a, b in report.samples),
        "",
        f"chat-ready model: {report.chat_model}",
        f"talk to it: rlhf-fast chat {report.chat_model}",
    ]
    return "\n".join(lines)
