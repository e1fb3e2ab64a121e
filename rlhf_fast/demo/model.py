"""The demo's model: a byte-level BPE tokenizer trained on the task's own text, and a tiny
Llama built from a config (random weights), saved together as a plain Hugging Face directory
(config.json, model.safetensors, tokenizer files) that transformers loads offline.

The tokenizer carries a chat template with single-token role markers, so that the trainer and
`rlhf-fast chat` render a conversation the same way (rlhf_fast/models/prompt_format.py):

    <bos><|user|>Which is larger, 3 or 4?<|assistant|>Sure! The answer is 4.<eos>

Special tokens: <eos> ends an answer, <pad> pads batches (distinct from <eos>, so padding can
never be mistaken for an answer's end), <bos> opens a conversation.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<|system|>", "<|user|>", "<|assistant|>"]

# Assistant turns end with <eos> in the history as well, so that a multi-turn conversation
# shows the model the same turn ending it was trained to produce.
DEMO_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@dataclass(frozen=True)
class DemoModelConfig:
    """Size of the demo model (about 0.9M parameters by default, embeddings tied)."""

    vocab_size: int = 512  # an upper bound: the task's text runs out of merges at 372 tokens
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    max_position_embeddings: int = 128


def build_tokenizer(texts: Iterable[str], vocab_size: int = 512):
    """A byte-level BPE `PreTrainedTokenizerFast` trained on `texts` (milliseconds), with the
    special tokens above and the demo chat template. Any text round-trips: the 256 byte
    symbols are always in the vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        additional_special_tokens=SPECIAL_TOKENS[3:],
    )
    wrapped.chat_template = DEMO_CHAT_TEMPLATE
    return wrapped


def build_model(tokenizer, config: DemoModelConfig = DemoModelConfig(), seed: int = 0):
    """A randomly initialised `LlamaForCausalLM` sized by `config` for this tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    llama_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_attention_heads,
        max_position_embeddings=config.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config)


def build_model_dir(
    directory: str | Path,
    texts: Iterable[str],
    config: DemoModelConfig = DemoModelConfig(),
    seed: int = 0,
) -> Path:
    """Train the tokenizer on `texts`, build the model, save both to `directory` (safetensors)."""
    directory = Path(directory)
    tokenizer = build_tokenizer(texts, config.vocab_size)
    model = build_model(tokenizer, config, seed)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory
