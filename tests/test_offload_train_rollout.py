"""PPO rollouts on an offloaded policy (generate_batch's block schedule) equal the resident
policy's rollouts (train/rollout.py's generate_rollouts, HF decoding with a KV cache): same
seeded draws, same answers and masks, the same log-probs of the policy and of the reference
(adapters disabled), whatever the micro-batching."""

from __future__ import annotations

import copy

import pytest
import torch

from rlhf_fast.models.load import LoraSettings, attach_lora
from rlhf_fast.offload import load_offloaded, prepare_offload
from rlhf_fast.offload.lora import attach_offload_lora
from rlhf_fast.offload.rollout import generate_offloaded_rollouts
from rlhf_fast.train.rollout import generate_rollouts

SETTINGS = LoraSettings(r=4, alpha=8.0, fused=True)
EOS = 5
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=23, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
        initializer_range=0.3, pad_token_id=0, eos_token_id=EOS,
    )  # fmt: skip
    base = LlamaForCausalLM(config).eval()
    directory = prepare_offload(base, tmp_path_factory.mktemp("rollout") / "off")
    resident = attach_lora(copy.deepcopy(base), SETTINGS)
    lm = load_offloaded(directory, resident_layers=1, prefetch=1)
    offloaded = attach_offload_lora(lm, SETTINGS)
    generator = torch.Generator().manual_seed(1)
    state = {
        name: torch.randn(p.shape, generator=generator) * 0.3
        for name, p in resident.named_parameters()
        if "lora_" in name
    }
    resident.load_state_dict(state, strict=False)
    offloaded.load_state_dict(state, strict=False)
    yield resident, offloaded
    lm.close()


PROMPTS = [[3, 7, 9], [11, 2], [4, 4, 8, 1, 6], [13], [9, 9, 2, 17]]


@pytest.mark.parametrize(
    "temperature, top_k, micro_batch", [(0.0, 0, None), (1.0, 0, 2), (0.7, 5, 1), (1.3, 0, 5)]
)
def test_offloaded_rollouts_equal_resident(models, temperature, top_k, micro_batch):
    resident, offloaded = models
    common = dict(pad_token_id=0, eos_token_ids=EOS, max_new_tokens=6, temperature=temperature,
                  top_k=top_k)  # fmt: skip
    want = generate_rollouts(
        resident, PROMPTS, generator=torch.Generator().manual_seed(4), **common
    )
    got = generate_offloaded_rollouts(
        offloaded, PROMPTS, generator=torch.Generator().manual_seed(4), micro_batch=micro_batch,
        **common,
    )  # fmt: skip
    assert torch.equal(got.query, want.query) and torch.equal(got.query_mask, want.query_mask)
    width = want.response.shape[1]
    assert torch.equal(got.response[:, :width], want.response)
    assert torch.equal(got.response_mask[:, :width], want.response_mask)
    assert not got.response_mask[:, width:].any()  # the resident path stopped: all had ended
    assert torch.equal(got.ended, want.ended)
    torch.testing.assert_close(got.logprobs[:, :width], want.logprobs, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got.ref_logprobs[:, :width], want.ref_logprobs, atol=1e-4, rtol=1e-4)
    assert (got.logprobs != got.ref_logprobs).any()  # the adapters matter


def test_multiple_eos_ids_and_bad_arguments(models):
    _, offloaded = models
    out = generate_offloaded_rollouts(
        offloaded, PROMPTS, pad_token_id=0, eos_token_ids=[EOS, 6], max_new_tokens=5,
        temperature=1.0, generator=torch.Generator().manual_seed(0), score_reference=False,
    )  # fmt: skip
    is_eos = (out.response == EOS) | (out.response == 6)
    first = torch.where(is_eos.any(1), is_eos.float().argmax(1), out.response.shape[1])
    positions = torch.arange(out.response.shape[1])[None]
    assert torch.equal(out.response_mask, positions <= first[:, None])
    assert torch.equal(out.ended, is_eos.any(1))
    assert out.ref_logprobs is None
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_offloaded_rollouts(offloaded, PROMPTS, pad_token_id=0, eos_token_ids=EOS,
                                    max_new_tokens=0)  # fmt: skip


def test_rollouts_with_the_4bit_kv_cache_store_the_policys_logprobs(models):
    """With kv=int4 the answers are drawn from logits that read a lossy KV cache; those were
    stored as PPO's old log-probs (up to ~1 nat off here), so epoch 1's ratio against the
    training forward (no cache) started away from 1, clipped. As for quantized sampling on
    the resident path, the stored log-probs are now the policy's own (one more forward)."""
    from rlhf_fast.offload.policy import Policy
    from rlhf_fast.train.rollout import response_logprobs

    _, offloaded = models
    lm = offloaded.rlhf_fast_offload
    common = dict(pad_token_id=0, eos_token_ids=EOS, max_new_tokens=10, temperature=1.0,
                  generator=torch.Generator().manual_seed(4))  # fmt: skip
    lm.policy = Policy(None, 1, 1, micro_batch=2, batch=len(PROMPTS), kv_bits=4)
    try:
        got = generate_offloaded_rollouts(offloaded, PROMPTS, **common)
    finally:
        lm.policy = None
    offloaded.eval()
    with torch.no_grad():
        exact = response_logprobs(
            offloaded, got.query, got.query_mask, got.response, got.response_mask, 1.0
        )
    assert got.response_mask.sum() > 10  # answers long enough to read the compressed past
    torch.testing.assert_close(got.logprobs, exact, atol=1e-4, rtol=1e-4)
    assert (got.logprobs[~got.response_mask] == 0).all()
