"""PPO stage on tiny models: the shared base (reference = adapters disabled = the SFT model;
the reward adapter scores as the RM directory does; the critic starts as the reward model),
PPO raising a reward a tiny model can learn, resume equality, and the run directory."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_families import make_family_dir
from train_helpers import assert_same_parameters, config, ranked_records, sft_records, write_jsonl

from rlhf_fast.models.load import load_causal_lm, load_tokenizer
from rlhf_fast.models.reward import load_reward_model
from rlhf_fast.train.checkpoint import load_checkpoint
from rlhf_fast.train.data import read_prompts, read_sft
from rlhf_fast.train.ppo import PPOTrainer, run_ppo
from rlhf_fast.train.ppo_models import CRITIC, POLICY, build_ppo_models
from rlhf_fast.train.run import run_stage
from rlhf_fast.train.sft import lora_settings

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """A tiny Llama, its SFT (merged) and an RM trained on that SFT model (adapter form)."""
    root = tmp_path_factory.mktemp("ppo")
    model = make_family_dir(root / "model", "llama", chat_template=True)
    sft_data = write_jsonl(root / "sft.jsonl", sft_records(8))
    ranked = write_jsonl(root / "ranked.jsonl", ranked_records(16))
    prompts = write_jsonl(
        root / "prompts.jsonl", [{"prompt": r["prompt"]} for r in sft_records(12)]
    )
    torch.set_num_threads(1)
    sft = run_stage(config("sft", model, sft_data, root / "sft", max_steps=2, merge=True))
    rm = run_stage(config("rm", sft.exports["merged"], ranked, root / "rm", max_steps=2))
    return {
        "root": root,
        "sft": sft.exports["merged"],
        "rm": rm.exports["reward_model"],
        "prompts": prompts,
        "sft_data": sft_data,
    }


def ppo_config(stages, output, **overrides):
    values = dict(reward_model=str(stages["rm"]), max_new_tokens=6, batch_size=4, lr=1e-3,
                  ppo_epochs=2, mini_batch_size=2)  # fmt: skip
    values.update(overrides)
    return config("ppo", stages["sft"], stages["prompts"], output, **values)


def build(stages, **overrides):
    cfg = ppo_config(stages, stages["root"] / "unused", **overrides)
    return build_ppo_models(cfg.model, cfg.reward_model, lora_settings(cfg), seed=0)


def _batch(tokenizer, texts):
    rows = [tokenizer(t)["input_ids"] for t in texts]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):  # left padding, as rollouts have
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    return ids, mask


def _perturb(models, adapter):
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in models.model.named_parameters():
            if f".{adapter}." in name and "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def test_reference_is_the_sft_model(stages):
    models = build(stages)
    _perturb(models, POLICY)  # a trained policy: differs from the SFT model
    _perturb(models, CRITIC)
    sft_model = load_causal_lm(stages["sft"])
    ids, mask = _batch(models.tokenizer, ["Hello there", "What is the weather like today?"])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    expected = sft_model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    with torch.no_grad():
        policy = models.policy_logits(ids, mask.bool())
        with models.reference():
            reference = models.model(input_ids=ids, attention_mask=mask, position_ids=positions)
    valid = mask.bool()
    torch.testing.assert_close(reference.logits[valid], expected[valid], atol=1e-5, rtol=1e-5)
    assert (policy[valid] - expected[valid]).abs().max() > 1e-2


def test_shared_reward_adapter_scores_like_the_rm_directory(stages):
    models = build(stages)
    assert models.reward_source.shared and models.separate_reward is None
    _perturb(models, POLICY)  # other adapters must not leak into the reward's forward
    rm = load_reward_model(stages["rm"])
    ids, mask = _batch(models.tokenizer, ["Say sunny sunny", "Say the", "Say hello weather dog"])
    expected = rm(ids, mask)
    torch.testing.assert_close(models.scores(ids, mask.bool()), expected, atol=1e-5, rtol=1e-5)
    # the critic starts as the reward model: its value at the last token is the score
    with torch.no_grad():
        values = models.critic_values(ids, mask.bool(), 1)  # states 0 .. L-2 predict 1 .. L-1
        full = models.critic_head(models._hidden(ids, mask.bool())[:, -1].float()).squeeze(-1)
    torch.testing.assert_close(full, expected, atol=1e-5, rtol=1e-5)
    assert values.shape == (3, ids.shape[1] - 1)


def test_separate_reward_model_reads_text(stages, tmp_path):
    # A policy on another base: the RM cannot share it and is loaded on its own.
    other = make_family_dir(tmp_path / "gpt2", "gpt2", chat_template=True)
    cfg = ppo_config(stages, tmp_path / "run")
    models = build_ppo_models(other, cfg.reward_model, lora_settings(cfg), seed=0)
    assert not models.reward_source.shared
    messages = [{"role": "user", "content": "Say it"}]
    texts = [(messages, "sunny sunny", True), (messages, "the dog", True)]
    ids, mask = torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.bool)
    scores = models.scores(ids, mask, texts)
    rm = load_reward_model(stages["rm"])
    tokenizer = load_tokenizer(stages["sft"])
    from rlhf_fast.train.data_encode import encode_response

    for row, answer in enumerate(["sunny sunny", "the dog"]):
        ids = torch.tensor([encode_response(tokenizer, messages, answer, 64)])
        torch.testing.assert_close(scores[row], rm(ids, torch.ones_like(ids))[0], atol=1e-5,
                                   rtol=1e-5)  # fmt: skip


def test_ppo_raises_a_learnable_reward(stages, tmp_path):
    # The tiny random model's logits are too small for adapters inside the decoder alone to
    # move them far (frozen, random 0.02-scale output weights): LoRA on lm_head can.
    # 16 steps, means of the first and last 4: over seeds 0-3 the gain was 0.18-0.47 (with
    # HF's own norms and MLPs too), where sampling noise alone moves it ~0.03. (At 12 steps
    # and 3-step means, 3 of 8 seed/backend runs gained less than 0.15.)
    cfg = ppo_config(stages, tmp_path / "run", max_steps=16, batch_size=16, mini_batch_size=4,
                     ppo_epochs=4, lr=1e-2, max_new_tokens=8, kl_coef=0.0, sample_every=4,
                     missing_eos_penalty=0.0,
                     lora_targets=["q_proj", "v_proj", "lm_head"])  # fmt: skip
    models = build_ppo_models(cfg.model, cfg.reward_model, lora_settings(cfg), seed=0)
    vocab = models.model.get_base_model().config.vocab_size
    wanted = torch.zeros(vocab, dtype=torch.bool)
    wanted[::2] = True  # even token ids: about half of what a random model samples
    from rlhf_fast.train.data import read_prompts

    def share_of_wanted(rollout, texts):
        hits = (wanted[rollout.response] & rollout.response_mask).sum(1).float()
        return hits / rollout.response_mask.sum(1).clamp(min=1)

    trainer = PPOTrainer(cfg, models, read_prompts(cfg.data), tmp_path / "run",
                         reward_fn=share_of_wanted)  # fmt: skip
    trainer.train()
    rewards = [json.loads(line)["reward"] for line in (tmp_path / "run/metrics.jsonl").open()]
    assert len(rewards) == 16
    first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    assert last > first + 0.15, rewards
    samples = [json.loads(line) for line in (tmp_path / "run/samples.jsonl").open()]
    assert {s["step"] for s in samples} == {4, 8, 12, 16}
    assert set(samples[0]) == {"step", "prompt", "response", "score"}


@pytest.mark.parametrize("kl_target", [0.0, 0.5])
def test_resume_equals_uninterrupted(stages, tmp_path, kl_target):
    common = dict(max_steps=4, save_every=2, keep_checkpoints=0, kl_target=kl_target,
                  ptx_coef=0.5, ptx_data=str(stages["sft_data"]))  # fmt: skip
    whole = run_ppo(ppo_config(stages, tmp_path / "whole", **common))
    cut = ppo_config(stages, tmp_path / "cut", **common)
    first = run_ppo(cut, stop_after=2)
    assert first.result.step == 2 and not first.exports
    resumed = run_ppo(cut, resume=tmp_path / "cut")
    assert resumed.result.step == 4
    a = load_checkpoint(tmp_path / "whole")
    b = load_checkpoint(tmp_path / "cut")
    assert_same_parameters(a.trainable, b.trainable, atol=1e-6)
    assert a.extra["kl_controller"] == pytest.approx(b.extra["kl_controller"])
    assert a.position == b.position
    lines = [json.loads(x) for x in (tmp_path / "cut/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4]
    whole_lines = (tmp_path / "whole/metrics.jsonl").read_text().splitlines()
    for mine, theirs in zip(lines, map(json.loads, whole_lines), strict=True):
        assert mine["reward"] == pytest.approx(theirs["reward"], abs=1e-5)
    assert whole.exports["adapter"].is_dir()


def test_first_epoch_forward_run_by_the_rollout_trains_as_its_own_forward(
    stages, tmp_path, monkeypatch
):
    """With the whole batch as one micro-batch, the rollout runs the first PPO epoch's
    training forward (its log-probs and values become the old ones) and optimize() trains
    from its graph: the run must equal one where epoch 1 runs its own forward, that epoch's
    ratios must be exactly 1, and later epochs must run forwards of their own."""
    common = dict(max_steps=2, mini_batch_size=0, ppo_epochs=3, save_every=0)
    reused = []
    micro_losses = PPOTrainer._micro_losses

    def spy(self, exp, rows, forward=None):
        loss, sft_loss, stats = micro_losses(self, exp, rows, forward)
        reused.append((forward is not None, stats["approx_kl"], stats["clip_frac"]))
        return loss, sft_loss, stats

    monkeypatch.setattr(PPOTrainer, "_micro_losses", spy)
    run_ppo(ppo_config(stages, tmp_path / "reused", **common))
    assert [r for r, _, _ in reused] == [True, False, False] * 2
    assert all(kl == 0.0 and clip == 0.0 for r, kl, clip in reused if r)
    reused.clear()
    monkeypatch.setattr(PPOTrainer, "_first_forward_reusable", lambda self, batch: False)
    run_ppo(ppo_config(stages, tmp_path / "own", **common))
    assert not any(r for r, _, _ in reused)
    a, b = load_checkpoint(tmp_path / "reused"), load_checkpoint(tmp_path / "own")
    assert_same_parameters(a.trainable, b.trainable, atol=1e-5)


def test_exports_load_in_plain_peft_and_transformers(stages, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    outcome = run_ppo(ppo_config(stages, tmp_path / "run", max_steps=2, merge=True))
    merged = AutoModelForCausalLM.from_pretrained(outcome.exports["merged"]).eval()
    base = AutoModelForCausalLM.from_pretrained(stages["sft"]).eval()
    adapted = PeftModel.from_pretrained(base, outcome.exports["adapter"]).eval()
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, atol=1e-5, rtol=1e-5)
    record = json.loads((tmp_path / "run/metrics.jsonl").read_text().splitlines()[-1])
    for key in ("reward", "kl", "non_score_reward", "policy_loss", "value_loss", "clip_frac",
                "approx_kl", "entropy", "response_length", "rollout_s", "train_s",
                "rollout_tok/s", "train_tok/s", "peak_rss_mib", "kl_coef"):  # fmt: skip
        assert key in record, key


def test_grad_accum_gives_the_gradient_of_the_whole_minibatch(stages, tmp_path):
    """Answers of different lengths: the losses are means over the minibatch's tokens, so
    micro-batches must add up to exactly that mean (not a mean of per-micro-batch means)."""
    from rlhf_fast.train.data import read_prompts

    cfg = ppo_config(stages, tmp_path / "run", batch_size=8, mini_batch_size=0, ppo_epochs=1,
                     max_grad_norm=0.0, max_new_tokens=8, lora_targets=["q_proj", "v_proj",
                     "lm_head"])  # fmt: skip
    models = build_ppo_models(cfg.model, cfg.reward_model, lora_settings(cfg), seed=0)
    _perturb(models, POLICY)
    prompts = read_prompts(cfg.data)
    gradients = {}
    for accum in (1, 2, 3):
        trainer = PPOTrainer(cfg.__class__(**{**vars(cfg), "grad_accum": accum}), models,
                             prompts, tmp_path / "run")  # fmt: skip
        if accum == 1:
            experience, _, _ = trainer.rollout(list(range(8)), 0)
            # as if rows had ended (EOS) after 1 to 8 tokens: the masks stay prefixes
            lengths = torch.tensor([8, 1, 3, 8, 2, 5, 7, 4])
            keep = torch.arange(experience.response.shape[1]) < lengths[:, None]
            experience.response_mask &= keep
        gradients[accum] = _step_gradients(trainer, experience)
    scale = max(float(g.abs().max()) for g in gradients[1].values())  # some entries are near 0
    for accum in (2, 3):
        assert gradients[accum].keys() == gradients[1].keys() and gradients[1]
        for name, expected in gradients[1].items():
            torch.testing.assert_close(gradients[accum][name], expected, rtol=0, atol=1e-5 * scale)


def test_logged_losses_are_means_over_the_trained_tokens(stages, tmp_path):
    """The step's losses weight each micro-batch by its answer tokens (grad_accum splits a
    minibatch into token shares); the logged policy/value losses, clip fractions, approx-KL and
    entropy must be the same token-weighted means (ptx: by rows), not the plain mean of the
    micro-batches' values, which overweights a micro-batch of short answers."""
    from rlhf_fast.train.data import read_prompts

    cfg = ppo_config(stages, tmp_path / "run", batch_size=4, mini_batch_size=0, ppo_epochs=2,
                     grad_accum=4, max_new_tokens=8, ptx_coef=0.5,
                     ptx_data=str(stages["sft_data"]))  # fmt: skip
    models = build(stages)
    _perturb(models, POLICY)
    trainer = PPOTrainer(cfg, models, read_prompts(cfg.data), tmp_path / "run",
                         ptx_examples=read_sft(cfg.ptx_data))  # fmt: skip
    experience, _, _ = trainer.rollout([0, 1, 2, 3], 0)
    lengths = torch.tensor([8, 1, 2, 6])  # as if rows had ended after 1 to 8 tokens
    experience.response_mask &= torch.arange(experience.response.shape[1]) < lengths[:, None]
    calls, micro_losses = [], trainer._micro_losses

    def spy(exp, rows, forward=None):
        loss, sft_loss, stats = micro_losses(exp, rows, forward)
        calls.append((int(exp.response_mask[rows].sum()), len(rows), stats))
        return loss, sft_loss, stats

    trainer._micro_losses = spy
    logged = trainer.optimize(experience, 0)
    assert len(calls) == 8 and len({tokens for tokens, _, _ in calls}) > 1
    tokens = sum(t for t, _, _ in calls)
    for key in ("policy_loss", "value_loss", "clip_frac", "value_clip_frac", "approx_kl",
                "entropy"):  # fmt: skip
        expected = sum(t * stats[key] for t, _, stats in calls) / tokens
        assert logged[key] == pytest.approx(expected, rel=1e-6), key
    rows = sum(r for _, r, _ in calls)
    expected = sum(r * stats["ptx_loss"] for _, r, stats in calls) / rows
    assert logged["ptx_loss"] == pytest.approx(expected, rel=1e-6)


