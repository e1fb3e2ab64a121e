"""`rlhf-fast chat`: talk to a causal LM directory, streaming its answers.

The prompt is the tokenizer's chat template when it has one; otherwise this plain template,
one line per message, ending with the assistant's header for the model to continue (both are
rendered by rlhf_fast/models/prompt_format.py, which the trainer shares):

    System: {system}
    User: {message}
    Assistant: {answer}
    User: {message}
    Assistant:

Interactive mode keeps the history; `/reset` clears it (the system message stays), `/exit`,
end of input or Ctrl-C at the prompt quit, Ctrl-C during an answer stops that answer.
`--prompt TEXT` answers once and exits. After each answer one line on stderr reports decode
tokens/s, prefill time and effective GB/s (model bytes read per token times tokens/s).

A model with a learned position table (GPT-2, OPT, ...) has no position past it: a history
that would leave the answer too little of the table loses its oldest exchanges (said on
stderr), and the answer stops at the table's end.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
from pathlib import Path

from rlhf_fast.models.generate import (
    GenerationStats,
    SamplingConfig,
    StreamDecoder,
    generate_tokens,
    model_bytes,
)
from rlhf_fast.models.load import has_tokenizer_files, run_outputs
from rlhf_fast.models.load import learned_positions as _positions_of_config
from rlhf_fast.models.prompt_format import TemplateError, prompt_token_ids

PROMPT_MARKER = ">>> "


class ChatError(Exception):
    """A problem to report on one line of stderr (exit code 2), never as a traceback."""


def load(args: argparse.Namespace):
    """(model, tokenizer) for the command line's arguments; ChatError on any failure."""
    model_dir = Path(args.model_dir)
    if not (model_dir / "config.json").is_file():
        if model_dir.is_dir():
            what = "no config.json in"
        else:  # a file (a .safetensors or data file given for the directory) exists
            what = "not a directory:" if model_dir.exists() else "no such directory:"
        raise ChatError(f"cannot load model: {what} {model_dir}{_not_a_model_hint(model_dir)}")
    if not has_tokenizer_files(model_dir):
        # transformers' own error here is several lines whose first ends in "from one of:"
        raise ChatError(
            f"cannot load model: no tokenizer in {model_dir} (no tokenizer.json or "
            "tokenizer_config.json; save the tokenizer beside the model)"
        )
    import torch
    import transformers
    from transformers import AutoTokenizer

    from rlhf_fast.quant.activations import set_int4_activations
    from rlhf_fast.quant.io import load_model

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise ChatError("--device cuda: no CUDA device is available")
    quantize = 4 if args.int4 else 8 if args.int8 else None
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            model_dir, local_files_only=True, trust_remote_code=False
        )
        if getattr(args, "offload", None):
            from rlhf_fast.offload.session import open_for_chat

            return open_for_chat(model_dir, args), tokenizer
        model = load_model(
            model_dir, quantize=quantize, group_size=args.group_size, device=device, dtype="auto"
        )
        # an int4 model chats under the project's int4 activation rule (quant/activations.py),
        # as the lean decoder and the streamed model (--offload) do
        set_int4_activations(model)
    except Exception as error:  # transformers raises many types; report them all on one line
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        if isinstance(error, ValueError) and reason.startswith(("--offload", "--max-memory")):
            # a flag's value (its own message names it), not a model that failed to load
            raise ChatError(reason) from None
        raise ChatError(
            f"cannot load model from {model_dir}: {type(error).__name__}: {reason}"
        ) from None
    return model.eval(), tokenizer


def _not_a_model_hint(directory: Path) -> str:
    """Where the model is when `directory` is one of the trainer's other outputs."""
    outputs = run_outputs(directory)  # a trainer's run directory
    if "merged" in outputs:
        return f" (its chat-ready model is {outputs['merged']})"
    if (directory / "adapter_config.json").is_file():
        return " (it holds a peft adapter: chat with a merged model, which --merge writes)"
    if (directory / "reward_config.json").is_file():
        return " (it holds a reward model, not a model to chat with)"
    if "adapter" in outputs:  # a run without --merge
        adapter = outputs["adapter"]
        return f" (its model is the peft adapter {adapter}: --merge writes a chat-ready one)"
    if "reward_model" in outputs:  # a --stage rm run
        return f" (it holds a reward model, {outputs['reward_model']}, not a model to chat with)"
    return ""


