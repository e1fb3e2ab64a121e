"""Reward-model training step on K=9 rankings: ours vs the pairwise way.

Reward model (forward + backward of a LoRA Llama-shaped decoder with our value head):
- ours ("cpp" when rank_loss's C++ backend runs, else "reference"): every prompt's 9 answers
  in ONE forward pass of B*9 rows, then `rank_loss(scores [B, 9])` over the 36 pairs;
- "peer": how TRL / OpenRLHF / DeepSpeed-Chat train on a ranking: each of the C(9,2) = 36
  pairs as a (chosen, rejected) example, i.e. 72 sequences per prompt through the model (in
  one concatenated forward, the peer's best case), loss mean -logsigmoid(chosen - rejected).
Both compute the same loss (checked below), so the ratio is the cost of re-encoding answers.

SFT tokens/s in fp32 vs bf16 is measured in bench/test_bench_sft_tokens.py.

Quick mode: tiny shape only.
"""

from __future__ import annotations

import functools
import itertools

import pytest
import torch
import torch.nn.functional as F

from rlhf_fast.models.load import LoraSettings, attach_lora
from rlhf_fast.models.reward import RewardModel
from rlhf_fast.ops import backends, rank_loss

K = 9
SHAPES = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=176, vocab_size=512, tokens=24, batch=1),
    "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4, intermediate_size=704, vocab_size=8192, tokens=64,
                  batch=2),
}  # fmt: skip
SHAPE_PARAMS = [
    pytest.param(name, id=name, marks=pytest.mark.bench_full if name != "tiny" else ())
    for name in SHAPES
]
OURS = "cpp" if backends("cpu")["rank_loss"]["cpp"].available else "reference"


def _llama_config(shape: str):
    from transformers import LlamaConfig

    spec = {k: v for k, v in SHAPES[shape].items() if k not in ("tokens", "batch")}
    return LlamaConfig(**spec, max_position_embeddings=512, pad_token_id=0)


@functools.lru_cache(maxsize=1)
def _reward_model(shape: str) -> RewardModel:
    from transformers import LlamaModel

    torch.manual_seed(0)
    backbone = attach_lora(LlamaModel(_llama_config(shape)), LoraSettings(r=8))
    return RewardModel(backbone).train()


def _rankings(shape: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids / attention_mask [B*K, L]: answers of random lengths, right padding."""
    batch, tokens = SHAPES[shape]["batch"], SHAPES[shape]["tokens"]
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, SHAPES[shape]["vocab_size"], (batch * K, tokens), generator=generator)
    lengths = torch.randint(tokens // 2, tokens + 1, (batch * K,), generator=generator)
    mask = (torch.arange(tokens)[None, :] < lengths[:, None]).long()
    return ids * mask, mask


def _ours_loss(model, ids, mask):
    scores = model(ids, mask).view(-1, K)
    return rank_loss(scores, backend=OURS)


_PAIRS = torch.tensor(list(itertools.combinations(range(K), 2)))  # [36, 2], better first


def _pairwise_loss(model, ids, mask):
    """Every pair as its own chosen / rejected sequences: 72 rows per prompt."""
    batch = ids.shape[0] // K
    rows = (torch.arange(batch)[:, None, None] * K + _PAIRS[None]).reshape(-1, 2)
    chosen, rejected = rows[:, 0], rows[:, 1]
    both = torch.cat([chosen, rejected])
    scores = model(ids[both], mask[both])
    return -F.logsigmoid(scores[: len(chosen)] - scores[len(chosen) :]).mean()


def _step(loss_fn, model, ids, mask):
    def run():
        model.zero_grad(set_to_none=True)
        loss = loss_fn(model, ids, mask)
        loss.backward()
        return loss

    return run


@pytest.mark.parametrize("provider", [OURS, "peer"])
@pytest.mark.parametrize("shape", SHAPE_PARAMS)
def test_rm_step_k9(measure, shape, provider):
    model = _reward_model(shape)
    ids, mask = _rankings(shape)
    loss_fn = _ours_loss if provider == OURS else _pairwise_loss
    batch, tokens = SHAPES[shape]["batch"], SHAPES[shape]["tokens"]
    measure(
        _step(loss_fn, model, ids, mask),
        op="rm_train_step_k9",
        device="cpu",
        size=f"{shape} B={batch} K={K} L={tokens}",
        provider=provider,
    )


def test_pairwise_peer_computes_our_loss():
    model = _reward_model("tiny").eval()  # no dropout: both passes see the same model
    ids, mask = _rankings("tiny", seed=1)
    with torch.no_grad():
        torch.testing.assert_close(
            _pairwise_loss(model, ids, mask), _ours_loss(model, ids, mask), atol=1e-5, rtol=1e-5
        )
    model.train()
