"""The `rlhf-fast` command line."""

from __future__ import annotations

import argparse
import difflib
import os
import sys

from rlhf_fast.quant import cli_quantize
from rlhf_fast.train import cli_train


class _Parser(argparse.ArgumentParser):
    """argparse's parser, whose errors are one line that names the command's --help: the
    stock one printed the whole usage first (40 lines for `train`) above a typo's error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from rlhf_fast import __version__

    parser = _Parser(
        prog="rlhf-fast",
        description="Fast kernels and a thin trainer for the InstructGPT recipe.",
    )
    parser.add_argument("--version", action="version", version=f"rlhf-fast {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser(
        "doctor",
        help="show versions, CPU features, devices and which backend each op uses",
        description="Show versions, CPU features, devices and which backend each op uses.",
    )
    cli_train.add_parser(commands)
    cli_quantize.add_parser(commands)
    _add_chat_parser(commands)
    return parser


def _add_chat_parser(commands) -> None:
    chat = commands.add_parser(
        "chat",
        help="chat with a model directory (streaming, history, /reset, /exit)",
        description="Chat with a causal LM directory. --prompt answers once and exits.",
    )
    chat.add_argument("model_dir", metavar="MODEL_DIR", help="HF model directory (safetensors)")
    bits = chat.add_mutually_exclusive_group()
    bits.add_argument("--int4", action="store_true", help="quantize weights to int4 on load")
    bits.add_argument("--int8", action="store_true", help="quantize weights to int8 on load")
    chat.add_argument(
        "--group-size", type=int, metavar="N", default=32, help="int4 group size (32)"
    )
    chat.add_argument("--system", metavar="TEXT", help="system message")
    chat.add_argument("--prompt", metavar="TEXT", help="answer this once and exit")
    chat.add_argument(
        "--temperature", type=float, metavar="T", default=0.7, help="0 is greedy (0.7)"
    )
    chat.add_argument(
        "--top-k", type=int, metavar="K", default=0, help="keep the k likeliest (0: off)"
    )
    chat.add_argument(
        "--top-p", type=float, metavar="P", default=1.0, help="nucleus mass to keep (1: off)"
    )
    chat.add_argument(
        "--repetition-penalty", type=float, metavar="R", default=1.0, help="CTRL-style (1: off)"
    )
    chat.add_argument(
        "--max-new-tokens", type=int, metavar="N", default=256, help="answer length cap (256)"
    )
    chat.add_argument("--seed", type=int, metavar="S", default=None, help="sampling seed")
    chat.add_argument(
        "--device", choices=("cpu", "cuda", "auto"), default="auto", help="auto: cuda if present"
    )
    chat.add_argument(
        "--offload",
        metavar="SPEC",
        help="stream decoder layers from disk: auto, or compress=none|int8|int4,resident=N|P%%,"
        "prefetch=N,micro-batch=N,threads=N,kv=none|int4,act=bf16|fp32 (overrides the policy's "
        "choice; threads: torch's intra-op threads for the streamed compute; "
        "kv=int4: the conversation's KV cache held 4-bit; act=fp32: int4 products on fp32 "
        "activations instead of bf16 from 32 rows)",
    )
    chat.add_argument(
        "--max-memory", metavar="cpu=SIZE", help="RAM budget for --offload (e.g. cpu=2GiB)"
    )
    chat.add_argument(
        "--offload-dir", metavar="DIR", help="offload shards' home (MODEL_DIR/.rlhf_fast_offload)"
    )


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """parse_args, except that an unknown flag is reported by its subcommand's parser, with the
    nearest flag it has: argparse's own error named only `rlhf-fast` and its usage."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        command = _subcommand(parser, args.command)
        flags = [flag for action in command._actions for flag in action.option_strings]
        guess = difflib.get_close_matches(unknown[0].split("=", 1)[0], flags, n=1)
        hint = f"; did you mean {guess[0]}?" if guess and unknown[0].startswith("-") else ""
        command.error(f"unrecognized arguments: {' '.join(unknown)}{hint}")
    return args


def _subcommand(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[name]
    raise AssertionError("rlhf-fast has no subcommands")


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    try:
        return _run(args)
    except BrokenPipeError:  # `rlhf-fast chat ... | head`: the reader left; so do we, quietly
        # what Python would flush to the closed pipe at exit must go elsewhere, or it reports
        # the same error again
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):  # stdout is no file (captured, embedded): nothing to flush
            pass
        return 141  # 128 + SIGPIPE, what a shell reports for a command killed by it


def _run(args: argparse.Namespace) -> int:
    if args.command == "doctor":
        from rlhf_fast import doctor

        return doctor.run()
    # transformers' own progress bars (loading, "Writing model shards") and info logs would
    # break up ours (the demo builds and saves a model, quantize loads one)
    from rlhf_fast.models.load import quiet_transformers

    quiet_transformers()
    if args.command == "train":
        return cli_train.run(args)
    if args.command == "quantize":
        return cli_quantize.run(args)
    if args.command == "chat":
        from rlhf_fast import chat

        return chat.run(args)
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    raise SystemExit(main())
