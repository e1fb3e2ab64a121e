"""Tiny random causal LMs of each family the trainer supports, saved with the tiny tokenizer.

`make_family_dir(directory, family)` writes config.json + model.safetensors + tokenizer files
for "llama", "qwen2", "mistral", "gpt2", "opt" or "bloom" (hidden size 32, 2 layers): small
enough that a few training steps take milliseconds on a CPU.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tiny_models import TINY_CHAT_TEMPLATE, train_tokenizer

FAMILIES = ("llama", "qwen2", "mistral", "gpt2", "opt", "bloom")
HIDDEN = 32


def _config(family: str, tokenizer):
    import transformers as tf

    special = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if family in ("llama", "qwen2", "mistral"):
        config_class = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config}.get(family)
        # Mistral's sliding window is shorter than the tests' sequences, so the windowed mask
        # is exercised, not just the causal one.
        extra = {"sliding_window": 16} if family == "mistral" else {}
        return (config_class or tf.MistralConfig)(
            hidden_size=HIDDEN,
            intermediate_size=HIDDEN * 2,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            tie_word_embeddings=False,
            **extra,
            **special,
        )
    if family == "gpt2":  # GPT2Config defaults bos/eos to 50256: `special` puts them in vocab
        return tf.GPT2Config(n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=256, **special)
    if family == "opt":
        return tf.OPTConfig(
            hidden_size=HIDDEN,
            ffn_dim=HIDDEN * 2,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=256,
            word_embed_proj_dim=HIDDEN,
            **special,
        )
    if family == "bloom":
        return tf.BloomConfig(hidden_size=HIDDEN, n_layer=2, n_head=4, **special)
    raise ValueError(f"unknown family {family!r}")


def make_family_dir(
    directory: str | Path, family: str, *, seed: int = 0, chat_template: bool = False
) -> Path:
    from transformers import AutoModelForCausalLM

    directory = Path(directory)
    tokenizer = train_tokenizer()
    if chat_template:
        tokenizer.chat_template = TINY_CHAT_TEMPLATE
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(family, tokenizer)).eval()
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory
