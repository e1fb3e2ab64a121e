"""models/load.py on broken checkpoints: every failure is a one-line ModelLoadError naming the
directory, never a model with silently re-initialized (random) weights."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_families import make_family_dir

from rlhf_fast.models.load import ModelLoadError, load_backbone, load_causal_lm

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return make_family_dir(tmp_path_factory.mktemp("load") / "llama", "llama")


def _without(source, directory, name):
    """A copy of the model directory whose checkpoint lacks the tensor `name`."""
    shutil.copytree(source, directory)
    tensors = load_file(directory / "model.safetensors")
    del tensors[name]
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    return directory


@pytest.mark.parametrize("loader", [load_causal_lm, load_backbone])
@pytest.mark.parametrize("name", ["model.layers.0.self_attn.q_proj.weight", "model.norm.weight"])
def test_a_tensor_missing_from_the_checkpoint_is_an_error(llama_dir, tmp_path, loader, name):
    broken = _without(llama_dir, tmp_path / "broken", name)
    with pytest.raises(ModelLoadError) as error:
        loader(broken)
    message = str(error.value)
    assert "\n" not in message and str(broken) in message
    assert name.removeprefix("model.") in message  # the tensor is named


def test_an_untied_lm_head_missing_is_an_error_and_a_complete_model_loads(llama_dir, tmp_path):
    broken = _without(llama_dir, tmp_path / "broken", "lm_head.weight")
    with pytest.raises(ModelLoadError, match="lm_head.weight"):
        load_causal_lm(broken)
    load_backbone(broken)  # the decoder alone does not need the head
    model = load_causal_lm(llama_dir)
    saved = load_file(llama_dir / "model.safetensors")
    assert torch.equal(model.lm_head.weight, saved["lm_head.weight"])


def test_a_config_that_does_not_fit_the_tensors_names_one_of_them(llama_dir, tmp_path):
    """transformers' own error only pointed at a report that _quiet_transformers hides."""
    import json

    broken = tmp_path / "wider"
    shutil.copytree(llama_dir, broken)
    config = json.loads((broken / "config.json").read_text())
    config["hidden_size"] *= 2
    (broken / "config.json").write_text(json.dumps(config))
    for loader in (load_causal_lm, load_backbone):
        with pytest.raises(ModelLoadError) as error:
            loader(broken)
        message = str(error.value)
        assert "\n" not in message and str(broken) in message
        assert "do not fit config.json" in message and "weight has shape [" in message, message


@pytest.mark.parametrize("loader", [load_causal_lm, load_backbone])
def test_a_quantized_directory_is_refused_by_name(llama_dir, tmp_path, loader):
    """`rlhf-fast quantize` output has codes where transformers looks for weights: it loaded
    with every projection random (since then: 'lacks 14 tensors'); say what the directory is."""
    from rlhf_fast.quant import quantize_model
    from rlhf_fast.quant.io import save_quantized

    model = quantize_model(load_causal_lm(llama_dir), bits=4, group_size=32)
    quantized = save_quantized(model, None, tmp_path / "int4")
    with pytest.raises(ModelLoadError) as error:
        loader(quantized)
    message = str(error.value)
    assert "\n" not in message and str(quantized) in message
    assert "quantized" in message and "--quant int4" in message, message


def test_a_model_directory_without_a_tokenizer_is_one_line(llama_dir, tmp_path):
    # transformers' error began "Couldn't instantiate the backend tokenizer from one of:" and
    # its one-line cut ended there, naming nothing
    from rlhf_fast.models.load import load_tokenizer

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(llama_dir / name, bare / name)
    with pytest.raises(ModelLoadError, match="no tokenizer") as error:
        load_tokenizer(bare)
    assert str(bare) in str(error.value) and "\n" not in str(error.value)
    assert load_tokenizer(llama_dir).eos_token_id is not None