def test_rollouts_stop_at_every_id_chat_stops_at(stages, tmp_path, monkeypatch):
    """Chat ends an answer at the tokenizer's EOS or any id the model's generation_config lists
    (instruct models end turns with one: Llama 3's <|eot_id|>, Qwen2's <|im_end|>); rollouts
    stopped at the tokenizer's EOS alone, so PPO trained and scored answers that ran on past
    where chat stops, each penalised as never having ended."""
    from rlhf_fast.chat import eos_ids
    from rlhf_fast.train import ppo
    from rlhf_fast.train.data import read_prompts

    cfg = ppo_config(stages, tmp_path / "run")
    models = build(stages)
    models.model.generation_config.eos_token_id = [models.tokenizer.eos_token_id, 7]
    trainer = PPOTrainer(cfg, models, read_prompts(cfg.data), tmp_path / "run")
    seen, generate = {}, ppo.generate_rollouts

    def spy(*args, **kwargs):
        seen["eos"] = kwargs["eos_token_ids"]
        return generate(*args, **kwargs)

    monkeypatch.setattr(ppo, "generate_rollouts", spy)
    trainer.rollout([0, 1], 0)
    expected = eos_ids(models.model, models.tokenizer)
    assert expected == {models.tokenizer.eos_token_id, 7}
    assert set(seen["eos"]) == expected


