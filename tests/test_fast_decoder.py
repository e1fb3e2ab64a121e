"""The lean Llama-family decode path (rlhf_fast/models/fast_decoder.py) against the HF forward
of the same model: logits of every position, greedy and seeded sampled tokens through
`generate_tokens`, for tiny random Llama / Qwen2 (q/k/v bias) / Mistral (sliding window)
models with GQA, tied and untied embeddings, rope scaling, fp32, bf16, int8 and int4."""

from __future__ import annotations

import pytest
import torch
import transformers

from rlhf_fast.models import fast_decoder
from rlhf_fast.models.fast_decoder import FastDecoder, decoder_for, unsupported_reason
from rlhf_fast.models.generate import SamplingConfig, generate_tokens
from rlhf_fast.quant import quantize_model

VOCAB = 160


def tiny_model(family: str = "llama", *, tie: bool = False, kv_heads: int = 2, **extra):
    """A tiny random model whose weights are large enough that its tokens vary (the default
    init's 0.02 std makes every step pick the same token, which would hide position bugs)."""
    common = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=512,
        tie_word_embeddings=tie,
    )  # fmt: skip
    common.update(extra)
    classes = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }
    config_class, model_class = classes[family]
    torch.manual_seed(0)
    model = model_class(config_class(**common)).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.copy_(1 + 0.2 * torch.randn_like(parameter))
            else:  # biases (Qwen2's q/k/v) included
                parameter.normal_(0, 0.15)
    return model