def prompt_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of the whole conversation, ending where the assistant's answer starts."""
    for message in messages:
        # bytes of argv or stdin that are not UTF-8 arrive as lone surrogates (surrogateescape),
        # which the tokenizer refuses with a TypeError
        try:
            message["content"].encode("utf-8")
        except UnicodeEncodeError as error:
            byte = ord(message["content"][error.start]) - 0xDC00
            where = f" (byte 0x{byte:02x})" if 0x80 <= byte <= 0xFF else ""
            raise ChatError(f"the {message['role']} message is not UTF-8 text{where}") from None
    try:
        return prompt_token_ids(tokenizer, messages)
    except TemplateError as error:
        raise ChatError(str(error)) from None


OFFLOAD_ROOM = "under --offload at most {limit} fit the context its memory budget was planned for"


def fit_context(
    tokenizer, messages: list[dict[str, str]], limit: int, room: str = OFFLOAD_ROOM
) -> list[dict[str, str]]:
    """The conversation without its oldest turns (system messages stay) so that its prompt is
    at most `limit` tokens; ChatError when the last message alone does not fit (`room`, with
    {limit}, says what bounds it)."""
    kept = list(messages)
    while (length := len(prompt_ids(tokenizer, kept))) > limit:
        oldest = next((i for i, m in enumerate(kept[:-1]) if m["role"] != "system"), None)
        if oldest is None:
            raise ChatError(f"the prompt is {length} tokens; " + room.format(limit=limit))
        del kept[oldest]
        # a whole exchange goes: a history must not start with an answer (templates refuse)
        if oldest < len(kept) - 1 and kept[oldest]["role"] == "assistant":
            del kept[oldest]
    return kept


def _fitted(tokenizer, messages, limit: int, room: str, allowed_by: str) -> list[dict]:
    """fit_context, saying on stderr how many messages it left out."""
    fitted = fit_context(tokenizer, messages, limit, room)
    if len(fitted) < len(messages):
        left_out = len(messages) - len(fitted)
        print(f"[history: {left_out} oldest message(s) left out to fit the {limit}-token "
              f"prompt {allowed_by}]", file=sys.stderr)  # fmt: skip
    return fitted


def learned_positions(model) -> int | None:
    """The size of the model's learned position table (GPT-2, OPT, ...): no token past it has
    a position embedding. None for models without one (rotary, ALiBi)."""
    config = getattr(model, "config", None)
    return _positions_of_config(config) if config is not None else None


