"""models/fused_layers.py: HF RMSNorm and SwiGLU MLP modules on rlhf_fast's fused ops give the
same model, forward and backward, with LoRA adapters on the MLP too."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from tiny_families import FAMILIES, make_family_dir

from rlhf_fast.models import fused_layers
from rlhf_fast.models.fused_layers import (
    FUSABLE_MLPS,
    FUSABLE_NORMS,
    fuse_layers,
    is_fused,
    unfuse_layers,
)
from rlhf_fast.models.load import LoraSettings, attach_lora, load_causal_lm

LLAMA_LIKE = ("llama", "qwen2", "mistral")


def test_fusable_classes_compute_llamas_formulas():
    """The lists are only safe while these classes' forwards are Llama's line for line."""
    from transformers.models.llama import modeling_llama as llama
    from transformers.models.mistral import modeling_mistral as mistral
    from transformers.models.qwen2 import modeling_qwen2 as qwen2

    for names, reference in ((FUSABLE_NORMS, llama.LlamaRMSNorm), (FUSABLE_MLPS, llama.LlamaMLP)):
        suffix = reference.__name__[len("Llama") :]
        classes = [getattr(m, prefix + suffix) for m, prefix in
                   ((llama, "Llama"), (qwen2, "Qwen2"), (mistral, "Mistral"))]  # fmt: skip
        assert {c.__name__ for c in classes} == names
        for cls in classes:
            assert inspect.getsource(cls.forward) == inspect.getsource(reference.forward)


def test_attention_hashes_are_of_the_transformers_we_develop_on():
    """ATTENTION_SOURCES hold 5.24's forwards: there they must match (else the hashes are
    wrong); another version may differ, and its attention then stays HF's (checked below)."""
    import transformers
    from transformers.models.llama.modeling_llama import LlamaAttention
    from transformers.models.mistral.modeling_mistral import MistralAttention
    from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention

    if not transformers.__version__.startswith("5.24."):
        pytest.skip(f"hashes are of transformers 5.24, this is {transformers.__version__}")
    for cls in (LlamaAttention, Qwen2Attention, MistralAttention):
        assert fused_layers._mirrored(cls), cls.__name__


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {family: make_family_dir(root / family, family) for family in FAMILIES}


def _logits_and_grads(model, ids):
    embeddings = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    logits = model(inputs_embeds=embeddings).logits
    weights = torch.linspace(-1, 1, logits.shape[-1])
    trained = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad((logits * weights).sum(), [embeddings, *trained])
    return logits.detach(), grads


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("lora", [False, True], ids=["base", "lora"])
def test_loaded_model_equals_hf_forward_and_backward(family, lora, family_dirs):
    model = load_causal_lm(family_dirs[family])  # the loader fuses
    if lora:  # adapters on every projection, the MLP's included; B nonzero so they count
        model = attach_lora(model, LoraSettings(r=4, alpha=8))
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(parameter, std=0.1)
    fused = [m for m in model.modules() if is_fused(m)]
    layers = 2  # tiny_families: 2 decoder layers
    # per layer 2 norms, the MLP and (where its source is the mirrored one) the attention;
    # the final norm
    attention = [m for m in model.modules() if type(m).__name__ in fused_layers.ATTENTION_SOURCES]
    mirrored = bool(attention) and fused_layers._mirrored(type(attention[0]))
    expected_count = (3 + mirrored) * layers + 1 if family in LLAMA_LIKE else 0
    assert len(fused) == expected_count
    keys = set(model.state_dict())
    ids = torch.randint(3, 60, (3, 21), generator=torch.Generator().manual_seed(0))
    logits, grads = _logits_and_grads(model, ids)
    assert unfuse_layers(model) == expected_count
    assert set(model.state_dict()) == keys
    expected_logits, expected_grads = _logits_and_grads(model, ids)
    torch.testing.assert_close(logits, expected_logits, atol=2e-5, rtol=1e-5)
    for grad, expected in zip(grads, expected_grads, strict=True):
        # the gradients reach ~100 here: a few fp32 ulps of the largest element, since the
        # fused and HF layers sum in different orders (1 of 2016 elements was off by 2.5e-5
        # on an AMD Zen 4 host under a fixed 2e-5)
        scale = max(1.0, float(expected.abs().max()))
        torch.testing.assert_close(grad, expected, atol=1e-6 * scale, rtol=1e-4)


def test_a_gelu_mlp_is_left_alone(family_dirs):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(family_dirs["llama"])
    config.hidden_act = "gelu"
    model = AutoModelForCausalLM.from_config(config)
    attention = model.model.layers[0].self_attn
    expected = 2 * 2 + 1 + (2 if fused_layers._mirrored(type(attention)) else 0)
    assert fuse_layers(model) == expected  # the norms and the attentions, not the MLPs
    assert not any(is_fused(m) for m in model.modules() if type(m).__name__ in FUSABLE_MLPS)