def _step_gradients(trainer, experience) -> dict[str, torch.Tensor]:
    """The gradients of one optimize() on `experience`, read where the optimizer would step
    (the step itself is skipped): one minibatch, one epoch."""
    captured = []

    def capture():
        params = trainer.params.items()
        captured.append({n: p.grad.clone() for n, p in params if p.grad is not None})

    trainer.optimizer.step = capture
    trainer.optimize(experience, 0)
    (gradients,) = captured
    return gradients


def test_value_loss_enters_the_step_scaled_by_vf_coef(stages, tmp_path):
    """loss = policy loss + vf_coef * value loss: tripling vf_coef triples the critic's
    gradients (its adapter and value head) and leaves the policy's alone. A step that dropped
    vf_coef (or weighted the policy loss instead) would pass every other test."""
    from rlhf_fast.train.data import read_prompts

    cfg = ppo_config(stages, tmp_path / "run", batch_size=4, mini_batch_size=0, ppo_epochs=1,
                     max_grad_norm=0.0)  # fmt: skip
    models = build_ppo_models(cfg.model, cfg.reward_model, lora_settings(cfg), seed=0)
    _perturb(models, POLICY)
    _perturb(models, CRITIC)
    prompts = read_prompts(cfg.data)
    gradients = {}
    experience = None
    for vf_coef in (0.1, 0.3):
        trainer = PPOTrainer(cfg.__class__(**{**vars(cfg), "vf_coef": vf_coef}), models,
                             prompts, tmp_path / "run")  # fmt: skip
        if experience is None:
            experience, _, _ = trainer.rollout([0, 1, 2, 3], 0)
        gradients[vf_coef] = _step_gradients(trainer, experience)
    low, high = gradients[0.1], gradients[0.3]
    assert low.keys() == high.keys()
    scale = max(float(g.abs().max()) for g in low.values())
    tripled, same = [], []
    for name, grad in low.items():
        if float(grad.abs().max()) < 1e-3 * scale:
            continue  # too small to tell the two apart
        if torch.allclose(high[name], grad, rtol=1e-4, atol=1e-6 * scale):
            same.append(name)
        else:
            torch.testing.assert_close(high[name], 3 * grad, rtol=1e-4, atol=1e-6 * scale)
            tripled.append(name)
    assert same and tripled, (same, tripled)
    assert all(CRITIC in name or "lora" not in name for name in tripled), tripled
    assert all(POLICY in name for name in same), same


@pytest.mark.parametrize("stacked", [True, False], ids=["stacked-roles", "one-pass-per-role"])
def test_rollout_advantages_and_kl_controller_follow_the_config(
    stages, tmp_path, monkeypatch, stacked
):
    """A rollout's advantages and returns, recomputed here from its own log-probs, values and
    scores with the config's kl_coef, score_clip, EOS penalty, gamma and lam (gamma != lam, so
    swapping them shows), and the adaptive controller's update by the batch's rows and the
    sequence KL (summed over tokens). The end-to-end tests compare runs with themselves
    (resume) or look at the reward only, so a mis-wired argument would pass them. Both ways
    of scoring: the roles in one stacked pass, or one pass each."""
    from rlhf_fast.train import ppo
    from rlhf_fast.train.data import read_prompts

    cfg = ppo_config(stages, tmp_path / "run", gamma=0.9, lam=0.7, kl_coef=0.3,
                     score_clip=0.05, missing_eos_penalty=0.25, kl_target=0.01,
                     kl_horizon=10.0)  # fmt: skip
    models = build_ppo_models(cfg.model, cfg.reward_model, lora_settings(cfg), seed=0)
    _perturb(models, POLICY)  # the policy leaves the reference: the KL is not 0
    trainer = PPOTrainer(cfg, models, read_prompts(cfg.data), tmp_path / "run")
    models._stacks_roles = stacked
    seen = {}
    generate, score, stacked_scores = ppo.generate_rollouts, models.scores, trainer._stacked_scores

    def spy_generate(*args, **kwargs):
        seen["out"] = generate(*args, **kwargs)
        return seen["out"]

    def spy_scores(*args, **kwargs):
        seen["scores"] = score(*args, **kwargs)
        return seen["scores"]

    def spy_stacked(*args, **kwargs):
        seen["out"], values, seen["scores"] = stacked_scores(*args, **kwargs)
        return seen["out"], values, seen["scores"]

    monkeypatch.setattr(ppo, "generate_rollouts", spy_generate)
    monkeypatch.setattr(models, "scores", spy_scores)
    monkeypatch.setattr(trainer, "_stacked_scores", spy_stacked)
    coef = trainer.kl_controller.coef
    experience, metrics, _ = trainer.rollout([0, 1, 2, 3], 0)

    out, scores = seen["out"], seen["scores"].float()
    mask = out.response_mask
    assert (scores.abs() > cfg.score_clip).any()  # the clip is exercised
    kl = torch.where(mask, out.logprobs - out.ref_logprobs, 0.0)
    assert kl.abs().sum() > 0
    final = scores.clamp(-cfg.score_clip, cfg.score_clip) - 0.25 * (~out.ended).float()
    rewards = -0.3 * kl
    for row in range(4):
        last = int(mask[row].nonzero().max())
        rewards[row, last] += final[row]
    values = experience.values
    # GAE by hand, one row and one step at a time (masks are prefixes here)
    advantages = torch.zeros_like(rewards)
    for row in range(4):
        next_value = next_advantage = 0.0
        for t in reversed(range(rewards.shape[1])):
            if not mask[row, t]:
                continue
            delta = rewards[row, t] + 0.9 * next_value - values[row, t]
            next_advantage = delta + 0.9 * 0.7 * next_advantage
            advantages[row, t], next_value = next_advantage, values[row, t]
    returns = torch.where(mask, advantages + values, 0.0)
    torch.testing.assert_close(experience.returns, returns, atol=1e-5, rtol=1e-5)
    valid = advantages[mask]
    whitened = (advantages - valid.mean()) / torch.sqrt(valid.var() + 1e-8)
    torch.testing.assert_close(
        experience.advantages, torch.where(mask, whitened, 0.0), atol=1e-4, rtol=1e-4
    )
    sequence_kl = float(kl.sum(1).mean())
    assert metrics["kl"] == pytest.approx(sequence_kl, rel=1e-5, abs=1e-7)
    error = min(max(sequence_kl / 0.01 - 1.0, -0.2), 0.2)
    assert trainer.kl_controller.coef == pytest.approx(coef * (1 + error * 4 / 10.0), rel=1e-9)


