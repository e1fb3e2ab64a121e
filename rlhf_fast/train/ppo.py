"""PPO stage (InstructGPT step 3) on the shared base of ppo_models.py.

One step:
  1. rollout: `batch_size` prompts (an epoch permutation, as the other stages), one sampled
     answer each with the KV cache (rollout.py), the policy's and the reference's log-probs
     (the reference is the policy with its adapters disabled), the critic's values, and the
     reward model's score of each whole answer; where the first PPO epoch is a single
     micro-batch (no mini_batch_size, grad_accum 1), the policy's log-probs and the values
     come from that epoch's training forward, run here with autograd and reused by step 4;
  2. rewards: per-token KL penalty -kl_coef * KL (k1 or k3) plus the clipped score on the last
     token, less `missing_eos_penalty` for answers that never emitted EOS; the KL coefficient
     is fixed or follows Ziegler et al.'s adaptive controller (`kl_target` > 0);
  3. advantages: `rlhf_fast.ops.gae`, whitened over the batch's tokens; returns = A + V;
  4. `ppo_epochs` passes over the batch in minibatches of `mini_batch_size` rows (one optimizer
     step each, in `grad_accum` micro-batches): clipped policy loss + vf_coef * clipped value
     loss (+ ptx_coef * SFT loss on a batch of `ptx_data`: PPO-ptx).

Metrics of every `log_every`-th step go to metrics.jsonl (reward, KL, non-score reward,
losses, clip fractions, approx-KL, entropy: token means over the step's minibatches; answer
length, rollout vs train seconds and tokens/s, peak RSS), a few (prompt, answer, score) rows
every `sample_every` steps to samples.jsonl.

Checkpoints hold the policy and critic adapters, the critic head, the optimizer, scheduler, KL
controller, data positions and RNG states; sampling and minibatch order are seeded by (seed,
step), so a resumed run repeats an uninterrupted one. Export: RUN_DIR/adapter (the policy's
peft adapter on the SFT model) and with merge RUN_DIR/merged (chat-ready).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf_fast.chat import eos_ids
from rlhf_fast.lora import fuse, unfuse
from rlhf_fast.models.load import check_max_length, check_model_dir, resolve_device
from rlhf_fast.models.prompt_format import TemplateError, prompt_token_ids
from rlhf_fast.train import checkpoint as ckpt
from rlhf_fast.train import config as config_module
from rlhf_fast.train.config import ConfigError, TrainConfig
from rlhf_fast.train.data import DataError, SFTCollator, encode_sft, read_prompts, read_sft
from rlhf_fast.train.loop import EpochSampler, TrainResult, lr_factor
from rlhf_fast.train.metrics import (
    MetricsLog,
    Progress,
    is_main_process,
    rewrite_lines,
    weighted_mean,
)
from rlhf_fast.train.ppo_math import (
    AdaptiveKLController,
    FixedKLController,
    advantages_and_returns,
    entropy_from_logits,
    per_token_kl,
    policy_loss,
    ppo_ptx_loss,
    shaped_rewards,
    token_logprobs,
    value_loss,
)
from rlhf_fast.train.ppo_models import (
    CRITIC,
    POLICY,
    REWARD,
    PPOModels,
    build_ppo_models,
    disable_dropout,
)
from rlhf_fast.train.rollout import (
    Rollout,
    choose_decoder,
    generate_rollouts,
    masked_logprobs,
    sampling_logprobs_exact,
)
from rlhf_fast.train.sft import lora_settings, merge_for_export, token_loss

SAMPLES_FILE = "samples.jsonl"
SAMPLE_ROWS = 4
ADAPTER_DIR = "adapter"
MERGED_DIR = "merged"
# Test hook (tests/test_ppo_kill_resume.py): "STEP:FILE" makes the trainer, inside 1-based
# step STEP just after that step's first optimizer update (adapters and optimizer moments
# half-updated, nothing of the step saved or logged), create FILE and sleep, so that a test
# can SIGKILL it mid-step. Unset (always, outside that test): nothing happens.
PAUSE_ENV = "RLHF_FAST_TEST_PPO_PAUSE"


class RewardError(ValueError):
    """A score that is not a finite number (one line naming the prompt's FILE:LINE)."""


@dataclass
class Experience:
    """One rollout batch with everything the PPO epochs need (all [B, ...], on the device)."""

    query: torch.Tensor
    query_mask: torch.Tensor
    response: torch.Tensor
    response_mask: torch.Tensor
    logprobs: torch.Tensor
    values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor


@dataclass
class TrainingForward:
    """The PPO training forward of some rows: the policy's log-probs of the answer tokens
    [b, w] and its logits [b, w, V], the critic's values [b, w], the answers [b, w] and their
    mask cut to the rows' longest (w), and the tokens in the pass (stats)."""

    logprobs: torch.Tensor
    logits: torch.Tensor
    values: torch.Tensor
    response: torch.Tensor
    response_mask: torch.Tensor
    tokens: int


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def total_ppo_steps(config: TrainConfig, num_prompts: int) -> int:
    if config.max_steps:
        return config.max_steps
    return max(1, math.ceil(config.epochs * num_prompts / config.batch_size))


def make_kl_controller(config: TrainConfig):
    if config.kl_target > 0:
        return AdaptiveKLController(config.kl_coef, config.kl_target, config.kl_horizon)
    return FixedKLController(config.kl_coef)


class SamplesLog:
    """samples.jsonl: a few rows per sampled step (a resumed run drops rows past its step)."""

    def __init__(self, run_dir: Path, resume_step: int | None) -> None:
        self.path = run_dir / SAMPLES_FILE
        self.enabled = is_main_process()
        if self.enabled and resume_step is not None and self.path.is_file():
            lines = self.path.read_text().splitlines()
            rewrite_lines(self.path, [line for line in lines if _step_of(line) <= resume_step])

    def write(self, rows: list[dict]) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.writelines(json.dumps(row) + "\n" for row in rows)


def _pause_request() -> tuple[int, Path] | None:
    raw = os.environ.get(PAUSE_ENV)
    if not raw:
        return None
    step, sep, file = raw.partition(":")
    if not (sep and step.isdigit() and file):
        raise ValueError(f"{PAUSE_ENV} must be STEP:FILE, got {raw!r}")
    return int(step), Path(file)


def _pause_for_test(marker: Path) -> None:
    marker.write_text("paused\n")
    time.sleep(600)  # the test kills the process long before this ends


def _prompt_ids(tokenizer, example) -> list[int]:
    """The prompt's token ids; a conversation the chat template rejects is FILE:LINE: why."""
    try:
        return prompt_token_ids(tokenizer, example.messages)
    except TemplateError as error:
        if example.source:
            raise DataError(example.source, str(error)) from None
        raise


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return 1 << 62  # a line cut short by a kill: dropped


class PPOTrainer:
    """The PPO loop over `prompts` (PromptExample list) with `models` (PPOModels)."""

    def __init__(
        self,
        config: TrainConfig,
        models: PPOModels,
        prompts: list,
        run_dir: str | Path,
        *,
        device: str = "cpu",
        ptx_examples: list | None = None,
        reward_fn=None,
    ) -> None:
        """reward_fn(rollout, texts) -> scores [B], when given, replaces the reward model
        (a programmatic reward; texts are (messages, decoded answer, ended) per row)."""
        self.config, self.models, self.device = config, models, torch.device(device)
        self.run_dir = Path(run_dir)
        self.tokenizer = models.tokenizer
        self.prompts = prompts
        self.reward_fn = reward_fn
        keep = max(1, config.max_length - config.max_new_tokens)
        self.prompt_ids = [_prompt_ids(self.tokenizer, example)[-keep:] for example in prompts]
        # where chat ends an answer: the tokenizer's EOS and the generation_config's stop ids
        self.eos_token_ids = sorted(eos_ids(models.model, self.tokenizer))
        self.total = total_ppo_steps(config, len(prompts))
        disable_dropout(models)  # the rollouts' log-probs and values had none
        self.params = models.trainable()
        # foreach: one fused update over the many small adapter tensors (not a Python loop)
        self.optimizer = torch.optim.AdamW(
            list(self.params.values()), lr=config.lr, weight_decay=config.weight_decay,
            foreach=True,
        )  # fmt: skip
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_factor(config.schedule, config.warmup_steps, self.total)
        )
        self.kl_controller = make_kl_controller(config)
        if config.rollout_quant != "none":  # a model the lean decoder cannot run: say so now
            try:
                choose_decoder(models.model, quant=config.rollout_quant)
            except ValueError as error:
                raise ConfigError(f"--rollout-quant {config.rollout_quant}: {error}") from None
        self.sampler = EpochSampler(len(prompts), config.batch_size, config.seed)
        self.ptx = None
        if config.ptx_coef > 0 and ptx_examples:
            encoded = [encode_sft(self.tokenizer, e, config.max_length) for e in ptx_examples]
            self.ptx = (encoded, SFTCollator(self.tokenizer.pad_token_id))
            self.ptx_sampler = EpochSampler(len(encoded), config.batch_size, config.seed + 1)
        self.step = 0
        self.position = {"epoch": 0, "index": 0, "ptx": {"epoch": 0, "index": 0}}
        self._pause = _pause_request()
        # (step, TrainingForward, its seconds): the first epoch's forward, run by the rollout
        # of that step; its time counts as training in the metrics (rollout_s, train_s)
        self._first_forward: tuple[int, TrainingForward, float] | None = None

    # ------------------------------------------------------------------ rollout

    def _generator(self, step: int, salt: int = 0) -> torch.Generator:
        return torch.Generator().manual_seed(self.config.seed * 1_000_003 + step * 7919 + salt)

    @torch.no_grad()
    def rollout(self, indices: list[int], step: int) -> tuple[Experience, dict, list[dict]]:
        config, models = self.config, self.models
        models.eval()
        models.use(POLICY)
        started = time.perf_counter()
        generate, keywords = generate_rollouts, {}
        if getattr(models.model, "rlhf_fast_offload", None) is not None:  # streamed base
            from rlhf_fast.offload.rollout import generate_offloaded_rollouts as generate
        # The reference, the critic, the shared reward model (and the policy, where sampling
        # rounds otherwise) score the answers in one stacked pass of the base, not one each.
        stacked = generate is generate_rollouts and models.stacks_roles()
        rescore_policy = False
        if stacked:
            path = choose_decoder(models.model, quant=config.rollout_quant)
            rescore_policy = not sampling_logprobs_exact(models.model, path, config.rollout_quant)
            keywords = {"score_reference": False, "exact_logprobs": False}
        out = self._generate(
            generate,
            [self.prompt_ids[i] for i in indices],
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_ids=self.eos_token_ids,
            max_new_tokens=config.max_new_tokens,
            temperature=config.temperature,
            top_k=config.top_k,
            generator=self._generator(step),
            quant=config.rollout_quant,
            **keywords,
        )
        generated = time.perf_counter()
        mask = out.response_mask
        sequences, attention = out.sequences, out.attention_mask
        if stacked:
            out, values, shared_scores = self._stacked_scores(out, rescore_policy, step)
        else:
            values = models.critic_values(sequences, attention, out.query.shape[1])
        answers = [
            self.tokenizer.decode(out.response[row][mask[row]], skip_special_tokens=True)
            for row in range(len(indices))
        ]
        texts = [
            (self.prompts[i].messages, answers[row], bool(out.ended[row]))
            for row, i in enumerate(indices)
        ]
        if self.reward_fn is not None:
            scores = self.reward_fn(out, texts).float()
        elif stacked and shared_scores is not None:
            scores = shared_scores.float()
        else:
            scores = models.scores(sequences, attention, texts, config.max_length).float()
        models.use(POLICY)
        self._check_scores(scores, indices, step)
        kl = per_token_kl(out.logprobs, out.ref_logprobs, mask, config.kl_estimator)
        shaped = shaped_rewards(
            scores,
            kl,
            mask,
            kl_coef=self.kl_controller.coef,
            score_clip=config.score_clip or None,
            ended=out.ended,
            missing_eos_penalty=config.missing_eos_penalty,
        )
        advantages, returns = advantages_and_returns(
            shaped.rewards, values, mask, gamma=config.gamma, lam=config.lam
        )
        sequence_kl = kl.sum(1).mean().item()
        metrics = {
            "reward": scores.mean().item(),
            "reward_std": scores.std().item() if len(indices) > 1 else 0.0,
            "score": shaped.scores.mean().item(),
            "kl": sequence_kl,
            "kl_coef": self.kl_controller.coef,
            "non_score_reward": shaped.non_score_rewards.sum(1).mean().item(),
            "response_length": mask.sum(1).float().mean().item(),
            "ended": out.ended.float().mean().item(),
            "rollout_s": time.perf_counter() - started - self._first_forward_seconds(step),
            "rollout_tok/s": int(mask.sum()) / max(generated - started, 1e-9),
        }
        self.kl_controller.update(sequence_kl, len(indices))
        samples = [
            {"step": step + 1, "prompt": self.prompts[i].messages[-1]["content"],
             "response": answers[row], "score": float(scores[row])}
            for row, i in enumerate(indices[:SAMPLE_ROWS])
        ]  # fmt: skip
        experience = Experience(
            out.query, out.query_mask, out.response, mask, out.logprobs, values, advantages,
            returns,
        )  # fmt: skip
        return experience, metrics, samples

    def _generate(self, generate, *args, **kwargs) -> Rollout:
        # The fused LoRA op pays off in training (memory saved for backward); without a
        # backward, and at the few rows of a decode step, peft's own forward is faster
        # (measured: 5 ms vs 80 ms a decode step of the bench's policy), so sampling uses it.
        refuse = unfuse(self.models.model) > 0
        try:
            return generate(self.models.model, *args, **kwargs)
        finally:
            if refuse:
                fuse(self.models.model)

    def _micro_batch_rows(self, batch: int) -> tuple[int, int]:
        """(minibatch rows, micro-batch rows) of the PPO epochs over a batch of `batch` rows."""
        mini = min(self.config.mini_batch_size or batch, batch)
        return mini, max(1, math.ceil(mini / self.config.grad_accum))

    def _first_forward_seconds(self, step: int) -> float:
        """Seconds of step `step`'s first-epoch forward that its rollout ran, else 0."""
        if self._first_forward is None or self._first_forward[0] != step:
            return 0.0
        return self._first_forward[2]

    def _first_forward_reusable(self, batch: int) -> bool:
        """Whether the rollout can run the first PPO epoch's training forward (see
        _stacked_scores): that epoch must be one micro-batch of all `batch` rows, at the
        parameters the rollout sampled with (after the first of several optimizer steps or
        micro-batches, each forward sees updated adapters or other rows)."""
        return self.config.ppo_epochs > 0 and self._micro_batch_rows(batch)[1] == batch

    def _stacked_scores(self, out: Rollout, rescore_policy: bool, step: int):
        """(out with the reference's log-probs, and the policy's too with rescore_policy;
        values [B, R]; the shared reward model's scores [B] or None) from one stacked pass.

        Where the first PPO epoch is one micro-batch of all rows (_first_forward_reusable),
        the policy and the critic instead run that epoch's training forward here, with
        autograd, in its row order, and optimize() starts from its graph: the old log-probs
        and values are that forward's, as a separate scoring pass would compute them (so
        the first epoch's ratios are exactly 1), and one of the step's forwards of the two
        trained roles is saved. The reference and the reward model run as a no-grad stacked
        pass before it, so their activations are gone when the graph is built."""
        models, query_width = self.models, out.query.shape[1]
        with_reward = self.reward_fn is None and models.reward_head is not None
        reuse = self._first_forward_reusable(out.query.shape[0])
        trained = [] if reuse else [POLICY] * rescore_policy + [CRITIC]
        roles = trained + [None] + [REWARD] * with_reward
        mask = out.attention_mask
        hidden = dict(zip(roles, models.stacked_hidden(out.sequences, mask, roles), strict=True))

        def logprobs(role):
            logits = models.response_logits_of(hidden[role], query_width)
            return masked_logprobs(logits, out.response, out.response_mask, self.config.temperature)

        scores = models.scores_of(hidden[REWARD], mask) if with_reward else None
        ref_logprobs = logprobs(None)
        if not reuse:
            out = dataclasses.replace(
                out,
                ref_logprobs=ref_logprobs,
                logprobs=logprobs(POLICY) if rescore_policy else out.logprobs,
            )
            return out, models.values_of(hidden[CRITIC], query_width), scores
        hidden.clear()  # before the graph is built: the peak is the training forward's
        rows = self._epoch_order(step, 0, out.query.shape[0])
        models.train()  # as optimize() runs it (gradient checkpointing applies in train mode)
        forward_started = time.perf_counter()
        try:
            with torch.enable_grad():
                forward = self._training_forward(out, rows)
        finally:
            models.eval()
        self._first_forward = (step, forward, time.perf_counter() - forward_started)
        old_logprobs = torch.zeros_like(out.logprobs)
        values = torch.zeros_like(out.logprobs)
        width = forward.response.shape[1]
        answered = forward.response_mask
        old_logprobs[rows, :width] = torch.where(answered, forward.logprobs.detach(), 0.0)
        values[rows, :width] = forward.values.detach().to(values.dtype)
        out = dataclasses.replace(out, ref_logprobs=ref_logprobs, logprobs=old_logprobs)
        return out, values, scores

    def _check_scores(self, scores: torch.Tensor, indices: list[int], step: int) -> None:
        """A NaN or infinite score would turn every advantage, then the adapters, into NaN
        (the failure only showing one step later, as unsampleable logits): stop here."""
        bad = ~torch.isfinite(scores)
        if not bool(bad.any()):
            return
        row = int(bad.nonzero()[0])
        example = self.prompts[indices[row]]
        where = example.source or f"prompt {indices[row]}"
        scorer = "reward function" if self.reward_fn is not None else "reward model"
        raise RewardError(
            f"{where}: the {scorer} scored this prompt's answer {float(scores[row])} at PPO "
            f"step {step + 1} ({int(bad.sum())} of {len(indices)} rows); scores must be finite"
        )

    # ------------------------------------------------------------------ optimize

    def _ptx_loss(self, rows: int) -> torch.Tensor:
        encoded, collate = self.ptx
        self.ptx_sampler.batch_size = rows
        indices, self.position["ptx"] = self.ptx_sampler.next_batch(self.position["ptx"])
        batch = collate([encoded[i] for i in indices])
        batch = {k: v.to(self.device) for k, v in batch.items()}
        self.models.use(POLICY)
        return token_loss(self.models.model, batch)

    def _epoch_order(self, step: int, epoch: int, rows: int) -> torch.Tensor:
        """The order of a batch's `rows` in PPO epoch `epoch` of step `step` (seeded:
        resumable)."""
        return torch.randperm(rows, generator=self._generator(step, 1 + epoch))

    def _training_forward(self, batch, rows: torch.Tensor) -> TrainingForward:
        """The policy's log-probs and logits and the critic's values of `rows` of `batch` (an
        Experience or a Rollout), differentiable where autograd is on."""
        query_mask = batch.query_mask[rows]
        first = int(query_mask.any(0).nonzero()[0])  # drop columns of padding only
        response_mask = batch.response_mask[rows]
        width = max(1, int(response_mask.sum(1).max()))
        query, query_mask = batch.query[rows][:, first:], query_mask[:, first:]
        response, response_mask = batch.response[rows][:, :width], response_mask[:, :width]
        sequences = torch.cat([query, response], 1)
        mask = torch.cat([query_mask, response_mask], 1)
        logits, values = self.models.policy_and_critic(sequences, mask, query.shape[1])
        temperature = self.config.temperature if self.config.temperature > 0 else 1.0
        logprobs = token_logprobs(logits, response, temperature)
        return TrainingForward(logprobs, logits, values, response, response_mask, int(mask.sum()))

    def _micro_losses(
        self, exp: Experience, rows: torch.Tensor, forward: TrainingForward | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
        """(PPO loss: token means over these rows, the ptx SFT loss or None, stats); forward:
        these rows' training forward when the rollout already ran it."""
        config = self.config
        forward = forward or self._training_forward(exp, rows)
        logprobs, logits, values = forward.logprobs, forward.logits, forward.values
        response_mask, width = forward.response_mask, forward.response.shape[1]
        temperature = config.temperature if config.temperature > 0 else 1.0
        pol = policy_loss(
            logprobs, exp.logprobs[rows][:, :width], exp.advantages[rows][:, :width],
            response_mask, config.clip_range,
        )  # fmt: skip
        val = value_loss(
            values, exp.values[rows][:, :width], exp.returns[rows][:, :width], response_mask,
            config.value_clip,
        )  # fmt: skip
        loss = pol.loss + config.vf_coef * val.loss
        stats = {
            "policy_loss": pol.loss.item(),
            "value_loss": val.loss.item(),
            "clip_frac": pol.clip_fraction.item(),
            "value_clip_frac": val.clip_fraction.item(),
            "approx_kl": pol.approx_kl.item(),
            # of the distribution that drew the tokens (the stored log-probs' temperature)
            "entropy": entropy_from_logits(
                logits.detach() / temperature if temperature != 1.0 else logits.detach(),
                response_mask,
            ).item(),
            "tokens": forward.tokens,
        }
        sft_loss = None
        if self.ptx is not None:
            sft_loss = self._ptx_loss(len(rows))
            stats["ptx_loss"] = sft_loss.item()
        return loss, sft_loss, stats

    def optimize(self, exp: Experience, step: int) -> dict:
        config = self.config
        self.models.train()
        batch = exp.query.shape[0]
        mini, micro = self._micro_batch_rows(batch)
        parts = []
        first_step, first_forward, _ = self._first_forward or (None, None, 0.0)
        self._first_forward = None
        for epoch in range(config.ppo_epochs):
            order = self._epoch_order(step, epoch, batch)
            for start in range(0, batch, mini):
                minibatch = order[start : start + mini]
                self.optimizer.zero_grad(set_to_none=True)
                # The PPO losses are means over tokens: each micro-batch counts by its share of
                # the minibatch's tokens, so that the gradient is the minibatch's (whatever
                # grad_accum is); the ptx loss is a mean over its own rows.
                tokens = exp.response_mask[minibatch.to(self.device)].sum().clamp(min=1)
                for rows in minibatch.split(micro):
                    rows = rows.to(self.device)
                    reused = first_forward if epoch == 0 and first_step == step else None
                    loss, sft_loss, stats = self._micro_losses(exp, rows, reused)
                    answer_tokens = exp.response_mask[rows].sum()
                    loss = loss * (answer_tokens / tokens)
                    if sft_loss is not None:
                        sft_loss = sft_loss * (len(rows) / len(minibatch))
                        loss = ppo_ptx_loss(loss, sft_loss, config.ptx_coef)
                    loss.backward()
                    parts.append((stats, int(answer_tokens), len(rows)))
                if config.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(list(self.params.values()), config.max_grad_norm)
                self.optimizer.step()
                if self._pause is not None and self._pause[0] == step + 1:
                    _pause_for_test(self._pause[1])
        self.models.eval()
        return _merged_stats(parts)

    # ------------------------------------------------------------------ loop

    def restore(self, checkpoint: ckpt.Checkpoint) -> None:
        missing = sorted(set(self.params) ^ set(checkpoint.trainable))
        if missing:
            raise ckpt.CheckpointError(
                f"{checkpoint.path}: does not match this PPO model (parameter {missing[0]}); "
                "same --model, --reward-model and LoRA settings as the run it comes from?"
            )
        with torch.no_grad():
            for name, param in self.params.items():
                saved = checkpoint.trainable[name]
                if saved.shape != param.shape:  # e.g. --lora-r changed on --resume
                    raise ckpt.CheckpointError(
                        f"{checkpoint.path}: {name} has shape {tuple(saved.shape)}, the "
                        f"model's is {tuple(param.shape)}; same LoRA settings as that run?"
                    )
                param.copy_(saved)
        try:
            self.optimizer.load_state_dict(checkpoint.optimizer)
            self.scheduler.load_state_dict(checkpoint.scheduler)
            self.kl_controller.load_state_dict(checkpoint.extra["kl_controller"])
        except (KeyError, ValueError, TypeError) as error:
            raise ckpt.CheckpointError(f"{checkpoint.path}: bad PPO state ({error})") from None
        self.step, self.position = checkpoint.step, dict(checkpoint.position)
        self.position.setdefault("ptx", {"epoch": 0, "index": 0})
        ckpt.restore_rng(checkpoint.rng["json"], checkpoint.rng["tensors"])

    def train(
        self, resume: ckpt.Checkpoint | None = None, stop_after: int | None = None
    ) -> TrainResult:
        config = self.config
        if resume is not None:
            self.restore(resume)
        resume_step = self.step  # rows past it: a killed or earlier run's (fresh: all)
        if is_main_process():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            ckpt.set_aside_later(self.run_dir, resume_step)  # and its checkpoints past it
        metrics_log = MetricsLog(self.run_dir, resume_step=resume_step)
        samples_log = SamplesLog(self.run_dir, resume_step)
        progress = Progress(self.total, initial=self.step, description="ppo")
        result = TrainResult(step=self.step, total_steps=self.total)
        try:
            while self.step < self.total and (stop_after is None or self.step < stop_after):
                indices, position = self.sampler.next_batch(self.position)
                self.position.update(epoch=position["epoch"], index=position["index"])
                lr = self.scheduler.get_last_lr()[0]
                experience, record, samples = self.rollout(indices, self.step)
                started = time.perf_counter() - self._first_forward_seconds(self.step)
                record.update(self.optimize(experience, self.step))
                record["train_s"] = time.perf_counter() - started
                record["train_tok/s"] = record.pop("train_tokens") / max(record["train_s"], 1e-9)
                record["peak_rss_mib"] = peak_rss_mib()
                if self.device.type == "cuda":
                    record["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
                self.scheduler.step()
                self.step += 1
                record = {"step": self.step, "epoch": self.position["epoch"], "lr": lr, **record}
                if self.step % config.log_every == 0 or self.step == self.total:
                    metrics_log.log(record)
                if config.sample_every and self.step % config.sample_every == 0:
                    samples_log.write(samples)
                progress.update(self.step, {k: record[k] for k in _SHOWN if k in record})
                result.metrics = record
                if (config.save_every and self.step % config.save_every == 0) or (
                    self.step == self.total
                ):
                    self.save_checkpoint(result)
        finally:
            progress.close()
            metrics_log.close()
        result.step = self.step
        return result

    def save_checkpoint(self, result: TrainResult) -> None:
        if is_main_process():
            result.checkpoint = ckpt.save_checkpoint(
                self.run_dir,
                step=self.step,
                position=self.position,
                trainable=self.params,
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                extra={"kl_controller": self.kl_controller.state_dict()},
                keep=self.config.keep_checkpoints,
            )

    def export(self) -> dict[str, Path]:
        """RUN_DIR/adapter (the policy's peft adapter) and with merge RUN_DIR/merged. Merging
        drops the critic and reward adapters: call it last."""
        paths = {"adapter": self.run_dir / ADAPTER_DIR}
        model = self.models.model
        model.peft_config[POLICY].base_model_name_or_path = str(check_model_dir(self.config.model))
        model.save_pretrained(paths["adapter"], selected_adapters=[POLICY], safe_serialization=True)
        self.tokenizer.save_pretrained(paths["adapter"])
        if self.config.merge:
            paths["merged"] = self.run_dir / MERGED_DIR
            self.models.use(POLICY)
            self.models._active = None  # deleting adapters below changes what is active
            for name in list(model.peft_config):
                if name != POLICY:
                    model.delete_adapter(name)
            model.base_model.set_adapter(POLICY)
            merged = merge_for_export(model, paths["adapter"], self.config.dtype)
            merged.save_pretrained(paths["merged"], safe_serialization=True)
            self.tokenizer.save_pretrained(paths["merged"])
        return paths


def _merged_stats(parts: list[tuple[dict, int, int]]) -> dict:
    """The step's stats from its micro-batches' (stats, answer tokens, rows): token means as
    the losses are (each micro-batch weighted by its answer tokens; ptx_loss, a mean over its
    own rows, by rows), and "train_tokens" summed."""
    merged = {
        key: weighted_mean(
            [(s[key], rows if key == "ptx_loss" else tokens) for s, tokens, rows in parts]
        )
        for key in parts[0][0]
        if key != "tokens"
    }
    merged["train_tokens"] = sum(stats["tokens"] for stats, _, _ in parts)
    return merged


_SHOWN = ("reward", "kl", "policy_loss", "value_loss", "response_length", "rollout_tok/s")


# ---------------------------------------------------------------------- the stage


def read_inputs(config: TrainConfig) -> tuple[list, list | None]:
    """(prompts, ptx SFT examples or None); every input checked before any model loads."""
    from rlhf_fast.models.reward import read_reward_config

    check_max_length(config.model, config.max_length)
    if not config.reward_model:
        raise ConfigError("--stage ppo needs --reward-model DIR")
    if not Path(config.reward_model).is_dir():
        raise ConfigError(
            f"--reward-model {config.reward_model}: no such directory; make it with: rlhf-fast "
            f"train --stage rm --model {config.model} --data RANKINGS.jsonl --output RM_RUN "
            "(then --reward-model RM_RUN/reward_model)"
        )
    read_reward_config(config.reward_model)
    prompts = read_prompts(config.data)
    ptx = None
    if config.ptx_coef > 0:
        if not config.ptx_data:
            raise ConfigError("--ptx-coef > 0 needs --ptx-data SFT.jsonl")
        ptx = read_sft(config.ptx_data)
    return prompts, ptx


def run_ppo(config: TrainConfig, *, resume=None, stop_after: int | None = None):
    """The PPO stage end to end (as run.run_stage for sft/rm): check inputs, build the
    shared-base models, train (or resume), export. Returns a run.StageOutcome."""
    from rlhf_fast.train.run import CONFIG_FILE, StageOutcome, default_run_dir

    started = time.perf_counter()
    config = config_module.validate(config)
    run_dir = Path(config.output) if config.output else default_run_dir("ppo")
    config = dataclasses.replace(config, output=str(run_dir))
    prompts, ptx = read_inputs(config)
    checkpoint = ckpt.load_checkpoint(resume) if resume is not None else None
    device = resolve_device(config.device)
    if config.offload:  # the frozen base streams from disk (rlhf_fast/offload/training.py)
        from rlhf_fast.offload.training import build_offloaded_ppo_models

        models = build_offloaded_ppo_models(config, build_ppo_models, lora_settings(config))
    else:
        models = build_ppo_models(
            config.model, config.reward_model, lora_settings(config), dtype=config.dtype,
            device=device, quant=config.quant, seed=config.seed,
        )  # fmt: skip
    if is_main_process():
        run_dir.mkdir(parents=True, exist_ok=True)
        config_module.write(config, run_dir / CONFIG_FILE)
    try:
        trainer = PPOTrainer(config, models, prompts, run_dir, device=device, ptx_examples=ptx)
        torch.manual_seed(config.seed)
        result = trainer.train(resume=checkpoint, stop_after=stop_after)
        exports = {}
        if result.step >= result.total_steps and is_main_process():
            exports = trainer.export()
    finally:
        if config.offload:  # the streamed base's reader thread and slots
            from rlhf_fast.offload.training import close_streamed

            close_streamed(models)
    outcome = StageOutcome(config, run_dir, result, exports, time.perf_counter() - started)
    outcome.reward_shared = models.reward_source.shared
    return outcome


def describe_reward(models: PPOModels) -> str:
    source = models.reward_source
    how = "shares the policy's base (its own adapter)" if source.shared else "loaded separately"
    return f"reward model {source.directory}: {how}"
