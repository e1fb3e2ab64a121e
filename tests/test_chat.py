"""`rlhf-fast chat` and the generation under it, on a tiny random Llama built here."""

from __future__ import annotations

import fcntl
import io
import json
import os
import pty
import select
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
import torch

from rlhf_fast.cli import main
from rlhf_fast.models.generate import (
    SamplingConfig,
    StreamDecoder,
    apply_repetition_penalty,
    filter_top_k,
    filter_top_p,
    generate_tokens,
    sample_next_token,
)

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import TINY_CHAT_TEMPLATE, make_tiny_model_dir, train_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def templated_dir(tmp_path_factory) -> Path:
    return make_tiny_model_dir(
        tmp_path_factory.mktemp("templated"), chat_template=TINY_CHAT_TEMPLATE
    )


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("plain"), seed=1)


@pytest.fixture(scope="module")
def tiny_model(plain_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(plain_dir, use_safetensors=True).eval()


def _env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


# ---- sampling -------------------------------------------------------------------------------


def test_greedy_is_argmax():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    config = SamplingConfig(temperature=0, top_k=3, top_p=0.5)
    assert sample_next_token(logits, torch.tensor([], dtype=torch.long), config) == int(
        logits.argmax()
    )


def test_top_k_keeps_only_k():
    logits = torch.tensor([0.5, 3.0, -1.0, 2.0, 1.0, 0.0])
    kept = torch.isfinite(filter_top_k(logits, 3)).nonzero().flatten().tolist()
    assert kept == [1, 3, 4]
    config = SamplingConfig(temperature=1.0, top_k=2)
    generator = torch.Generator().manual_seed(0)
    drawn = {sample_next_token(logits, torch.tensor([]), config, generator) for _ in range(200)}
    assert drawn == {1, 3}


def test_top_p_keeps_smallest_nucleus():
    logits = torch.tensor([0.04, 0.4, 0.3, 0.2, 0.06]).log()

    def kept(p):
        return torch.isfinite(filter_top_p(logits, p)).nonzero().flatten().tolist()

    assert kept(0.39) == [1]  # the top token alone reaches 0.39
    assert kept(0.5) == [1, 2]
    assert kept(0.85) == [1, 2, 3]
    assert kept(0.95) == [1, 2, 3, 4]  # 0.96 with the fourth: the 0.04 token is left out
    assert kept(0.99) == [0, 1, 2, 3, 4]
    assert kept(0.01) == [1]  # never empty
    assert kept(1.0) == [0, 1, 2, 3, 4]


def test_repetition_penalty_lowers_seen_tokens():
    logits = torch.tensor([2.0, -2.0, 1.0, -1.0])
    out = apply_repetition_penalty(logits, torch.tensor([0, 1, 1]), 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0, -1.0]
    assert logits.tolist() == [2.0, -2.0, 1.0, -1.0]  # input untouched
    # Greedy would repeat token 0; a strong penalty moves it to the unseen token 2.
    config = SamplingConfig(temperature=0, repetition_penalty=4.0)
    assert sample_next_token(logits, torch.tensor([0]), config) == 2


def test_bad_sampling_values_raise():
    for bad in ({"temperature": -1}, {"top_p": 0}, {"top_k": -2}, {"repetition_penalty": 0}):
        with pytest.raises(ValueError):
            SamplingConfig(**bad)


def test_same_seed_same_output(tiny_model):
    config = SamplingConfig(temperature=1.5, top_k=50, top_p=0.95, max_new_tokens=12)

    def run(seed):
        return list(generate_tokens(tiny_model, [5, 6, 7], config, seed=seed))

    assert run(3) == run(3)
    assert len(run(3)) == 12
    assert run(3) != run(4)


# ---- generation -----------------------------------------------------------------------------


def test_kv_cache_generation_equals_no_cache_greedy(tiny_model):
    prompt = [3, 17, 42, 99, 7]
    config = SamplingConfig(temperature=0, max_new_tokens=20)
    with_cache = list(generate_tokens(tiny_model, prompt, config))
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(20):
            logits = tiny_model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1]
            ids.append(int(logits.argmax()))
    assert with_cache == ids[len(prompt) :]
    reference = tiny_model.generate(
        torch.tensor([prompt]), do_sample=False, max_new_tokens=20, eos_token_id=None
    )
    assert with_cache == reference[0, len(prompt) :].tolist()