def test_non_finite_reward_is_a_one_line_error_naming_the_prompt(stages, tmp_path, capsys):
    """A reward model that scores NaN stops the run before the update (no NaN adapters, no
    NaN checkpoint) with one line naming the prompt's FILE:LINE, not a traceback later."""
    import shutil

    from safetensors.torch import load_file, save_file

    from rlhf_fast.cli import main
    from rlhf_fast.models.reward import HEAD_FILE

    broken = tmp_path / "rm"
    shutil.copytree(stages["rm"], broken)
    head = load_file(broken / HEAD_FILE)
    save_file({k: torch.full_like(v, float("nan")) for k, v in head.items()}, broken / HEAD_FILE)
    output = tmp_path / "run"
    args = ["train", "--stage", "ppo", "--model", str(stages["sft"]), "--reward-model",
            str(broken), "--data", str(stages["prompts"]), "--output", str(output), "--device",
            "cpu", "--max-steps", "2", "--batch-size", "2", "--max-new-tokens", "3",
            "--save-every", "1"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    assert err[-1].startswith(f"rlhf-fast train: error: {stages['prompts']}:"), err[-1]
    assert "reward model scored" in err[-1] and "nan" in err[-1], err[-1]
    assert not (output / "checkpoints").is_dir() or not any((output / "checkpoints").iterdir())


def test_ratios_start_at_one_with_dropout_configured(stages, tmp_path):
    """The rollout's log-probs and values come from the model without dropout; PPO's training
    forward must see the same model, or ratio = exp(logp - old_logp) is noise from the very
    first minibatch (spurious clipping and approx-KL before any update). lr 0: no update ever,
    so every ratio must stay exactly 1."""
    from rlhf_fast.train.data import read_prompts

    cfg = ppo_config(stages, tmp_path / "run", lora_dropout=0.5, lr=0.0, ppo_epochs=2,
                     max_new_tokens=6)  # fmt: skip
    models = build_ppo_models(cfg.model, cfg.reward_model, lora_settings(cfg), seed=0)
    _perturb(models, POLICY)
    trainer = PPOTrainer(cfg, models, read_prompts(cfg.data), tmp_path / "run")
    experience, _, _ = trainer.rollout([0, 1, 2, 3], 0)
    stats = trainer.optimize(experience, 0)
    assert stats["approx_kl"] < 1e-7 and stats["clip_frac"] == 0.0, stats
    assert stats["value_clip_frac"] == 0.0, stats


def test_resume_with_other_lora_shapes_is_a_checkpoint_error(stages, tmp_path):
    """Same parameter names, other shapes (--lora-r changed on --resume): one line naming the
    checkpoint and the parameter, not a RuntimeError from copy_."""
    from rlhf_fast.train.checkpoint import CheckpointError

    run_ppo(ppo_config(stages, tmp_path / "run", max_steps=1, batch_size=2, max_new_tokens=2))
    other = ppo_config(stages, tmp_path / "run", max_steps=2, batch_size=2, max_new_tokens=2,
                       lora_r=2)  # fmt: skip
    with pytest.raises(CheckpointError, match="has shape") as caught:
        run_ppo(other, resume=tmp_path / "run")
    assert "\n" not in str(caught.value) and "step-00000001" in str(caught.value)


def test_prompt_the_chat_template_rejects_names_its_line(stages, tmp_path):
    """As for SFT and RM data: a PPO prompt the chat template rejects is FILE:LINE: why."""
    from rlhf_fast.train.data import DataError, read_prompts

    system, user = {"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Hi"}, {"messages": [system, user]}])
    models = build(stages)
    models.tokenizer.chat_template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system turns') }}"
        "{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    cfg = ppo_config(stages, tmp_path / "run")
    with pytest.raises(DataError) as caught:
        PPOTrainer(cfg, models, read_prompts(path), tmp_path / "run")
    assert str(caught.value) == f"{path}:2: the tokenizer's chat template failed: no system turns"


def test_entropy_is_that_of_the_sampling_distribution(stages, tmp_path, monkeypatch):
    """At temperature 0.5 the reported entropy must be of softmax(logits / 0.5), the
    distribution the rollout drew from (whose log-probs PPO stores), not of softmax(logits)."""
    from rlhf_fast.train import ppo
    from rlhf_fast.train.data import read_prompts
    from rlhf_fast.train.ppo_math import entropy_from_logits

    cfg = ppo_config(stages, tmp_path / "run", lr=0.0, ppo_epochs=1, mini_batch_size=0,
                     temperature=0.5)  # fmt: skip
    models = build_ppo_models(cfg.model, cfg.reward_model, lora_settings(cfg), seed=0)
    trainer = PPOTrainer(cfg, models, read_prompts(cfg.data), tmp_path / "run")
    experience, _, _ = trainer.rollout([0, 1, 2, 3], 0)
    seen = []

    def spy(logits, mask):
        seen.append(logits)
        return entropy_from_logits(logits, mask)

    monkeypatch.setattr(ppo, "entropy_from_logits", spy)
    stats = trainer.optimize(experience, 0)
    (logits,) = seen
    rows = torch.randperm(4, generator=trainer._generator(0, 1))  # the minibatch's row order
    width = logits.shape[1]
    response, mask = experience.response[rows, :width], experience.response_mask[rows, :width]
    picked = torch.log_softmax(logits.float(), -1).gather(-1, response[..., None]).squeeze(-1)
    stored = experience.logprobs[rows, :width]
    torch.testing.assert_close(picked[mask], stored[mask], atol=1e-4, rtol=0)
    assert stats["entropy"] > 0


