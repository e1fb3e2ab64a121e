"""rlhf_fast.train.loop's pieces against hand-computed values: the learning-rate schedule, the
epoch sampler's data order (every example once per epoch, fresh order per epoch, rank shards),
step counts, micro-batch weights, and the loop logging the lr and clipping gradients it says."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from rlhf_fast.train import loop
from rlhf_fast.train.config import TrainConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_lr_factor_by_hand():
    warm = loop.lr_factor("constant", 3, 10)
    # warmup climbs (s + 1) / (warmup + 1): never 0 at step 0, reaches 1 right after warmup
    assert [warm(s) for s in range(5)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])
    cosine = loop.lr_factor("cosine", 2, 12)  # decays over steps 2..12 (10 steps)
    assert cosine(2) == pytest.approx(1.0)
    assert cosine(7) == pytest.approx(0.5)
    assert cosine(4) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.2)))
    assert cosine(12) == pytest.approx(0.0, abs=1e-12)
    assert cosine(20) == pytest.approx(0.0, abs=1e-12)  # past the end: stays at 0
    linear = loop.lr_factor("linear", 0, 8)
    assert [linear(s) for s in (0, 2, 6, 8, 9)] == pytest.approx([1.0, 0.75, 0.25, 0.0, 0.0])


def test_total_steps_by_hand():
    assert loop.total_steps(TrainConfig(max_steps=7), 1000) == 7
    # 10 examples, batches of 3 -> 4 micro-batches per epoch; 2 epochs / accum 3 -> ceil(8/3)
    assert loop.total_steps(TrainConfig(batch_size=3, grad_accum=3, epochs=2.0), 10) == 3
    assert loop.total_steps(TrainConfig(batch_size=4, epochs=0.5), 16) == 2
    assert loop.total_steps(TrainConfig(batch_size=64, epochs=0.01), 3) == 1


def _walk(sampler, batches, position=None):
    position = position or {"epoch": 0, "index": 0}
    out = []
    for _ in range(batches):
        indices, position = sampler.next_batch(position)
        out.append((indices, dict(position)))
    return out, position


def test_epoch_sampler_visits_every_example_once_per_epoch_in_a_fresh_order():
    sampler = loop.EpochSampler(size=7, batch_size=3, seed=5)
    walked, _ = _walk(sampler, 6)  # batches of 3, 3, 1 per epoch, two epochs
    sizes = [len(indices) for indices, _ in walked]
    assert sizes == [3, 3, 1, 3, 3, 1]
    epochs = [position["epoch"] for _, position in walked]
    assert epochs == [0, 0, 0, 1, 1, 1]
    first = [i for indices, _ in walked[:3] for i in indices]
    second = [i for indices, _ in walked[3:] for i in indices]
    assert sorted(first) == sorted(second) == list(range(7))
    assert first != second  # each epoch has its own permutation
    assert first == loop.EpochSampler(7, 3, seed=5).permutation(0).tolist()  # deterministic
    assert first != loop.EpochSampler(7, 3, seed=6).permutation(0).tolist()  # seeded


def test_epoch_sampler_resumes_at_the_very_next_example():
    whole, _ = _walk(loop.EpochSampler(9, 2, seed=1), 8)
    head, position = _walk(loop.EpochSampler(9, 2, seed=1), 3)
    tail, _ = _walk(loop.EpochSampler(9, 2, seed=1), 5, position)  # a fresh sampler: resume
    assert head + tail == whole


def test_epoch_sampler_ranks_split_each_batch_without_overlap():
    single, _ = _walk(loop.EpochSampler(10, 4, seed=3), 6)
    shards = [_walk(loop.EpochSampler(10, 2, seed=3, rank=r, world_size=2), 6)[0] for r in (0, 1)]
    for step, (indices, position) in enumerate(single):
        rank0, rank1 = shards[0][step], shards[1][step]
        assert rank0[1] == rank1[1] == position  # every rank walks in step
        assert sorted(rank0[0] + rank1[0]) == sorted(indices)
        assert not set(rank0[0]) & set(rank1[0])


def test_micro_weights_follow_the_count():
    stage = loop.Stage("t", nn.Linear(1, 1), [], lambda b: b, lambda b: None)
    assert loop.micro_weights(stage, [{}, {}, {}, {}]) == [0.25] * 4
    stage.count = lambda batch: batch["n"]
    assert loop.micro_weights(stage, [{"n": 1}, {"n": 3}]) == [0.25, 0.75]
    assert loop.micro_weights(stage, [{"n": 0}, {"n": 0}]) == [0.5, 0.5]


def _tiny_stage(examples: int = 6) -> loop.Stage:
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    data = [(torch.randn(3), torch.randn(1)) for _ in range(examples)]

    def collate(items):
        return {"x": torch.stack([x for x, _ in items]), "y": torch.stack([y for _, y in items])}

    def loss(batch):
        return 50.0 * (model(batch["x"]) - batch["y"]).square().mean(), {}

    return loop.Stage("tiny", model, data, collate, loss)


def test_loop_logs_the_scheduled_lr_and_clips_the_gradient(tmp_path, monkeypatch):
    stage = _tiny_stage()
    config = TrainConfig(
        lr=0.1, schedule="linear", warmup_steps=1, max_steps=4, batch_size=2,
        max_grad_norm=0.5, save_every=0, keep_checkpoints=0,
    )  # fmt: skip
    norms_after_clip = []
    original_step = torch.optim.AdamW.step

    def observing_step(self, *args, **kwargs):
        grads = [p.grad.flatten() for group in self.param_groups for p in group["params"]]
        norms_after_clip.append(float(torch.linalg.vector_norm(torch.cat(grads))))
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", observing_step)
    loop.train(stage, config, tmp_path, device="cpu")
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    factor = loop.lr_factor("linear", 1, 4)
    assert [r["lr"] for r in records] == pytest.approx([0.1 * factor(s) for s in range(4)])
    assert [r["lr"] for r in records] == pytest.approx([0.05, 0.1, 2 / 30, 1 / 30])
    # the loss is scaled up so that every pre-clip norm exceeds max_grad_norm: each is clipped
    assert all(r["grad_norm"] > 0.5 for r in records)
    assert norms_after_clip == pytest.approx([0.5] * 4, rel=1e-4)


def test_logged_metrics_weight_each_micro_batch_as_the_gradient_does(tmp_path):
    """With grad_accum, the step's loss is the mean over all of its terms (micro-batches
    weighted by Stage.count); the logged loss and accuracy must be that mean, not the plain
    mean of the micro-batches' values (which overweights a micro-batch of few tokens)."""
    model = nn.Linear(1, 1)
    examples = [{"n": n, "v": float(v)} for n, v in [(1, 9.0), (9, 1.0), (3, 2.0), (5, 4.0)]]
    seen = []

    def collate(items):
        (item,) = items
        return {"n": torch.tensor(item["n"]), "v": torch.tensor(item["v"])}

    def loss(batch):
        seen.append((int(batch["n"]), float(batch["v"])))
        value = model.weight.sum() * 0 + batch["v"]
        return value, {"accuracy": float(batch["v"]) / 10, "tokens": int(batch["n"])}

    stage = loop.Stage("t", model, examples, collate, loss, count=lambda b: int(b["n"]))
    config = TrainConfig(batch_size=1, grad_accum=2, max_steps=2, save_every=0, lr=0.0)
    loop.train(stage, config, tmp_path, device="cpu")
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for step, record in enumerate(records):
        (n1, v1), (n2, v2) = seen[2 * step : 2 * step + 2]
        expected = (n1 * v1 + n2 * v2) / (n1 + n2)
        assert record["loss"] == pytest.approx(expected)
        assert record["accuracy"] == pytest.approx(expected / 10)
        assert record["tokens"] == n1 + n2