def eos_ids(model, tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return {i for i in ids if i is not None}


def sampling_config(args: argparse.Namespace) -> SamplingConfig:
    try:  # SamplingConfig refuses NaN and inf too (each failed mid-answer, as a traceback)
        return SamplingConfig(
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            repetition_penalty=args.repetition_penalty,
            max_new_tokens=args.max_new_tokens,
        )
    except ValueError as error:
        raise ChatError(str(error)) from None


def answer(model, tokenizer, messages, config: SamplingConfig, seed: int | None) -> str:
    """Stream the model's answer to stdout (Ctrl-C stops it); the stats line goes to stderr."""
    stats = GenerationStats(model_bytes=model_bytes(model))
    decoder = StreamDecoder(tokenizer)
    offloaded = getattr(model, "rlhf_fast_offload", None)
    if offloaded is not None:  # its policy charged the prefill and KV of `context` tokens
        limit = max(1, offloaded.context - config.max_new_tokens)
        messages = _fitted(tokenizer, messages, limit, OFFLOAD_ROOM,
                           "the offload memory plan allows")  # fmt: skip
    positions = learned_positions(model)
    if positions is not None:  # past the table the embedding raises IndexError
        limit = max(positions - config.max_new_tokens, positions // 2)
        table = f"the model's {positions} positions"
        room = f"at most {{limit}} fit beside the answer in {table}"
        messages = _fitted(
            tokenizer, messages, limit, room, f"that leaves the answer room in {table}"
        )
    ids = prompt_ids(tokenizer, messages)
    if positions is not None and len(ids) + config.max_new_tokens > positions:
        config = dataclasses.replace(config, max_new_tokens=positions - len(ids))
    eos = eos_ids(model, tokenizer)
    # The lean decoder fuses every layer's weights up front, which streamed layers (--offload)
    # cannot offer: they run the HF forward, through the streaming hooks.
    path = "hf" if hasattr(model, "rlhf_fast_offload") else None
    tokens = generate_tokens(
        model, ids, config, eos_token_ids=eos, seed=seed, stats=stats, decoder=path
    )
    try:
        for token in tokens:
            sys.stdout.write(decoder.push(token))
            sys.stdout.flush()
    except KeyboardInterrupt:
        tokens.close()
        sys.stderr.write("\n[interrupted]")
    sys.stdout.write(decoder.flush() + "\n")
    sys.stdout.flush()
    print(f"[{stats.summary()}]", file=sys.stderr, flush=True)
    return decoder.text.strip()


def read_line() -> str | None:
    """One line typed by the user, or None at end of input / Ctrl-C."""
    try:
        return input(PROMPT_MARKER)
    except (EOFError, KeyboardInterrupt):
        sys.stdout.write("\n")
        return None
    except UnicodeDecodeError as error:  # stdin decoded strictly (not surrogateescape)
        print(f"rlhf-fast chat: the line is not UTF-8 text ({error.reason})", file=sys.stderr)
        return ""


def interactive(model, tokenizer, system: list[dict], config: SamplingConfig, seed) -> None:
    print("chat: /reset clears the history, /exit quits", file=sys.stderr, flush=True)
    messages = list(system)
    while (line := read_line()) is not None and line.strip() != "/exit":
        if line.strip() == "/reset":
            messages = list(system)
            print("[history cleared]", file=sys.stderr, flush=True)
        elif line.strip():
            turn_seed = None if seed is None else seed + len(messages)
            try:
                reply = answer(model, tokenizer, messages + [user(line)], config, turn_seed)
            except ChatError as error:  # a template that rejects this history: say so, go on
                print(f"rlhf-fast chat: {error}", file=sys.stderr, flush=True)
                continue
            messages += [user(line), {"role": "assistant", "content": reply}]


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def _offload_threads(model):
    """Under --offload, torch's intra-op threads at the count the offload policy chose and
    timed (one fewer than the machine's leaves the reader thread a core), restored after."""
    policy = getattr(getattr(model, "rlhf_fast_offload", None), "policy", None)
    if policy is None or not policy.threads:
        return contextlib.nullcontext()
    from rlhf_fast.offload.generate import intra_op_threads

    return intra_op_threads(policy.threads)


def _check_one_shot_flags(args: argparse.Namespace) -> None:
    """Mistakes that used to cost the model's load first, or went unnoticed: an int4 group size
    the format cannot take (reported as a model that failed to load), an empty --prompt (a
    script's unset variable: the model answered nothing at length) and a zero-token answer."""
    from rlhf_fast.quant.weight import INT4_BLOCK

    if args.int4 and (args.group_size <= 0 or args.group_size % INT4_BLOCK):
        raise ChatError(
            f"--group-size must be a multiple of {INT4_BLOCK} (32, 64, 128, ...), "
            f"got {args.group_size}"
        )
    if args.prompt is not None and not args.prompt.strip():
        raise ChatError("--prompt is empty: give the message to answer")
    if args.max_new_tokens < 1:
        raise ChatError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")


def run(args: argparse.Namespace) -> int:
    try:
        config = sampling_config(args)  # bad flags fail before the slow load
        if args.seed is not None and not -(2**63) <= args.seed < 2**63:
            # torch's generators take 64 bits; below 2**63 a turn's seed + messages still fits
            raise ChatError(f"--seed must be in [-2**63, 2**63), got {args.seed}")
        for name in ("max_memory", "offload_dir"):
            if getattr(args, name, None) is not None and not getattr(args, "offload", None):
                flag = "--" + name.replace("_", "-")
                raise ChatError(f"{flag} applies to --offload (e.g. --offload auto)")
        _check_one_shot_flags(args)
        model, tokenizer = load(args)
        system = [{"role": "system", "content": args.system}] if args.system else []
        try:
            with _offload_threads(model):
                if args.prompt is None:
                    interactive(model, tokenizer, system, config, args.seed)
                else:
                    answer(model, tokenizer, system + [user(args.prompt)], config, args.seed)
        finally:  # a streamed model (--offload): its reader thread and open shards
            offloaded = getattr(model, "rlhf_fast_offload", None)
            if offloaded is not None:
                offloaded.close()
        return 0
    except ChatError as error:
        print(f"rlhf-fast chat: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