def test_separate_reward_model_reads_what_it_was_trained_on(stages, tmp_path):
    """A separate reward model with absolute positions (GPT-2, 256 of them) and a prompt longer
    than that: the policy reads the prompt cut to max_length, and the reward model must read
    it cut the same way (as its training data, encode_response), not the whole prompt, which
    ran past its position table (an IndexError traceback in the middle of PPO)."""
    from rlhf_fast.train.data_encode import encode_response

    gpt2 = make_family_dir(tmp_path / "gpt2", "gpt2", chat_template=True)
    ranked = write_jsonl(tmp_path / "ranked.jsonl", ranked_records(4))
    rm_dir = run_stage(config("rm", gpt2, ranked, tmp_path / "rm", max_steps=1)).exports
    cfg = ppo_config(stages, tmp_path / "run", max_length=64)
    models = build_ppo_models(cfg.model, rm_dir["reward_model"], lora_settings(cfg), seed=0)
    assert not models.reward_source.shared
    messages = [{"role": "user", "content": "Say " + "sunny weather " * 200}]
    texts = [(messages, "sunny sunny", True), (messages, "the dog", False)]
    ids, mask = torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.bool)
    scores = models.scores(ids, mask, texts, max_length=cfg.max_length)
    rm = load_reward_model(rm_dir["reward_model"])
    tokenizer = load_tokenizer(gpt2)
    expected = torch.tensor(encode_response(tokenizer, messages, "sunny sunny", 64))[None]
    assert expected.shape[1] == 64
    torch.testing.assert_close(scores[0], rm(expected, torch.ones_like(expected))[0], atol=1e-5,
                               rtol=1e-5)  # fmt: skip
    assert torch.isfinite(scores).all()


