"""Reward model and RM stage: last real token under right/left padding, one batched forward of
all K answers, pair statistics against a loop, the toy preference learned to >= 90% held-out
accuracy, MSE on direct scores, every family, and the exported directory formats."""

from __future__ import annotations

import itertools

import pytest
import torch
from tiny_families import FAMILIES, make_family_dir
from train_helpers import (
    assert_same_step_gradients,
    config,
    ranked_records,
    record_step_gradients,
    scored_records,
    sft_records,
    write_jsonl,
)

from rlhf_fast.models.load import LoraSettings, attach_lora, load_backbone, load_tokenizer
from rlhf_fast.models.reward import RewardModel, last_token_index, load_reward_model
from rlhf_fast.train import rm
from rlhf_fast.train.config import ConfigError
from rlhf_fast.train.data import RankCollator, encode_ranking, read_rm
from rlhf_fast.train.run import run_stage

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {family: make_family_dir(root / family, family) for family in FAMILIES}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return {
        "ranked": write_jsonl(root / "ranked.jsonl", ranked_records(48, responses=3)),
        "scored": write_jsonl(root / "scored.jsonl", scored_records(24)),
        "sft": write_jsonl(root / "sft.jsonl", sft_records(8)),
    }


def _random_lora(model: torch.nn.Module, seed: int = 1) -> None:
    """LoRA B starts at zero (the adapter is a no-op): make it matter for the checks."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)


def test_last_token_index_right_left_and_gaps():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 0, 1, 0]])
    expected = [max(i for i, m in enumerate(row) if m) for row in mask.tolist()]
    assert last_token_index(mask).tolist() == expected
    with pytest.raises(ValueError, match="all padding"):
        last_token_index(torch.tensor([[1, 0], [0, 0]]))
    with pytest.raises(ValueError, match=r"\[N, L\]"):
        last_token_index(torch.ones(3, dtype=torch.long))


@pytest.mark.parametrize("family", FAMILIES)
def test_scores_do_not_depend_on_padding_side(family, models):
    backbone = attach_lora(load_backbone(models[family]), LoraSettings(r=4))
    _random_lora(backbone)
    model = RewardModel(backbone).eval()
    lengths = [5, 9, 3]
    generator = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, 200, (n,), generator=generator) for n in lengths]
    width = max(lengths)
    right = torch.zeros(len(rows), width, dtype=torch.long)
    left, right_mask, left_mask = right.clone(), right.clone(), right.clone()
    for i, row in enumerate(rows):
        right[i, : len(row)], right_mask[i, : len(row)] = row, 1
        left[i, width - len(row) :], left_mask[i, width - len(row) :] = row, 1
    with torch.no_grad():
        alone = torch.cat([model(r[None], torch.ones(1, len(r), dtype=torch.long)) for r in rows])
        torch.testing.assert_close(model(right, right_mask), alone, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(left, left_mask), alone, atol=1e-5, rtol=1e-5)


def test_pair_statistics_against_a_loop():
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(7, 5, generator=generator)
    present = torch.rand(7, 5, generator=generator) > 0.3
    correct = pairs = 0
    margin = 0.0
    for row in range(7):
        for i, j in itertools.combinations(range(5), 2):
            if present[row, i] and present[row, j]:
                pairs += 1
                correct += int(scores[row, i] > scores[row, j])
                margin += float(scores[row, i] - scores[row, j])
    got = rm.pair_statistics(scores, present)
    assert got[:2] == (correct, pairs)
    assert got[2] == pytest.approx(margin, abs=1e-5)


def test_all_answers_of_a_batch_go_through_one_forward(models, data):
    tokenizer = load_tokenizer(models["llama"])
    model = RewardModel(attach_lora(load_backbone(models["llama"]), LoraSettings(r=2)))
    calls = []
    model.backbone.register_forward_hook(
        lambda m, args, kwargs, out: calls.append(1), with_kwargs=True
    )
    rankings = [encode_ranking(tokenizer, e, 64) for e in read_rm(data["ranked"])[:4]]
    rankings[1] = rankings[1][:2]  # one prompt with fewer answers: a padding row
    batch = RankCollator(tokenizer.pad_token_id)(rankings)
    loss, values = rm._rank_loss(model, batch)
    loss.backward()
    assert len(calls) == 1 and batch["input_ids"].shape[0] == 4 * 3
    assert 0.0 <= values["accuracy"] <= 1.0
    assert model.value_head.weight.grad is not None


def test_rm_learns_the_toy_preference(models, data, tmp_path):
    run_dir = tmp_path / "rm"
    outcome = run_stage(
        config("rm", models["llama"], data["ranked"], run_dir, max_steps=40, eval_fraction=0.25)
    )
    assert outcome.config.rm_loss == "rank"
    assert outcome.result.eval_metrics["accuracy"] >= 0.9, outcome.result.eval_metrics
    assert outcome.result.eval_metrics["margin"] > 0


def test_mse_on_direct_scores(models, data, tmp_path):
    run_dir = tmp_path / "mse"
    outcome = run_stage(
        config("rm", models["llama"], data["scored"], run_dir, max_steps=30, eval_fraction=0.25)
    )
    assert outcome.config.rm_loss == "mse"
    losses = [float(line.split('"loss": ')[1].split(",")[0]) for line in
              (run_dir / "metrics.jsonl").read_text().splitlines()]  # fmt: skip
    assert sum(losses[-5:]) < sum(losses[:5]), losses
    with pytest.raises(ConfigError, match="--rm-loss mse"):
        run_stage(config("rm", models["llama"], data["scored"], tmp_path / "x", rm_loss="rank"))


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_trains_and_exports(family, models, data, tmp_path):
    from peft import PeftModel
    from transformers import AutoModel

    run_dir = tmp_path / "rm"
    outcome = run_stage(config("rm", models[family], data["ranked"], run_dir, merge=True))
    assert torch.isfinite(torch.tensor(outcome.result.metrics["loss"]))
    ids = torch.tensor([[5, 17, 40, 9, 33, 2], [7, 8, 9, 10, 2, 2]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]])
    adapter_form = load_reward_model(run_dir / "reward_model")
    merged_form = load_reward_model(run_dir / "merged")
    with torch.no_grad():
        expected = adapter_form(ids, mask)
        torch.testing.assert_close(merged_form(ids, mask), expected, atol=1e-4, rtol=1e-4)
        # Plain peft + transformers read the same decoder (the head is ours).
        plain = PeftModel.from_pretrained(
            AutoModel.from_pretrained(models[family]), run_dir / "reward_model" / "adapter"
        ).eval()
        hidden = plain(input_ids=ids, attention_mask=mask).last_hidden_state
        plain_merged = AutoModel.from_pretrained(run_dir / "merged").eval()
        merged_hidden = plain_merged(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(merged_hidden, hidden, atol=1e-4, rtol=1e-4)
    head = adapter_form.value_head
    torch.testing.assert_close(head(hidden[0, -1]).squeeze(), expected[0], atol=1e-4, rtol=1e-4)


def test_rm_on_top_of_an_sft_adapter(models, data, tmp_path):
    run_stage(config("sft", models["llama"], data["sft"], tmp_path / "sft", max_steps=2))
    outcome = run_stage(
        config("rm", tmp_path / "sft" / "adapter", data["ranked"], tmp_path / "rm", max_steps=2)
    )
    reward = load_reward_model(outcome.exports["reward_model"])
    with torch.no_grad():
        score = reward(torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long))
    assert score.shape == (1,) and torch.isfinite(score).all()


def test_pairwise_and_k_wise_lines_mix(models, tmp_path):
    records = ranked_records(6, responses=4)
    records += [{"prompt": "Say hi", "chosen": "sunny hello", "rejected": "hello"}] * 6
    data = write_jsonl(tmp_path / "mixed.jsonl", records)
    outcome = run_stage(config("rm", models["qwen2"], data, tmp_path / "rm", max_steps=3))
    assert outcome.result.step == 3 and 0.0 <= outcome.result.metrics["accuracy"] <= 1.0


def test_grad_accum_gives_the_gradient_of_the_whole_batch(models, tmp_path, monkeypatch):
    """Prompts with 2 and with 4 answers (1 and 6 pairs): batch 1 x grad_accum 4 must give the
    gradient of batch 4's mean over all 14 pairs, not a mean of per-prompt means."""
    from rlhf_fast.train.loop import train

    records = ranked_records(2, responses=4, seed=3) + ranked_records(2, responses=2, seed=4)
    data = write_jsonl(tmp_path / "mixed.jsonl", records)
    tokenizer = load_tokenizer(models["llama"])
    gradients = record_step_gradients(monkeypatch)
    for batch_size, grad_accum in ((4, 1), (1, 4), (2, 2)):
        cfg = config("rm", models["llama"], data, tmp_path / f"run{grad_accum}",
                     batch_size=batch_size, grad_accum=grad_accum)  # fmt: skip
        cfg, train_examples, held_out = rm.read_data(cfg)
        stage = rm.build(cfg, tokenizer, train_examples, held_out, "cpu")
        _random_lora(stage.model)
        (tmp_path / f"run{grad_accum}").mkdir()
        train(stage, cfg, cfg.output, device="cpu", stop_after=1)
    assert len(gradients) == 3
    assert_same_step_gradients(gradients)
