"""JSONL readers for the formats in DESIGN.md, and the held-out split.

One JSON object a line (UTF-8, a byte-order mark allowed at the start of any line; lines end
at \n, \r\n or \r only, so a U+2028 inside a string is not a line break); blank lines are
skipped (they still count for line numbers). Every line is checked before anything is
returned, so that nothing trains on a bad file: the first
bad line is raised as `DataError("FILE:LINE: what is wrong (N more bad lines after this one)")`.

Formats (a conversation may be given as `"prompt": str` or as `"messages"`, a list of
`{"role": "system"|"user"|"assistant", "content": str}` with the system turn first if any):

    SFT     {"prompt", "response"}  or  {"messages": [..., user, assistant]}   (last = the answer)
    RM      {"prompt", "chosen", "rejected"}     pairwise, read as responses [chosen, rejected]
            {"prompt", "responses": [best, ..., worst]}   K-wise, K >= 2, all distinct
            {"prompt", "response", "score": number}      direct score (finite)
            Pairwise and K-wise lines may mix in one file; score lines may not mix with them.
    PPO     {"prompt"}  or  {"messages": [..., user]}

Keys other than these are ignored (datasets often carry ids or sources); a line that matches
two formats at once is an error. Strings that are empty or only whitespace are errors.
"""

from __future__ import annotations

import json
import math
import random
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

from rlhf_fast.models.prompt_format import FALLBACK_ROLES
from rlhf_fast.train.data_examples import (
    DataError,
    Messages,
    PromptExample,
    RankExample,
    ScoreExample,
    SFTExample,
)

Example = TypeVar("Example")
UTF8_BOM = b"\xef\xbb\xbf"


class LineError(ValueError):
    """What is wrong with one line (the reader adds FILE:LINE)."""


def read_sft(path: str | Path) -> list[SFTExample]:
    """SFT examples of a JSONL file: `{"prompt", "response"}` or `{"messages"}` lines."""
    return _read_lines(path, _parse_sft)


def read_rm(path: str | Path) -> list[RankExample] | list[ScoreExample]:
    """Reward-model examples: rankings (pairwise and K-wise, may mix) or direct scores."""
    return _read_lines(path, _parse_rm, same_kind=True)


def read_prompts(path: str | Path) -> list[PromptExample]:
    """PPO prompts: `{"prompt"}` or `{"messages"}` (ending with a user turn) lines."""
    return _read_lines(path, _parse_prompt)