def test_fuse_is_idempotent_copyable_and_trains_the_norm_weight(family_dirs):
    model = load_causal_lm(family_dirs["llama"])
    assert fuse_layers(model) == 0  # already fused by the loader
    clone = copy.deepcopy(model)
    norm = clone.model.norm
    assert norm.forward.__self__ is norm  # the copy's forward is bound to the copy
    norm.weight.requires_grad_(True)
    x = torch.randn(4, model.config.hidden_size, requires_grad=True)
    position = torch.arange(x.shape[-1])
    (grad_w,) = torch.autograd.grad((norm(x) * position).sum(), norm.weight)
    x64 = x.detach().double()
    normalized = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    torch.testing.assert_close(grad_w.double(), (normalized * position).sum(0),
                               atol=1e-5, rtol=1e-5)  # fmt: skip


@pytest.mark.parametrize("family", LLAMA_LIKE)
def test_cached_generation_with_left_padding_is_unchanged(family, family_dirs):
    # the attention's cache update and padded masks through the fused forward: greedy tokens
    # and every step's scores equal HF's own forward
    model = load_causal_lm(family_dirs[family])
    pad = model.config.pad_token_id
    ids = torch.randint(3, 60, (3, 9), generator=torch.Generator().manual_seed(1))
    ids[0, :4] = pad  # left padding, as rollouts batch prompts
    mask = (ids != pad).long()
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=pad, output_scores=True,
                    return_dict_in_generate=True)  # fmt: skip
    fused = model.generate(input_ids=ids, attention_mask=mask, **settings)
    unfuse_layers(model)
    plain = model.generate(input_ids=ids, attention_mask=mask, **settings)
    assert torch.equal(fused.sequences, plain.sequences)
    for ours, theirs in zip(fused.scores, plain.scores, strict=True):
        torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-5)


def test_attention_is_fused_only_for_the_mirrored_source(family_dirs, monkeypatch):
    from rlhf_fast.models import fused_layers

    fused_layers._mirrored.cache_clear()
    monkeypatch.setitem(fused_layers.ATTENTION_SOURCES, "LlamaAttention", ("0" * 16, None))
    try:
        model = load_causal_lm(family_dirs["llama"])  # as if transformers had changed it
        attention = [m for m in model.modules() if type(m).__name__ == "LlamaAttention"]
        assert attention and not any(is_fused(m) for m in attention)
        assert all(is_fused(m) for m in model.modules() if type(m).__name__ in FUSABLE_NORMS)
    finally:
        fused_layers._mirrored.cache_clear()


@pytest.mark.parametrize("family", LLAMA_LIKE)
def test_bf16_training_forward_with_padding_is_hfs_to_bf16_rounding(family, family_dirs):
    # bf16 weights with LoRA and a padded mask: the fused forward (short attentions under
    # autograd run through fp32) against HF's bf16 forward; both against the fp32 model
    def run(dtype: str, fuse: bool):
        torch.manual_seed(0)  # the same adapters each time
        model = attach_lora(load_causal_lm(family_dirs[family], dtype=dtype), LoraSettings(r=4))
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(parameter, std=0.1)
        if not fuse:
            unfuse_layers(model)
        ids = torch.randint(3, 60, (3, 13), generator=torch.Generator().manual_seed(0))
        mask = torch.ones_like(ids)
        mask[0, :5] = 0
        mask[2, :2] = 0
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        lora_grads = torch.autograd.grad(
            (logits * torch.linspace(-1, 1, logits.shape[-1])).sum(),
            [p for p in model.parameters() if p.requires_grad],
        )
        keep = mask.bool()
        return logits[keep].detach(), [g.float() for g in lora_grads]

    fused_logits, fused_grads = run("bf16", fuse=True)
    hf_logits, hf_grads = run("bf16", fuse=False)
    exact_logits, exact_grads = run("fp32", fuse=False)
    torch.testing.assert_close(fused_logits, hf_logits, atol=0.05, rtol=0.05)
    fused_error = (fused_logits - exact_logits).abs().max()
    assert fused_error <= 2 * (hf_logits - exact_logits).abs().max() + 1e-3
    for fused, hf, exact in zip(fused_grads, hf_grads, exact_grads, strict=True):
        scale = exact.abs().max()
        assert (fused - exact).abs().max() <= 0.05 * scale + 2 * (hf - exact).abs().max()


