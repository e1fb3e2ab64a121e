"""Packing for SFT: several encoded examples in one row, kept from attending to each other.

A packed row carries `position_ids` that restart at 0 at each example and no attention mask.
transformers (v5) reads such rows as packed (masking_utils.find_packed_sequence_indices) and
builds a block-diagonal causal mask, for eager and SDPA attention, and flash-attention uses the
same position ids, BUT only:

- for models whose attention mask goes through transformers' `create_causal_mask`: checked
  here for Llama, Qwen2 and GPT-2; NOT for OPT or BLOOM, whose packed examples would see each
  other (and would read wrong positions);
- when the model is called with `use_cache=False`: with a cache (the default `use_cache=True`
  makes one even in training) the packed rows are silently treated as one sequence.

`packing_isolates(model)` runs that check on the model at hand; a trainer should call it before
packing and refuse to pack where it returns False. The filler after the last example of a row
is its own "example" (pad tokens, positions from 0, labels IGNORE_INDEX), after all real tokens,
so causal attention keeps it out of every real token's view. Each example's first token is a
prompt token (the encoder always keeps one), so no label is predicted across an example border.
"""

from __future__ import annotations

import torch

from rlhf_fast.train.data_encode import IGNORE_INDEX


def pack_rows(
    features: list[dict[str, list[int]]], pack_to: int, pad_token_id: int
) -> dict[str, torch.Tensor]:
    """{"input_ids", "labels", "position_ids"}: LongTensor [rows, L <= pack_to], examples
    placed greedily in order (a new row starts when the next one does not fit)."""
    rows: list[list[dict]] = [[]]
    used = 0
    for index, feature in enumerate(features):
        size = len(feature["input_ids"])
        if size > pack_to:
            raise ValueError(
                f"features[{index}] has {size} tokens, more than pack_to={pack_to}: "
                "encode with max_length <= pack_to"
            )
        if used + size > pack_to:
            rows.append([])
            used = 0
        rows[-1].append(feature)
        used += size
    length = max(sum(len(f["input_ids"]) for f in row) for row in rows)
    input_ids, labels, position_ids = [], [], []
    for row in rows:
        ids, row_labels, positions = [], [], []
        for feature in row:
            ids += feature["input_ids"]
            row_labels += feature["labels"]
            positions += range(len(feature["input_ids"]))
        filler = length - len(ids)
        input_ids.append(ids + [pad_token_id] * filler)
        labels.append(row_labels + [IGNORE_INDEX] * filler)
        position_ids.append(positions + list(range(filler)))
    return {
        "input_ids": torch.tensor(input_ids, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
        "position_ids": torch.tensor(position_ids, dtype=torch.long),
    }


def packing_isolates(model) -> bool:
    """Whether `model` keeps packed examples apart: the logits of two short sequences packed in
    one row (called as a trainer must: position_ids, no attention mask, use_cache=False) equal
    their logits run one at a time (to 1e-4 of the largest logit in fp32, 2e-2 in 16-bit; mixing
    examples moves them far more). Runs three tiny forward passes in eval mode, no gradient."""
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().num_embeddings
    first = torch.arange(1, 6, device=device) % vocab
    second = torch.arange(7, 14, device=device) % vocab
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            alone = [model(input_ids=s[None], use_cache=False).logits[0] for s in (first, second)]
            positions = torch.cat([torch.arange(len(first)), torch.arange(len(second))])
            packed = model(
                input_ids=torch.cat([first, second])[None],
                position_ids=positions[None].to(device),
                use_cache=False,
            ).logits[0]
    finally:
        model.train(was_training)
    expected = torch.cat(alone).float()
    relative = 1e-4 if packed.dtype == torch.float32 else 2e-2
    tolerance = relative * float(expected.abs().max().clamp(min=1.0))
    return bool((packed.float() - expected).abs().max() <= tolerance)
