"""SFT training tokens/s on this CPU: one optimizer step (forward, backward, AdamW) of a small
Llama-shaped model built from a config, fp32 against bf16, full fine-tuning and LoRA.

The batch is what the trainer feeds: random token rows through `SFTCollator` (right padding,
labels -100 on the first half of each row, the "prompt"), loss = the model's own token
cross-entropy. Every row is full length, so tokens per step = batch x sequence length.

Providers per size (group "sft_step cpu <mode> <size>", throughput table):
- "fp32": fp32 weights and optimizer;
- "bf16": bf16 weights (what `--dtype bf16` loads): full fine-tuning then runs AdamW on bf16
  parameters; LoRA keeps its adapters in fp32 (peft's default) over the bf16 base;
- "bf16-autocast" (full fine-tuning only): fp32 master weights, forward and backward under
  torch.autocast("cpu", bfloat16), the usual mixed precision.

Size "h256-L4" (hidden 256, 4 layers, vocab 2000, sequence 256, batch 8) is marked bench_full;
quick mode runs a tiny shape only. On a machine whose cores other processes also use, torch's
two threads wait on each other and medians swing several-fold between runs; OMP_NUM_THREADS=1
gives steadier numbers there (the summary prints the thread count).
"""

from __future__ import annotations

import contextlib
import functools

import pytest
import torch

from rlhf_fast.train.data import SFTCollator

SHAPES = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=176, vocab_size=300,
                 seq=32, batch=2),
    "h256-L4": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=4, intermediate_size=688, vocab_size=2000,
                    seq=256, batch=8),
}  # fmt: skip
SHAPE_PARAMS = [
    pytest.param(name, id=name, marks=pytest.mark.bench_full if name != "tiny" else ())
    for name in SHAPES
]
PROVIDERS = {"full": ["fp32", "bf16", "bf16-autocast"], "lora": ["fp32", "bf16"]}
CASES = [(mode, provider) for mode, providers in PROVIDERS.items() for provider in providers]
LORA_RANK = 16
PAD = 0


def _batch(shape: str) -> dict[str, torch.Tensor]:
    spec = SHAPES[shape]
    generator = torch.Generator().manual_seed(0)
    features = []
    for _ in range(spec["batch"]):
        ids = torch.randint(1, spec["vocab_size"], (spec["seq"],), generator=generator).tolist()
        half = spec["seq"] // 2
        features.append({"input_ids": ids, "labels": [-100] * half + ids[half:]})
    return SFTCollator(PAD)(features)


@functools.lru_cache(maxsize=1)  # one model alive at a time
def _training_step(shape: str, mode: str, provider: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = {k: v for k, v in SHAPES[shape].items() if k not in ("seq", "batch")}
    torch.manual_seed(0)
    config = LlamaConfig(**spec, max_position_embeddings=512, pad_token_id=PAD)
    model = LlamaForCausalLM(config)
    if provider == "bf16":
        model = model.to(torch.bfloat16)
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        lora = LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, target_modules=targets)
        model = get_peft_model(model, lora)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    batch = _batch(shape)
    autocast = provider == "bf16-autocast"

    def step() -> float:
        context = (
            torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        )
        with context:
            loss = model(**batch, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    return step, int(batch["attention_mask"].sum())


@pytest.mark.parametrize("mode, provider", CASES, ids=[f"{m}-{p}" for m, p in CASES])
@pytest.mark.parametrize("shape", SHAPE_PARAMS)
def test_sft_step(measure, shape, mode, provider):
    step, tokens = _training_step(shape, mode, provider)
    assert torch.isfinite(torch.tensor(step()))  # also the warm-up step
    spec = SHAPES[shape]
    size = f"{mode} {shape} seq{spec['seq']} b{spec['batch']}"
    measure(step, op="sft_step", device="cpu", size=size, provider=provider, tokens=tokens)