def test_policy_and_critic_in_one_stacked_pass_equal_two_passes(stages):
    models = build(stages)
    _perturb(models, POLICY)
    _perturb(models, CRITIC)
    assert models.stacks_roles()
    ids, mask = _batch(models.tokenizer, ["Hello there", "What is the weather like today?"])
    models.train()

    def logits_values_grads(stacked: bool):
        models._stacks_roles = stacked
        models.zero_grad(set_to_none=True)
        logits, values = models.policy_and_critic(ids, mask.bool(), 3)
        (logits.logsumexp(-1).sum() + values.square().sum()).backward()
        grads = {n: p.grad.clone() for n, p in models.trainable().items() if p.grad is not None}
        return logits.detach(), values.detach(), grads

    logits, values, grads = logits_values_grads(stacked=True)
    expected_logits, expected_values, expected_grads = logits_values_grads(stacked=False)
    assert logits.shape == (2, ids.shape[1] - 3, models.model.config.vocab_size)
    torch.testing.assert_close(logits, expected_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(values, expected_values, atol=1e-5, rtol=1e-5)
    assert set(grads) == set(expected_grads) == set(models.trainable())
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], atol=1e-5, rtol=1e-4)


def test_roles_are_not_stacked_where_the_head_is_more_than_the_output_embedding(stages):
    models = build(stages)
    head = models.model.get_output_embeddings()
    scaled = torch.nn.Linear(head.in_features, head.out_features, bias=False)
    with torch.no_grad():
        scaled.weight.copy_(head.weight * 2)  # what the stacked pass would use: not the LM's
    models.model.get_output_embeddings = lambda: scaled
    assert not models.stacks_roles()
    ids, mask = _batch(models.tokenizer, ["Hello there"])
    logits, _ = models.policy_and_critic(ids, mask.bool(), 2)
    torch.testing.assert_close(logits, models.policy_logits(ids, mask.bool(), 2))


def test_rollouts_sample_from_the_policy_adapter(stages, tmp_path):
    """Deciding whether the roles stack runs a probe through the policy and the critic; it
    left the critic's adapter active, so the first rollout of every run (and of every resume)
    sampled the critic's answers and stored its log-probs as the policy's."""
    from rlhf_fast.train.rollout import response_logprobs

    cfg = ppo_config(stages, tmp_path / "run", temperature=1.0)
    trainer = PPOTrainer(cfg, build(stages), read_prompts(cfg.data), tmp_path / "run")
    _perturb(trainer.models, POLICY)
    _perturb(trainer.models, CRITIC)  # a critic that would sample otherwise
    experience, _, _ = trainer.rollout([0, 1, 2, 3], 0)
    trainer.models.use(POLICY)
    policy = response_logprobs(
        trainer.models.model, experience.query, experience.query_mask, experience.response,
        experience.response_mask,
    )  # fmt: skip
    torch.testing.assert_close(experience.logprobs, policy, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_rollout_scored_in_one_stacked_pass_equals_one_pass_per_role(stages, tmp_path, dtype):
    """The reference's and (bf16: rescored) policy's log-probs, the critic's values and the
    shared reward's scores from the stacked pass are those of one pass per role."""
    cfg = ppo_config(stages, tmp_path / "run", dtype=dtype)
    models = build_ppo_models(cfg.model, cfg.reward_model, lora_settings(cfg), dtype=dtype)
    _perturb(models, POLICY)
    _perturb(models, CRITIC)
    trainer = PPOTrainer(cfg, models, read_prompts(cfg.data), tmp_path / "run")
    assert models.stacks_roles()
    experiences = []
    for stacked in (True, False):
        models._stacks_roles = stacked
        experiences.append(trainer.rollout([0, 1, 2, 3], 0)[0])
    stacked, separate = experiences
    assert torch.equal(stacked.response, separate.response)
    # GEMMs of twice the rows may sum in another order (on the dev machine they do not: equal)
    tolerance = {"atol": 1e-5, "rtol": 1e-5} if dtype == "fp32" else {"atol": 1e-3, "rtol": 1e-3}
    for field in ("logprobs", "values", "advantages", "returns"):
        torch.testing.assert_close(getattr(stacked, field), getattr(separate, field), **tolerance)


def test_mode_switches_reach_every_module_even_when_skipped(stages):
    """PPOModels.train skips a switch only where every module is already in that mode: a
    submodule left in the other mode (by a caller's own .train()) is still switched."""
    models = build(stages)
    models.eval()
    assert not any(m.training for m in models.modules())
    models.eval()  # nothing to switch
    models.model.get_base_model().model.layers[0].mlp.train()
    models.eval()
    assert not any(m.training for m in models.modules())
    models.train()
    assert all(m.training for m in models.modules())
    models.critic_head.eval()
    models.train()
    assert all(m.training for m in models.modules())
    models.eval()
