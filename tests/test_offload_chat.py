"""`rlhf-fast chat --offload`: answers equal the resident model's, the policy is printed, and
bad --offload / --max-memory values are one-line errors (exit 2). int4 chats under the int4
activation rule (bf16 for products of >= 32 rows) offloaded and resident alike."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import pytest

from rlhf_fast.cli import main

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import make_tiny_model_dir  # noqa: E402

ARGS = ["--prompt", "Hello there", "--temperature", "0", "--max-new-tokens", "12"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("chat") / "model", num_layers=4)


@pytest.fixture(autouse=True)
def _restore_decoder_env():
    saved = os.environ.get("RLHF_FAST_DECODER")
    yield
    if saved is None:
        os.environ.pop("RLHF_FAST_DECODER", None)
    else:
        os.environ["RLHF_FAST_DECODER"] = saved


def _answer(capsys, argv) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    "spec, budget",
    # The policy charges a 512-token prefill (~2.3 MiB of activations for this 144 KiB-a-layer
    # model): at 2520 KiB no placement holds every layer (int4 all resident needs 2563), so
    # auto streams some.
    [("auto", "cpu=2520KiB"), ("compress=none,resident=1,prefetch=0", "cpu=3MB")],
)
def test_offloaded_chat_answers_like_the_resident_model(model_dir, capsys, tmp_path, spec, budget):
    argv = ["chat", str(model_dir), *ARGS, "--offload", spec, "--max-memory", budget]
    decoder_env = os.environ.get("RLHF_FAST_DECODER")
    code, offloaded, err = _answer(capsys, [*argv, "--offload-dir", str(tmp_path / "o")])
    assert code == 0, err
    # the session closed its streamer (no reader thread left) and changed no global setting
    assert not [t for t in threading.enumerate() if t.name.startswith("rlhf-fast-offload")]
    assert os.environ.get("RLHF_FAST_DECODER") == decoder_env
    assert "[offload: compress=" in err and "predicted" in err
    if spec != "auto":
        assert "compress=none resident_layers=1 prefetch=0" in err
    # the resident oracle: the same compression the policy chose, through the HF forward
    chosen = err.split("[offload: compress=")[1].split()[0]
    flags = {"none": [], "int8": ["--int8"], "int4": ["--int4", "--group-size", "32"]}[chosen]
    os.environ["RLHF_FAST_DECODER"] = "hf"
    code, resident, _ = _answer(capsys, ["chat", str(model_dir), *ARGS, *flags])
    assert code == 0
    assert offloaded == resident


def test_offloaded_chat_with_a_4_bit_kv_cache(model_dir, capsys, tmp_path, monkeypatch):
    from rlhf_fast.offload import kv_cache

    stored = []
    update = kv_cache.Int4KVLayer.update

    def counting(self, keys, values, *args, **kwargs):
        stored.append(keys.shape[-2])
        return update(self, keys, values, *args, **kwargs)

    monkeypatch.setattr(kv_cache.Int4KVLayer, "update", counting)
    spec = "compress=none,resident=1,prefetch=0,kv=int4"
    argv = ["chat", str(model_dir), *ARGS, "--offload", spec, "--max-memory", "cpu=3MB"]
    code, answer, err = _answer(capsys, [*argv, "--offload-dir", str(tmp_path / "o")])
    assert code == 0, err
    assert "kv=int4" in err and answer.strip()
    # every layer stored the prompt, then one token a step, in the compressed cache
    layers = 4
    assert len(stored) >= layers * 2 and stored[0] > 1 and set(stored[layers:]) == {1}
    assert not [t for t in threading.enumerate() if t.name.startswith("rlhf-fast-offload")]


LONG = "Hello there, please tell me a long story about the sea and the ships on it today"


@pytest.mark.parametrize("act, bf16_expected", [("", True), (",act=fp32", False)])
def test_offloaded_int4_chat_follows_the_activation_rule(
    model_dir, capsys, tmp_path, monkeypatch, act, bf16_expected
):
    import torch

    import rlhf_fast.ops

    seen = []
    original = rlhf_fast.ops.quant_matmul

    def spy(x, qweight, bias=None, **kwargs):
        if x.dim() == 3 and x.shape[0] == 1:  # the chat's one sequence (not the calibration's)
            seen.append((x.dtype, x.shape[1]))
        return original(x, qweight, bias, **kwargs)

    monkeypatch.setattr(rlhf_fast.ops, "quant_matmul", spy)
    args = ["--prompt", LONG, "--temperature", "0", "--max-new-tokens", "8"]
    argv = ["chat", str(model_dir), *args, "--offload", f"compress=int4,resident=1{act}"]
    argv += ["--max-memory", "cpu=3MB", "--offload-dir", str(tmp_path / "o")]
    code, offloaded, err = _answer(capsys, argv)
    assert code == 0, err
    assert ("act=bf16" in err) == bf16_expected
    prefill = max(rows for _, rows in seen)
    assert prefill >= 32  # the prompt's prefill is a product of >= 32 rows
    assert {d for d, r in seen if r >= 32} == {torch.bfloat16 if bf16_expected else torch.float32}
    assert {d for d, r in seen if r < 32} == {torch.float32}
    if bf16_expected:  # the resident HF forward of chat --int4 applies the same rule
        os.environ["RLHF_FAST_DECODER"] = "hf"
        seen.clear()
        flags = ["--int4", "--group-size", "32"]
        code, resident, _ = _answer(capsys, ["chat", str(model_dir), *args, *flags])
        assert code == 0 and offloaded == resident
        assert {d for d, r in seen if r >= 32} == {torch.bfloat16}


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--offload", "bogus"], "--offload: 'bogus'"),
        (["--offload", "auto", "--max-memory", "cpu=2KB"], "too small"),
        (["--offload", "auto", "--max-memory", "ram=2GB"], "cpu=SIZE"),
    ],
)
def test_bad_offload_flags_are_one_line_errors(model_dir, capsys, tmp_path, extra, message):
    argv = ["chat", str(model_dir), *ARGS, *extra, "--offload-dir", str(tmp_path / "o")]
    code, _, err = _answer(capsys, argv)
    assert code == 2
    errors = [line for line in err.splitlines() if line.startswith("rlhf-fast chat:")]
    assert len(errors) == 1 and message in errors[0], err
    assert err.strip().endswith(errors[0])


def _conversation(turns: int, words: int) -> list[dict[str, str]]:
    text = " ".join(["sea"] * words)
    messages = [{"role": "system", "content": "Be brief."}]
    for turn in range(turns):
        messages += [{"role": "user", "content": f"{turn}: {text}"},
                     {"role": "assistant", "content": f"answer {turn}"}]  # fmt: skip
    return messages + [{"role": "user", "content": "last question"}]


def test_fit_context_leaves_out_the_oldest_exchanges(model_dir):
    from rlhf_fast.chat import ChatError, fit_context, prompt_ids
    from rlhf_fast.models.load import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    messages = _conversation(turns=4, words=30)
    whole = len(prompt_ids(tokenizer, messages))
    assert fit_context(tokenizer, messages, whole) == messages  # it fits: untouched
    kept = fit_context(tokenizer, messages, whole - 1)
    assert len(prompt_ids(tokenizer, kept)) <= whole - 1
    # the system message stays, whole exchanges go from the start, the newest ones stay
    assert kept[0] == messages[0] and kept[1]["role"] == "user" and kept == messages[:1] + kept[1:]
    assert kept[1:] == messages[len(messages) - len(kept) + 1 :] and len(kept) % 2 == 0
    only_last = fit_context(
        tokenizer, messages, len(prompt_ids(tokenizer, messages[:1] + messages[-1:]))
    )
    assert only_last == messages[:1] + messages[-1:]
    with pytest.raises(ChatError, match=r"the prompt is \d+ tokens; under --offload at most 3 "):
        fit_context(tokenizer, messages, 3)


def test_offloaded_chat_refuses_a_prompt_beyond_its_planned_context(model_dir, capsys, tmp_path):
    from rlhf_fast.offload.session import CHAT_PROMPT_TOKENS

    long = " ".join(["sea"] * (CHAT_PROMPT_TOKENS + 50))
    argv = ["chat", str(model_dir), "--prompt", long, "--max-new-tokens", "4", "--offload",
            "compress=none,resident=1", "--max-memory", "cpu=3MB", "--offload-dir",
            str(tmp_path / "o")]  # fmt: skip
    code, _, err = _answer(capsys, argv)
    assert code == 2
    assert f"under --offload at most {CHAT_PROMPT_TOKENS} fit" in err.strip().splitlines()[-1]
    assert not [t for t in threading.enumerate() if t.name.startswith("rlhf-fast-offload")]


def test_offloaded_chat_leaves_out_old_turns_beyond_its_planned_context(
    model_dir, capsys, tmp_path
):
    from types import SimpleNamespace

    from rlhf_fast.chat import answer, fit_context, prompt_ids
    from rlhf_fast.models.generate import SamplingConfig
    from rlhf_fast.models.load import load_tokenizer
    from rlhf_fast.offload.session import CHAT_PROMPT_TOKENS, open_for_chat

    tokenizer = load_tokenizer(model_dir)
    messages = _conversation(turns=12, words=60)
    assert len(prompt_ids(tokenizer, messages)) > CHAT_PROMPT_TOKENS
    args = SimpleNamespace(
        offload="compress=none,resident=1", max_memory="cpu=3MB", offload_dir=tmp_path / "o",
        max_new_tokens=4, int4=False, int8=False,
    )  # fmt: skip
    model = open_for_chat(model_dir, args)
    try:
        capsys.readouterr()
        config = SamplingConfig(temperature=0, max_new_tokens=4)
        reply = answer(model, tokenizer, messages, config, seed=0)
        kept = fit_context(tokenizer, messages, CHAT_PROMPT_TOKENS)
        left_out = len(messages) - len(kept)
        assert left_out > 0 and f"[history: {left_out} oldest message(s) left out" in (
            capsys.readouterr().err
        )
        # the answer is the one to the kept conversation
        assert reply == answer(model, tokenizer, kept, config, seed=0)
    finally:
        model.rlhf_fast_offload.close()