def test_generation_stops_at_eos_and_fills_stats(tiny_model):
    from rlhf_fast.models.generate import GenerationStats, model_bytes

    config = SamplingConfig(temperature=0, max_new_tokens=10)
    free = list(generate_tokens(tiny_model, [3, 4], config))
    stats = GenerationStats(model_bytes=model_bytes(tiny_model))
    stopped = list(
        generate_tokens(tiny_model, [3, 4], config, eos_token_ids={free[3]}, stats=stats)
    )
    assert stopped == free[: free.index(free[3])]
    assert stats.prompt_tokens == 2 and stats.new_tokens == len(stopped)
    assert stats.model_bytes == sum(p.numel() * 4 for p in tiny_model.parameters()) + sum(
        b.numel() * b.element_size() for b in tiny_model.buffers()
    )
    assert "tok/s" in stats.summary() and "GB/s" in stats.summary()
    # the first token comes from the prefill, each decode step draws the next (the last one
    # the EOS): the rate is the steps' (new_tokens over the decode time would miscount it)
    assert stats.decode_steps == len(stopped) and stats.decode_seconds > 0
    capped = GenerationStats()
    assert len(list(generate_tokens(tiny_model, [3, 4], config, stats=capped))) == 10
    assert capped.new_tokens == 10 and capped.decode_steps == 9  # no step after the 10th
    assert capped.tokens_per_second == pytest.approx(9 / capped.decode_seconds)
    assert stats.tokens_per_second == pytest.approx(stats.decode_steps / stats.decode_seconds)
    assert stats.gigabytes_per_second == pytest.approx(
        stats.model_bytes * stats.decode_steps / stats.decode_seconds / 1e9
    )


def test_stream_decoder_never_splits_characters():
    tokenizer = train_tokenizer()
    text = "Café 東京 🙂 naïve über"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > len(text.split())  # some characters span several tokens
    decoder = StreamDecoder(tokenizer)
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)


# ---- command line ---------------------------------------------------------------------------


def test_one_shot_through_main(templated_dir, capsys):
    argv = ["chat", str(templated_dir), "--prompt", "hi", "--temperature", "0"]
    assert main(argv + ["--max-new-tokens", "8", "--device", "cpu"]) == 0
    first = capsys.readouterr()
    assert main(argv + ["--max-new-tokens", "8", "--system", "be brief"]) == 0
    with_system = capsys.readouterr()
    assert first.out.endswith("\n") and first.out.strip()
    assert "tok/s" in first.err and "prefill" in first.err and "GB/s" in first.err
    assert "Traceback" not in first.err
    assert with_system.out != first.out  # the system message reached the prompt

    # The printed text is the decoded greedy continuation of the templated prompt.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(templated_dir)
    model = AutoModelForCausalLM.from_pretrained(templated_dir).eval()
    prompt = tokenizer("<|user|>hi\n<|assistant|>", add_special_tokens=False)["input_ids"]
    config = SamplingConfig(temperature=0, max_new_tokens=8)
    tokens = list(generate_tokens(model, prompt, config, eos_token_ids={tokenizer.eos_token_id}))
    assert first.out == tokenizer.decode(tokens, skip_special_tokens=True) + "\n"


def test_one_shot_sampling_is_seeded(plain_dir, capsys):
    argv = ["chat", str(plain_dir), "--prompt", "hello", "--max-new-tokens", "10"]
    argv += ["--temperature", "1.2", "--top-k", "40", "--top-p", "0.9"]
    argv += ["--repetition-penalty", "1.2"]
    outputs = []
    for seed in ("5", "5", "6"):
        assert main(argv + ["--seed", seed]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] != outputs[2]


