"""SFT stage on tiny models of each family: the loss falls, only answer tokens are scored, and
the exported adapter / merged model load in plain peft / transformers with the same outputs."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny_families import FAMILIES, make_family_dir
from train_helpers import (
    assert_same_step_gradients,
    config,
    record_step_gradients,
    sft_records,
    write_jsonl,
)

from rlhf_fast.models.load import LoraSettings, attach_lora, load_causal_lm, load_tokenizer
from rlhf_fast.train.checkpoint import TRAINABLE_FILE, find_checkpoint
from rlhf_fast.train.config import ConfigError
from rlhf_fast.train.data import SFTCollator, encode_sft, read_sft
from rlhf_fast.train.run import run_stage
from rlhf_fast.train.sft import token_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {family: make_family_dir(root / family, family) for family in FAMILIES}


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "sft.jsonl", sft_records(8))


def _losses(run_dir) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


@pytest.mark.parametrize("family", FAMILIES)
def test_sft_loss_falls_and_exports_load_in_plain_libraries(family, models, sft_data, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir = tmp_path / "run"
    outcome = run_stage(
        config(
            "sft",
            models[family],
            sft_data,
            run_dir,
            batch_size=8,
            max_steps=8,
            merge=True,
            lr=2e-2,
        )
    )
    losses = _losses(run_dir)
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.1, losses
    assert set(outcome.exports) == {"adapter", "merged"}

    ids = torch.tensor([[5, 17, 40, 9, 33, 2]])
    base = AutoModelForCausalLM.from_pretrained(models[family]).eval()
    before = base(ids).logits
    adapted = PeftModel.from_pretrained(base, run_dir / "adapter").eval()
    with torch.no_grad():
        expected = adapted(ids).logits
    assert (expected - before).abs().max() > 1e-4  # the adapter was trained and is applied
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, expected, atol=1e-4, rtol=1e-4)
    AutoTokenizer.from_pretrained(run_dir / "merged")  # the tokenizer travels with the model

    # The adapter holds exactly the parameters of the final checkpoint.
    final = load_file(find_checkpoint(run_dir) / TRAINABLE_FILE)
    lora_a = {k: v for k, v in final.items() if "lora_A" in k}
    assert lora_a and all(v.abs().sum() > 0 for v in lora_a.values())


def test_loss_is_on_answer_tokens_only(models, sft_data):
    """token_loss against transformers' own causal-LM loss (labels shifted inside the model),
    and against a by-hand mean over the answer positions only."""
    tokenizer = load_tokenizer(models["llama"])
    model = load_causal_lm(models["llama"])
    features = [encode_sft(tokenizer, e, 64) for e in read_sft(sft_data)[:3]]
    batch = SFTCollator(tokenizer.pad_token_id)(features)
    ours = token_loss(model, batch)
    torch.testing.assert_close(ours, model(**batch).loss, atol=1e-5, rtol=1e-5)

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    terms = []
    for row, feature in enumerate(features):
        prompt_length = feature["labels"].count(-100)
        for position in range(prompt_length, len(feature["input_ids"])):  # answer + EOS
            log_probs = logits[row, position - 1].log_softmax(-1)
            terms.append(-log_probs[feature["input_ids"][position]])
        assert feature["input_ids"][-1] == tokenizer.eos_token_id  # the EOS is trained
    torch.testing.assert_close(ours, torch.stack(terms).mean(), atol=1e-5, rtol=1e-5)


def test_packing_runs_where_the_model_isolates_examples(models, sft_data, tmp_path):
    run_dir = tmp_path / "packed"
    run_stage(config("sft", models["llama"], sft_data, run_dir, batch_size=8, pack=True))
    assert (run_dir / "adapter" / "adapter_config.json").is_file()
    with pytest.raises(ConfigError, match="--pack: OPT"):
        run_stage(config("sft", models["opt"], sft_data, tmp_path / "opt", pack=True))


def test_bf16_and_held_out_evaluation(models, sft_data, tmp_path):
    run_dir = tmp_path / "bf16"
    outcome = run_stage(
        config("sft", models["qwen2"], sft_data, run_dir, dtype="bf16", eval_fraction=0.25)
    )
    assert torch.isfinite(torch.tensor(outcome.result.eval_metrics["loss"]))
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert "eval_loss" in last and last["step"] == 4


def test_lora_targets_default_per_family_and_override(models):
    model = load_causal_lm(models["gpt2"])
    wrapped = attach_lora(model, LoraSettings(r=2, targets=("c_attn",)))
    names = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert names and all("c_attn" in n for n in names)
    with pytest.raises(ValueError, match="--lora-targets: q_proj not found"):
        attach_lora(load_causal_lm(models["gpt2"]), LoraSettings(targets=("q_proj",)))


def test_fused_lora_trains_like_plain_peft(models, sft_data, tmp_path):
    """The fused LoRA op (default) and peft's own forward give the same run, dropout included."""
    runs = {}
    for fused in (True, False):
        run_dir = tmp_path / f"fused-{fused}"
        run_stage(
            config(
                "sft",
                models["llama"],
                sft_data,
                run_dir,
                max_steps=3,
                lora_fused=fused,
                lora_dropout=0.1,
            )
        )
        runs[fused] = load_file(find_checkpoint(run_dir) / TRAINABLE_FILE)
    for name, value in runs[True].items():
        torch.testing.assert_close(value, runs[False][name], atol=1e-5, rtol=1e-4, msg=name)


def test_grad_accum_gives_the_gradient_of_the_whole_batch(models, tmp_path, monkeypatch):
    """batch 2 x grad_accum 2 sees the same 4 examples as batch 4: with answers of different
    lengths the step's gradient must still be that of the mean over all 4 examples' answer
    tokens (a mean of the micro-batches' means weighs the short answers' tokens more)."""
    from rlhf_fast.train import sft
    from rlhf_fast.train.loop import train

    words = "one two three four five six seven eight nine ten eleven twelve".split()
    records = [{"prompt": f"Count {i}", "response": " ".join(words[: 1 + 3 * i])} for i in range(4)]
    data = write_jsonl(tmp_path / "uneven.jsonl", records)
    tokenizer = load_tokenizer(models["llama"])
    gradients = record_step_gradients(monkeypatch)
    for batch_size, grad_accum in ((4, 1), (2, 2), (1, 4)):
        cfg = config("sft", models["llama"], data, tmp_path / f"run{grad_accum}",
                     batch_size=batch_size, grad_accum=grad_accum)  # fmt: skip
        _, train_examples, held_out = sft.read_data(cfg)
        torch.manual_seed(cfg.seed)
        stage = sft.build(cfg, tokenizer, train_examples, held_out, "cpu")
        (tmp_path / f"run{grad_accum}").mkdir()
        train(stage, cfg, cfg.output, device="cpu", stop_after=1)
    assert len(gradients) == 3
    assert_same_step_gradients(gradients)
