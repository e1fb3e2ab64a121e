"""Batches of encoded examples as tensors, right-padded.

Padding is told apart from real tokens by the attention mask and by the labels that the
encoder wrote, never by comparing ids with `pad_token_id`: a tokenizer whose pad token is its
EOS must still train the EOS. Readers of the last real token (the reward model) should use the
attention mask, which also covers left padding.
"""

from __future__ import annotations

import torch

from rlhf_fast.train.data_encode import IGNORE_INDEX
from rlhf_fast.train.data_pack import pack_rows


class SFTCollator:
    """list of encode_sft dicts -> {"input_ids", "attention_mask", "labels"}: LongTensor [B, L],
    right padding, labels IGNORE_INDEX on padding.

    `pack_to=N` instead puts several examples in each row of at most N tokens (greedily, in
    order) and returns {"input_ids", "labels", "position_ids"} with NO attention mask:
    positions restart at 0 for each example, which is how transformers recognises packed rows.
    See rlhf_fast/train/data_pack.py for which models then keep examples apart (call them with
    use_cache=False) and `packing_isolates(model)` to check one.
    """

    def __init__(self, pad_token_id: int, pack_to: int | None = None) -> None:
        self.pad_token_id = _check_pad(pad_token_id)
        if pack_to is not None and (not isinstance(pack_to, int) or pack_to < 2):
            raise ValueError(f"pack_to must be None or an integer >= 2, got {pack_to!r}")
        self.pack_to = pack_to

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        _check_nonempty(features, "features")
        for index, feature in enumerate(features):
            if len(feature["input_ids"]) != len(feature["labels"]) or not feature["input_ids"]:
                raise ValueError(
                    f"features[{index}]: input_ids and labels must be non-empty and of one length"
                )
        if self.pack_to is not None:
            return pack_rows(features, self.pack_to, self.pad_token_id)
        length = max(len(f["input_ids"]) for f in features)
        input_ids = _full(len(features), length, self.pad_token_id)
        attention_mask = _full(len(features), length, 0)
        labels = _full(len(features), length, IGNORE_INDEX)
        for row, feature in enumerate(features):
            size = len(feature["input_ids"])
            input_ids[row, :size] = torch.tensor(feature["input_ids"])
            attention_mask[row, :size] = 1
            labels[row, :size] = torch.tensor(feature["labels"])
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class RankCollator:
    """list (B prompts) of lists (K_b >= 1 answers, best first) of token ids ->
    {"input_ids": [B*K, L], "attention_mask": [B*K, L], "present": BoolTensor [B, K]}.

    Row b*K + k is answer k of prompt b, K the batch's largest K_b. A prompt with fewer answers
    gets filler rows of one pad token with attention 1 (so no row is empty for the model) and
    present False; rank_loss(rewards.view(B, K), present) then ignores them.
    """

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = _check_pad(pad_token_id)

    def __call__(self, rankings: list[list[list[int]]]) -> dict[str, torch.Tensor]:
        _check_nonempty(rankings, "rankings")
        for b, answers in enumerate(rankings):
            _check_nonempty(answers, f"rankings[{b}]")
            for k, ids in enumerate(answers):
                _check_nonempty(ids, f"rankings[{b}][{k}]")
        count = max(len(answers) for answers in rankings)
        present = torch.zeros(len(rankings), count, dtype=torch.bool)
        rows = []
        for b, answers in enumerate(rankings):
            present[b, : len(answers)] = True
            rows += answers + [[self.pad_token_id]] * (count - len(answers))
        input_ids, attention_mask = _pad_rows(rows, self.pad_token_id)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "present": present}


class ScoreCollator:
    """list of (token ids, score) -> {"input_ids", "attention_mask": [B, L],
    "scores": FloatTensor [B]}."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = _check_pad(pad_token_id)

    def __call__(self, items: list[tuple[list[int], float]]) -> dict[str, torch.Tensor]:
        _check_nonempty(items, "items")
        for index, (ids, _) in enumerate(items):
            _check_nonempty(ids, f"items[{index}] token ids")
        input_ids, attention_mask = _pad_rows([ids for ids, _ in items], self.pad_token_id)
        scores = torch.tensor([float(score) for _, score in items], dtype=torch.float32)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "scores": scores}


def _pad_rows(rows: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(ids) for ids in rows)
    input_ids = _full(len(rows), length, pad_token_id)
    attention_mask = _full(len(rows), length, 0)
    for row, ids in enumerate(rows):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
    return input_ids, attention_mask


def _full(rows: int, length: int, value: int) -> torch.Tensor:
    return torch.full((rows, length), value, dtype=torch.long)


def _check_pad(pad_token_id) -> int:
    if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int) or pad_token_id < 0:
        raise ValueError(
            f"pad_token_id must be a token id (int >= 0), got {pad_token_id!r}; "
            "a tokenizer without a pad token can pad with its eos_token_id"
        )
    return pad_token_id


def _check_nonempty(items, name: str) -> None:
    if len(items) == 0:
        raise ValueError(f"{name} is empty")
