"""`rlhf-fast train --offload ... --max-memory cpu=SIZE` with a budget below the model's size:
an SFT run (dense layers pinned, so they stream) and PPO runs (`--offload auto,kv=int4`, then
dense and int4 layers streamed: rollouts through the offloaded block schedule, PPO's forward
and backward through streamed layers) finish, with finite losses and rewards in metrics.jsonl;
what offloading cannot do is refused with a one-line error (exit 2).
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch
from train_helpers import ranked_records, sft_records, write_jsonl

from rlhf_fast.cli import main

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import TINY_CHAT_TEMPLATE, make_tiny_model_dir  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = ["--device", "cpu", "--max-steps", "2", "--batch-size", "2", "--max-new-tokens", "4",
         "--save-every", "0", "--eval-fraction", "0", "--lr", "1e-3", "--max-length", "32",
         "--ppo-epochs", "1"]  # fmt: skip
BUDGET = 4 << 20  # bytes; the model's weights are ~5.1 MB


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("offload_train")
    model = make_tiny_model_dir(
        root / "model", chat_template=TINY_CHAT_TEMPLATE, hidden_size=128, num_layers=8
    )
    weights = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    assert weights > BUDGET * 1.2, weights
    data = {
        "sft": write_jsonl(root / "sft.jsonl", sft_records(6)),
        "ranked": write_jsonl(root / "ranked.jsonl", ranked_records(6)),
        "prompts": write_jsonl(root / "prompts.jsonl", [{"prompt": f"Say {w}"} for w in "abcd"]),
    }
    return root, model, data


def _offload_flags(root: Path, spec: str = "auto") -> list[str]:
    return ["--offload", spec, "--max-memory", f"cpu={BUDGET}B",
            "--offload-dir", str(root / "shards")]  # fmt: skip


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _reader_threads() -> list[str]:
    import threading

    return [t.name for t in threading.enumerate() if t.name.startswith("rlhf-fast-offload")]


def test_sft_and_ppo_run_on_a_base_over_budget(setup, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    root, model, data = setup
    sft_run = root / "sft"
    # auto may pick int4 with every layer resident (it fits): pin dense layers, which stream
    argv = ["train", "--stage", "sft", "--model", str(model), "--data", str(data["sft"]),
            "--output", str(sft_run), *SMALL, *_offload_flags(root, "compress=none")]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    assert not _reader_threads()  # the stage closed its streamed base
    err = capsys.readouterr().err
    assert "[offload: compress=" in err and "training activations" in err
    assert int(re.search(r"resident_layers=(\d+)", err).group(1)) < 8  # some layers stream
    records = _records(sft_run)
    assert [r["step"] for r in records] == [1, 2]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in records)
    assert records[0]["grad_norm"] > 0
    # the adapter is a plain peft adapter of the resident model
    base = AutoModelForCausalLM.from_pretrained(model)
    adapted = PeftModel.from_pretrained(base, sft_run / "adapter")
    assert torch.isfinite(adapted(torch.tensor([[1, 2, 3]])).logits).all()

    rm_run = root / "rm"
    argv = ["train", "--stage", "rm", "--model", str(model), "--data", str(data["ranked"]),
            "--output", str(rm_run), *SMALL]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    ppo_run = root / "ppo"
    argv = ["train", "--stage", "ppo", "--model", str(model), "--data", str(data["prompts"]),
            "--reward-model", str(rm_run / "reward_model"), "--output", str(ppo_run), *SMALL,
            *_offload_flags(root, "auto,kv=int4")]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    assert not _reader_threads()
    err = capsys.readouterr().err
    assert "[offload: compress=" in err and "kv=int4" in err  # auto may fit int4 entirely
    records = _records(ppo_run)
    assert [r["step"] for r in records] == [1, 2]
    for record in records:
        for key in ("reward", "kl", "policy_loss", "value_loss", "response_length"):
            assert math.isfinite(record[key]), (key, record)
    assert (ppo_run / "adapter" / "adapter_model.safetensors").is_file()
    # dense layers and int4 layers (LoRA on QuantLinear for every role), streamed
    for spec in ("compress=none,resident=1", "compress=int4,resident=2"):
        argv[argv.index("--output") + 1] = str(root / spec)
        argv[argv.index("--offload") + 1] = spec
        assert main(argv) == 0, capsys.readouterr().err
        assert spec.replace(",resident=", " resident_layers=") in capsys.readouterr().err
        for record in _records(root / spec):
            assert all(math.isfinite(record[k]) for k in ("reward", "kl", "policy_loss")), record


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--full-finetune"], "drop --full-finetune"),
        (["--merge"], "--merge needs the whole base"),
        (["--stage", "rm"], "supported for --stage sft and ppo"),
        (["--max-memory", "cpu=64KB"], "too small"),
        (["--max-memory", "device=2GB"], "--max-memory: give cpu=SIZE"),
        (["--device", "cuda"], "use --device cpu"),
        (["--rollout-quant", "int4"], "not with --offload"),
        (["--offload", "compress=int3"], "--offload: 'compress=int3'"),
    ],
)
def test_what_offload_cannot_do_is_a_one_line_error(setup, capsys, extra, message):
    root, model, data = setup
    argv = ["train", "--stage", "sft", "--model", str(model), "--data", str(data["sft"]),
            "--output", str(root / "refused"), *SMALL, *_offload_flags(root), *extra]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and err[-1].startswith("rlhf-fast train: error:"), err
    assert not (root / "refused" / "metrics.jsonl").exists()
