"""Offload edge cases found in review: corrupt shard headers, bad --offload / --max-memory
strings, and temp files left behind by a failed calibration. Each failed before its fix."""

from __future__ import annotations

import copy
import json
import struct

import pytest
import torch

from rlhf_fast.offload.shards import ShardError, load_file, read_layout


def _write_shard(path, header, data: bytes = bytes(16)):
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def _entry(shape, offsets, dtype="F32"):
    return {"w": {"dtype": dtype, "shape": shape, "data_offsets": offsets}}


@pytest.mark.parametrize(
    "header",
    [
        [1, 2],  # valid JSON, not an object
        "weights",
        _entry([2], [-8, 0]),  # a negative offset: the right length, bytes before the data
        _entry([-1, -2], [0, 8]),  # negative dimensions whose product is positive
        _entry([2.5], [0, 8]),  # a fractional dimension
        _entry([2], [0.0, 8.9]),  # fractional offsets
    ],
)
def test_corrupt_header_is_a_one_line_shard_error(tmp_path, header):
    path = _write_shard(tmp_path / "layer_000.safetensors", header)
    with pytest.raises(ShardError) as error:
        load_file(path)
    message = str(error.value)
    assert message.startswith(str(path)) and "\n" not in message


def test_valid_header_still_reads(tmp_path):
    values = torch.arange(4, dtype=torch.float32)
    path = _write_shard(
        tmp_path / "ok.safetensors",
        {"__metadata__": {"format": "pt"}, **_entry([2, 2], [0, 16])},
        values.numpy().tobytes(),
    )
    assert read_layout(path).data_bytes == 16
    assert torch.equal(load_file(path)["w"], values.view(2, 2))


@pytest.mark.parametrize("spec", ["resident=inf%", "resident=1e999%", "resident=-inf%"])
def test_infinite_resident_share_is_an_offload_error(spec):
    from rlhf_fast.offload.session import parse_offload

    # round(inf) raises OverflowError, which is no ValueError: `rlhf-fast train` (it catches
    # ValueError) printed a traceback
    with pytest.raises(ValueError, match="--offload: 'resident="):
        parse_offload(spec, 8)


def test_failed_bandwidth_probe_leaves_no_temp_file(tmp_path, monkeypatch):
    import os

    from rlhf_fast.offload.policy import measure_disk_bandwidth

    chunks = []

    def disk_full(size):  # the probe file's write fails part-way (after its first chunk)
        if chunks:
            raise OSError(28, "No space left on device")
        chunks.append(size)
        return bytes(size)

    monkeypatch.setattr(os, "urandom", disk_full)
    with pytest.raises(OSError, match="No space"):
        measure_disk_bandwidth(tmp_path)
    assert list(tmp_path.iterdir()) == []  # the partial 256 MiB probe was left behind


def _family_model(name: str, **extra):
    import transformers

    torch.manual_seed(0)
    config_class, model_class = {
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM),
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "granite": (transformers.GraniteConfig, transformers.GraniteForCausalLM),
    }[name]
    config = config_class(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=None,
        bos_token_id=None, initializer_range=0.3, **extra,
    )  # fmt: skip
    return model_class(config).eval()


