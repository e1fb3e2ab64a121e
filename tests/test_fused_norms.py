"""models/fused_norms.py: HF RMSNorm modules running ops.rms_norm give the same model."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from tiny_families import FAMILIES, make_family_dir

from rlhf_fast.models.fused_norms import FUSABLE, fuse_rms_norms, unfuse_rms_norms
from rlhf_fast.models.load import load_causal_lm

RMS_FAMILIES = ("llama", "qwen2", "mistral")


def test_fusable_classes_compute_llamas_formula():
    """The list is only safe while these classes' forward is LlamaRMSNorm's line for line."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.mistral.modeling_mistral import MistralRMSNorm
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    classes = {c.__name__: c for c in (LlamaRMSNorm, Qwen2RMSNorm, MistralRMSNorm)}
    assert set(classes) == FUSABLE
    expected = inspect.getsource(LlamaRMSNorm.forward)
    for cls in classes.values():
        assert inspect.getsource(cls.forward) == expected


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {family: make_family_dir(root / family, family) for family in FAMILIES}


def _logits_and_grad(model, ids):
    embeddings = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    logits = model(inputs_embeds=embeddings).logits
    (grad,) = torch.autograd.grad((logits * torch.linspace(-1, 1, logits.shape[-1])).sum(),
                                  embeddings)  # fmt: skip
    return logits.detach(), grad


@pytest.mark.parametrize("family", FAMILIES)
def test_loaded_model_equals_hf_forward_and_backward(family, family_dirs):
    model = load_causal_lm(family_dirs[family])  # load fuses
    fused = sum(getattr(m, "_rlhf_fast_rms_norm_fused", False) for m in model.modules())
    hf_names = [type(m).__name__ for m in model.modules() if type(m).__name__ in FUSABLE]
    assert fused == len(hf_names) == (2 * 2 + 1 if family in RMS_FAMILIES else 0)
    keys = set(model.state_dict())
    ids = torch.randint(
        3, model.config.vocab_size, (3, 21), generator=torch.Generator().manual_seed(0)
    )
    logits, grad = _logits_and_grad(model, ids)
    assert unfuse_rms_norms(model) == fused
    assert set(model.state_dict()) == keys
    expected_logits, expected_grad = _logits_and_grad(model, ids)
    torch.testing.assert_close(logits, expected_logits, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(grad, expected_grad, atol=2e-5, rtol=1e-4)


def test_fuse_is_idempotent_copyable_and_trains_the_weight(family_dirs):
    model = load_causal_lm(family_dirs["llama"])
    assert fuse_rms_norms(model) == 0  # already fused by the loader
    clone = copy.deepcopy(model)
    norm = clone.model.norm
    assert norm.forward.__self__ is norm  # the copy's forward is bound to the copy
    norm.weight.requires_grad_(True)
    x = torch.randn(4, model.config.hidden_size, requires_grad=True)
    (grad_w,) = torch.autograd.grad((norm(x) * torch.arange(x.shape[-1])).sum(), norm.weight)
    x64 = x.detach().double()
    normalized = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    torch.testing.assert_close(grad_w.double(), (normalized * torch.arange(x.shape[-1])).sum(0),
                               atol=1e-5, rtol=1e-5)  # fmt: skip
