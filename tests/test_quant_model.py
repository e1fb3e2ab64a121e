"""QuantLinear, quantize_model, save/load of quantized HF directories and `rlhf-fast quantize`,
on tiny random models of five families (built from configs, offline)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from rlhf_fast.cli import main
from rlhf_fast.quant import (
    QuantizedWeight,
    QuantLinear,
    load_model,
    load_quantized,
    quantize_model,
    quantize_weight,
    save_quantized,
)

FAMILIES = ("llama", "qwen2", "gpt2", "opt", "bloom")
VOCAB = 96


def tiny_config(family: str, tie: bool | None = None):
    common = {"vocab_size": VOCAB, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    if family == "llama":
        config = transformers.LlamaConfig(
            hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, **common,
        )  # fmt: skip
    elif family == "qwen2":
        config = transformers.Qwen2Config(
            hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True, **common,
        )  # fmt: skip
    elif family == "gpt2":
        config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=64, **common)
    elif family == "opt":
        config = transformers.OPTConfig(
            hidden_size=64, ffn_dim=80, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, word_embed_proj_dim=64, **common,
        )  # fmt: skip
    else:
        config = transformers.BloomConfig(hidden_size=64, n_layer=2, n_head=4, **common)
    if tie is not None:
        config.tie_word_embeddings = tie
    return config


def tiny_model(family: str, seed: int = 0, tie: bool | None = None) -> nn.Module:
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(family, tie))
    with torch.no_grad():  # larger than the 0.02 init, so that quantization error shows
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0.0, 0.2)
    return model.eval()


def input_ids(seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (2, 11), generator=generator)


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def dense_layers(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))]


def dequantized_copy(float_model: nn.Module, quantized: nn.Module) -> nn.Module:
    """The float model with each quantized layer's weight replaced by its dequantize()."""
    model = copy.deepcopy(float_model)
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if isinstance(module, QuantLinear):
                target = model.get_submodule(name)
                weight = module.dequantize()
                target.weight.copy_(weight.T if isinstance(target, Conv1D) else weight)
    return model


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert state_a[key].dtype == state_b[key].dtype, key
        assert torch.equal(state_a[key], state_b[key]), key


# -------------------------------------------------------------------------------- QuantLinear


@pytest.mark.parametrize("bits", [8, 4])
def test_quant_linear_from_linear_and_conv1d(bits):
    torch.manual_seed(0)
    linear = nn.Linear(200, 48)
    conv = Conv1D(48, 200)  # nf=out, nx=in; weight stored [in, out]
    x = torch.randn(3, 5, 200)
    for layer, weight in ((linear, linear.weight), (conv, conv.weight.T)):
        quantized = QuantLinear.from_linear(layer, bits, 32)
        expected = quantize_weight(weight, bits, 32)
        assert torch.equal(quantized.dequantize(), expected.dequantize())
        reference = x @ expected.dequantize().T + layer.bias
        torch.testing.assert_close(quantized(x), reference, atol=1e-5, rtol=1e-5)
        assert quantized.qdata.dtype == (torch.int8 if bits == 8 else torch.uint8)


def test_quant_linear_is_frozen_buffers_and_state_dict_is_the_file_format():
    torch.manual_seed(0)
    layer = QuantLinear.from_linear(nn.Linear(96, 40), 4, 32)
    assert [name for name, p in layer.named_parameters() if p.requires_grad] == []
    assert {name for name, _ in layer.named_buffers()} == {"qdata", "scales", "offsets", "qshape"}
    expected = layer.qweight.state_dict("layer")
    expected["layer.bias"] = layer.bias
    state = layer.state_dict(prefix="layer.")
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[key], expected[key]) for key in state)
    text = repr(layer)
    assert "bits=4" in text and "group_size=32" in text and "in_features=96" in text
    assert "out_features=40" in text