@pytest.mark.parametrize(
    "name, extra",
    [
        ("mistral", {"sliding_window": 3}),
        ("granite", {"embedding_multiplier": 3.0, "logits_scaling": 4.0}),
        ("gemma", {"head_dim": 16}),
        ("llama", {}),
    ],
)
def test_generation_of_other_llama_shaped_families_equals_hf(tmp_path, name, extra):
    """The block schedule re-implements LlamaModel.forward; a model merely laid out like it
    (Granite scales its embeddings and logits, Mistral with a sliding window shorter than
    the sequence masks differently) generated other tokens than HF."""
    from rlhf_fast.offload import load_offloaded, prepare_offload
    from rlhf_fast.offload.generate import generate_batch

    model = _family_model(name, **extra)
    ids = torch.randint(1, 97, (3, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    ids = ids.masked_fill(mask == 0, 0)
    want = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    prepare_offload(model, tmp_path / "off")
    with load_offloaded(tmp_path / "off", prefetch=1) as lm:
        got = generate_batch(lm, ids, mask, max_new_tokens=6, micro_batch=2)
    assert torch.equal(got, want)


def test_the_schedule_still_runs_mistral_within_its_window():
    from rlhf_fast.offload.generate import _scheduled

    mistral = _family_model("mistral", sliding_window=16)
    assert _scheduled(mistral, 16) and not _scheduled(mistral, 17)
    assert _scheduled(_family_model("llama"), 10_000)
    assert _scheduled(_family_model("gemma", head_dim=16), 10_000)
    assert not _scheduled(_family_model("granite"), 10)


def test_a_module_with_a_non_persistent_buffer_keeps_its_loaded_weights(tmp_path):
    """Gemma's embedding owns `embed_scale` (non-persistent, in no file) and its weight:
    building the buffer re-initialized the module and replaced the loaded embedding with
    random numbers (logits off by ~10)."""
    from rlhf_fast.offload import load_offloaded, prepare_offload

    model = _family_model("gemma", head_dim=16)
    prepare_offload(model, tmp_path / "off")
    ids = torch.randint(1, 97, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), load_offloaded(tmp_path / "off", resident_layers=1) as lm:
        embedding = lm.model.model.embed_tokens
        assert torch.equal(embedding.weight, model.model.embed_tokens.weight)
        assert torch.equal(embedding.embed_scale, model.model.embed_tokens.embed_scale)
        # still tied to the head (the same storage)
        assert embedding.weight.data_ptr() == lm.model.lm_head.weight.data_ptr()
        torch.testing.assert_close(lm.model(ids).logits, model(ids).logits)


@pytest.mark.parametrize(
    "text, message",
    [
        ("cpu=2GiB,cpu=1KB", "cpu is given twice"),  # the last one silently won
        ("cpu=lots", "--max-memory: cpu='lots' is not a size"),  # the flag went unnamed
    ],
)
def test_bad_max_memory_strings_name_the_flag(text, message):
    from rlhf_fast.offload.policy import parse_max_memory

    with pytest.raises(ValueError, match=message.replace("(", r"\(")) as error:
        parse_max_memory(text)
    assert str(error.value).startswith("--max-memory: ")


def test_shards_of_a_model_directory_whose_weights_changed_are_prepared_again(tmp_path):
    """The shards under MODEL_DIR/.rlhf_fast_offload were reused whenever their manifest named
    the same directory: weights saved over it later (a merged fine-tune) streamed the old ones."""
    from rlhf_fast.offload.session import _prepared
    from rlhf_fast.offload.shards import load_file

    model_dir, target = tmp_path / "model", tmp_path / "model" / ".rlhf_fast_offload" / "none"
    _family_model("llama").save_pretrained(model_dir)
    _prepared(model_dir, target, None)
    first = load_file(target / "layer_000.safetensors")["mlp.down_proj.weight"].clone()
    untouched = (target / "offload.json").stat().st_mtime_ns
    _prepared(model_dir, target, None)  # unchanged: reused, not written again
    assert (target / "offload.json").stat().st_mtime_ns == untouched
    retrained = _family_model("llama")
    with torch.no_grad():
        retrained.model.layers[0].mlp.down_proj.weight.mul_(2)
    retrained.save_pretrained(model_dir)
    _prepared(model_dir, target, None)
    second = load_file(target / "layer_000.safetensors")["mlp.down_proj.weight"]
    assert torch.equal(second, first * 2)
    # the config alone edited (same weights): the offload directory's copy of it was stale
    config = json.loads((model_dir / "config.json").read_text())
    config["rms_norm_eps"] = 0.25
    (model_dir / "config.json").write_text(json.dumps(config))
    _prepared(model_dir, target, None)
    assert json.loads((target / "config.json").read_text())["rms_norm_eps"] == 0.25


def test_an_offload_directory_with_a_missing_or_cut_shard_is_prepared_again(tmp_path):
    """_prepared reused a directory whenever its manifest matched the source, a deleted or
    truncated layer shard too; loading then said to prepare again, which no command did."""
    from rlhf_fast.offload import load_offloaded
    from rlhf_fast.offload.session import _prepared
    from rlhf_fast.offload.shards import RESIDENT_FILE, layer_file

    model_dir, target = tmp_path / "model", tmp_path / "model" / ".rlhf_fast_offload" / "none"
    _family_model("llama").save_pretrained(model_dir)
    _prepared(model_dir, target, None)
    whole = {name: (target / name).read_bytes() for name in (layer_file(1), RESIDENT_FILE)}
    (target / layer_file(1)).unlink()
    _prepared(model_dir, target, None)
    (target / RESIDENT_FILE).write_bytes(whole[RESIDENT_FILE][:-100])
    _prepared(model_dir, target, None)
    for name, data in whole.items():
        assert (target / name).read_bytes() == data
    with load_offloaded(target) as lm:  # loads: every shard is whole again
        assert lm.model.config.num_hidden_layers >= 2


def _edit_layer_shard(offload_dir, edit) -> None:
    from safetensors.torch import load_file as read_all
    from safetensors.torch import save_file

    path = offload_dir / "layer_001.safetensors"
    tensors = read_all(path)
    edit(tensors)
    save_file(tensors, path)


@pytest.mark.parametrize(
    "edit, message",
    [
        # a shard of another layout (modules renamed between transformers versions): it raised
        # AttributeError "LlamaDecoderLayer has no attribute `feed_forward`" at the first token
        (lambda t: t.update({"feed_forward.w1.weight": t.pop("mlp.up_proj.weight")}),
         "feed_forward.w1.weight"),
        # a tensor missing from a layer's shard was blamed on resident.safetensors
        (lambda t: t.pop("mlp.up_proj.weight"), "missing tensor mlp.up_proj.weight"),
        # a shard of another shape: failed in the middle of a matmul
        (lambda t: t.update({"self_attn.o_proj.weight": torch.zeros(64, 32)}),
         "self_attn.o_proj.weight"),
        # integers where the model has floats (a corrupt header's dtype): bound and computed
        # with, silently (int32 * fp32 promotes: the float bits read as huge integers)
        (lambda t: t.update({"input_layernorm.weight": t["input_layernorm.weight"].view(
            torch.int32)}), "input_layernorm.weight has dtype torch.int32"),
    ],
)  # fmt: skip
def test_an_inconsistent_layer_shard_is_a_shard_error_naming_it(tmp_path, edit, message):
    from rlhf_fast.offload import load_offloaded, prepare_offload

    offload_dir = prepare_offload(_family_model("llama"), tmp_path / "off")
    _edit_layer_shard(offload_dir, edit)
    with pytest.raises(ShardError, match=message) as error:
        load_offloaded(offload_dir, resident_layers=0)
    assert str(error.value).startswith(str(offload_dir / "layer_001.safetensors") + ": ")


def test_micro_batch_zero_is_refused(tmp_path):
    """`micro_batch=0` slipped past the >= 1 check (`0 or size`: the whole batch)."""
    from rlhf_fast.offload import load_offloaded, prepare_offload
    from rlhf_fast.offload.generate import generate_batch

    offload_dir = prepare_offload(_family_model("llama"), tmp_path / "off")
    with load_offloaded(offload_dir) as lm:
        with pytest.raises(ValueError, match="micro_batch must be >= 1, got 0"):
            generate_batch(lm, torch.ones(2, 3, dtype=torch.long), max_new_tokens=1, micro_batch=0)
        with pytest.raises(ValueError, match="input_ids must be"):  # an empty batch
            generate_batch(lm, torch.ones(0, 3, dtype=torch.long), max_new_tokens=1)
        # None is the whole batch; more than the batch is the whole batch too
        for micro_batch in (None, 5):
            out = generate_batch(lm, torch.ones(2, 3, dtype=torch.long), max_new_tokens=1,
                                 micro_batch=micro_batch)  # fmt: skip
            assert out.shape == (2, 4)


def test_rollouts_with_several_eos_ids_stop_when_every_row_has_ended(tmp_path):
    """With more than one EOS id (Llama 3 has two) the offloaded rollout never stopped early:
    every rollout ran max_new_tokens steps, each streaming every layer from disk, where the
    resident path stops once all rows have ended."""
    from rlhf_fast.models.load import LoraSettings, attach_lora
    from rlhf_fast.offload import load_offloaded, prepare_offload
    from rlhf_fast.offload.lora import attach_offload_lora
    from rlhf_fast.offload.rollout import generate_offloaded_rollouts
    from rlhf_fast.train.rollout import generate_rollouts

    settings = LoraSettings(r=4, alpha=8.0, fused=True)
    base = _family_model("llama")
    resident = attach_lora(copy.deepcopy(base), settings)
    prompts = [[3, 7, 9], [11, 2], [4, 4, 8, 1, 6]]
    eos = list(range(40, 97))  # most of the vocabulary: every row ends within a few tokens
    common = dict(pad_token_id=0, eos_token_ids=eos, max_new_tokens=12, temperature=1.0)
    seeded = torch.Generator().manual_seed(4)
    want = generate_rollouts(resident, prompts, generator=seeded, **common)
    assert want.response.shape[1] < 12 and bool(want.ended.all())
    with load_offloaded(prepare_offload(base, tmp_path / "off"), prefetch=1) as lm:
        offloaded = attach_offload_lora(lm, settings)
        steps = []
        hook = lm.layers[0].register_forward_hook(lambda *_: steps.append(1))
        got = generate_offloaded_rollouts(
            offloaded, prompts, generator=torch.Generator().manual_seed(4), **common
        )
        hook.remove()
    assert got.response.shape == want.response.shape
    assert torch.equal(got.response, want.response) and torch.equal(got.ended, want.ended)
    # the generation's steps (one pass through layer 0 each) plus the scoring forwards
    assert len(steps) <= want.response.shape[1] + 2


def test_a_cached_calibration_is_measured_again_for_another_model(tmp_path, monkeypatch):
    """calibration.json sits in the offload root, which --offload-dir can share between models:
    the first model's layer timings were reused for any other (and a compression it never
    timed raised KeyError in layer_time)."""
    from transformers import LlamaConfig

    from rlhf_fast.offload import session
    from rlhf_fast.offload.policy import CALIBRATION_VERSION, Calibration

    measured = []

    def calibrate(config, dtype, root, *, compressions):
        measured.append((config.hidden_size, tuple(compressions)))
        return Calibration(1e9, {"none": 1e-3}, {"none": 1e-4}, 1e-4, 1e-5,
                           version=CALIBRATION_VERSION)  # fmt: skip

    monkeypatch.setattr(session, "calibrate", calibrate)
    small, large = LlamaConfig(hidden_size=64), LlamaConfig(hidden_size=128)
    session._calibration(tmp_path, small, torch.float32, [None])
    session._calibration(tmp_path, small, torch.float32, [None])  # the same model: reused
    assert measured == [(64, (None,))]
    session._calibration(tmp_path, large, torch.float32, [None])
    session._calibration(tmp_path, large, torch.float32, [None, 4])
    assert measured == [(64, (None,)), (128, (None,)), (128, (None, 4))]


@pytest.mark.parametrize("bits", [4, 8])
def test_prepare_with_a_dtype_casts_only_the_dense_tensors(tmp_path, bits):
    """prepare_offload(compress=..., dtype=bf16) cast the quantized formats' scales and
    offsets too: the directory failed at the first token ("scales must be Half/Float")."""
    from rlhf_fast.offload import load_offloaded, prepare_offload
    from rlhf_fast.offload.generate import generate_batch
    from rlhf_fast.offload.shards import layer_file, read_layout
    from rlhf_fast.quant import quantize_model

    model = _family_model("llama")
    offload_dir = prepare_offload(model, tmp_path / "off", compress=bits, dtype=torch.bfloat16)
    dtypes = {e.name: e.dtype for e in read_layout(offload_dir / layer_file(0)).tensors}
    assert dtypes["input_layernorm.weight"] == torch.bfloat16  # dense: cast
    reference = quantize_model(copy.deepcopy(model).to(torch.bfloat16), bits, 32)
    assert dtypes["mlp.up_proj.scales"] == reference.model.layers[0].mlp.up_proj.scales.dtype
    ids = torch.randint(1, 97, (2, 5), generator=torch.Generator().manual_seed(0))
    with load_offloaded(offload_dir, bf16_rows=None) as lm:
        got = generate_batch(lm, ids, max_new_tokens=3)
    want = reference.generate(ids, max_new_tokens=3, do_sample=False)
    assert torch.equal(got, want)


def test_prepare_skips_source_tensors_the_model_does_not_have(tmp_path):
    """Older Llama checkpoints (Llama 2's among them) store each layer's
    `self_attn.rotary_emb.inv_freq`, which transformers ignores on load: prepare_offload
    raised AttributeError ("LlamaAttention has no attribute `rotary_emb`")."""
    from safetensors.torch import load_file as read_all
    from safetensors.torch import save_file

    from rlhf_fast.offload import load_offloaded, prepare_offload
    from rlhf_fast.offload.generate import generate_batch

    model = _family_model("llama")
    model.save_pretrained(tmp_path / "model")
    weights = tmp_path / "model" / "model.safetensors"
    tensors = read_all(weights)
    for index in range(2):
        tensors[f"model.layers.{index}.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(tensors, weights, metadata={"format": "pt"})
    offload_dir = prepare_offload(tmp_path / "model", tmp_path / "off")
    ids = torch.randint(1, 97, (2, 5), generator=torch.Generator().manual_seed(0))
    with load_offloaded(offload_dir) as lm:
        got = generate_batch(lm, ids, max_new_tokens=3)
    assert torch.equal(got, model.generate(ids, max_new_tokens=3, do_sample=False))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m.pop("num_layers"), "num_layers"),  # KeyError
        (lambda m: m.update(dtype="float42"), "dtype"),  # AttributeError from getattr(torch)
        (lambda m: m.update(num_layers=1), "num_layers"),  # zip(): argument 2 is shorter ...
        (lambda m: m.pop("resident_bytes"), "resident_bytes"),  # KeyError on resident_bytes
        # transformers' "cannot be instantiated under `dtype=torch.int8`", naming no file
        (lambda m: m.update(dtype="int8"), "dtype 'int8' is not a floating-point"),
    ],
)
def test_an_inconsistent_manifest_is_a_shard_error_naming_it(tmp_path, edit, message):
    from rlhf_fast.offload import load_offloaded, prepare_offload

    offload_dir = prepare_offload(_family_model("llama"), tmp_path / "off")
    manifest = json.loads((offload_dir / "offload.json").read_text())
    edit(manifest)
    (offload_dir / "offload.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match=message) as error:
        with load_offloaded(offload_dir) as lm:
            lm.resident_bytes  # noqa: B018 (what the policy and benchmarks read)
    assert str(error.value).startswith(str(offload_dir / "offload.json") + ": ")


def test_gradients_through_streamed_layers_in_eval_mode_are_refused(tmp_path):
    """Only a training-mode forward checkpoints the streamed layers (offload/backward.py). In
    eval mode with gradients on, autograd kept views of the slot buffers, which later layers
    overwrote before the backward: 68 of 70 LoRA gradients came out silently wrong."""
    from rlhf_fast.models.load import LoraSettings
    from rlhf_fast.offload import load_offloaded, prepare_offload
    from rlhf_fast.offload.lora import attach_offload_lora

    offload_dir = prepare_offload(_family_model("llama"), tmp_path / "off")
    ids = torch.randint(1, 97, (2, 6), generator=torch.Generator().manual_seed(0))
    with load_offloaded(offload_dir, resident_layers=0, prefetch=1) as lm:
        frozen = lm.model(ids).logits  # no adapters, nothing requires a gradient: allowed
        assert not frozen.requires_grad
        model = attach_offload_lora(lm, LoraSettings(r=4, alpha=8.0))
        model.eval()
        with pytest.raises(RuntimeError, match=r"model\.train\(\)"):
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        assert not lm.streamer._held
        with torch.no_grad():  # inference in eval mode is unaffected
            model(input_ids=ids, use_cache=False)
        model.train()  # the supported way
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        assert all(p.grad is not None for n, p in model.named_parameters() if "lora_A" in n)


def test_prepare_refuses_to_replace_a_directory_that_is_not_an_offload_directory(tmp_path):
    """prepare_offload replaced an existing output directory with shutil.rmtree, whatever it
    held: an --offload-dir or output path naming a directory of the user's (or the model
    directory itself) was deleted. Only an earlier offload directory (or an empty one) is
    replaced now; anything else is a one-line error naming it, and stays as it was."""
    from rlhf_fast.offload import prepare_offload

    model = _family_model("llama")
    model.save_pretrained(tmp_path / "model")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    for target in (mine, tmp_path / "model"):
        before = sorted(p.name for p in target.iterdir())
        with pytest.raises(FileExistsError, match="not an offload directory") as error:
            prepare_offload(tmp_path / "model", target)
        assert str(error.value).startswith(str(target)) and "\n" not in str(error.value)
        assert sorted(p.name for p in target.iterdir()) == before
    assert (mine / "notes.txt").read_text() == "keep me"
    assert not list(tmp_path.glob(".*.tmp-*"))  # no staged directory left behind
    # an earlier offload directory and an empty directory are replaced
    first = prepare_offload(model, tmp_path / "off")
    assert prepare_offload(model, first) == first and (first / "offload.json").is_file()
    (tmp_path / "empty").mkdir()
    assert (prepare_offload(model, tmp_path / "empty") / "offload.json").is_file()


def test_train_reports_an_offload_dir_it_will_not_replace_on_one_line(tmp_path, monkeypatch):
    """open_for_training turned only ValueError into the trainer's one-line error: an OSError
    while preparing (here the refusal above; a full disk, a read-only --offload-dir) was a
    traceback."""
    from types import SimpleNamespace

    from rlhf_fast.models.load import ModelLoadError
    from rlhf_fast.offload import session
    from rlhf_fast.offload.policy import CALIBRATION_VERSION, Calibration
    from rlhf_fast.offload.training import open_for_training

    calibration = Calibration(1e9, {"none": 1e-3}, {"none": 1e-4}, 1e-4, 1e-5,
                              version=CALIBRATION_VERSION)  # fmt: skip
    monkeypatch.setattr(session, "calibrate", lambda *args, **kwargs: calibration)
    _family_model("llama").save_pretrained(tmp_path / "model")
    (tmp_path / "shards" / "none").mkdir(parents=True)
    (tmp_path / "shards" / "none" / "notes.txt").write_text("keep me")
    config = SimpleNamespace(
        model=str(tmp_path / "model"), offload="compress=none", max_memory="cpu=64MiB",
        offload_dir=str(tmp_path / "shards"), batch_size=1, max_length=8, dtype="fp32",
    )  # fmt: skip
    with pytest.raises(ModelLoadError, match="not an offload directory") as error:
        open_for_training(config, rows=1)
    assert "\n" not in str(error.value)
    assert (tmp_path / "shards" / "none" / "notes.txt").read_text() == "keep me"


def test_an_offload_directory_without_its_config_is_a_shard_error_naming_it(tmp_path):
    """A missing config.json surfaced as transformers' "Unrecognized model in DIR. Should have
    a `model_type` key in its config.json" (a ValueError, not the ShardError of every other
    missing offload file)."""
    from rlhf_fast.offload import load_offloaded, prepare_offload

    offload_dir = prepare_offload(_family_model("llama"), tmp_path / "off")
    (offload_dir / "config.json").unlink()
    with pytest.raises(ShardError, match="missing") as error:
        load_offloaded(offload_dir)
    assert str(error.value).startswith(str(offload_dir / "config.json") + ": ")


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.update({"lm_head.weight": torch.zeros(96, 64)}), "lm_head.weight has shape"),
        (lambda t: t.update({"model.norm.weight": t["model.norm.weight"].view(torch.int32)}),
         "model.norm.weight has dtype torch.int32"),
    ],
)  # fmt: skip
def test_an_inconsistent_resident_file_is_a_shard_error_naming_it(tmp_path, edit, message):
    """resident.safetensors of another shape or an integer dtype failed in load_state_dict
    with a multi-line RuntimeError naming no file."""
    from safetensors.torch import load_file as read_all
    from safetensors.torch import save_file

    from rlhf_fast.offload import load_offloaded, prepare_offload

    offload_dir = prepare_offload(_family_model("llama"), tmp_path / "off")
    path = offload_dir / "resident.safetensors"
    tensors = read_all(path)
    edit(tensors)
    save_file(tensors, path)
    with pytest.raises(ShardError, match=message) as error:
        load_offloaded(offload_dir)
    assert str(error.value).startswith(str(path) + ": ") and "\n" not in str(error.value)


