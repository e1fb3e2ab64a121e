"""How much perplexity each quantization format costs a small *trained* model.

Small models lose far more to 4-bit rounding than 7B ones, so the defaults of `quantize` and
`chat --int4` are chosen on a small model. Everything is offline and made here: a corpus from
a tiny generative grammar (so there is real structure to learn and a held-out split to score),
a byte-level BPE trained on it, and a Llama-shaped model trained from scratch for a few hundred
steps. Then each format replaces the model's linear layers (embeddings and head stay fp32, as
`quantize_model` does by default) and the held-out perplexity is compared with fp32.

    python -m rlhf_fast.quant.perplexity            # ~2-4 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import copy
import math
import random
import time
from dataclasses import dataclass

import torch

from rlhf_fast.quant.model import quantize_model

_NAMES = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi"]
_THINGS = ["apples", "pears", "books", "coins", "shells", "stones", "cards", "plums"]
_COLORS = ["red", "green", "blue", "black", "white", "small", "large", "old"]
_VERBS = ["has", "wants", "sells", "buys", "finds", "keeps", "counts", "loses"]


def grammar_sentence(rng: random.Random) -> str:
    """One sentence with learnable structure: agreement, counting, and a closing clause."""
    name, other = rng.sample(_NAMES, 2)
    count = rng.randint(1, 9)
    thing = rng.choice(_THINGS)
    sentence = f"{name} {rng.choice(_VERBS)} {count} {rng.choice(_COLORS)} {thing}"
    if rng.random() < 0.5:
        sentence += f" and gives {rng.randint(1, count)} to {other}"
    if rng.random() < 0.3:
        sentence += f" , so {other} has {thing} too"
    return sentence + " ."


def fact_sentences(rng: random.Random, facts: int = 400) -> list[str]:
    """Arbitrary facts (who keeps which coloured thing in which number): nothing to infer,
    everything to memorize, so the knowledge sits in the weights, where rounding hurts."""
    sentences = []
    for index in range(facts):
        who = f"{rng.choice(_NAMES)}{index}"
        sentences.append(
            f"{who} keeps {rng.randint(10, 99)} {rng.choice(_COLORS)} {rng.choice(_THINGS)} ."
        )
    return sentences


@dataclass
class Setup:
    model: torch.nn.Module
    held_out: torch.Tensor  # [batch, seq] token ids


def check_sizes(*, steps: int, hidden: int, layers: int, seq: int) -> None:
    """ValueError naming the first size the study cannot run with (before any work is done):
    4 attention heads need hidden / 4 even for RoPE, and a row predicts seq - 1 tokens."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if hidden < 8 or hidden % 8:
        raise ValueError(f"hidden must be a positive multiple of 8 (4 heads, RoPE), got {hidden}")
    if layers < 1:
        raise ValueError(f"layers must be >= 1, got {layers}")
    if seq < 2:
        raise ValueError(f"seq must be >= 2 (one predicted token per row), got {seq}")


def train_small_model(
    steps: int = 300,
    hidden: int = 192,
    layers: int = 4,
    seq: int = 64,
    seed: int = 0,
    task: str = "grammar",
) -> Setup:
    """Trains a Llama-shaped model; returns it and the batch its perplexity is measured on.

    task="grammar": held-out sentences of the grammar (generalization).
    task="facts": the memorized facts themselves (how much stored knowledge survives)."""
    check_sizes(steps=steps, hidden=hidden, layers=layers, seq=seq)
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM

    rng = random.Random(seed)
    torch.manual_seed(seed)
    if task == "facts":
        facts = fact_sentences(rng)
        corpus = " ".join(" ".join(rng.sample(facts, len(facts))) for _ in range(40))
    else:
        corpus = " ".join(grammar_sentence(rng) for _ in range(20000))
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.train_from_iterator(
        [corpus[i : i + 1000] for i in range(0, len(corpus), 1000)],
        trainers.BpeTrainer(vocab_size=512, show_progress=False),
    )
    ids = torch.tensor(tokenizer.encode(corpus).ids)
    rows = ids[: ids.numel() // seq * seq].view(-1, seq)
    # Facts: score what was memorized; grammar: score sentences never trained on.
    held_out, train = (rows[:64], rows) if task == "facts" else (rows[:64], rows[64:])
    config = LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(), hidden_size=hidden, intermediate_size=hidden * 3,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=seq, tie_word_embeddings=False,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 3e-3, total_steps=steps)
    model.train()
    for step in range(steps):
        batch = train[torch.randint(0, train.shape[0], (32,))]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"  train step {step:4d}  loss {loss.item():.3f}", flush=True)
    return Setup(model.eval(), held_out)


@torch.inference_mode()
def perplexity(model: torch.nn.Module, held_out: torch.Tensor) -> float:
    """exp of the mean next-token loss over every predicted token of `held_out` [rows, seq]."""
    if held_out.dim() != 2 or held_out.shape[0] == 0 or held_out.shape[1] < 2:
        raise ValueError(
            f"held_out must be [rows >= 1, seq >= 2] token ids, got {tuple(held_out.shape)}"
        )
    total, tokens = 0.0, 0
    for chunk in held_out.split(16):
        # Each chunk's loss is a mean over its own tokens: weigh it by their count, or a short
        # last chunk would count as much as a full one.
        count = chunk.shape[0] * (chunk.shape[1] - 1)
        total += model(input_ids=chunk, labels=chunk).loss.double().item() * count
        tokens += count
    return math.exp(total / tokens)


FORMATS = [
    ("int8", 8, 32, False),
    ("int4 g32", 4, 32, False),
    ("int4 g32 clip", 4, 32, True),
    ("int4 g64", 4, 64, False),
    ("int4 g64 clip", 4, 64, True),
    ("int4 g128", 4, 128, False),
    ("int4 g128 clip", 4, 128, True),
]


def perplexity_table(setup: Setup) -> list[tuple[str, float, float]]:
    """(format, perplexity, rise over fp32) for fp32 and every format above."""
    base = perplexity(setup.model, setup.held_out)
    table = [("fp32", base, 0.0)]
    for name, bits, group, clip in FORMATS:
        quantized = quantize_model(copy.deepcopy(setup.model), bits, group, clip_search=clip)
        value = perplexity(quantized, setup.held_out)
        table.append((name, value, value / base - 1.0))
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--hidden", type=int, default=192)
    parser.add_argument("--task", choices=("grammar", "facts"), default="grammar")
    args = parser.parse_args()
    try:
        check_sizes(steps=args.steps, hidden=args.hidden, layers=4, seq=64)
    except ValueError as error:
        parser.error(f"--{error}")  # "--steps must be >= 1, got 0"
    start = time.perf_counter()
    setup = train_small_model(steps=args.steps, hidden=args.hidden, task=args.task)
    params = sum(p.numel() for p in setup.model.parameters())
    print(f"trained {params / 1e6:.1f}M parameters in {time.perf_counter() - start:.0f} s")
    print(f"{'format':<16} {'perplexity':>10} {'rise':>8}")
    for name, value, rise in perplexity_table(setup):
        print(f"{name:<16} {value:>10.3f} {rise:>+8.2%}")


if __name__ == "__main__":
    main()
