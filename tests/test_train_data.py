"""The trainer's data layer: JSONL readers and their FILE:LINE errors, the held-out split,
encoding (the prompt chat feeds, response-only labels, the EOS always trained, truncation),
collators and packing, on the tiny BPE tokenizer with and without a chat template."""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path

import pytest
import torch

from rlhf_fast.chat import ChatError, prompt_ids
from rlhf_fast.models.prompt_format import (
    TemplateError,
    prompt_token_ids,
    render_prompt,
    response_text,
)
from rlhf_fast.train.data import (
    IGNORE_INDEX,
    DataError,
    PromptExample,
    RankCollator,
    RankExample,
    ScoreCollator,
    ScoreExample,
    SFTCollator,
    SFTExample,
    encode_ranking,
    encode_response,
    encode_scored,
    encode_sft,
    packing_isolates,
    pad_token_id,
    read_prompts,
    read_rm,
    read_sft,
    split_held_out,
)

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import TINY_CHAT_TEMPLATE, train_tokenizer  # noqa: E402

GOOD = {
    "sft": {"prompt": "Hello!", "response": "I am fine."},
    "rm": {"prompt": "Hello!", "chosen": "Fine.", "rejected": "Go away."},
    "prompts": {"prompt": "Hello!"},
}
READERS = {"sft": read_sft, "rm": read_rm, "prompts": read_prompts}
SYSTEM = {"role": "system", "content": "Be kind."}
USER = {"role": "user", "content": "Hi"}
ASSISTANT = {"role": "assistant", "content": "Hello!"}