@pytest.mark.parametrize("source", ["directory", "model"])
def test_prepare_with_a_dtype_keeps_a_stored_quantized_format(tmp_path, source):
    """A model already quantized (a `rlhf-fast quantize` directory, or QuantLinear modules in
    memory) prepared with dtype=bf16: its int4 scales and offsets were cast with the dense
    tensors, and the directory failed at the first token ("scales must be Half")."""
    from rlhf_fast.offload import load_offloaded, prepare_offload
    from rlhf_fast.offload.generate import generate_batch
    from rlhf_fast.offload.shards import layer_file, read_layout
    from rlhf_fast.quant import quantize_model
    from rlhf_fast.quant.io import save_quantized

    quantized = quantize_model(_family_model("llama"), 4, 32)
    if source == "directory":
        save_quantized(quantized, None, tmp_path / "int4")
    origin = tmp_path / "int4" if source == "directory" else quantized
    offload_dir = prepare_offload(origin, tmp_path / "off", dtype=torch.bfloat16)
    dtypes = {e.name: e.dtype for e in read_layout(offload_dir / layer_file(0)).tensors}
    assert dtypes["input_layernorm.weight"] == torch.bfloat16  # dense: cast
    assert dtypes["mlp.up_proj.scales"] == quantized.model.layers[0].mlp.up_proj.scales.dtype
    reference = copy.deepcopy(quantized)
    for parameter in reference.parameters():  # the dense tensors; the formats are buffers
        parameter.data = parameter.data.to(torch.bfloat16)
    ids = torch.randint(1, 97, (2, 5), generator=torch.Generator().manual_seed(0))
    with load_offloaded(offload_dir, bf16_rows=None) as lm:
        got = generate_batch(lm, ids, max_new_tokens=3)
    assert torch.equal(got, reference.generate(ids, max_new_tokens=3, do_sample=False))


