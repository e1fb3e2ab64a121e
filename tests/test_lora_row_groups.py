"""lora.row_groups.adapters_by_rows: each block of rows of one stacked pass gives what a pass
with its adapter active gives (None: adapters disabled), outputs and LoRA gradients, fused or
not, on several families; bad plans and unsupported adapters are refused; the layers' own
forwards come back afterwards, also after an exception."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from test_lora_peft import TARGETS, VOCAB, tiny_model

from rlhf_fast import lora
from rlhf_fast.lora.row_groups import adapters_by_rows, unsupported_reason

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Stacking changes the rows of the base's GEMMs; the fp32 rounding of their sums may differ.
ATOL = 3e-5


def two_adapter_model(kind: str, fused: bool, **config):
    """A peft model with adapters "default" and "critic", both non-zero and different."""
    settings = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS[kind],
                    init_lora_weights=False, fan_in_fan_out=kind == "gpt2")  # fmt: skip
    settings.update(config)
    model = get_peft_model(tiny_model(kind), LoraConfig(**settings))
    torch.manual_seed(1)
    model.add_adapter("critic", LoraConfig(**settings))
    model.base_model.set_adapter("default", inference_mode=False)
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)
    if fused:
        lora.fuse(model)
    return model.eval()


def _rows(batch: int, length: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (batch, length), generator=generator)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, :3] = 0  # left padding on one row
    return ids, mask


def _one_adapter_pass(model, adapter, ids, mask):
    if adapter is None:
        with model.disable_adapter():
            return model(input_ids=ids, attention_mask=mask).logits
    model.base_model.set_adapter(adapter, inference_mode=False)
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)
    return model(input_ids=ids, attention_mask=mask).logits


def _lora_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "peft-formula"])
@pytest.mark.parametrize("kind", ["llama", "gpt2", "opt", "qwen2"])
def test_each_block_of_rows_is_a_pass_with_its_adapter(kind, fused):
    model = two_adapter_model(kind, fused)
    plan = [("default", 2), (None, 1), ("critic", 3)]
    ids, mask = _rows(6, 9, seed=0)
    weights = torch.randn(6, 9, VOCAB, generator=torch.Generator().manual_seed(2))

    expected, start = [], 0
    for adapter, count in plan:
        block = slice(start, start + count)
        logits = _one_adapter_pass(model, adapter, ids[block], mask[block])
        if adapter is not None:  # the base alone has nothing to train
            (logits * weights[block]).sum().backward()
        expected.append(logits.detach())
        start += count
    expected_grads = _lora_grads(model)
    model.zero_grad(set_to_none=True)
    model.base_model.set_adapter("default", inference_mode=False)
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)

    with adapters_by_rows(model, plan):
        logits = model(input_ids=ids, attention_mask=mask).logits
    (logits * weights).sum().backward()

    torch.testing.assert_close(logits.detach(), torch.cat(expected), atol=ATOL, rtol=1e-4)
    grads = _lora_grads(model)
    assert set(grads) == set(expected_grads)
    assert any(".critic." in name for name in grads) and any(".default." in name for name in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], atol=ATOL, rtol=1e-4)


def test_forwards_come_back_after_the_block_and_after_an_exception():
    model = two_adapter_model("llama", fused=True)
    layers = [m for m in model.modules() if lora.is_fused(m)]
    before = [layer.forward for layer in layers]
    ids, mask = _rows(2, 5, seed=3)
    expected = model(input_ids=ids, attention_mask=mask).logits
    with adapters_by_rows(model, [("critic", 2)]):
        pass
    with pytest.raises(RuntimeError, match="boom"):
        with adapters_by_rows(model, [("critic", 2)]):
            raise RuntimeError("boom")
    assert [layer.forward for layer in layers] == before
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, expected)

    plain = two_adapter_model("llama", fused=False)
    with adapters_by_rows(plain, [("critic", 2)]):
        pass
    assert not any("forward" in m.__dict__ for m in plain.modules() if hasattr(m, "lora_A"))


def test_a_batch_of_other_rows_than_the_plan_is_refused():
    model = two_adapter_model("llama", fused=True)
    ids, mask = _rows(3, 5, seed=4)
    with pytest.raises(ValueError, match=r"plan covers 4 rows.*shape \(3, 5"):
        with adapters_by_rows(model, [("default", 2), ("critic", 2)]):
            model(input_ids=ids, attention_mask=mask)


@pytest.mark.parametrize("plan", [[], [("default", 0)], [("critic", -1)]])
def test_an_empty_block_is_refused(plan):
    model = two_adapter_model("llama", fused=True)
    with pytest.raises(ValueError, match="blocks of >= 1 rows"):
        with adapters_by_rows(model, plan):
            pass


def test_variants_and_merged_adapters_are_named_not_mixed():
    dora = two_adapter_model("llama", fused=True, use_dora=True)
    assert "DoRA" in unsupported_reason(dora, ["critic"])
    with pytest.raises(ValueError, match="adapter 'critic': DoRA"):
        with adapters_by_rows(dora, [("critic", 1)]):
            pass
    assert unsupported_reason(dora, [None]) is None  # the base alone needs no adapter

    merged = two_adapter_model("llama", fused=False)
    merged.base_model.merge_adapter(["default"])
    assert unsupported_reason(merged, ["critic"]) == "merged adapters"
    assert unsupported_reason(copy.deepcopy(tiny_model("llama")), ["x"]) is not None