def write_lines(path: Path, lines: list) -> Path:
    """Each item: a dict (written as JSON), or a str written as is (raw text of the line)."""
    text = [line if isinstance(line, str) else json.dumps(line) for line in lines]
    path.write_text("\n".join(text) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def plain_tokenizer():
    tokenizer = train_tokenizer()
    assert not tokenizer.chat_template
    return tokenizer


@pytest.fixture(scope="module")
def templated_tokenizer():
    tokenizer = train_tokenizer()
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(params=["plain", "templated"])
def tokenizer(request, plain_tokenizer, templated_tokenizer):
    return plain_tokenizer if request.param == "plain" else templated_tokenizer


# ---- readers: good files --------------------------------------------------------------------


def test_read_sft_both_formats_and_blank_lines(tmp_path):
    path = write_lines(
        tmp_path / "sft.jsonl",
        [
            {"prompt": "Hello!", "response": "I am fine.", "id": 7},  # extra keys are ignored
            "",
            "   ",
            {"messages": [SYSTEM, USER, ASSISTANT, USER, {"role": "assistant", "content": "Bye"}]},
        ],
    )
    examples = read_sft(path)
    assert examples == [
        SFTExample([{"role": "user", "content": "Hello!"}], "I am fine."),
        SFTExample([SYSTEM, USER, ASSISTANT, USER], "Bye"),
    ]
    assert [e.source for e in examples] == [f"{path}:1", f"{path}:4"]


def test_byte_order_mark_crlf_and_unicode_line_separators(tmp_path):
    """A BOM (Windows editors), CRLF endings, and U+2028 inside a string (JSON allows it raw;
    str.splitlines would break the line there)."""
    path = tmp_path / "sft.jsonl"
    line = json.dumps({"prompt": "a\u2028b", "response": "c\u0085d"}, ensure_ascii=False)
    path.write_bytes(b"\xef\xbb\xbf" + line.encode() + b"\r\n\r\n" + line.encode() + b"\r\n")
    examples = read_sft(path)
    assert [e.source for e in examples] == [f"{path}:1", f"{path}:3"]
    assert examples[0] == SFTExample([{"role": "user", "content": "a\u2028b"}], "c\u0085d")


def test_byte_order_mark_of_a_concatenated_file(tmp_path):
    """`cat a.jsonl b.jsonl` puts b's BOM at the start of a middle line; it said "invalid JSON:
    Unexpected UTF-8 BOM (decode using utf-8-sig)", advice for Python, not for this command."""
    path = tmp_path / "sft.jsonl"
    line = json.dumps(GOOD["sft"]).encode()
    path.write_bytes(b"\xef\xbb\xbf" + line + b"\n" + b"\xef\xbb\xbf" + line + b"\r\n")
    examples = read_sft(path)
    assert [e.source for e in examples] == [f"{path}:1", f"{path}:2"]
    assert examples[0] == examples[1]


def test_read_rm_pairwise_and_kwise_mix(tmp_path):
    path = write_lines(
        tmp_path / "rm.jsonl",
        [
            {"prompt": "p1", "chosen": "good", "rejected": "bad"},
            {"prompt": "p2", "responses": ["a", "b", "c", "d"]},
            {"messages": [SYSTEM, USER], "responses": ["x", "y"]},
        ],
    )
    assert read_rm(path) == [
        RankExample([{"role": "user", "content": "p1"}], ["good", "bad"]),
        RankExample([{"role": "user", "content": "p2"}], ["a", "b", "c", "d"]),
        RankExample([SYSTEM, USER], ["x", "y"]),
    ]


def test_read_rm_scores(tmp_path):
    path = write_lines(
        tmp_path / "scores.jsonl",
        [
            {"prompt": "p", "response": "r", "score": 1},
            {"prompt": "p", "response": "s", "score": -2.5e-3},
        ],
    )
    examples = read_rm(path)
    assert examples == [
        ScoreExample([{"role": "user", "content": "p"}], "r", 1.0),
        ScoreExample([{"role": "user", "content": "p"}], "s", -2.5e-3),
    ]
    assert isinstance(examples[0].score, float)


def test_read_prompts(tmp_path):
    path = write_lines(
        tmp_path / "prompts.jsonl", [{"prompt": "Tell me a joke."}, {"messages": [SYSTEM, USER]}]
    )
    assert read_prompts(path) == [
        PromptExample([{"role": "user", "content": "Tell me a joke."}]),
        PromptExample([SYSTEM, USER]),
    ]


# ---- readers: bad lines ---------------------------------------------------------------------

NOT_UTF8 = object()  # marker: the bad line is raw bytes that are not UTF-8

# (reader, bad line, the exact reason after "FILE:LINE: ")
BAD_LINES = [
    ("sft", '{"prompt": "a", "response": "b"', "invalid JSON: Expecting ',' delimiter (column 32)"),
    ("sft", "[1, 2]", "expected a JSON object, got list"),
    ("sft", '"text"', "expected a JSON object, got string"),
    ("sft", NOT_UTF8, "not UTF-8 text (byte 13)"),
    ("sft", {"prompt": "a"}, 'missing key "response"'),
    ("sft", {"response": "a"}, 'expected "prompt" and "response", or "messages"'),
    ("sft", {"prompt": "a", "response": ""}, '"response" is empty'),
    ("sft", {"prompt": " \n", "response": "b"}, '"prompt" is empty'),
    ("sft", {"prompt": "a", "response": 3}, '"response" must be a string, got number'),
    ("sft", {"prompt": None, "response": "b"}, '"prompt" must be a string, got null'),
    (
        "sft",
        '{"prompt": "a", "response": "b\\ud83d c"}',
        '"response" holds an unpaired surrogate escape (\\ud83d)',
    ),
    ("sft", "[" * 100_000 + "]" * 100_000, "invalid JSON: nested too deeply"),
    (  # Python refuses to convert integers this long (a plain ValueError, not a JSON error)
        "sft",
        '{"prompt": "a", "response": "b", "id": ' + "7" * 5000 + "}",
        f"invalid JSON: an integer of more than {sys.get_int_max_str_digits()} digits",
    ),
    (
        "sft",
        {"prompt": "a", "messages": [USER, ASSISTANT]},
        'has both "messages" and "prompt"; give one',
    ),
    ("sft", {"messages": [USER]}, '"messages" must end with an assistant turn, not user'),
    (  # which answer to learn? "response" was silently ignored
        "sft",
        {"messages": [USER, ASSISTANT], "response": "other"},
        'has both "messages" and "response"; give "prompt" and "response", or "messages"',
    ),
    (
        "sft",
        {"messages": [ASSISTANT]},
        '"messages" must end with a user turn, then the assistant answer',
    ),
    (
        "sft",
        {"messages": [SYSTEM, ASSISTANT]},
        '"messages" must end with a user turn, then the assistant answer',
    ),
    ("sft", {"messages": []}, '"messages" is empty'),
    ("sft", {"messages": "hi"}, '"messages" must be a list of turns, got string'),
    ("sft", {"messages": [USER, "hi"]}, '"messages"[1] must be an object, got string'),
    ("sft", {"messages": [{"role": "user"}, ASSISTANT]}, '"messages"[0] has no "content"'),
    (
        "sft",
        {"messages": [{"role": "tool", "content": "x"}, ASSISTANT]},
        '"messages"[0] has unknown role "tool" (expected system, user, assistant)',
    ),
    (
        "sft",
        {"messages": [{"role": ["user"], "content": "x"}, ASSISTANT]},
        '"messages"[0] has unknown role ["user"] (expected system, user, assistant)',
    ),
    (
        "prompts",
        {"messages": [{"role": {"name": "user"}, "content": "x"}]},
        '"messages"[0] has unknown role {"name": "user"} (expected system, user, assistant)',
    ),
    (
        "sft",
        {"messages": [USER, SYSTEM, USER, ASSISTANT]},
        '"messages"[1] is a system turn; only the first message may be one',
    ),
    (
        "sft",
        {"messages": [USER, {"role": "assistant", "content": ""}]},
        '"messages"[1]["content"] is empty',
    ),
    ("rm", {"prompt": "p", "chosen": "a"}, 'missing key "rejected"'),
    (
        "rm",
        {"prompt": "p", "chosen": "a", "rejected": "a"},
        '"chosen" and "rejected" are the same text',
    ),
    ("rm", {"chosen": "a", "rejected": "b"}, 'missing key "prompt"'),
    (
        "rm",
        {"prompt": "p", "responses": ["a"]},
        '"responses" needs at least 2 answers to rank, got 1',
    ),
    ("rm", {"prompt": "p", "responses": []}, '"responses" needs at least 2 answers to rank, got 0'),
    ("rm", {"prompt": "p", "responses": "a"}, '"responses" must be a list of strings, got string'),
    ("rm", {"prompt": "p", "responses": ["a", 2]}, '"responses"[1] must be a string, got number'),
    (
        "rm",
        {"prompt": "p", "responses": ["a", "b", "c", "b"]},
        '"responses"[1] and [3] are the same text; a ranking needs distinct answers',
    ),
    (  # an SFT file given to --stage rm
        "rm",
        {"prompt": "p", "response": "a"},
        'missing key "score" (a "prompt"/"response" line without one is SFT data: --stage sft; '
        '--stage rm reads "chosen"/"rejected", "responses" or a "score")',
    ),
    (  # a rankings file given to --stage sft
        "sft",
        {"prompt": "p", "chosen": "a", "rejected": "b"},
        'missing key "response" (this line is reward-model data: --stage rm)',
    ),
    (
        "sft",
        {"prompt": "p", "responses": ["a", "b"]},
        'missing key "response" (this line is reward-model data: --stage rm)',
    ),
    ("rm", '{"prompt": "p", "response": "a", "score": NaN}', '"score" must be finite, got nan'),
    (
        "rm",
        '{"prompt": "p", "response": "a", "score": -Infinity}',
        '"score" must be finite, got -inf',
    ),
    ("rm", {"prompt": "p", "response": "a", "score": 1e400}, '"score" must be finite, got inf'),
    ("rm", {"prompt": "p", "response": "a", "score": 10**400}, '"score" is too large for a float'),
    (
        "rm",
        {"prompt": "p", "response": "a", "score": "1.0"},
        '"score" must be a number, got string',
    ),
    (
        "rm",
        {"prompt": "p", "response": "a", "score": True},
        '"score" must be a number, got boolean',
    ),
    (
        "rm",
        {"prompt": "p", "responses": ["a", "b"], "chosen": "a", "rejected": "b"},
        'mixes formats: "chosen" and "rejected" and "responses" cannot be on one line',
    ),
    (
        "rm",
        {"prompt": "p", "response": "x"} | {"responses": ["a", "b"]},
        'mixes formats: "responses" and "response" cannot be on one line',
    ),
    (
        "rm",
        {"prompt": "p"},
        'expected "chosen" and "rejected", "responses", or "response" and "score"',
    ),
    (
        "rm",
        {"messages": [USER, ASSISTANT], "responses": ["a", "b"]},
        '"messages" must end with a user turn, not assistant',
    ),
    ("prompts", {"response": "a"}, 'missing key "prompt"'),
    ("prompts", {"prompt": ""}, '"prompt" is empty'),
    (
        "prompts",
        {"messages": [USER, ASSISTANT]},
        '"messages" must end with a user turn, not assistant',
    ),
]


@pytest.mark.parametrize("reader, bad, reason", BAD_LINES, ids=[r for _, _, r in BAD_LINES])
def test_bad_line_reports_file_line_and_reason(tmp_path, reader, bad, reason):
    """The bad line is line 4 (after two good lines and a blank one, which still counts)."""
    path = tmp_path / f"{reader}.jsonl"
    good = json.dumps(GOOD[reader]).encode()
    if bad is NOT_UTF8:
        bad_bytes = b'{"prompt": "\xff\xfe", "response": "x"}'
    else:
        bad_bytes = (bad if isinstance(bad, str) else json.dumps(bad)).encode()
    path.write_bytes(b"\n".join([good, good, b"", bad_bytes, good]) + b"\n")
    with pytest.raises(DataError) as caught:
        READERS[reader](path)
    assert str(caught.value) == f"{path}:4: {reason}"
    assert "\n" not in str(caught.value)
    assert caught.value.location == f"{path}:4" and caught.value.more_bad_lines == 0


def test_first_bad_line_is_reported_with_the_count_of_the_others(tmp_path):
    lines = [GOOD["sft"], {"prompt": "a"}, GOOD["sft"], "not json", {"prompt": "", "response": "x"}]
    path = write_lines(tmp_path / "sft.jsonl", lines)
    with pytest.raises(DataError) as caught:
        read_sft(path)
    assert (
        str(caught.value) == f'{path}:2: missing key "response" (2 more bad lines after this one)'
    )
    path = write_lines(tmp_path / "two.jsonl", lines[:4])
    with pytest.raises(DataError, match=r":2: .* \(1 more bad line after this one\)$"):
        read_sft(path)


def test_score_lines_cannot_mix_with_rankings(tmp_path):
    score = {"prompt": "p", "response": "a", "score": 0.5}
    path = write_lines(tmp_path / "mixed.jsonl", [GOOD["rm"], score, score])
    with pytest.raises(DataError) as caught:
        read_rm(path)
    assert str(caught.value) == (
        f"{path}:2: a direct-score line in a file whose line 1 is a ranking; "
        "rankings and direct scores cannot mix (1 more bad line after this one)"
    )
    path = write_lines(tmp_path / "mixed2.jsonl", ["", score, GOOD["rm"]])
    with pytest.raises(DataError, match=r":3: a ranking in a file whose line 2 is a direct-score"):
        read_rm(path)


@pytest.mark.parametrize("reader", sorted(READERS))
@pytest.mark.parametrize("content", ["", "\n\n  \n"], ids=["empty", "blank"])
def test_empty_file(tmp_path, reader, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(DataError) as caught:
        READERS[reader](path)
    assert str(caught.value) == f"{path}: empty file: expected one JSON object per line"


def test_missing_file(tmp_path):
    path = tmp_path / "nope.jsonl"
    with pytest.raises(DataError) as caught:
        read_sft(path)
    assert str(caught.value) == f"{path}: cannot read: No such file or directory"


def test_a_file_is_read_a_line_at_a_time(tmp_path):
    """Datasets carry fields the readers ignore (ids, metadata, whole source documents): the
    file must not be held in memory whole, nor as a list of all its lines, beside the examples
    (it was: 2-3x a huge file's size of peak memory on top of the examples)."""
    import tracemalloc

    path = tmp_path / "big.jsonl"
    filler = "x" * 4000
    records = [{"prompt": f"q{i}", "response": "a", "meta": filler} for i in range(1000)]
    ends = ["\r\n", "\n"]
    path.write_text("".join(json.dumps(r) + ends[i % 2] for i, r in enumerate(records)))
    tracemalloc.start()
    try:
        examples = read_sft(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(examples) == 1000 and examples[-1].source == f"{path}:1000"
    assert peak < path.stat().st_size / 4, (peak, path.stat().st_size)


def test_lone_carriage_returns_end_lines_as_in_editors(tmp_path):
    path = tmp_path / "cr.jsonl"
    line = json.dumps({"prompt": "p", "response": "r"}).encode()
    path.write_bytes(line + b"\r" + line + b"\r\n\r" + b"{bad\r" + line + b"\r")
    with pytest.raises(DataError, match=rf"{path}:4: invalid JSON"):
        read_sft(path)
    path.write_bytes(line + b"\r" + line + b"\r\n\r\n" + line)
    assert [e.source for e in read_sft(path)] == [f"{path}:1", f"{path}:2", f"{path}:4"]


# ---- held-out split -------------------------------------------------------------------------


def test_split_held_out_is_deterministic_and_disjoint():
    examples = list(range(100))
    train, held = split_held_out(examples, 0.1, seed=3)
    assert len(held) == 10 and len(train) == 90
    assert sorted(train + held) == examples
    assert train == sorted(train) and held == sorted(held)  # the file's order is kept
    assert split_held_out(examples, 0.1, seed=3) == (train, held)
    assert split_held_out(examples, 0.1, seed=4)[1] != held


def test_split_held_out_edges():
    assert split_held_out([1, 2, 3], 0.0, seed=0) == ([1, 2, 3], [])
    assert len(split_held_out([1, 2, 3], 0.01, seed=0)[1]) == 1  # at least one held out
    assert len(split_held_out([1, 2], 0.9, seed=0)[0]) == 1  # never all
    assert split_held_out([1], 0.5, seed=0) == ([1], [])
    for bad in (-0.1, 1.0, math.nan):
        with pytest.raises(ValueError, match="fraction"):
            split_held_out([1, 2], bad, seed=0)


# ---- prompt format: what chat feeds ---------------------------------------------------------


def test_prompt_text_without_and_with_template(plain_tokenizer, templated_tokenizer):
    messages = [SYSTEM, USER, ASSISTANT, USER]
    assert render_prompt(plain_tokenizer, messages) == (
        "System: Be kind.\nUser: Hi\nAssistant: Hello!\nUser: Hi\nAssistant:"
    )
    assert render_prompt(templated_tokenizer, messages) == (
        "<|system|>Be kind.\n<|user|>Hi\n<|assistant|>Hello!\n<|user|>Hi\n<|assistant|>"
    )
    for tokenizer in (plain_tokenizer, templated_tokenizer):
        assert prompt_ids(tokenizer, messages) == prompt_token_ids(tokenizer, messages)
    assert response_text(plain_tokenizer, "Sure.") == " Sure."
    assert response_text(plain_tokenizer, "\nSure.") == "\nSure."
    assert response_text(templated_tokenizer, "Sure.") == "Sure."


def test_failing_template_is_template_error_chat_error_and_data_error(tmp_path):
    tokenizer = train_tokenizer()
    tokenizer.chat_template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system turns') }}"
        "{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    messages = [SYSTEM, USER]
    with pytest.raises(TemplateError, match="^the tokenizer's chat template failed: no system"):
        prompt_token_ids(tokenizer, messages)
    with pytest.raises(ChatError, match="chat template failed: no system turns"):
        prompt_ids(tokenizer, messages)
    path = write_lines(
        tmp_path / "sft.jsonl", [GOOD["sft"], {"messages": [SYSTEM, USER, ASSISTANT]}]
    )
    examples = read_sft(path)
    assert encode_sft(tokenizer, examples[0], 64)["input_ids"]
    with pytest.raises(DataError) as caught:
        encode_sft(tokenizer, examples[1], 64)
    assert str(caught.value) == f"{path}:2: the tokenizer's chat template failed: no system turns"
    with pytest.raises(TemplateError):  # no source given: the template's own error
        encode_response(tokenizer, messages, "x", 64)


# ---- encoding -------------------------------------------------------------------------------


def expected_encoding(tokenizer, messages, response):
    """Independent of data_encode: chat's prompt ids, then the answer text tokenized alone
    (one space after the plain template's "Assistant:"), then the EOS id."""
    text = response if tokenizer.chat_template else " " + response
    answer = tokenizer(text, add_special_tokens=False)["input_ids"]
    return prompt_ids(tokenizer, messages), answer + [tokenizer.eos_token_id]


@pytest.mark.parametrize(
    "messages", [[USER], [SYSTEM, USER], [SYSTEM, USER, ASSISTANT, USER]], ids=len
)
def test_encode_sft_token_by_token(tokenizer, messages):
    response = "It is sunny and warm. Café 🙂"
    encoded = encode_sft(tokenizer, SFTExample(messages, response), max_length=1000)
    prompt, answer = expected_encoding(tokenizer, messages, response)
    assert encoded["input_ids"] == prompt + answer
    assert encoded["labels"] == [IGNORE_INDEX] * len(prompt) + answer
    for index, (token, label) in enumerate(
        zip(encoded["input_ids"], encoded["labels"], strict=True)
    ):
        assert label == (IGNORE_INDEX if index < len(prompt) else token)
    assert encoded["labels"][-1] == tokenizer.eos_token_id == tokenizer.pad_token_id
    trained = [t for t in encoded["labels"] if t != IGNORE_INDEX]
    assert tokenizer.decode(trained) == response_text(tokenizer, response) + "<eos>"
    full_text = tokenizer.decode(encoded["input_ids"])
    assert (
        full_text
        == render_prompt(tokenizer, messages) + response_text(tokenizer, response) + "<eos>"
    )


def test_prompt_ids_are_not_merged_with_the_answer():
    """A template whose assistant header ends inside a word ("He" + "llo!"): tokenizing the
    joined text merges across the border and changes the prompt's ids; the encoder's prompt part
    is still exactly the ids chat feeds, and the first answer token is the first trained one."""
    tokenizer = train_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}He{% endif %}"
    )
    messages, response = [USER], "llo!"
    prompt = prompt_ids(tokenizer, messages)
    joined = tokenizer("Hi\nHello!", add_special_tokens=False)["input_ids"]
    assert joined[: len(prompt)] != prompt  # the hazard is real with this tokenizer
    encoded = encode_sft(tokenizer, SFTExample(messages, response), 1000)
    answer = tokenizer(response, add_special_tokens=False)["input_ids"]
    assert encoded["input_ids"] == prompt + answer + [tokenizer.eos_token_id]
    assert encoded["labels"] == [IGNORE_INDEX] * len(prompt) + answer + [tokenizer.eos_token_id]


def test_encode_response_matches_encode_sft(tokenizer):
    example = SFTExample([SYSTEM, USER], "It is sunny.")
    for max_length in (1000, 12, 5, 2):
        expected = encode_sft(tokenizer, example, max_length)["input_ids"]
        assert (
            encode_response(tokenizer, example.messages, example.response, max_length) == expected
        )
    ranking = RankExample([USER], ["good answer", "bad"])
    assert encode_ranking(tokenizer, ranking, 50) == [
        encode_response(tokenizer, [USER], "good answer", 50),
        encode_response(tokenizer, [USER], "bad", 50),
    ]
    # A policy's answer that is empty (EOS at once) or decoded with its leading space.
    prompt, _ = expected_encoding(tokenizer, [USER], "x")
    assert encode_response(tokenizer, [USER], "", 50) == prompt + [tokenizer.eos_token_id]
    spaced = encode_response(tokenizer, [USER], " Hi there", 50)
    assert spaced == prompt + tokenizer(" Hi there", add_special_tokens=False)["input_ids"] + [
        tokenizer.eos_token_id
    ]
    ids, score = encode_scored(tokenizer, ScoreExample([USER], "bad", -1.5), 50)
    assert ids == encode_response(tokenizer, [USER], "bad", 50) and score == -1.5


def test_truncation_drops_prompt_from_the_left_first(tokenizer):
    messages = [SYSTEM, {"role": "user", "content": "The quick brown fox jumps over the lazy dog."}]
    prompt, answer = expected_encoding(tokenizer, messages, "Fine.")
    assert len(prompt) > 10
    for cut in (1, 5, len(prompt) - 1):  # the whole answer and EOS still fit
        max_length = len(prompt) + len(answer) - cut
        encoded = encode_sft(tokenizer, SFTExample(messages, "Fine."), max_length)
        assert encoded["input_ids"] == prompt[cut:] + answer
        assert encoded["labels"] == [IGNORE_INDEX] * (len(prompt) - cut) + answer
    exact = encode_sft(tokenizer, SFTExample(messages, "Fine."), len(prompt) + len(answer))
    assert exact["input_ids"] == prompt + answer


def test_truncation_then_cuts_the_answer_and_its_eos(tokenizer):
    response = "It is sunny and warm. The quick brown fox jumps over the lazy dog."
    prompt, answer = expected_encoding(tokenizer, [USER], response)
    # The answer with its EOS fits behind the prompt's last token: EOS kept.
    encoded = encode_sft(tokenizer, SFTExample([USER], response), len(answer) + 1)
    assert encoded["input_ids"] == prompt[-1:] + answer
    # One token less: the prompt keeps its last token, the answer loses its EOS.
    for max_length in (len(answer), 7, 2):
        encoded = encode_sft(tokenizer, SFTExample([USER], response), max_length)
        assert encoded["input_ids"] == prompt[-1:] + answer[: max_length - 1]
        assert encoded["labels"] == [IGNORE_INDEX] + answer[: max_length - 1]
        assert tokenizer.eos_token_id not in encoded["input_ids"]


def test_every_length_keeps_a_trained_label_the_model_predicts(tokenizer):
    generator = random.Random(0)
    words = "the quick brown fox jumps over lazy dog sunny warm".split()
    for _ in range(30):
        prompt = " ".join(generator.choices(words, k=generator.randint(1, 12)))
        response = " ".join(generator.choices(words, k=generator.randint(1, 12)))
        max_length = generator.randint(2, 40)
        encoded = encode_sft(
            tokenizer, SFTExample([{"role": "user", "content": prompt}], response), max_length
        )
        assert 2 <= len(encoded["input_ids"]) <= max_length
        assert len(encoded["labels"]) == len(encoded["input_ids"])
        # Position 0 is never a prediction target (the model shifts labels by one).
        assert encoded["labels"][0] == IGNORE_INDEX
        assert any(label != IGNORE_INDEX for label in encoded["labels"][1:])


def test_encode_bad_arguments(plain_tokenizer):
    example = SFTExample([USER], "x")
    for bad in (1, 0, 2.5, None):
        with pytest.raises(ValueError, match="max_length"):
            encode_sft(plain_tokenizer, example, bad)
    assert pad_token_id(plain_tokenizer) == plain_tokenizer.pad_token_id
    tokenizer = train_tokenizer()
    tokenizer.pad_token = None
    assert pad_token_id(tokenizer) == tokenizer.eos_token_id  # no pad token: pad with EOS
    tokenizer.eos_token = None
    with pytest.raises(ValueError, match="eos_token"):
        encode_sft(tokenizer, example, 10)
    with pytest.raises(ValueError, match="eos_token"):
        pad_token_id(tokenizer)


# ---- collators ------------------------------------------------------------------------------


def test_sft_collator_pads_right_and_keeps_eos_labels_when_pad_is_eos(plain_tokenizer):
    eos = plain_tokenizer.eos_token_id
    assert plain_tokenizer.pad_token_id == eos
    features = [
        encode_sft(plain_tokenizer, SFTExample([USER], "A long answer about the weather."), 100),
        encode_sft(plain_tokenizer, SFTExample([USER], "Ok."), 100),
    ]
    batch = SFTCollator(plain_tokenizer.pad_token_id)(features)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    length = max(len(f["input_ids"]) for f in features)
    for name in batch:
        assert batch[name].shape == (2, length) and batch[name].dtype == torch.long
    for row, feature in enumerate(features):
        size = len(feature["input_ids"])
        assert batch["input_ids"][row, :size].tolist() == feature["input_ids"]
        assert batch["labels"][row, :size].tolist() == feature["labels"]
        assert batch["attention_mask"][row].tolist() == [1] * size + [0] * (length - size)
        assert batch["input_ids"][row, size:].tolist() == [eos] * (length - size)
        assert batch["labels"][row, size:].tolist() == [IGNORE_INDEX] * (length - size)
        assert batch["labels"][row, size - 1] == eos  # the real EOS is trained, the padding not


def test_eos_counts_in_the_model_loss(plain_tokenizer):
    """Through a real model: the loss of the collated batch is the mean cross-entropy over the
    answer tokens and the EOS, and nothing else."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(plain_tokenizer), hidden_size=32, intermediate_size=64,
        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    features = [
        encode_sft(plain_tokenizer, SFTExample([USER], text), 100)
        for text in ("Hello there.", "Ok.")
    ]
    batch = SFTCollator(plain_tokenizer.pad_token_id)(features)
    with torch.no_grad():
        output = model(**batch)
    logits = output.logits.double()
    terms = []
    for row, feature in enumerate(features):
        for position in range(1, len(feature["input_ids"])):
            target = feature["labels"][position]
            if target != IGNORE_INDEX:
                log_probs = logits[row, position - 1].log_softmax(-1)
                terms.append(-log_probs[target])
    assert len(terms) == sum(sum(t != IGNORE_INDEX for t in f["labels"]) for f in features)
    torch.testing.assert_close(
        output.loss.double(), torch.stack(terms).mean(), atol=1e-5, rtol=1e-5
    )


def test_rank_collator_variable_k():
    pad = 0
    rankings = [[[5, 6], [7]], [[8], [9, 10, 11], [12]], [[13, 14, 15, 16], [17]]]
    batch = RankCollator(pad)(rankings)
    assert set(batch) == {"input_ids", "attention_mask", "present"}
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (9, 4)
    assert batch["present"].dtype == torch.bool
    assert batch["present"].tolist() == [[True, True, False], [True] * 3, [True, True, False]]
    for b, answers in enumerate(rankings):
        for k in range(3):
            row = b * 3 + k
            ids = answers[k] if k < len(answers) else [pad]  # filler: one pad token, attended
            assert batch["input_ids"][row].tolist() == ids + [pad] * (4 - len(ids))
            assert batch["attention_mask"][row].tolist() == [1] * len(ids) + [0] * (4 - len(ids))


def test_rank_collator_from_encoded_file(tmp_path, plain_tokenizer):
    path = write_lines(
        tmp_path / "rm.jsonl",
        [GOOD["rm"], {"prompt": "p", "responses": ["a", "b", "c"]}],
    )
    items = [encode_ranking(plain_tokenizer, e, 64) for e in read_rm(path)]
    batch = RankCollator(plain_tokenizer.pad_token_id)(items)
    assert batch["input_ids"].shape[0] == 6 and batch["present"].tolist() == [
        [True, True, False],
        [True, True, True],
    ]
    for row, ids in ((0, items[0][0]), (1, items[0][1]), (5, items[1][2])):
        length = int(batch["attention_mask"][row].sum())
        assert batch["input_ids"][row, :length].tolist() == ids
        assert ids[-1] == plain_tokenizer.eos_token_id


def test_score_collator():
    batch = ScoreCollator(3)([([1, 2, 4], 0.5), ([5], -2)])
    assert batch["input_ids"].tolist() == [[1, 2, 4], [5, 3, 3]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["scores"].dtype == torch.float32 and batch["scores"].tolist() == [0.5, -2.0]


def test_collators_reject_bad_input():
    for pad in (None, -1, True, 1.0):
        for collator in (SFTCollator, RankCollator, ScoreCollator):
            with pytest.raises(ValueError, match="pad_token_id"):
                collator(pad)
    with pytest.raises(ValueError, match="pack_to"):
        SFTCollator(0, pack_to=1)
    with pytest.raises(ValueError, match="features is empty"):
        SFTCollator(0)([])
    with pytest.raises(ValueError, match=r"features\[1\]"):
        SFTCollator(0)([{"input_ids": [1], "labels": [1]}, {"input_ids": [1, 2], "labels": [1]}])
    with pytest.raises(ValueError, match=r"rankings\[0\] is empty"):
        RankCollator(0)([[]])
    with pytest.raises(ValueError, match=r"rankings\[1\]\[0\] is empty"):
        RankCollator(0)([[[1]], [[]]])
    with pytest.raises(ValueError, match=r"items\[0\] token ids is empty"):
        ScoreCollator(0)([([], 1.0)])


# ---- packing --------------------------------------------------------------------------------


def test_packing_layout():
    features = [
        {"input_ids": [1, 2, 3], "labels": [-100, 2, 3]},
        {"input_ids": [4, 5], "labels": [-100, 5]},
        {"input_ids": [6, 7, 8], "labels": [-100, -100, 8]},
        {"input_ids": [10], "labels": [-100]},
    ]
    batch = SFTCollator(0, pack_to=6)(features)
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 10, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3, -100, 5], [-100, -100, 8, -100, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 0, 0]]
    one_each = SFTCollator(0, pack_to=3)(features)
    assert one_each["input_ids"].tolist() == [[1, 2, 3], [4, 5, 0], [6, 7, 8], [10, 0, 0]]
    assert one_each["position_ids"].tolist() == [[0, 1, 2], [0, 1, 0], [0, 1, 2], [0, 0, 1]]
    with pytest.raises(ValueError, match=r"features\[0\] has 3 tokens, more than pack_to=2"):
        SFTCollator(0, pack_to=2)(features)


def _tiny_model(family: str, vocab: int):
    import transformers as tf

    torch.manual_seed(0)
    llama_like = dict(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    if family == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(**llama_like))
    if family == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**llama_like))
    if family == "gpt2":
        config = tf.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4,
                               bos_token_id=0, eos_token_id=0)  # fmt: skip
        return tf.GPT2LMHeadModel(config)
    if family == "opt":
        config = tf.OPTConfig(
            vocab_size=vocab, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
            num_attention_heads=4, word_embed_proj_dim=32,
        )  # fmt: skip
        return tf.OPTForCausalLM(config)
    config = tf.BloomConfig(vocab_size=vocab, hidden_size=32, n_layer=2, n_head=4)
    return tf.BloomForCausalLM(config)


def test_packed_loss_equals_unpacked_loss(plain_tokenizer):
    """Oracle: the summed token loss of packed rows equals that of the padded batch, so no
    example saw another (Llama, called as data_pack.py says: use_cache=False)."""
    model = _tiny_model("llama", len(plain_tokenizer)).eval()
    texts = ["Hello there.", "Ok.", "It is sunny and warm today.", "Fine, thank you."]
    features = [encode_sft(plain_tokenizer, SFTExample([USER], t), 100) for t in texts]
    pad = plain_tokenizer.pad_token_id

    def summed_loss(batch):
        with torch.no_grad():
            logits = model(**batch, use_cache=False).logits
        return torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), reduction="sum"
        )

    plain = summed_loss(SFTCollator(pad)(features))
    packed_batch = SFTCollator(pad, pack_to=64)(features)
    assert packed_batch["input_ids"].shape[0] < len(features)
    torch.testing.assert_close(summed_loss(packed_batch), plain, atol=1e-4, rtol=1e-5)
    # The same rows without position ids (one long sequence) would mix examples: the check bites.
    mixed = {k: v for k, v in packed_batch.items() if k != "position_ids"}
    assert not torch.allclose(summed_loss(mixed), plain, atol=1e-2)


# What data_pack.py documents for transformers 5: these families build their mask from the
# packed position ids; OPT and BLOOM do not (their packed examples would see each other).
PACKING_ISOLATES = {"llama": True, "qwen2": True, "gpt2": True, "opt": False, "bloom": False}


@pytest.mark.parametrize("family", sorted(PACKING_ISOLATES))
def test_packing_isolates_tells_models_apart(family):
    model = _tiny_model(family, 50).train()
    assert packing_isolates(model) == PACKING_ISOLATES[family]
    assert model.training  # the check leaves the mode as it found it