def test_fallback_template_without_chat_template(plain_dir):
    from transformers import AutoTokenizer

    from rlhf_fast.chat import prompt_ids

    tokenizer = AutoTokenizer.from_pretrained(plain_dir)
    assert not tokenizer.chat_template
    messages = [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "How are you?"},
    ]
    expected = "System: Be kind.\nUser: Hi\nAssistant: Hello!\nUser: How are you?\nAssistant:"
    assert tokenizer.decode(prompt_ids(tokenizer, messages), skip_special_tokens=True) == expected


def test_answer_streams_token_by_token(plain_dir, monkeypatch, capsys):
    writes = []

    class Recorder(io.StringIO):
        def write(self, text):
            writes.append(text)
            return super().write(text)

    monkeypatch.setattr(sys, "stdout", Recorder())
    argv = ["chat", str(plain_dir), "--prompt", "hi", "--temperature", "0"]
    assert main(argv + ["--max-new-tokens", "12"]) == 0
    assert sum(1 for piece in writes if piece.strip()) >= 3


def test_interactive_over_piped_stdin(templated_dir, monkeypatch, capsys):
    """History, /reset and a clean exit at end of input (no /exit)."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\nagain\n/reset\nhello\n"))
    argv = ["chat", str(templated_dir), "--temperature", "0", "--max-new-tokens", "6"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    answers = [a for a in captured.out.split(">>> ") if a]
    assert len(answers) == 4  # three answers, then the newline printed at end of input
    assert answers[0] == answers[2]  # after /reset, the same question gets the same answer
    assert captured.err.count("tok/s") == 3 and "[history cleared]" in captured.err


def test_bytes_that_are_not_utf8_are_one_line_errors(templated_dir, monkeypatch, capsys):
    """Python hands undecodable bytes of argv and stdin over as lone surrogates ("\udce9" for
    0xe9, Latin-1's é); the tokenizer then raised a TypeError traceback."""
    argv = ["chat", str(templated_dir), "--temperature", "0", "--max-new-tokens", "4"]
    assert main([*argv, "--prompt", "caf\udce9"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "rlhf-fast chat: the user message is not UTF-8 text (byte 0xe9)\n"
    assert main([*argv, "--prompt", "hi", "--system", "\udcff"]) == 2
    assert "the system message is not UTF-8 text (byte 0xff)" in capsys.readouterr().err
    # interactive: say so, keep nothing of it in the history, go on
    monkeypatch.setattr(sys, "stdin", io.StringIO("caf\udce9\nhello\n"))
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "the user message is not UTF-8 text (byte 0xe9)" in captured.err
    assert captured.err.count("tok/s") == 1
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    assert main(argv) == 0

    def answers(out: str) -> list[str]:
        return [a for a in out.split(">>> ") if a.strip()]

    # the same answer as in a fresh session: the bad line left nothing in the history
    assert answers(capsys.readouterr().out) == answers(captured.out) != []
    # stdin decoded strictly (PYTHONIOENCODING=utf-8:strict) raises while reading the line
    strict = io.TextIOWrapper(io.BytesIO(b"caf\xe9\n"), encoding="utf-8", errors="strict")
    monkeypatch.setattr(sys, "stdin", strict)
    assert main(argv) == 0
    assert "rlhf-fast chat: the line is not UTF-8 text (" in capsys.readouterr().err


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    """A model with a learned table of 256 positions (GPT-2's is 1024): beyond it, no forward."""
    from tiny_families import make_family_dir

    return make_family_dir(tmp_path_factory.mktemp("gpt2"), "gpt2", chat_template=True)


def test_learned_position_table_bounds_the_chat(gpt2_dir, monkeypatch, capsys):
    """A prompt, an answer or a history past GPT-2's positions raised IndexError (a traceback,
    and the end of an interactive session) from the position embedding."""
    argv = ["chat", str(gpt2_dir), "--temperature", "0"]
    long = " ".join(["sea"] * 300)
    assert main([*argv, "--prompt", long, "--max-new-tokens", "8"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert "fit beside the answer in the model's 256 positions" in captured.err
    # the answer stops at the end of the table
    assert main([*argv, "--prompt", "hi", "--max-new-tokens", "400"]) == 0
    captured = capsys.readouterr()
    new_tokens = int(captured.err.split("[", 1)[1].split(" tokens")[0])
    assert 200 < new_tokens < 256 and "Traceback" not in captured.err
    # a long conversation leaves out its oldest exchanges
    medium = " ".join(["sea"] * 40)
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{medium}\n" * 6))
    assert main([*argv, "--max-new-tokens", "16"]) == 0
    captured = capsys.readouterr()
    assert captured.err.count("tok/s") == 6 and "oldest message(s) left out" in captured.err


def test_one_shot_subprocess(templated_dir, capsys):
    command = [sys.executable, "-m", "rlhf_fast.cli", "chat", str(templated_dir)]
    command += ["--prompt", "hi", "--temperature", "0", "--max-new-tokens", "8"]
    result = subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=120)
    assert result.returncode == 0, result.stderr
    assert main(command[3:]) == 0
    assert result.stdout == capsys.readouterr().out
    assert "tok/s" in result.stderr and "Traceback" not in result.stderr


def test_reader_closing_the_pipe_is_not_a_traceback(templated_dir):
    """`rlhf-fast chat DIR --prompt ... | head -c 1`: the answer's next write raised
    BrokenPipeError with a traceback."""
    command = [sys.executable, "-m", "rlhf_fast.cli", "chat", str(templated_dir)]
    command += ["--prompt", "hi", "--temperature", "1", "--max-new-tokens", "400", "--seed", "0"]
    child = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(), bufsize=0
    )
    assert child.stdout.read(1)  # the first piece of the answer, then the reader goes away
    child.stdout.close()
    stderr = child.stderr.read().decode()
    assert child.wait(timeout=120) == 141  # 128 + SIGPIPE, as a shell reports a piped command
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr


class _Terminal:
    """A child process on a pseudo-terminal: what a user typing at the chat would see."""

    def __init__(self, argv: list[str]) -> None:
        self.master, slave = pty.openpty()
        # A session of its own with the terminal as its controlling tty, so that ^C typed on
        # the terminal reaches it as SIGINT.
        self.process = subprocess.Popen(
            argv,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=_env(),
            start_new_session=True,
            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
        )
        os.close(slave)
        self.seen = b""

    def read_until(self, marker: bytes, timeout: float = 60.0) -> bytes:
        deadline = time.monotonic() + timeout
        while marker not in self.seen:
            ready, _, _ = select.select(
                [self.master], [], [], max(0.0, deadline - time.monotonic())
            )
            if not ready:
                raise AssertionError(f"no {marker!r} within {timeout} s; saw {self.seen!r}")
            try:
                chunk = os.read(self.master, 4096)
            except OSError:  # the child closed the terminal
                chunk = b""
            if not chunk:
                raise AssertionError(f"child exited before {marker!r}; saw {self.seen!r}")
            self.seen += chunk
        before, _, self.seen = self.seen.partition(marker)
        return before

    def type(self, text: bytes) -> None:
        os.write(self.master, text)

    def close(self) -> int:
        code = self.process.wait(timeout=30)
        os.close(self.master)
        return code


def test_interactive_session_on_a_terminal(templated_dir, capsys):
    argv = [sys.executable, "-m", "rlhf_fast.cli", "chat", str(templated_dir)]
    argv += ["--temperature", "0", "--max-new-tokens", "8"]
    assert main(argv[3:] + ["--prompt", "hello"]) == 0
    expected = capsys.readouterr().out.rstrip("\n").replace("\n", "\r\n").encode()

    terminal = _Terminal(argv)
    try:
        terminal.read_until(b">>> ")
        terminal.type(b"hello\n")
        answer = terminal.read_until(b">>> ")
        assert expected in answer and b"tok/s" in answer
        terminal.type(b"/reset\n")
        assert b"[history cleared]" in terminal.read_until(b">>> ")
        terminal.type(b"hello\n")
        assert expected in terminal.read_until(b">>> ")
        terminal.type(b"/exit\n")
        assert terminal.close() == 0
    finally:
        if terminal.process.poll() is None:
            terminal.process.kill()
    assert b"Traceback" not in answer


def test_ctrl_c_stops_an_answer_then_quits_at_the_prompt(plain_dir, monkeypatch, capsys):
    """Ctrl-C during an answer ends that answer only; at the prompt it quits with code 0."""
    typed = iter(["hello", KeyboardInterrupt])

    def fake_input(prompt):
        item = next(typed)
        if item is KeyboardInterrupt:
            raise KeyboardInterrupt
        return item

    pushes = 0
    real_push = StreamDecoder.push

    def push_then_interrupt(self, token_id):
        nonlocal pushes
        pushes += 1
        if pushes == 3:
            raise KeyboardInterrupt
        return real_push(self, token_id)

    monkeypatch.setattr("builtins.input", fake_input)
    monkeypatch.setattr(StreamDecoder, "push", push_then_interrupt)
    assert main(["chat", str(plain_dir), "--temperature", "0", "--max-new-tokens", "20"]) == 0
    captured = capsys.readouterr()
    assert pushes == 3 and "[interrupted]" in captured.err and "tok/s" in captured.err


# ---- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["missing", "empty", "broken", "file"])
def test_bad_model_dir_exits_2_with_one_line(tmp_path, kind, capsys):
    model_dir = tmp_path / "model"
    if kind == "file":  # said "no such directory" of a file that exists
        model_dir.write_text("{}")
    elif kind != "missing":
        model_dir.mkdir()
    if kind == "broken":
        (model_dir / "config.json").write_text(json.dumps({"model_type": "llama"}))
        (model_dir / "model.safetensors").write_bytes(b"not a safetensors file")
    assert main(["chat", str(model_dir), "--prompt", "hi"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and str(model_dir) in captured.err
    reason = {"missing": "no such directory:", "file": "not a directory:"}.get(kind)
    assert reason is None or f"cannot load model: {reason} {model_dir}" in captured.err


@pytest.mark.parametrize(
    "marker, hint",
    [
        ("merged/config.json", "its chat-ready model is {dir}/merged"),
        ("ppo/merged/config.json", "its chat-ready model is {dir}/ppo/merged"),
        (
            "adapter_config.json",
            "it holds a peft adapter: chat with a merged model, which --merge writes",
        ),
        ("reward_config.json", "it holds a reward model, not a model to chat with"),
        (  # `rlhf-fast chat runs/sft` of a run without --merge, and of a --stage rm run, said
            # only 'no config.json'
            "adapter/adapter_config.json",
            "its model is the peft adapter {dir}/adapter: --merge writes a chat-ready one",
        ),
        (
            "reward_model/reward_config.json",
            "it holds a reward model, {dir}/reward_model, not a model to chat with",
        ),
    ],
)
def test_run_adapter_and_reward_dirs_point_to_the_chat_model(tmp_path, marker, hint, capsys):
    """`rlhf-fast chat runs/sft` (or its adapter/, or an RM export) said only 'no config.json'."""
    model_dir = tmp_path / "run"
    (model_dir / marker).parent.mkdir(parents=True, exist_ok=True)
    (model_dir / marker).write_text("{}")
    assert main(["chat", str(model_dir), "--prompt", "hi"]) == 2
    captured = capsys.readouterr()
    assert captured.err == (
        f"rlhf-fast chat: cannot load model: no config.json in {model_dir} "
        f"({hint.format(dir=model_dir)})\n"
    )


def test_model_dir_without_tokenizer_says_so(templated_dir, tmp_path, capsys):
    """A directory saved without its tokenizer (model.save_pretrained alone) is common; the
    error said "Couldn't instantiate the backend tokenizer from one of:" and stopped there."""
    model_dir = tmp_path / "no-tokenizer"
    model_dir.mkdir()
    for name in ("config.json", "model.safetensors"):
        (model_dir / name).write_bytes((templated_dir / name).read_bytes())
    assert main(["chat", str(model_dir), "--prompt", "hi"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert captured.err.startswith(
        f"rlhf-fast chat: cannot load model: no tokenizer in {model_dir}"
    )


@pytest.mark.parametrize("flag, value", [("--max-memory", "cpu=1GiB"), ("--offload-dir", "off")])
def test_offload_settings_without_offload_are_refused(templated_dir, flag, value, capsys):
    """They were ignored: the whole model loaded, whatever RAM budget the user had set."""
    assert main(["chat", str(templated_dir), "--prompt", "hi", flag, value]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert captured.err == f"rlhf-fast chat: {flag} applies to --offload (e.g. --offload auto)\n"


@pytest.mark.parametrize(
    "flags, error",
    [
        (["--offload", "auto", "--max-memory", "2GiB"], "--max-memory: '2GiB' is not cpu=SIZE"),
        (["--offload", "compress=int3"], "--offload: 'compress=int3' is not auto or one of"),
        (["--offload", "auto", "--max-memory", "cpu=1KiB"], "--max-memory cpu=1.00 KiB is too"),
    ],
)
def test_a_bad_offload_flag_value_is_not_a_model_that_failed_to_load(
    templated_dir, tmp_path, flags, error, capsys
):
    """These said 'cannot load model from DIR: ValueError: --max-memory: ...', blaming the model."""
    argv = ["chat", str(templated_dir), "--prompt", "hi", "--offload-dir", str(tmp_path), *flags]
    assert main(argv) == 2
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if not line.startswith("[offload:")]
    assert captured.out == "" and len(errors) == 1  # a too-small budget is known after calibrating
    assert errors[0].startswith(f"rlhf-fast chat: {error}")


def test_missing_dir_subprocess_exit_code(tmp_path):
    command = [sys.executable, "-m", "rlhf_fast.cli", "chat", str(tmp_path / "nope")]
    result = subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=120)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--top-p", "1.5"),
        ("--top-p", "nan"),
        ("--temperature", "nan"),  # passed `< 0`; sampling then raised a traceback
        ("--temperature", "inf"),
        ("--repetition-penalty", "nan"),
        ("--repetition-penalty", "inf"),
    ],
)
def test_bad_flag_value_exits_2(templated_dir, flag, value, capsys):
    argv = ["chat", str(templated_dir), "--prompt", "hi", flag, value, "--max-new-tokens", "4"]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    name = flag[2:].replace("-", "_")
    assert captured.err.startswith(f"rlhf-fast chat: {name} must be") and value in captured.err
    assert captured.err.count("\n") == 1


@pytest.mark.parametrize(
    "argv, error",
    [
        (
            ["chat", "m", "--temprature", "0"],
            "rlhf-fast chat: error: unrecognized arguments: --temprature 0; did you mean "
            "--temperature? (see rlhf-fast chat --help)\n",
        ),
        (
            ["train", "--stage", "sft", "--lora-rank", "4"],
            "rlhf-fast train: error: unrecognized arguments: --lora-rank 4; did you mean "
            "--lora-r? (see rlhf-fast train --help)\n",
        ),
        (
            ["train", "--stage", "spt"],
            "rlhf-fast train: error: argument --stage: invalid choice: 'spt' (choose from "
            "'sft', 'rm', 'ppo', 'all') (see rlhf-fast train --help)\n",
        ),
    ],
)
def test_a_mistyped_flag_is_one_line_from_its_command(argv, error, capsys):
    """A typo'd chat flag was reported as `rlhf-fast: error: unrecognized arguments` under the
    top-level usage, naming neither the command nor the flag meant; a bad `train` value came
    under 40 lines of usage."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == error


def test_version_flag(capsys):
    from rlhf_fast import __version__

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out == f"rlhf-fast {__version__}\n"


@pytest.mark.parametrize(
    "flags, error",
    [
        (  # was 'cannot load model from DIR: ValueError: group_size must be ...', after the load
            ["--int4", "--group-size", "48"],
            "--group-size must be a multiple of 32 (32, 64, 128, ...), got 48",
        ),
        (["--prompt", "  "], "--prompt is empty: give the message to answer"),  # answered 256
        (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1, got 0"),  # said nothing
    ],
)
def test_flag_mistakes_fail_before_the_load(tmp_path, flags, error, capsys):
    missing = tmp_path / "not-loaded"  # the flags are checked first: the directory is never read
    assert main(["chat", str(missing), "--prompt", "hi", *flags]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == f"rlhf-fast chat: {error}\n"


@pytest.mark.parametrize("seed", [str(2**64), str(-(2**63) - 1)])
def test_seed_out_of_range_exits_2(templated_dir, seed, capsys):
    """torch.Generator.manual_seed raised 'Overflow when unpacking long long' mid-answer."""
    argv = ["chat", str(templated_dir), "--prompt", "hi", "--max-new-tokens", "2", "--seed", seed]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"rlhf-fast chat: --seed must be in [-2**63, 2**63), got {seed}\n"


def _has_quant_loader() -> bool:
    try:
        from rlhf_fast.quant.io import load_model  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(
    not _has_quant_loader(),
    reason="rlhf_fast.quant.io.load_model (the int4/int8 loader) is missing",
)
@pytest.mark.parametrize("flag", ["--int4", "--int8"])
def test_quantized_chat(templated_dir, flag, capsys):
    argv = ["chat", str(templated_dir), flag, "--group-size", "32", "--prompt", "hi"]
    assert main(argv + ["--temperature", "0", "--max-new-tokens", "6"]) == 0
    captured = capsys.readouterr()
    assert captured.out.endswith("\n") and "tok/s" in captured.err


@pytest.mark.skipif(
    not _has_quant_loader(),
    reason="rlhf_fast.quant.io.load_model (the int4/int8 loader) is missing",
)
def test_quantized_directory_loads_without_flags(templated_dir, tmp_path, capsys):
    quantized = tmp_path / "int8"
    assert main(["quantize", str(templated_dir), "--bits", "8", "--output", str(quantized)]) == 0
    capsys.readouterr()
    argv = ["chat", str(quantized), "--prompt", "hi", "--temperature", "0", "--max-new-tokens", "6"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.out.endswith("\n") and "tok/s" in captured.err
    # Asking for other bits than the directory holds is a one-line error, exit code 2.
    assert main(argv + ["--int4"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_offload_help_names_every_setting_the_spec_accepts():
    """`kv=int4` (the conversation's KV cache held 4-bit) works in chat but --help left it out."""
    from rlhf_fast.cli import build_parser
    from rlhf_fast.offload.session import parse_offload

    commands = next(a for a in build_parser()._actions if a.dest == "command")
    (offload,) = [a for a in commands.choices["chat"]._actions if a.dest == "offload"]
    help_text = offload.help.replace("%%", "%")
    for setting in ("compress=none|int8|int4", "resident=N|P%", "prefetch=N", "micro-batch=N",
                    "threads=N", "kv=none|int4", "act=bf16|fp32"):  # fmt: skip
        assert setting in help_text, setting
        key, values = setting.split("=")
        example = values.split("|")[-1].replace("N", "1").replace("P%", "50%")
        assert parse_offload(f"{key}={example}", num_layers=4)  # the setting exists


@pytest.mark.parametrize("threads", [1, 2])
def test_offloaded_chat_computes_on_the_policys_thread_count(plain_dir, tmp_path, capsys,
                                                             monkeypatch, threads):  # fmt: skip
    """The offload policy times the compute at one fewer thread than torch has and at all of
    them; chat must run the count it chose (the prediction's), and leave torch's as it was."""
    from rlhf_fast import chat

    seen, answer = [], chat.answer
    monkeypatch.setattr(
        chat, "answer", lambda *a: seen.append(torch.get_num_threads()) or answer(*a)
    )
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)  # the policy chooses between 1 and 2
        argv = ["chat", str(plain_dir), "--prompt", "hi", "--max-new-tokens", "2",
                "--temperature", "0", "--offload", f"auto,threads={threads}",
                "--max-memory", "cpu=64MB", "--offload-dir", str(tmp_path / "o")]  # fmt: skip
        assert main(argv) == 0
        assert f"threads={threads}" in capsys.readouterr().err
        assert seen == [threads] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