def test_only_short_16bit_cpu_attention_under_autograd_is_widened():
    widen = fused_layers._widen_for_cpu_sdpa
    keys = fused_layers.SHORT_KEYS_IN_FP32
    q = torch.zeros(2, 4, 8, 16, dtype=torch.bfloat16, requires_grad=True)
    short, long = torch.zeros(2, 4, 8, 16, dtype=torch.bfloat16), torch.zeros(1, 1, keys, 16)
    assert widen("sdpa", q, short)
    assert widen("sdpa", q.half(), short.half())
    assert not widen("eager", q, short)
    assert not widen("sdpa", q, long.bfloat16())
    assert not widen("sdpa", q.float(), short.float())
    assert not widen("sdpa", q.detach(), short)  # no gradient: bf16's forward is the faster
    with torch.no_grad():
        assert not widen("sdpa", q, short)


@pytest.mark.parametrize("family", LLAMA_LIKE)
def test_autocast_forward_and_backward_equal_hfs(family, family_dirs):
    """Under torch.autocast HF's rotary multiplies bf16 q/k by fp32 cos/sin (promoting them);
    the fused rotary refused the mixed dtypes (TypeError): the attention runs HF's forward."""
    model = load_causal_lm(family_dirs[family])
    for name, parameter in model.named_parameters():  # norms and projections (not embeddings)
        parameter.requires_grad_("embed" not in name)
    ids = torch.randint(3, 60, (2, 13), generator=torch.Generator().manual_seed(4))
    results = []
    for fused in (True, False):
        if not fused:
            unfuse_layers(model)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(_logits_and_grads(model, ids))
    (logits, grads), (expected_logits, expected_grads) = results
    torch.testing.assert_close(logits, expected_logits, atol=3e-2, rtol=1e-2)
    for grad, expected in zip(grads, expected_grads, strict=True):
        scale = expected.abs().max().item()
        torch.testing.assert_close(grad, expected, atol=3e-2 * scale + 1e-6, rtol=0)


@pytest.mark.parametrize("family", LLAMA_LIKE)
@pytest.mark.parametrize("padded", [False, True], ids=["causal", "padded"])
def test_short_attention_gives_sdpas_logits_and_lora_gradients(family, padded, family_dirs,
                                                               monkeypatch):  # fmt: skip
    # fp32 with LoRA on every projection: training forward and backward through
    # ops.short_attention against HF's SDPA (SHORT_ATTENTION off), no mask (is_causal), or a
    # left-padded one (and Mistral's window of 16 < 21 positions: a mask either way)
    calls = []
    real = fused_layers.ops.short_attention

    def counting(*args, **kwargs):
        calls.append(kwargs["is_causal"])
        return real(*args, **kwargs)

    monkeypatch.setattr(fused_layers.ops, "short_attention", counting)
    torch.manual_seed(0)
    model = attach_lora(load_causal_lm(family_dirs[family]), LoraSettings(r=4, alpha=8))
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.1)
    ids = torch.randint(3, 60, (3, 21), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :6] = 0
        mask[2, :1] = 0
    trained = [p for p in model.parameters() if p.requires_grad]

    def logits_and_grads():
        logits = model(input_ids=ids, attention_mask=mask if padded else None).logits
        grads = torch.autograd.grad((logits * torch.linspace(-1, 1, logits.shape[-1])).sum(),
                                    trained)  # fmt: skip
        return logits.detach()[mask.bool()], grads

    logits, grads = logits_and_grads()
    assert len(calls) == 2  # both layers took the op
    assert all(calls) == (not padded and family != "mistral")
    monkeypatch.setattr(fused_layers, "SHORT_ATTENTION", False)
    expected_logits, expected_grads = logits_and_grads()
    assert len(calls) == 2
    torch.testing.assert_close(logits, expected_logits, atol=2e-5, rtol=1e-5)
    for grad, expected in zip(grads, expected_grads, strict=True):
        scale = max(1.0, float(expected.abs().max()))
        torch.testing.assert_close(grad, expected, atol=2e-6 * scale, rtol=1e-4)


def test_short_attention_is_skipped_for_cached_steps_and_long_or_float_masked_calls(family_dirs):
    model = load_causal_lm(family_dirs["llama"])
    attention = model.model.layers[0].self_attn
    q = torch.randn(1, 4, 5, 8)
    applies = fused_layers._short_attention_applies
    assert applies(attention, q, q[:, :2], None, {})
    assert not applies(attention, q[:, :, :1], q[:, :2], None, {})  # decode step over a cache
    assert applies(attention, q, q[:, :2], torch.ones(1, 1, 5, 5, dtype=torch.bool), {})
    assert not applies(attention, q, q[:, :2], torch.zeros(1, 1, 5, 5), {})  # additive mask
    wide = torch.ones(1, 1, 5, 9, dtype=torch.bool)  # a static cache's mask: more key columns
    assert not applies(attention, q, q[:, :2], wide, {})
    long = torch.randn(1, 2, fused_layers.SHORT_ATTENTION_MAX_KEYS + 1, 8)
    assert not applies(attention, long, long, None, {})
    assert not applies(attention, q, q[:, :2], None, {"is_causal": False})
