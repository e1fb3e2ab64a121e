"""Examples to token ids: the prompt exactly as `rlhf-fast chat` feeds it, then the answer, then
EOS.

The prompt and the answer are tokenized separately (rlhf_fast/models/prompt_format.py) and
their ids concatenated, so the boundary between untrained and trained tokens is exact and the
prompt ids are those of inference. The EOS is appended as an id (never as text) and is always
a trained label, also when the tokenizer's pad token is its EOS: the model must learn to stop.

Truncation to `max_length`: prompt tokens are dropped from the left first, but the prompt's
last token is always kept (the first answer token is predicted from it; without it that token
would train nothing); then answer tokens are dropped from the right, the EOS first, so the EOS
stays only when the whole answer fits. Every encoded example thus has at least one trained
label at a position the model predicts (index >= 1).
"""

from __future__ import annotations

from rlhf_fast.models.prompt_format import TemplateError, prompt_token_ids, response_token_ids
from rlhf_fast.train.data_examples import (
    DataError,
    Messages,
    RankExample,
    ScoreExample,
    SFTExample,
)

IGNORE_INDEX = -100  # labels with this value take no part in the loss (torch's CrossEntropy)


def encode_sft(tokenizer, example: SFTExample, max_length: int) -> dict[str, list[int]]:
    """{"input_ids", "labels"}: prompt + answer + EOS; labels are IGNORE_INDEX on the prompt
    and equal input_ids on the answer and the EOS (see the module docstring for truncation)."""
    prompt, answer = _prompt_and_answer(
        tokenizer, example.messages, example.response, max_length, example.source
    )
    return {"input_ids": prompt + answer, "labels": [IGNORE_INDEX] * len(prompt) + answer}


def encode_response(
    tokenizer, messages: Messages, response: str, max_length: int, source: str = ""
) -> list[int]:
    """prompt + answer + EOS with encode_sft's truncation: what the reward model reads."""
    prompt, answer = _prompt_and_answer(tokenizer, messages, response, max_length, source)
    return prompt + answer


def encode_ranking(tokenizer, example: RankExample, max_length: int) -> list[list[int]]:
    """One encode_response per answer, best first: an item for RankCollator."""
    return [
        encode_response(tokenizer, example.messages, response, max_length, example.source)
        for response in example.responses
    ]


def encode_scored(tokenizer, example: ScoreExample, max_length: int) -> tuple[list[int], float]:
    """(encode_response ids, score): an item for ScoreCollator."""
    ids = encode_response(tokenizer, example.messages, example.response, max_length, example.source)
    return ids, example.score


def eos_token_id(tokenizer) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("tokenizer has no eos_token: set one so that the model learns to stop")
    return int(eos)


def pad_token_id(tokenizer) -> int:
    """The id to pad batches with: the tokenizer's pad token, else its EOS (GPT-2 and Llama
    tokenizers ship without a pad token). Padding is never trained, whichever id it is."""
    pad = tokenizer.pad_token_id
    return eos_token_id(tokenizer) if pad is None else int(pad)


def _prompt_and_answer(tokenizer, messages, response, max_length, source):
    if not isinstance(max_length, int) or max_length < 2:
        raise ValueError(
            f"max_length must be an integer >= 2 (a prompt and an answer token), got {max_length!r}"
        )
    try:
        prompt = prompt_token_ids(tokenizer, messages)
    except TemplateError as error:
        if source:
            raise DataError(source, str(error)) from None
        raise
    answer = response_token_ids(tokenizer, response) + [eos_token_id(tokenizer)]
    return truncate(prompt, answer, max_length)


def truncate(prompt: list[int], answer: list[int], max_length: int):
    """(prompt, answer) cut to max_length tokens in all: the prompt from the left (keeping its
    last token), then the answer from the right."""
    keep = max(max_length - len(answer), 1 if prompt else 0)
    prompt = prompt[max(len(prompt) - keep, 0) :]
    return prompt, answer[: max_length - len(prompt)]
