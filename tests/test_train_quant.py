"""`--quant int8|int4` (QLoRA): the frozen base is quantized on load and LoRA trains on top,
in SFT, RM and PPO (the shared base of the four roles, and a separately loaded reward model);
exports stay plain peft adapters that apply to the dense model, and dense merged models."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny_families import make_family_dir
from train_helpers import SMALL_RUN_FLAGS, assert_same_parameters, config, pipeline_data

from rlhf_fast.cli import main
from rlhf_fast.models.load import LoraSettings, attach_lora, load_causal_lm
from rlhf_fast.models.reward import load_reward_model
from rlhf_fast.quant import quantize_model
from rlhf_fast.quant.linear import QuantLinear
from rlhf_fast.train import checkpoint as ckpt
from rlhf_fast.train.config import ConfigError, validate
from rlhf_fast.train.ppo_models import POLICY, build_ppo_models
from rlhf_fast.train.run import run_stage

pytestmark = pytest.mark.usefixtures("one_torch_thread")

IDS = torch.tensor([[5, 17, 40, 9, 33, 2, 11]])


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_family_dir(tmp_path_factory.mktemp("llama"), "llama", chat_template=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return pipeline_data(tmp_path_factory.mktemp("quant_data"))


def _quant_layers(model) -> list[QuantLinear]:
    return [m for m in model.modules() if isinstance(m, QuantLinear)]


@pytest.mark.parametrize(("quant", "bits"), [("int8", 8), ("int4", 4)])
def test_load_quantizes_the_base_like_quantize_model(llama, quant, bits):
    loaded = load_causal_lm(llama, quant=quant)
    expected = quantize_model(load_causal_lm(llama), bits=bits, group_size=32)
    assert _quant_layers(loaded) and all(m.bits == bits for m in _quant_layers(loaded))
    assert not isinstance(loaded.lm_head, QuantLinear)  # the head stays dense
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, expected(IDS).logits, atol=0, rtol=0)
    with pytest.raises(ValueError, match="--quant must be one of"):
        load_causal_lm(llama, quant="int3")


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # gpt2: Conv1D layers, quantized
def test_lora_on_a_quantized_base_trains_only_adapters_and_disables_to_the_base(family, tmp_path):
    model_dir = make_family_dir(tmp_path / family, family)
    base = load_causal_lm(model_dir, quant="int4")
    with torch.no_grad():
        base_logits = base(IDS).logits
    model = attach_lora(base, LoraSettings(r=4, alpha=8))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    loss = model(IDS, labels=IDS).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    with torch.no_grad(), model.disable_adapter():
        torch.testing.assert_close(model(IDS).logits, base_logits, atol=1e-6, rtol=1e-6)


def test_sft_on_an_int4_base_learns_and_exports_dense(llama, data, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "sft"
    outcome = run_stage(
        config("sft", llama, data["sft"], run_dir, quant="int4", batch_size=8, max_steps=8,
               merge=True, lr=2e-2)
    )  # fmt: skip
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").open()]
    assert losses[-1] < losses[0] - 0.1, losses
    assert set(outcome.exports) == {"adapter", "merged"}
    # The adapter is a plain peft one: it applies to the dense model, and merged/ is that.
    dense = AutoModelForCausalLM.from_pretrained(llama).eval()
    adapted = PeftModel.from_pretrained(dense, run_dir / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "merged").eval()
    assert not _quant_layers(merged)
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS).logits, adapted(IDS).logits, atol=1e-4, rtol=1e-4)


def test_rm_on_an_int8_base_and_a_quantized_separate_reward_model(llama, data, tmp_path):
    run_dir = tmp_path / "rm"
    run_stage(config("rm", llama, data["ranked"], run_dir, quant="int8", merge=True, max_steps=2))
    dense = load_reward_model(run_dir / "reward_model")
    quantized = load_reward_model(run_dir / "reward_model", quant="int8")
    merged = load_reward_model(run_dir / "merged")
    assert _quant_layers(quantized) and not _quant_layers(dense) and not _quant_layers(merged)
    mask = torch.ones_like(IDS)
    with torch.no_grad():
        scores = [m(IDS, mask) for m in (dense, quantized, merged)]
    torch.testing.assert_close(scores[2], scores[0], atol=1e-4, rtol=1e-4)
    assert (scores[1] - scores[0]).abs().max() < 0.05  # int8: close, not equal
    assert (scores[1] - scores[0]).abs().max() > 0  # ... and really quantized


def test_ppo_shares_one_int4_base_for_every_role(llama, data, tmp_path):
    run_dir = tmp_path / "rm"
    run_stage(config("rm", llama, data["ranked"], run_dir, max_steps=2))
    models = build_ppo_models(llama, run_dir / "reward_model", LoraSettings(r=4), quant="int4")
    assert models.separate_reward is None and models.reward_source.shared
    base = load_causal_lm(llama, quant="int4")
    with torch.no_grad():
        expected = base(IDS).logits
        models.use(POLICY)
        with models.model.disable_adapter():  # the reference: the int4 base itself
            torch.testing.assert_close(models.model(IDS).logits, expected, atol=1e-6, rtol=1e-6)


def test_stage_all_with_quant_int4_end_to_end(llama, data, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    output = tmp_path / "run"
    args = ["train", "--stage", "all", "--model", str(llama), "--sft-data", str(data["sft"]),
            "--rm-data", str(data["ranked"]), "--data", str(data["prompts"]), "--quant", "int4",
            "--output", str(output), *SMALL_RUN_FLAGS]  # fmt: skip
    assert main(args) == 0
    assert f"rlhf-fast chat {output / 'ppo' / 'merged'}" in capsys.readouterr().out
    assert "quant: int4" in (output / "ppo" / "config.yaml").read_text()
    merged = AutoModelForCausalLM.from_pretrained(output / "ppo" / "merged")
    assert not _quant_layers(merged)
    assert torch.isfinite(merged(IDS).logits).all()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"full_finetune": True}, "--quant int4 freezes the base: drop --full-finetune"),
        ({"offload": "auto"}, "--quant int4: the streamed base is compressed by --offload"),
        ({"rollout_quant": "int8"}, "--rollout-quant int8: the base is already int4"),
    ],
)
def test_quant_conflicts_are_one_line_errors(llama, data, tmp_path, extra, message):
    if "rollout_quant" in extra:
        extra = {**extra, "stage": "ppo", "reward_model": str(tmp_path)}
    settings = {"stage": "sft", **extra}
    with pytest.raises(ConfigError, match=message):
        validate(config(settings.pop("stage"), llama, data["sft"], tmp_path, quant="int4",
                        **settings))  # fmt: skip


def test_unknown_quant_is_a_cli_error(llama, data, tmp_path, capsys):
    args = ["train", "--stage", "sft", "--model", str(llama), "--data", str(data["sft"]),
            "--quant", "int3", "--output", str(tmp_path / "x")]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert "--quant: invalid choice: 'int3'" in capsys.readouterr().err


def test_resume_on_an_int4_base_repeats_the_uninterrupted_run(llama, data, tmp_path):
    def final(run_dir):
        return load_file(ckpt.find_checkpoint(run_dir) / ckpt.TRAINABLE_FILE)

    settings = dict(quant="int4", lora_dropout=0.2, grad_accum=2, batch_size=3, save_every=2)
    run_stage(config("sft", llama, data["sft"], tmp_path / "straight", **settings))
    split = config("sft", llama, data["sft"], tmp_path / "split", **settings)
    assert run_stage(split, stop_after=2).result.step == 2
    assert run_stage(split, resume=tmp_path / "split").result.step == 4
    assert_same_parameters(final(tmp_path / "split"), final(tmp_path / "straight"))
