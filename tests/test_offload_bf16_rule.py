"""The int4 activation rule (quant/activations.py) under offload.

Streamed int4 generation (bf16 activations for products of >= 32 rows, the default) equals the
resident quantized model under the same rule token for token with greedy decoding, and the
bf16 path is really taken on both sides (every product is counted); the opt-out (fp32) equals
the fp32-activation resident model; the rule's logits stay within a bound of the fp32 ones but
differ from them (so the equality tests could fail); PPO rollouts on an offloaded int4 policy
sample and score on fp32 activations, so their stored log-probs equal the training forward's.
"""

from __future__ import annotations

import copy

import pytest
import torch

import rlhf_fast.ops
from rlhf_fast.offload import load_offloaded, prepare_offload
from rlhf_fast.offload.generate import generate_batch
from rlhf_fast.quant import QuantLinear, quantize_model
from rlhf_fast.quant.activations import (
    BF16_ROWS,
    int4_activations,
    runs_on_bf16,
    same_side,
    set_int4_activations,
)

NEW_TOKENS = 6
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tiny_llama(eos: int | None = None):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=eos,
        bos_token_id=None, tie_word_embeddings=False, initializer_range=0.3,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def _prompts(batch: int, length: int = 5):
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 97, (batch, length), generator=generator)
    mask = torch.ones_like(ids)
    for row in range(batch):
        mask[row, : row % 3] = 0  # left padding of 0, 1 or 2 positions
    return ids.masked_fill(mask == 0, 0), mask


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model = _tiny_llama()
    root = tmp_path_factory.mktemp("bf16rule")
    int4_dir = prepare_offload(model, root / "int4", compress=4, group_size=32)
    resident = quantize_model(copy.deepcopy(model), 4, 32)
    return {"model": model, "int4": int4_dir, "resident": resident}


