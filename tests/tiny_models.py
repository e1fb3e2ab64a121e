"""Build and save a tiny Llama-style causal LM plus a tokenizer trained on the spot.

Everything is offline and takes well under a second: a byte-level BPE is trained with the
`tokenizers` library on a few KB of text, wrapped as a `PreTrainedTokenizerFast`, and saved
beside a randomly initialised `LlamaForCausalLM` (safetensors). Other tests may reuse
`make_tiny_model_dir`.
"""

from __future__ import annotations

from pathlib import Path

import torch

# A simple chat template (Jinja, as transformers renders it): one line per message, then the
# assistant's header when a generation prompt is asked for.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

_TEXT = (
    "Hello! How are you today? I am fine, thank you. What is the weather like? "
    "It is sunny and warm. The quick brown fox jumps over the lazy dog. "
    "Reinforcement learning from human feedback trains a reward model on ranked answers, "
    "then optimises the policy against it with proximal policy optimisation. "
    "Café, naïve, über, 東京, 🙂 — multi-byte characters exercise the streaming decoder. "
)


def train_tokenizer(vocab_size: int = 300):
    """A byte-level BPE tokenizer with `<eos>` (also used as pad) and `<bos>` tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<eos>", "<bos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([_TEXT] * 20, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<eos>", pad_token="<eos>", bos_token="<bos>"
    )


def make_tiny_model_dir(
    directory: str | Path,
    *,
    chat_template: str | None = None,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
) -> Path:
    """Save a tiny random Llama model and its tokenizer to `directory`; returns the path."""
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = Path(directory)
    tokenizer = train_tokenizer()
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        # Wider than the default 0.02, so that the random model's greedy answer depends on its
        # prompt instead of repeating one token whatever it is asked.
        initializer_range=0.5,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory
