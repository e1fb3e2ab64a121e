"""rlhf_fast.lora against plain peft: fused layers and models give peft's outputs and LoRA
gradients (dropout included: both paths draw the same mask from the same seed), keep peft's
adapter switching, disable_adapter, save/load; QLoRA trains on int4/int8 bases."""

from __future__ import annotations

import copy
import importlib
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from rlhf_fast import lora, ops
from rlhf_fast.quant import QuantLinear

VOCAB = 96
# fp32 models: the fused path sums in another order than peft's (one GEMM accumulates the
# LoRA term in place): differences are fp32 rounding.
ATOL = 2e-5


def tiny_model(kind: str) -> nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    common = {"vocab_size": VOCAB, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
    if kind == "llama":
        config = tf.LlamaConfig(
            hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, **common,
        )  # fmt: skip
        return tf.LlamaForCausalLM(config)
    if kind == "qwen2":
        config = tf.Qwen2Config(
            hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, **common,
        )  # fmt: skip
        return tf.Qwen2ForCausalLM(config)
    if kind == "gpt2":
        config = tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=64, **common)
        return tf.GPT2LMHeadModel(config)
    if kind == "opt":
        config = tf.OPTConfig(
            hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
            word_embed_proj_dim=64, max_position_embeddings=64, **common,
        )  # fmt: skip
        return tf.OPTForCausalLM(config)
    raise ValueError(kind)


TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "v_proj", "down_proj"],  # q/v carry a bias in Qwen2
    "gpt2": ["c_attn", "c_proj", "c_fc"],  # Conv1D: fan_in_fan_out
    "opt": ["q_proj", "v_proj", "fc1", "fc2"],
}


def peft_pair(kind: str, r: int = 8, dropout: float = 0.1, **config):
    """(plain peft model, fused copy) with the same non-zero adapters."""
    lora_config = LoraConfig(
        r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules=TARGETS[kind],
        init_lora_weights=False, fan_in_fan_out=kind == "gpt2", **config,
    )  # fmt: skip
    plain = get_peft_model(tiny_model(kind), lora_config)
    fused = copy.deepcopy(plain)
    assert lora.fuse(fused) > 0
    return plain, fused


def loss_and_grads(model, ids, seed=1):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def assert_same_training_signal(plain, fused, ids):
    loss_plain, grads_plain = loss_and_grads(plain, ids)
    loss_fused, grads_fused = loss_and_grads(fused, ids)
    torch.testing.assert_close(loss_fused, loss_plain, atol=ATOL, rtol=1e-5)
    assert grads_plain.keys() == grads_fused.keys() and grads_plain
    for name, grad in grads_plain.items():
        assert grads_fused[name] is not None, name
        scale = grad.abs().max().item()
        torch.testing.assert_close(grads_fused[name], grad, atol=1e-4 * scale + 1e-7, rtol=1e-3)


@pytest.fixture
def counted_calls(monkeypatch):
    """How many times the fused op ran (proves the fused path, not peft's, was taken)."""
    calls = []
    real = ops.lora_linear

    def spy(*args, **kwargs):
        calls.append(kwargs.get("dropout"))
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, "lora_linear", spy)
    return calls


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2", "opt"])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_fused_model_matches_peft(kind, dropout, counted_calls):
    plain, fused = peft_pair(kind, dropout=dropout)
    plain.train(), fused.train()
    ids = torch.randint(2, VOCAB, (2, 11), generator=torch.Generator().manual_seed(3))
    assert_same_training_signal(plain, fused, ids)
    assert counted_calls and set(counted_calls) == {dropout}


@pytest.mark.parametrize("rank", [1, 8, 64])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_single_layer_matches_peft(rank, dropout, dtype, counted_calls):
    torch.manual_seed(rank)
    layer = nn.Sequential(nn.Linear(72, 40, bias=True)).to(dtype)
    config = LoraConfig(
        r=rank, lora_alpha=16, lora_dropout=dropout, target_modules=["0"], init_lora_weights=False
    )
    plain = get_peft_model(layer, config)  # adapters in fp32 (peft's autocast_adapter_dtype)
    fused = copy.deepcopy(plain)
    lora.fuse(fused)
    x = torch.randn(3, 13, 72, dtype=dtype)
    grad_y = torch.randn(3, 13, 40, dtype=dtype)
    results = []
    for model in (plain, fused):
        xi = x.clone().requires_grad_()
        torch.manual_seed(7)
        y = model(xi)
        y.backward(grad_y)
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        results.append((y.detach(), xi.grad, *grads))
    tolerance = 2e-5 if dtype == torch.float32 else 3e-2  # bf16: products rounded to bf16
    for fused_t, plain_t in zip(results[1], results[0], strict=True):
        scale = plain_t.abs().max().item()
        torch.testing.assert_close(fused_t.float(), plain_t.float(), atol=tolerance * scale, rtol=0)
    assert len(counted_calls) == 1