@pytest.fixture
def products(monkeypatch):
    """(dtype, rows) of every quantized product the model runs (QuantLinear calls ops)."""
    seen: list[tuple[torch.dtype, int]] = []
    original = rlhf_fast.ops.quant_matmul

    def spy(x, qweight, bias=None, **kwargs):
        seen.append((x.dtype, x.numel() // x.shape[-1]))
        return original(x, qweight, bias, **kwargs)

    monkeypatch.setattr(rlhf_fast.ops, "quant_matmul", spy)
    return seen


def _resident_greedy(model, ids, mask):
    with torch.no_grad():
        return model.generate(
            ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0
        )


def test_rule_predicate_setter_and_context():
    x = torch.randn(BF16_ROWS, 8)
    with torch.no_grad():
        assert runs_on_bf16(x, 4, BF16_ROWS)
        assert runs_on_bf16(x.view(4, BF16_ROWS // 4, 8), 4, BF16_ROWS)  # rows of any shape
        assert not runs_on_bf16(x[:-1], 4, BF16_ROWS)
        assert not runs_on_bf16(x, 8, BF16_ROWS)  # int8 keeps fp32
        assert not runs_on_bf16(x, 4, None)  # the rule off
        assert not runs_on_bf16(x.bfloat16(), 4, BF16_ROWS)  # already 16-bit: nothing to do
    assert not runs_on_bf16(x.requires_grad_(), 4, BF16_ROWS)  # autograd: fp32
    model = quantize_model(_tiny_llama(), 4, 32)
    int4 = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert set_int4_activations(model, 40) == len(int4) == 4 * 7
    with int4_activations(model, None):
        assert {m.bf16_rows for m in int4} == {None}
    assert {m.bf16_rows for m in int4} == {40}
    with pytest.raises(RuntimeError), int4_activations(model, 7):
        raise RuntimeError
    assert {m.bf16_rows for m in int4} == {40}
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="rows"):
            set_int4_activations(model, bad)


def test_the_dense_head_of_an_int4_model_follows_the_rule():
    model = quantize_model(_tiny_llama(), 4, 32)
    head = model.lm_head
    assert type(head) is torch.nn.Linear  # quantize_model leaves it dense
    x = torch.randn(BF16_ROWS, 64)
    exact = torch.nn.functional.linear(x, head.weight)
    set_int4_activations(model)
    with torch.no_grad():
        ruled = head(x)
        bf16 = torch.nn.functional.linear(x.bfloat16(), head.weight.bfloat16()).float()
        assert ruled.dtype == torch.float32 and torch.equal(ruled, bf16)
        assert not torch.equal(ruled, exact)  # (else the next checks could not fail)
        assert torch.equal(head(x[:-1]), exact[:-1])  # below the threshold: fp32
        head.weight.mul_(2)  # a changed weight: the bf16 copy is made again
        torch.testing.assert_close(head(x), 2 * bf16, atol=0.05, rtol=0.02)
    assert torch.equal(head(x), 2 * exact)  # under autograd: fp32
    with int4_activations(model, None):
        with torch.no_grad():
            assert torch.equal(head(x), 2 * exact)
        assert "forward" not in head.__dict__  # nn.Linear's own forward, no copy held
    with torch.no_grad():
        assert not torch.equal(head(x), 2 * exact)  # the context put the rule back
    set_int4_activations(model, None)
    assert not [key for key in head.__dict__ if key == "forward" or "rlhf_fast" in key]
    dense = _tiny_llama()  # no int4 layers: the rule does not touch the head
    set_int4_activations(dense)
    assert "forward" not in dense.lm_head.__dict__


def test_same_side_of_the_threshold():
    assert same_side(8, 8, 32) and same_side(64, 64, 32) and same_side(1, 5, None)
    assert same_side(32, 64, 32) and same_side(32, 96, 32) and same_side(40, 72, 32)
    assert not same_side(16, 64, 32)  # decode: 16-row products where the whole batch has 64
    assert not same_side(2, 8, 32)  # prefill: 2 x prompt rows where the batch has 8 x prompt
    assert not same_side(64, 70, 32)  # the remainder micro-batch of 6 rows
    assert not same_side(32, 40, 32)


@pytest.mark.parametrize("batch, micro_batch", [(40, None), (64, 32)])
def test_streamed_int4_equals_resident_under_the_rule(setup, products, batch, micro_batch):
    ids, mask = _prompts(batch)
    resident = setup["resident"]
    with int4_activations(resident):
        expected = _resident_greedy(resident, ids, mask)
    resident_products = list(products)
    products.clear()
    with load_offloaded(setup["int4"], resident_layers=1, prefetch=1) as lm:  # the default
        assert {m.bf16_rows for m in lm.model.modules() if isinstance(m, QuantLinear)} == {
            BF16_ROWS
        }
        out = generate_batch(lm, ids, mask, max_new_tokens=NEW_TOKENS, micro_batch=micro_batch)
    assert torch.equal(out, expected)
    for seen in (resident_products, products):
        bf16 = [rows for dtype, rows in seen if dtype == torch.bfloat16]
        fp32 = [rows for dtype, rows in seen if dtype == torch.float32]
        # prefill and every decode step of all 4 layers x 7 projections: bf16, none fp32
        assert len(bf16) >= NEW_TOKENS * 4 * 7 and not fp32
        assert min(bf16) >= BF16_ROWS


def test_opt_out_equals_fp32_resident_and_takes_no_bf16_path(setup, products):
    ids, mask = _prompts(40)
    expected = _resident_greedy(setup["resident"], ids, mask)
    assert products and {dtype for dtype, _ in products} == {torch.float32}
    products.clear()
    with load_offloaded(setup["int4"], prefetch=1, bf16_rows=None) as lm:
        out = generate_batch(lm, ids, mask, max_new_tokens=NEW_TOKENS, micro_batch=20)
    assert torch.equal(out, expected)
    assert products and {dtype for dtype, _ in products} == {torch.float32}
    with pytest.raises(ValueError, match="bf16_rows"):
        load_offloaded(setup["int4"], bf16_rows=0)


def test_rule_logits_match_resident_and_stay_near_fp32(setup):
    ids, mask = _prompts(12)  # 60 rows: the bf16 path
    resident = setup["resident"]
    with torch.no_grad():
        fp32 = resident(input_ids=ids, attention_mask=mask).logits
        with int4_activations(resident):
            rule = resident(input_ids=ids, attention_mask=mask).logits
        with load_offloaded(setup["int4"], resident_layers=2, prefetch=1) as lm:
            streamed = lm.model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(streamed, rule, atol=1e-5, rtol=1e-5)
    # bf16 activations (and bf16 weight tiles) move the logits: measurably, and a little
    relative = ((rule - fp32).norm() / fp32.norm()).item()
    assert 1e-4 < relative < 0.05, relative
    assert (rule.argmax(-1) == fp32.argmax(-1)).float().mean() > 0.9


def test_offloaded_ppo_rollouts_score_like_the_training_forward(setup, products):
    """Old log-probs (stored by the rollout from its sampling forward) equal what PPO's training
    forward (fp32, under autograd) computes for the same tokens, though the streamed model has
    the bf16 rule on: the rollout turns it off while it samples and scores."""
    from rlhf_fast.models.load import LoraSettings
    from rlhf_fast.offload.lora import attach_offload_lora
    from rlhf_fast.offload.rollout import generate_offloaded_rollouts
    from rlhf_fast.train.ppo_math import token_logprobs
    from rlhf_fast.train.rollout import response_logits, response_logprobs

    prompts = [[int(t) for t in row if t] for row in _prompts(36)[0]]
    with load_offloaded(setup["int4"], resident_layers=1, prefetch=1) as lm:
        # peft's own LoRA forward calls the QuantLinear base (where the rule acts)
        policy = attach_offload_lora(lm, LoraSettings(r=4, alpha=8.0, fused=False))
        int4 = [m for m in lm.model.modules() if isinstance(m, QuantLinear)]
        assert {m.bf16_rows for m in int4} == {None}  # training turned the rule off
        generator = torch.Generator().manual_seed(0)
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.data.normal_(0.0, 0.3, generator=generator)
        products.clear()
        with int4_activations(lm.model):  # as if the rule were on: the rollout still runs fp32
            out = generate_offloaded_rollouts(
                policy, prompts, pad_token_id=0, eos_token_ids=96, max_new_tokens=NEW_TOKENS,
                temperature=1.0, generator=torch.Generator().manual_seed(1), micro_batch=12,
            )  # fmt: skip
            assert {m.bf16_rows for m in int4} == {BF16_ROWS}  # put back afterwards
            assert products and {dtype for dtype, _ in products} == {torch.float32}
            with torch.no_grad():  # what sampling under the rule would have scored
                ruled = response_logprobs(
                    policy, out.query, out.query_mask, out.response, out.response_mask, 1.0
                )
        with torch.enable_grad():  # PPO's training forward (streamed, fp32 under autograd)
            logits = response_logits(
                policy, out.query, out.query_mask, out.response, out.response_mask
            )
            trained = token_logprobs(logits, out.response, 1.0)
        assert trained.requires_grad
        trained = torch.where(out.response_mask, trained.detach(), 0.0)
        torch.testing.assert_close(out.logprobs, trained, atol=1e-4, rtol=0)
        # the check can fail: log-probs under the rule are off by far more
        assert (ruled - trained).abs().max() > 1e-2


def test_a_head_with_a_bias_keeps_it_under_the_rule():
    """Mutation-testing addition: the bf16 path of a dense head dropped its bias unnoticed."""
    from rlhf_fast.quant.activations import set_head_rule

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 24)
    with torch.no_grad():
        head.bias.normal_(0, 5.0)
    set_head_rule(head, BF16_ROWS)
    x = torch.randn(BF16_ROWS, 16)
    expected = torch.nn.functional.linear(
        x.bfloat16(), head.weight.bfloat16(), head.bias.bfloat16()
    ).float()
    with torch.no_grad():
        assert torch.equal(head(x), expected)
        assert torch.equal(head(x[:-1]), torch.nn.functional.linear(x[:-1], head.weight, head.bias))