def test_train_names_a_malformed_config_instead_of_calling_it_missing(tmp_path):
    """open_for_training reported every config failure as "has no config.json (an adapter
    directory? merge it first)", also for a config.json that is there but not valid."""
    from types import SimpleNamespace

    from rlhf_fast.models.load import ModelLoadError
    from rlhf_fast.offload.training import open_for_training

    config = SimpleNamespace(
        model=str(tmp_path), offload="auto", max_memory="cpu=64MiB", offload_dir=None,
        batch_size=1, max_length=8, dtype="fp32",
    )  # fmt: skip
    with pytest.raises(ModelLoadError, match="has no config.json"):
        open_for_training(config, rows=1)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError) as error:
        open_for_training(config, rows=1)
    message = str(error.value)
    assert "has no config.json" not in message and "\n" not in message
    assert message.startswith(f"--offload: {tmp_path / 'config.json'}: ") and "JSON" in message


@pytest.mark.parametrize("missing", ["mlp.up_proj.offsets", "self_attn.o_proj.qshape"])
def test_a_layer_shard_without_a_quantized_weights_buffer_is_a_shard_error(tmp_path, missing):
    """Only missing parameters were reported: an int4 shard without a weight's `.offsets`
    (a persistent buffer) loaded, the buffer was made up by the model's initializer (zeros),
    and the layer computed with it silently (logits off by 0.1)."""
    from rlhf_fast.offload import load_offloaded, prepare_offload

    offload_dir = prepare_offload(_family_model("llama"), tmp_path / "off", compress=4)
    _edit_layer_shard(offload_dir, lambda tensors: tensors.pop(missing))
    with pytest.raises(ShardError, match=f"missing tensor {missing}") as error:
        load_offloaded(offload_dir, resident_layers=0)
    assert str(error.value).startswith(str(offload_dir / "layer_001.safetensors") + ": ")


def _neox_and_gpt2():
    import transformers

    torch.manual_seed(0)
    neox = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
        vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=64, pad_token_id=0, eos_token_id=None,
        bos_token_id=None, initializer_range=0.3,
    )).eval()  # fmt: skip
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=97, n_embd=48, n_layer=2, n_head=4, n_positions=64, bos_token_id=1,
        eos_token_id=2, initializer_range=0.3,
    )).eval()  # fmt: skip
    return {"gpt_neox": neox, "gpt2": gpt2}


@pytest.mark.parametrize("family", ["gpt_neox", "gpt2"])
def test_prepare_reads_checkpoint_keys_the_way_transformers_loads_them(tmp_path, family):
    """prepare_offload read a model directory's keys as they are stored, but transformers
    renames some on load: GPT-NeoX (Pythia) stores its head as `embed_out.weight` (the model's
    `lm_head.weight`: "missing tensor lm_head.weight"), and checkpoints saved from a base model
    (the hub's gpt2: `h.0.attn...`, no `transformer.` prefix) put every layer tensor into the
    resident file. Both now stream and compute like the resident model."""
    from safetensors.torch import load_file as read_all
    from safetensors.torch import save_file

    from rlhf_fast.offload import load_offloaded, prepare_offload

    model = _neox_and_gpt2()[family]
    model.save_pretrained(tmp_path / "model")
    weights = tmp_path / "model" / "model.safetensors"
    if family == "gpt2":  # as the hub's checkpoint: saved from GPT2Model
        tensors = {k.removeprefix("transformer."): v for k, v in read_all(weights).items()}
        save_file({k: v for k, v in tensors.items() if k != "lm_head.weight"}, weights,
                  metadata={"format": "pt"})  # fmt: skip
    else:
        assert "embed_out.weight" in read_all(weights)  # transformers saves the old name
    offload_dir = prepare_offload(tmp_path / "model", tmp_path / "off")
    ids = torch.randint(3, 97, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), load_offloaded(offload_dir, resident_layers=0) as lm:
        torch.testing.assert_close(lm.model(ids).logits, model(ids).logits)


@pytest.mark.parametrize(
    "edit",
    [
        lambda t: t.update({"mlp.up_proj.qdata": t["mlp.up_proj.qdata"].flatten()}),  # 1-D
        lambda t: t.update({"mlp.up_proj.scales": t["mlp.up_proj.scales"].flatten()}),  # 1-D
        lambda t: t.update({"mlp.up_proj.scales": t["mlp.up_proj.scales"][:, :0]}),  # 0 groups
        # codes for fewer in_features than the config's: failed at the first token instead
        lambda t: t.update(
            {
                k: t[k][:, :1].contiguous()
                for k in t
                if k.startswith("mlp.up_proj.") and t[k].dim() == 2
            }
        ),
    ],
)
def test_a_quantized_weight_of_a_malformed_shape_is_a_shard_error(tmp_path, edit):
    """An int4 weight whose codes or scales have the wrong rank raised ValueError ("not
    enough values to unpack"), IndexError or ZeroDivisionError from the shell builder; codes
    of the right rank for fewer inputs than the config's failed at the first token ("qdata
    must have shape [64, 32]", no file named)."""
    from rlhf_fast.offload import load_offloaded, prepare_offload

    offload_dir = prepare_offload(_family_model("llama"), tmp_path / "off", compress=4)
    _edit_layer_shard(offload_dir, edit)
    with pytest.raises(ShardError, match="mlp.up_proj") as error:
        load_offloaded(offload_dir, resident_layers=0)
    assert str(error.value).startswith(str(offload_dir / "layer_001.safetensors") + ": ")


def test_prepare_removes_staging_left_by_a_killed_prepare_and_keeps_a_live_ones(tmp_path):
    """A kill -9 during prepare_offload left its staging directory (shards written so far)
    beside the output for good; the next prepare of that output now removes it, unless the
    process that owns it is still running."""
    import os
    import subprocess
    import sys

    from rlhf_fast.offload import prepare_offload

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    abandoned = tmp_path / f".off.tmp-{int(dead.stdout)}-0badf00d"
    live = tmp_path / f".off.tmp-{os.getpid()}-c0ffee00"
    other = tmp_path / f".other.tmp-{int(dead.stdout)}-0badf00d"  # another output's
    for path in (abandoned, live, other):
        path.mkdir()
        (path / "layer_00000.safetensors").write_bytes(b"partial")
    prepare_offload(_family_model("llama"), tmp_path / "off")
    assert not abandoned.exists()
    assert live.is_dir() and other.is_dir()
    assert (tmp_path / "off" / "offload.json").is_file()