def test_optimizer_steps_track_peft():
    plain, fused = peft_pair("llama", dropout=0.1)
    ids = torch.randint(2, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for model in (plain, fused):
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], 1e-2)
        run = []
        for step in range(6):
            loss, _ = loss_and_grads(model, ids, seed=step)
            optimizer.step()
            run.append(loss.item())
        losses.append(run)
    assert losses[1][-1] < losses[1][0]  # it trains
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


def test_disable_adapter_gives_the_base_model():
    base = tiny_model("llama").eval()
    ids = torch.randint(2, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    expected = base(input_ids=ids).logits
    config = LoraConfig(r=4, target_modules=TARGETS["llama"], init_lora_weights=False)
    model = get_peft_model(copy.deepcopy(base), config).eval()
    lora.fuse(model)
    with model.disable_adapter():
        torch.testing.assert_close(model(input_ids=ids).logits, expected, atol=0, rtol=0)
    assert not torch.allclose(model(input_ids=ids).logits, expected, atol=1e-3)


def test_unfuse_restores_peft(counted_calls):
    plain, fused = peft_pair("opt", dropout=0.0)
    ids = torch.randint(2, VOCAB, (2, 9), generator=torch.Generator().manual_seed(2))
    layers = [m for m in fused.modules() if lora.is_fused(m)]
    assert layers and lora.unfuse(fused) == len(layers)
    assert not any(lora.is_fused(m) or "forward" in m.__dict__ for m in fused.modules())
    plain.eval(), fused.eval()
    torch.testing.assert_close(fused(input_ids=ids).logits, plain(input_ids=ids).logits)
    assert counted_calls == []


def test_save_and_load_through_plain_peft(tmp_path):
    _, fused = peft_pair("gpt2", dropout=0.0)
    fused.eval()
    ids = torch.randint(2, VOCAB, (2, 9), generator=torch.Generator().manual_seed(4))
    expected = fused(input_ids=ids).logits
    fused.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").exists()
    loaded = PeftModel.from_pretrained(tiny_model("gpt2"), tmp_path).eval()  # plain peft
    torch.testing.assert_close(loaded(input_ids=ids).logits, expected, atol=ATOL, rtol=1e-5)
    lora.fuse(loaded)
    torch.testing.assert_close(loaded(input_ids=ids).logits, expected, atol=ATOL, rtol=1e-5)


def test_uncovered_configurations_fall_back_and_warn_once(counted_calls, monkeypatch):
    monkeypatch.setattr(importlib.import_module("rlhf_fast.lora.fuse"), "_warned", set())
    plain, fused = peft_pair("llama", dropout=0.0, use_dora=True)
    ids = torch.randint(2, VOCAB, (2, 9), generator=torch.Generator().manual_seed(5))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = fused(input_ids=ids).logits
        fused(input_ids=ids)
    messages = [str(w.message) for w in caught if "rlhf_fast.lora" in str(w.message)]
    assert len(messages) == 1 and "DoRA" in messages[0]  # once, for 14 layers and 2 calls
    assert counted_calls == []
    torch.testing.assert_close(first, plain(input_ids=ids).logits)


@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_fused_matches_qlora_unfused_and_trains(bits, counted_calls, tmp_path):
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, init_lora_weights=False)
    dense = tiny_model("llama")
    fused = lora.prepare_qlora(copy.deepcopy(dense), bits=bits, group_size=32, lora_config=config)
    quantized = [m for m in fused.modules() if isinstance(m, QuantLinear)]
    assert len(quantized) == 14  # 7 projections x 2 layers, lm_head skipped
    plain = copy.deepcopy(fused)
    lora.unfuse(plain)
    ids = torch.randint(2, VOCAB, (2, 12), generator=torch.Generator().manual_seed(6))
    plain.train(), fused.train()
    assert_same_training_signal(plain, fused, ids)
    assert counted_calls

    optimizer = torch.optim.AdamW([p for p in fused.parameters() if p.requires_grad], 2e-2)
    losses = []
    for step in range(5):
        loss, _ = loss_and_grads(fused, ids, seed=step)
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(not p.requires_grad for n, p in fused.named_parameters() if "lora_" not in n)

    # The adapter loads with plain peft onto the dense model (same names, same shapes).
    fused.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(dense, tmp_path)
    for name, param in fused.named_parameters():
        if "lora_" in name:
            torch.testing.assert_close(loaded.get_parameter(name), param, atol=0, rtol=0)


def test_qlora_rejects_merge():
    model = lora.prepare_qlora(tiny_model("llama"), bits=4, group_size=32)
    with pytest.raises(NotImplementedError, match="quantized"):
        model.merge_adapter()


def test_cuda_inputs_keep_peft_forward_unless_triton_is_asked_for(monkeypatch):
    """Measured on an H200, peft's forward beat the Triton fused layer: CUDA inputs run peft's
    forward unless RLHF_FAST_BACKEND=triton; CPU inputs always take the fused op."""
    from rlhf_fast.lora.fuse import peft_is_faster_here

    class CudaLike:
        is_cuda = True

    monkeypatch.delenv("RLHF_FAST_BACKEND", raising=False)
    assert peft_is_faster_here(CudaLike())
    assert not peft_is_faster_here(torch.zeros(2))
    monkeypatch.setenv("RLHF_FAST_BACKEND", "triton")
    assert not peft_is_faster_here(CudaLike())
    monkeypatch.setenv("RLHF_FAST_BACKEND", "cpp")
    assert peft_is_faster_here(CudaLike())


def test_autocast_runs_peft_forward_instead_of_failing(counted_calls, monkeypatch):
    """Under torch.autocast the op's GEMMs would get bf16 and fp32 operands (an internal
    RuntimeError): the fused layer runs peft's forward there, with peft's result and gradients."""
    monkeypatch.setattr(importlib.import_module("rlhf_fast.lora.fuse"), "_warned", set())
    plain, fused = peft_pair("llama", dropout=0.0)
    ids = torch.randint(2, VOCAB, (2, 9), generator=torch.Generator().manual_seed(8))
    results = []
    with pytest.warns(UserWarning, match="autocast"):
        for model in (plain, fused):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
            results.append((loss.detach(), *grads))
    for fused_t, plain_t in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(fused_t, plain_t, atol=0, rtol=0)
    assert counted_calls == []
    fused(input_ids=ids)  # outside autocast: the fused op again
    assert counted_calls


def test_qlora_all_linear_leaves_a_quantized_output_layer_alone():
    """peft's "all-linear" never targets the output layer; quantized with the rest (skip=()),
    lm_head got an adapter (vocab x r more weights, the head trained) under the default."""
    model = lora.prepare_qlora(tiny_model("llama"), bits=4, group_size=32, skip=())
    assert isinstance(model.get_base_model().lm_head, QuantLinear)  # quantized, not wrapped
    targets = model.peft_config["default"].target_modules
    assert "lm_head" not in targets and {"q_proj", "down_proj"} <= set(targets)


# ------------------------------------------------- mutation-testing additions (peft as oracle)


def _one_layer(**config):
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(16, 12))
    lora_config = LoraConfig(r=4, target_modules=["0"], init_lora_weights=False, **config)
    plain = get_peft_model(layer, lora_config)
    fused = copy.deepcopy(plain)
    lora.fuse(fused)
    return plain, fused


def test_eval_mode_passes_no_dropout_to_the_fused_op(counted_calls):
    plain, fused = _one_layer(lora_dropout=0.5)
    plain.eval(), fused.eval()
    x = torch.randn(5, 16)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), plain(x), atol=1e-5, rtol=0)
    assert counted_calls == [0.0]


def _grads(model, x):
    model.zero_grad()
    y = model(x)
    y.square().sum().backward()
    return y.detach(), [p.grad for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("case", ["merged", "two adapters", "lora_bias", "trainable base"])
def test_uncovered_calls_give_pefts_outputs_and_gradients(case, counted_calls, monkeypatch):
    monkeypatch.setattr(importlib.import_module("rlhf_fast.lora.fuse"), "_warned", set())
    plain, fused = _one_layer(lora_bias=case == "lora_bias")
    for model in (plain, fused):
        torch.manual_seed(1)
        if case == "merged":
            model.merge_adapter()
        elif case == "two adapters":
            model.add_adapter("other", LoraConfig(r=2, target_modules=["0"],
                                                  init_lora_weights=False))  # fmt: skip
            model.base_model.set_adapter(["default", "other"])
        elif case == "lora_bias":
            with torch.no_grad():
                model.base_model.model[0].lora_B["default"].bias.normal_(0, 1.0)
        else:
            model.base_model.model[0].base_layer.weight.requires_grad_(True)
    x = torch.randn(5, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if case == "merged":  # the frozen base alone: nothing to differentiate
            with torch.no_grad():
                torch.testing.assert_close(fused(x), plain(x), atol=1e-5, rtol=0)
            assert counted_calls == []
            return
        (y_plain, g_plain), (y_fused, g_fused) = _grads(plain, x), _grads(fused, x)
    torch.testing.assert_close(y_fused, y_plain, atol=1e-5, rtol=0)
    assert len(g_fused) == len(g_plain) and all(g is not None for g in g_fused)
    for got, want in zip(g_fused, g_plain, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert counted_calls == []