def split_held_out(
    examples: Sequence[Example], fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """(train, held_out): a seeded random `fraction` of the examples is held out (at least one
    when fraction > 0 and there are two or more; never all). Both keep the file's order, and the
    same examples, fraction and seed always give the same split."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    count = len(examples)
    held = round(fraction * count)
    if fraction > 0 and count >= 2:
        held = min(max(held, 1), count - 1)
    chosen = set(random.Random(seed).sample(range(count), held))
    train = [e for i, e in enumerate(examples) if i not in chosen]
    held_out = [e for i, e in enumerate(examples) if i in chosen]
    return train, held_out


# ---- file and lines -------------------------------------------------------------------------


def _read_lines(path: str | Path, parse: Callable[[dict, str], object], same_kind=False):
    try:
        with open(path, "rb") as handle:
            return _parse_lines(path, _split_lines(handle), parse, same_kind)
    except OSError as error:
        raise DataError(str(path), f"cannot read: {error.strerror or error}") from None


def _split_lines(handle) -> Iterator[bytes]:
    """The file's lines as bytes.splitlines() cuts them (at LF, CR LF or a lone CR), read one
    at a time: a huge file is never held whole (datasets carry fields nobody reads)."""
    for chunk in handle:  # up to and including an LF, or the end of the file
        if chunk.endswith(b"\n"):
            chunk = chunk[:-2] if chunk.endswith(b"\r\n") else chunk[:-1]
        elif chunk.endswith(b"\r"):  # the last line, ended by a lone CR
            chunk = chunk[:-1]
        yield from chunk.split(b"\r")


def _parse_lines(path, raw_lines: Iterable[bytes], parse, same_kind: bool):
    examples, first_error, bad_lines = [], None, 0
    first_kind = None  # (type, line) of the first good line, when kinds must not mix
    for number, raw in enumerate(raw_lines, start=1):
        location = f"{path}:{number}"
        # editors on Windows write a BOM; `cat a.jsonl b.jsonl` moves b's to a middle line
        raw = raw[len(UTF8_BOM) :] if raw.startswith(UTF8_BOM) else raw
        try:
            record = _decode(raw)
            if record is None:
                continue
            example = parse(record, location)
            if same_kind:
                first_kind = _check_same_kind(example, number, first_kind)
        except LineError as error:
            first_error = first_error or DataError(location, str(error))
            bad_lines += 1
            continue
        examples.append(example)
    if first_error:
        raise DataError(first_error.location, first_error.reason, more_bad_lines=bad_lines - 1)
    if not examples:
        raise DataError(str(path), "empty file: expected one JSON object per line")
    return examples


def _decode(raw: bytes) -> dict | None:
    """The JSON object of one line, or None for a blank line."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise LineError(f"not UTF-8 text (byte {error.start + 1})") from None
    if not text.strip():
        return None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as error:
        raise LineError(f"invalid JSON: {error.msg} (column {error.colno})") from None
    except RecursionError:
        raise LineError("invalid JSON: nested too deeply") from None
    except ValueError:  # not a JSONDecodeError: Python's cap on converting long integers
        limit = sys.get_int_max_str_digits()
        raise LineError(f"invalid JSON: an integer of more than {limit} digits") from None
    if not isinstance(record, dict):
        raise LineError(f"expected a JSON object, got {_json_type(record)}")
    return record


def _check_same_kind(example, number: int, first_kind):
    if first_kind is None:
        return (type(example), number)
    kind, first_number = first_kind
    if type(example) is not kind:
        names = {RankExample: "a ranking", ScoreExample: "a direct-score line"}
        raise LineError(
            f"{names[type(example)]} in a file whose line {first_number} is "
            f"{names[kind]}; rankings and direct scores cannot mix"
        )
    return first_kind


# ---- formats --------------------------------------------------------------------------------


def _parse_sft(record: dict, source: str) -> SFTExample:
    if "messages" in record:
        _only_one_of(record, "messages", "prompt")
        if "response" in record:  # two answers to learn: the last turn's and this one
            raise LineError(
                'has both "messages" and "response"; give "prompt" and "response", or "messages"'
            )
        messages = _messages(record, final_role="assistant")
        if len(messages) < 2 or messages[-2]["role"] != "user":
            raise LineError('"messages" must end with a user turn, then the assistant answer')
        return SFTExample(messages[:-1], messages[-1]["content"], source=source)
    if "prompt" not in record:
        raise LineError('expected "prompt" and "response", or "messages"')
    if "response" not in record and any(k in record for k in ("chosen", "rejected", "responses")):
        raise LineError('missing key "response" (this line is reward-model data: --stage rm)')
    return SFTExample(_prompt(record), _string(record, "response"), source=source)


def _parse_rm(record: dict, source: str) -> RankExample | ScoreExample:
    formats = {
        "pairwise": ("chosen", "rejected"),
        "ranked": ("responses",),
        "score": ("response", "score"),
    }
    present = [name for name, keys in formats.items() if any(k in record for k in keys)]
    if not present:
        raise LineError('expected "chosen" and "rejected", "responses", or "response" and "score"')
    if len(present) > 1:
        keys = " and ".join(f'"{k}"' for name in present for k in formats[name] if k in record)
        raise LineError(f"mixes formats: {keys} cannot be on one line")
    messages = _prompt(record)
    if present[0] == "score":
        response = _string(record, "response")
        if "score" not in record:  # a prompt and an answer alone: an SFT line
            raise LineError(
                'missing key "score" (a "prompt"/"response" line without one is SFT data: '
                '--stage sft; --stage rm reads "chosen"/"rejected", "responses" or a "score")'
            )
        return ScoreExample(messages, response, _score(record), source=source)
    if present[0] == "pairwise":
        responses = [_string(record, "chosen"), _string(record, "rejected")]
        if responses[0] == responses[1]:
            raise LineError('"chosen" and "rejected" are the same text')
        return RankExample(messages, responses, source=source)
    return RankExample(messages, _ranking(record), source=source)


def _parse_prompt(record: dict, source: str) -> PromptExample:
    return PromptExample(_prompt(record), source=source)


# ---- fields ---------------------------------------------------------------------------------


def _prompt(record: dict) -> Messages:
    """The conversation to answer: "prompt" (one user turn) or "messages" ending with user."""
    if "messages" in record:
        _only_one_of(record, "messages", "prompt")
        return _messages(record, final_role="user")
    return [{"role": "user", "content": _string(record, "prompt")}]


def _only_one_of(record: dict, key: str, other: str) -> None:
    if other in record:
        raise LineError(f'has both "{key}" and "{other}"; give one')


def _string(record: dict, key: str) -> str:
    if key not in record:
        raise LineError(f'missing key "{key}"')
    return _nonempty(record[key], f'"{key}"')


def _nonempty(value, name: str) -> str:
    if not isinstance(value, str):
        raise LineError(f"{name} must be a string, got {_json_type(value)}")
    if not value.strip():
        raise LineError(f"{name} is empty")
    try:  # "\ud83d" alone is valid JSON but no text: the tokenizer would fail on it later
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        bad = f"\\u{ord(value[error.start]):04x}"
        raise LineError(f"{name} holds an unpaired surrogate escape ({bad})") from None
    return value


def _messages(record: dict, final_role: str) -> Messages:
    value = record["messages"]
    if not isinstance(value, list):
        raise LineError(f'"messages" must be a list of turns, got {_json_type(value)}')
    if not value:
        raise LineError('"messages" is empty')
    messages = []
    for index, message in enumerate(value):
        name = f'"messages"[{index}]'
        if not isinstance(message, dict):
            raise LineError(f"{name} must be an object, got {_json_type(message)}")
        for key in ("role", "content"):
            if key not in message:
                raise LineError(f'{name} has no "{key}"')
        role = message["role"]
        if not isinstance(role, str) or role not in FALLBACK_ROLES:  # a list or object: unhashable
            known = ", ".join(FALLBACK_ROLES)
            raise LineError(f"{name} has unknown role {json.dumps(role)} (expected {known})")
        if role == "system" and index > 0:
            raise LineError(f"{name} is a system turn; only the first message may be one")
        content = _nonempty(message["content"], f'{name}["content"]')
        messages.append({"role": role, "content": content})
    if messages[-1]["role"] != final_role:
        article = "an" if final_role == "assistant" else "a"
        last = messages[-1]["role"]
        raise LineError(f'"messages" must end with {article} {final_role} turn, not {last}')
    return messages


def _ranking(record: dict) -> list[str]:
    value = record["responses"]
    if not isinstance(value, list):
        raise LineError(f'"responses" must be a list of strings, got {_json_type(value)}')
    if len(value) < 2:
        raise LineError(f'"responses" needs at least 2 answers to rank, got {len(value)}')
    responses = [_nonempty(text, f'"responses"[{i}]') for i, text in enumerate(value)]
    first_index = {}
    for index, text in enumerate(responses):
        if text in first_index:
            raise LineError(
                f'"responses"[{first_index[text]}] and [{index}] are the same text; '
                "a ranking needs distinct answers"
            )
        first_index[text] = index
    return responses


def _score(record: dict) -> float:
    if "score" not in record:
        raise LineError('missing key "score"')
    value = record["score"]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise LineError(f'"score" must be a number, got {_json_type(value)}')
    try:
        score = float(value)
    except OverflowError:  # an integer too long for a float
        raise LineError('"score" is too large for a float') from None
    if not math.isfinite(score):
        raise LineError(f'"score" must be finite, got {value}')
    return score


def _json_type(value) -> str:
    """The JSON name of a value's type (what the user wrote), e.g. "string", "null"."""
    names = {str: "string", bool: "boolean", int: "number", float: "number"}
    names.update({list: "list", dict: "object", type(None): "null"})
    return names.get(type(value), type(value).__name__)
