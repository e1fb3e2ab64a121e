"""The `rlhf-fast` command line."""

from __future__ import annotations

import argparse

from rlhf_fast.quant import cli_quantize


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlhf-fast",
        description="Fast kernels and a thin trainer for the InstructGPT recipe.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser(
        "doctor",
        help="show versions, CPU features, devices and which backend each op uses",
        description="Show versions, CPU features, devices and which backend each op uses.",
    )
    cli_quantize.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "doctor":
        from rlhf_fast import doctor

        return doctor.run()
    if args.command == "quantize":
        return cli_quantize.run(args)
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    raise SystemExit(main())