def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits of every position of `ids` from one full HF forward: the oracle."""
    with torch.inference_mode():
        return model(input_ids=ids.reshape(1, -1)).logits[0].float()


def lean_logits(decoder: FastDecoder, ids: torch.Tensor, prompt_length: int) -> torch.Tensor:
    """Logits at positions prompt_length - 1 .. len(ids) - 1: prefill, then one step a token."""
    rows = [decoder.prefill(ids[:prompt_length])]
    rows += [decoder.step(int(token)) for token in ids[prompt_length:]]
    return torch.stack(rows).float()


def sequence(length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (length,), generator=torch.Generator().manual_seed(seed))


MODELS = [
    pytest.param("llama", dict(tie=True), id="llama-tied-gqa"),
    pytest.param("llama", dict(kv_heads=4), id="llama-mha"),
    pytest.param("llama", dict(kv_heads=1, rope_theta=500.0), id="llama-mqa-theta"),
    pytest.param(
        "llama", dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), id="llama-linear"
    ),
    pytest.param(
        "llama",
        dict(
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            }
        ),
        id="llama3-rope",
    ),  # fmt: skip
    pytest.param("qwen2", dict(), id="qwen2-bias"),
    pytest.param("qwen2", dict(tie=True, kv_heads=1), id="qwen2-tied-mqa"),
    pytest.param("mistral", dict(sliding_window=5), id="mistral-window5"),
]


@pytest.mark.parametrize("family, extra", MODELS)
def test_logits_match_the_hf_forward(family, extra):
    model = tiny_model(family, **extra)
    ids = sequence(20)
    expected = hf_logits(model, ids)[7:]
    got = lean_logits(FastDecoder(model, fast_activations=False), ids, 8)
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("family, extra", MODELS[:1] + MODELS[5:])
def test_greedy_tokens_equal_the_hf_loop(family, extra):
    model = tiny_model(family, **extra)
    config = SamplingConfig(temperature=0.0, max_new_tokens=24)
    prompt = sequence(9).tolist()
    hf = list(generate_tokens(model, prompt, config, decoder="hf"))
    lean = list(generate_tokens(model, prompt, config, decoder="fast"))
    assert lean == hf
    assert len(set(hf)) > 3, "the test model should not repeat one token"


def test_seeded_sampling_gives_the_same_tokens():
    model = tiny_model("qwen2")
    config = SamplingConfig(temperature=0.9, top_k=40, top_p=0.95, repetition_penalty=1.1,
                            max_new_tokens=30)  # fmt: skip
    prompt = sequence(6).tolist()
    hf = list(generate_tokens(model, prompt, config, seed=7, decoder="hf"))
    lean = list(generate_tokens(model, prompt, config, seed=7, decoder="fast"))
    assert lean == hf


def test_auto_picks_the_lean_path_and_the_env_forces_hf(monkeypatch):
    model = tiny_model("llama")
    config = SamplingConfig(temperature=0.0, max_new_tokens=3)
    list(generate_tokens(model, [1, 2, 3], config))
    assert model in fast_decoder._DECODERS
    fast_decoder._DECODERS.pop(model)
    monkeypatch.setenv("RLHF_FAST_DECODER", "hf")
    list(generate_tokens(model, [1, 2, 3], config))
    assert model not in fast_decoder._DECODERS
    monkeypatch.setenv("RLHF_FAST_DECODER", "fastest")
    with pytest.raises(ValueError, match="RLHF_FAST_DECODER"):
        list(generate_tokens(model, [1, 2, 3], config))


def test_cache_grows_past_its_capacity():
    """A prompt that fills the first cache block, then steps past it (the cache is copied into
    a larger one mid-sequence), with a sliding window smaller than the prompt."""
    model = tiny_model("mistral", sliding_window=40)
    ids = sequence(fast_decoder.CACHE_ROUNDING + 12)
    decoder = decoder_for(model, capacity=1)
    assert decoder.capacity == fast_decoder.CACHE_ROUNDING
    prompt_length = fast_decoder.CACHE_ROUNDING - 3
    got = lean_logits(decoder, ids, prompt_length)
    assert decoder.capacity == 2 * fast_decoder.CACHE_ROUNDING
    expected = hf_logits(model, ids)[prompt_length - 1 :]
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)


def test_generation_beyond_the_requested_capacity_matches():
    model = tiny_model("llama", tie=True)
    config = SamplingConfig(temperature=0.0, max_new_tokens=20)
    prompt = sequence(fast_decoder.CACHE_ROUNDING - 5).tolist()
    hf = list(generate_tokens(model, prompt, config, decoder="hf"))
    assert list(generate_tokens(model, prompt, config, decoder="fast")) == hf


def test_decoder_is_rebuilt_when_weights_change():
    model = tiny_model("llama")
    ids = sequence(10)
    first = decoder_for(model)
    assert decoder_for(model) is first
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(-1.5)
    second = decoder_for(model)
    assert second is not first
    expected = hf_logits(model, ids)[4:]
    torch.testing.assert_close(lean_logits(second, ids, 5), expected, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("bits, group_size", [(4, 32), (4, 128), (8, -1)])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_quantized_models(family, bits, group_size):
    """Exact activations: the same kernels as the HF path's QuantLinear, so logits agree to
    fp32 rounding and greedy tokens are equal. Fast activations (int8 / int16-quantized x in the
    GEMVs, an int8 lm_head): they move the logits far less than quantizing the weights did."""
    model = tiny_model(family, hidden_size=128, intermediate_size=160)
    ids = sequence(40)
    float_logits = hf_logits(model, ids)[35:]
    quantize_model(model, bits=bits, group_size=max(group_size, 32))
    expected = hf_logits(model, ids)[35:]
    exact = lean_logits(FastDecoder(model, fast_activations=False), ids, 36)
    torch.testing.assert_close(exact, expected, atol=3e-4, rtol=1e-4)
    fast = lean_logits(FastDecoder(model, fast_activations=True), ids, 36)
    weight_error = (expected - float_logits).abs().max()
    assert (fast - expected).abs().max() <= 0.5 * weight_error
    config = SamplingConfig(temperature=0.0, max_new_tokens=16)
    prompt = ids[:12].tolist()
    hf = list(generate_tokens(model, prompt, config, decoder="hf"))
    fast_decoder._DECODERS[model] = FastDecoder(model, fast_activations=False)
    assert list(generate_tokens(model, prompt, config, decoder="fast")) == hf


@pytest.mark.parametrize("bits", [4, 8])
def test_prefill_of_32_rows_and_more_uses_fast_activations_closely(bits):
    """Prefill with M >= 32 multiplies bf16 weights (int4 tiles, int8 codes) with torch's bf16
    GEMM."""
    model = tiny_model("qwen2", hidden_size=128, intermediate_size=160)
    quantize_model(model, bits=bits, group_size=32)
    ids = sequence(48)
    expected = hf_logits(model, ids)[-1]
    got = FastDecoder(model, fast_activations=True).prefill(ids).float()
    # bf16 activations through both layers of this deliberately "hot" random model: ~1% typical
    error, scale = (got - expected).abs(), expected.abs().max()
    assert error.max() <= 6e-2 * scale and error.mean() <= 2e-2 * scale


def test_bf16_model_logits_close():
    model = tiny_model("qwen2").to(torch.bfloat16)
    ids = sequence(16)
    expected = hf_logits(model, ids)[5:]
    got = lean_logits(FastDecoder(model), ids, 6)
    assert (got - expected).abs().max() <= 3e-2 * expected.abs().max()


def test_unsupported_models_fall_back_to_the_hf_loop():
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64)
    ).eval()
    assert "GPT2LMHeadModel" in unsupported_reason(gpt2)
    config = SamplingConfig(temperature=0.0, max_new_tokens=5)
    assert len(list(generate_tokens(gpt2, [1, 2, 3], config))) == 5
    with pytest.raises(ValueError, match="decoder='fast'"):
        list(generate_tokens(gpt2, [1, 2, 3], config, decoder="fast"))
    with pytest.raises(ValueError, match="cannot run"):
        FastDecoder(gpt2)
    dynamic = tiny_model("llama", rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    assert "dynamic" in unsupported_reason(dynamic)
    hf = list(generate_tokens(dynamic, [1, 2, 3], config, decoder="hf"))
    assert list(generate_tokens(dynamic, [1, 2, 3], config)) == hf


def test_models_with_hooks_or_meta_weights_fall_back():
    """Offloaded models stream their layers through forward hooks into meta-device shells."""
    model = tiny_model("llama")
    handle = model.model.layers[1].register_forward_pre_hook(lambda module, args: None)
    assert "hooks" in unsupported_reason(model)
    handle.remove()
    assert unsupported_reason(model) is None
    model.model.layers[0].mlp.up_proj.to("meta")
    assert "meta" in unsupported_reason(model)


def test_bad_calls():
    decoder = FastDecoder(tiny_model("llama"))
    with pytest.raises(ValueError, match="before prefill"):
        decoder.step(1)
    with pytest.raises(ValueError, match="empty"):
        decoder.prefill([])
    with pytest.raises(ValueError, match="decoder must be one of"):
        list(generate_tokens(tiny_model("llama"), [1], SamplingConfig(), decoder="jit"))


def test_prefill_refuses_a_batch_instead_of_joining_it():
    decoder = FastDecoder(tiny_model("llama"))
    with pytest.raises(ValueError, match="one sequence"):
        decoder.prefill(torch.ones(2, 5, dtype=torch.long))
    assert decoder.prefill(torch.ones(1, 5, dtype=torch.long)).shape == (VOCAB,)