@pytest.mark.parametrize("bits", [8, 4])
def test_gradient_reaches_the_input_whatever_the_backend(bits):
    torch.manual_seed(0)
    layer = QuantLinear.from_linear(nn.Linear(80, 24), bits, 32)
    x = torch.randn(3, 4, 80, requires_grad=True)
    grad_y = torch.randn(3, 4, 24)
    layer(x).backward(grad_y)
    torch.testing.assert_close(x.grad, grad_y @ layer.dequantize(), atol=1e-5, rtol=1e-5)
    assert layer.bias.grad is None
    with torch.no_grad():
        assert not layer(x).requires_grad


def test_quant_linear_cast_keeps_format_dtypes():
    layer = QuantLinear.from_linear(nn.Linear(64, 32), 4, 32).to(torch.bfloat16)
    assert layer.scales.dtype == torch.float16 and layer.offsets.dtype == torch.float16
    assert layer.qdata.dtype == torch.uint8 and layer.bias.dtype == torch.bfloat16
    y = layer(torch.randn(3, 64, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    int8 = QuantLinear.from_linear(nn.Linear(64, 32, bias=False), 8).half()
    assert int8.scales.dtype == torch.float32 and int8.bias is None
    assert "per-channel" in repr(int8)


# ----------------------------------------------------------------------------- quantize_model


@pytest.mark.parametrize("family", FAMILIES)
def test_quantize_model_replaces_every_linear_but_lm_head(family):
    model = tiny_model(family)
    expected = [name for name in dense_layers(model) if name != "lm_head"]
    embedding = model.get_input_embeddings()
    tied = model.get_output_embeddings().weight is embedding.weight
    assert quantize_model(model, 4, 32) is model
    quantized = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert quantized == expected and len(quantized) >= 8
    assert dense_layers(model) == ["lm_head"]
    assert model.get_input_embeddings() is embedding
    assert (model.get_output_embeddings().weight is embedding.weight) == tied
    assert model.config.quantization == {
        "bits": 4, "group_size": 32, "skip": ["lm_head"], "format": "rlhf_fast",
    }  # fmt: skip
    assert json.loads(model.config.to_json_string())["quantization"]["bits"] == 4


def test_skip_patterns_match_components_and_fnmatch():
    model = quantize_model(tiny_model("llama"), 8, skip=("lm_head", "mlp", "*.layers.1.*"))
    assert [n for n, m in model.named_modules() if isinstance(m, QuantLinear)] == [
        f"model.layers.0.self_attn.{p}_proj" for p in "qkvo"
    ]
    assert model.config.quantization["skip"] == ["lm_head", "mlp", "*.layers.1.*"]
    prefixed = quantize_model(tiny_model("llama"), 8, skip=("lm_head", "model.layers.0"))
    assert isinstance(prefixed.model.layers[0].mlp.up_proj, nn.Linear)
    assert isinstance(prefixed.model.layers[1].mlp.up_proj, QuantLinear)
    gpt2 = quantize_model(tiny_model("gpt2"), 4, skip=("c_*",))
    assert [n for n, m in gpt2.named_modules() if isinstance(m, QuantLinear)] == ["lm_head"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("bits, close_to_float", [(8, 0.05), (4, 0.5)])
def test_quantized_logits_equal_the_dequantized_float_model(family, bits, close_to_float):
    float_model = tiny_model(family)
    ids = input_ids()
    reference = logits(float_model, ids)
    quantized = quantize_model(copy.deepcopy(float_model), bits, 32)
    got = logits(quantized, ids)
    # the quantized model computes exactly the float model with dequantized weights...
    dequantized = logits(dequantized_copy(float_model, quantized), ids)
    torch.testing.assert_close(got, dequantized, atol=1e-4, rtol=1e-4)
    # ...and stays close to the float model (error relative to the logits' spread; these
    # random nets amplify weight error: measured int8 ~0.02, int4 g32 ~0.2-0.33; a wrong
    # layout or transpose gives ~1)
    relative = ((got - reference).norm() / (reference - reference.mean()).norm()).item()
    assert relative < close_to_float
    assert relative > 1e-5  # it is quantized


def test_quantizing_a_tied_lm_head_unties_it():
    model = tiny_model("qwen2")
    quantize_model(model, 8, skip=())
    assert isinstance(model.lm_head, QuantLinear)
    assert isinstance(model.get_input_embeddings(), nn.Embedding)
    assert model.config.tie_word_embeddings is False
    model.tie_weights()  # must leave the quantized head alone
    assert isinstance(model.lm_head, QuantLinear) and not hasattr(model.lm_head, "weight")


# ------------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_round_trip_is_bit_exact_and_generates(family, tmp_path):
    model = quantize_model(tiny_model(family), 4, 32)
    ids = input_ids()
    save_quantized(model, None, tmp_path / "q")
    assert sorted(os.listdir(tmp_path)) == ["q"]  # the temp dir was renamed, nothing left
    assert {"config.json", "model.safetensors"} <= set(os.listdir(tmp_path / "q"))
    loaded = load_quantized(tmp_path / "q")
    assert not loaded.training
    assert torch.equal(logits(loaded, ids), logits(model, ids))
    assert_same_state(loaded, model)
    if model.config.tie_word_embeddings:
        assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight
    cached = loaded.generate(ids[:1], max_new_tokens=6, do_sample=False, use_cache=True)
    uncached = loaded.generate(ids[:1], max_new_tokens=6, do_sample=False, use_cache=False)
    assert cached.shape == (1, ids.shape[1] + 6)
    assert torch.equal(cached, uncached)


def test_int8_untied_round_trip_and_load_model_detects_quantized_dirs(tmp_path):
    model = quantize_model(tiny_model("qwen2"), 8, skip=())  # lm_head quantized too
    save_quantized(model, None, tmp_path / "q")
    loaded = load_model(tmp_path / "q")  # no flags: detected from config.json
    assert isinstance(loaded.lm_head, QuantLinear) and loaded.lm_head.qdata.dtype == torch.int8
    assert torch.equal(logits(loaded, input_ids()), logits(model, input_ids()))
    assert load_model(tmp_path / "q", quantize=8).config.quantization["bits"] == 8
    with pytest.raises(ValueError, match="already quantized to int8"):
        load_model(tmp_path / "q", quantize=4)


def test_loaded_float_parts_follow_dtype(tmp_path):
    model = quantize_model(tiny_model("llama"), 4, 32)
    save_quantized(model, None, tmp_path / "q")
    loaded = load_quantized(tmp_path / "q", dtype=torch.bfloat16)
    assert loaded.get_input_embeddings().weight.dtype == torch.bfloat16
    layer = loaded.model.layers[0].self_attn.q_proj
    assert layer.qdata.dtype == torch.uint8 and layer.scales.dtype == torch.float16
    assert loaded.model.rotary_emb.inv_freq.dtype == torch.float32
    assert torch.isfinite(logits(loaded, input_ids()).float()).all()


def test_load_model_takes_a_dtype_name_for_dense_and_quantized_directories(tmp_path):
    # A dense directory took "bfloat16" (transformers parses it); a quantized one raised
    # "Invalid device string: 'bfloat16'" from tensor.to.
    tiny_model("llama").save_pretrained(tmp_path / "dense")
    save_quantized(quantize_model(tiny_model("llama"), 4, 32), None, tmp_path / "q")
    for directory in (tmp_path / "dense", tmp_path / "q"):
        loaded = load_model(directory, dtype="bfloat16")
        assert loaded.get_input_embeddings().weight.dtype == torch.bfloat16, directory
        for bad in ("nonsense", "int8", 3):
            with pytest.raises(ValueError, match="dtype") as error:
                load_model(directory, dtype=bad)
            assert "\n" not in str(error.value)


def test_load_model_quantizes_a_dense_directory_on_load(tmp_path):
    dense = tiny_model("gpt2")
    dense.save_pretrained(tmp_path / "dense")
    loaded = load_model(tmp_path / "dense", quantize=4, group_size=32)
    expected = quantize_model(copy.deepcopy(dense), 4, 32)
    assert torch.equal(logits(loaded, input_ids()), logits(expected, input_ids()))
    plain = load_model(tmp_path / "dense")
    assert dense_layers(plain) == dense_layers(dense)
    assert torch.equal(logits(plain, input_ids()), logits(dense, input_ids()))


def test_loading_never_builds_float_weights_for_quantized_layers(tmp_path, monkeypatch):
    model = quantize_model(tiny_model("llama"), 4, 32)
    save_quantized(model, None, tmp_path / "q")

    def forbidden(*args, **kwargs):
        raise AssertionError("loading must not quantize or dequantize")

    monkeypatch.setattr(QuantizedWeight, "dequantize", forbidden)
    monkeypatch.setattr("rlhf_fast.quant.linear.quantize_weight", forbidden)

    def only_on_meta(linear):
        assert linear.weight.is_meta, "a real (allocated) nn.Linear was built while loading"

    monkeypatch.setattr(nn.Linear, "reset_parameters", only_on_meta)
    loaded = load_quantized(tmp_path / "q")
    monkeypatch.undo()
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as handle:
        for name, module in loaded.named_modules():
            if isinstance(module, QuantLinear):
                assert module.qdata.dtype == torch.uint8
                assert torch.equal(module.qdata, handle.get_tensor(f"{name}.qdata"))


_PEAK_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from rlhf_fast.quant import load_quantized
    def status(key):
        line = [l for l in open("/proc/self/status") if l.startswith(key)][0]
        return int(line.split()[1]) * 1024
    load_quantized(sys.argv[2])  # a tiny model of the same family: imports and caches warm
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
    before = status("VmRSS")
    model = load_quantized(sys.argv[1])
    print(status("VmHWM") - before)
    """
)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux procfs")
def test_loading_peak_memory_is_far_below_a_float_copy(tmp_path):
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=384, intermediate_size=1536, num_hidden_layers=4,
        num_attention_heads=6, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    float_bytes = sum(p.numel() * 4 for p in model.parameters())  # ~38 MB
    save_quantized(quantize_model(model, 8), None, tmp_path / "q")
    save_quantized(quantize_model(tiny_model("llama"), 8), None, tmp_path / "tiny")
    del model
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT, str(tmp_path / "q"), str(tmp_path / "tiny")],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    peak_growth = int(result.stdout.split()[-1])
    # measured ~5 MB (the int8 pages stay on disk until used); a float copy adds >= 38 MB
    assert peak_growth < float_bytes / 2, (peak_growth, float_bytes)


# ------------------------------------------------------------------------------------ errors


def saved(tmp_path, family: str = "llama"):
    model = quantize_model(tiny_model(family), 4, 32)
    save_quantized(model, None, tmp_path / "q")
    return tmp_path / "q"


def rewrite(weights_file, change) -> None:
    with safe_open(str(weights_file), "pt") as handle:
        tensors = {key: handle.get_tensor(key).clone() for key in handle.keys()}
    change(tensors)
    save_file(tensors, weights_file, metadata={"format": "pt"})


def test_missing_directory_config_and_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_quantized(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json: missing"):
        load_model(tmp_path / "empty")
    directory = saved(tmp_path)
    (directory / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors: missing"):
        load_quantized(directory)


def test_truncated_or_garbage_weights(tmp_path):
    directory = saved(tmp_path)
    weights = directory / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match=r"model\.safetensors: not a readable safetensors"):
        load_quantized(directory)
    weights.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match=r"model\.safetensors: not a readable safetensors"):
        load_quantized(directory)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t: t.pop("model.layers.0.mlp.up_proj.scales"), "missing tensor model.layers.0"),
        (lambda t: t.pop("model.norm.weight"), "missing tensor model.norm.weight"),
        (lambda t: t.update({"model.extra": torch.zeros(1)}), "unexpected tensor model.extra"),
        (
            lambda t: t.update({"model.layers.1.mlp.down_proj.qdata": torch.zeros(64, 40).byte()}),
            r"tensor model.layers.1.mlp.down_proj.qdata has shape \(64, 40\), expected \(64, 48\)",
        ),
        (
            lambda t: t.update({"model.embed_tokens.weight": torch.zeros(VOCAB, 32)}),
            "tensor model.embed_tokens.weight has shape",
        ),
        (
            lambda t: t.update({"model.layers.0.self_attn.q_proj.qshape": torch.tensor([64, 63])}),
            r"q_proj.qshape says \(64, 63\)",
        ),
        (
            lambda t: t.update({"model.layers.0.self_attn.q_proj.qdata": torch.zeros(64, 32)}),
            "not int8/uint8",
        ),
        (  # loaded fine before, then the first forward failed in the kernel, naming no file
            lambda t: t.update({"model.layers.0.self_attn.q_proj.scales": torch.zeros(64, 2)}),
            "q_proj: scales must be float16 for int4, got float32",
        ),
    ],
)
def test_inconsistent_tensors_are_named(tmp_path, change, message):
    directory = saved(tmp_path)
    rewrite(directory / "model.safetensors", change)
    with pytest.raises(ValueError, match=message) as error:
        load_quantized(directory)
    assert "model.safetensors" in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"group_size": "32"}, "group_size"),  # was a TypeError from a comparison
        ({"group_size": 0}, "group_size"),  # was an error naming neither file nor entry
        ({"group_size": 48}, "group_size"),
        ({"group_size": True}, "group_size"),
        ({"bits": 8, "group_size": -1}, "says int8 but"),  # the file holds int4: was loaded
        ({"bits": 8, "group_size": 32}, "group_size must be -1 for int8"),
    ],
)
def test_bad_quantization_entry_is_a_one_line_error_naming_the_config(tmp_path, entry, message):
    directory = saved(tmp_path)
    config = json.loads((directory / "config.json").read_text())
    config["quantization"].update(entry)
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message) as error:
        load_quantized(directory)
    assert "config.json" in str(error.value) and "\n" not in str(error.value)


def test_dense_directory_needs_safetensors(tmp_path):
    tiny_model("opt").save_pretrained(tmp_path / "dense")
    (tmp_path / "dense" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        load_model(tmp_path / "dense", quantize=4)
    with pytest.raises(ValueError, match="no 'quantization' entry"):
        load_quantized(tmp_path / "dense")


def test_save_refuses_unquantized_models_and_foreign_directories(tmp_path):
    with pytest.raises(ValueError, match="quantize_model"):
        save_quantized(tiny_model("gpt2"), None, tmp_path / "q")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    model = quantize_model(tiny_model("gpt2"), 8)
    with pytest.raises(FileExistsError, match="not a model directory"):
        save_quantized(model, None, tmp_path / "notes")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"
    save_quantized(model, None, tmp_path / "q")
    save_quantized(quantize_model(tiny_model("gpt2"), 4), None, tmp_path / "q")  # replaces
    assert load_quantized(tmp_path / "q").config.quantization["bits"] == 4
    assert sorted(os.listdir(tmp_path)) == ["notes", "q"]


# --------------------------------------------------------------------------------------- CLI


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3}
    vocab.update({f"w{i}": i for i in range(4, VOCAB)})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>"
    )


def test_quantize_cli_end_to_end(tmp_path, capsys):
    dense = tiny_model("llama")
    dense.save_pretrained(tmp_path / "dense")
    tiny_tokenizer().save_pretrained(tmp_path / "dense")
    argv = ["quantize", str(tmp_path / "dense"), "--bits", "4", "--group-size", "32"]
    transformers.utils.logging.enable_progress_bar()  # as in a fresh process
    capsys.readouterr()
    assert main([*argv, "--clip-search", "--output", str(tmp_path / "q")]) == 0
    out, err = capsys.readouterr()
    assert "Loading weights" not in err and "it/s" not in err  # transformers' bars, not ours
    assert "MB ->" in out and out.count("relative error") == 3
    assert "model.layers.0.self_attn.q_proj" in out and "model.layers.1.mlp.down_proj" in out
    assert "tokenizer.json" in os.listdir(tmp_path / "q")
    loaded = load_model(tmp_path / "q")
    expected = quantize_model(copy.deepcopy(dense), 4, 32, clip_search=True)
    assert torch.equal(logits(loaded, input_ids()), logits(expected, input_ids()))
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "q")
    assert tokenizer("w5 w6")["input_ids"] == [5, 6]

    assert main(["quantize", str(tmp_path / "dense"), "--bits", "8", "--skip", "mlp", "lm_head",
                 "--output", str(tmp_path / "q8")]) == 0  # fmt: skip
    skipped = load_model(tmp_path / "q8")
    assert isinstance(skipped.model.layers[0].mlp.up_proj, nn.Linear)
    assert skipped.config.quantization["skip"] == ["mlp", "lm_head"]


def test_quantize_cli_errors(tmp_path, capsys):
    missing = tmp_path / "missing"
    assert main(["quantize", str(missing), "--bits", "4", "--output", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(missing) in err and "does not exist" in err
    tiny_model("bloom").save_pretrained(tmp_path / "dense")
    dense = str(tmp_path / "dense")
    assert main(["quantize", dense, "--group-size", "48", "--output", str(tmp_path / "q")]) == 2
    assert "multiple of 32" in capsys.readouterr().err
    assert main(["quantize", dense, "--output", dense]) == 2
    assert "must differ" in capsys.readouterr().err
    assert main(["quantize", dense, "--output", str(tmp_path / "q")]) == 0
    assert main(["quantize", str(tmp_path / "q"), "--output", str(tmp_path / "q2")]) == 2
    assert "already quantized" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["quantize", dense, "--bits", "3", "--output", str(tmp_path / "q3")])
    assert exit_info.value.code == 2


def test_failed_replace_keeps_the_old_model_directory(tmp_path, monkeypatch):
    # Saving over an existing model moves it aside, then moves the new one in: when that second
    # move failed, the old model stayed under a hidden .q.old-* name and q was gone.
    model = quantize_model(tiny_model("gpt2"), 8)
    save_quantized(model, None, tmp_path / "q")
    before = (tmp_path / "q" / "model.safetensors").read_bytes()
    real_rename = type(tmp_path).rename

    def rename(self, target):
        if ".tmp-" in self.name:  # the staged directory's move into place
            raise OSError("simulated failure")
        return real_rename(self, target)

    monkeypatch.setattr(type(tmp_path), "rename", rename)
    with pytest.raises(OSError, match="simulated"):
        save_quantized(quantize_model(tiny_model("gpt2"), 4), None, tmp_path / "q")
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["q"]
    assert (tmp_path / "q" / "model.safetensors").read_bytes() == before


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_load_model_refuses_a_checkpoint_missing_a_tensor(tmp_path, family):
    # transformers initializes a tensor the checkpoint lacks at random and only logs it: chat
    # and quantize would have answered with a random q_proj
    tiny_model(family).save_pretrained(tmp_path / "dense")
    weights = tmp_path / "dense" / "model.safetensors"
    with safe_open(weights, "pt") as stored:
        tensors = {name: stored.get_tensor(name) for name in stored.keys()}  # noqa: SIM118
    dropped = next(name for name in tensors if name.endswith(("q_proj.weight", "c_attn.weight")))
    del tensors[dropped]
    save_file(tensors, weights, metadata={"format": "pt"})
    for quantize in (None, 4):
        with pytest.raises(ValueError, match="lacks") as error:
            load_model(tmp_path / "dense", quantize=quantize)
        assert dropped in str(error.value) and "\n" not in str(error.value)


def test_tensors_sharing_memory_are_saved_as_copies(tmp_path):
    """safetensors refuses two names over the same memory (a tie the model does not declare):
    the later one is saved as a copy; views at other offsets of one storage save as they are."""
    from safetensors.torch import load_file, save_file

    from rlhf_fast.quant.io import _tensors_to_save

    module = nn.Module()
    module.first = nn.Linear(4, 3)
    module.second = nn.Linear(4, 3)
    module.second.weight = module.first.weight  # the same tensor under two names
    base = torch.randn(8, 4)
    module.low, module.high = nn.Parameter(base[:4]), nn.Parameter(base[4:])
    tensors = _tensors_to_save(module)
    assert tensors["second.weight"].data_ptr() != tensors["first.weight"].data_ptr()
    save_file(tensors, tmp_path / "w.safetensors")  # raised "share memory" without the copy
    back = load_file(tmp_path / "w.safetensors")
    assert torch.equal(back["second.weight"], module.first.weight.detach())
    assert torch.equal(back["high"], base[4:]) and torch.equal(back["low"], base[:4])
