"""The `tiered` command line. Subcommands register here; Ray is imported only when needed."""

from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Callable, Sequence
from pathlib import Path

from rich.console import Console

console = Console()
Handler = Callable[[argparse.Namespace], int]


def _model_make_default(args: argparse.Namespace) -> int:
    from models.default_model import default_model_path, make_default

    path = make_default(args.size, args.output) if args.output else default_model_path(args.size)
    console.print(f"[green]{args.size}[/green] default model at [bold]{path}[/bold]")
    print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tiered", description="Tiered LLM serving")
    groups = parser.add_subparsers(dest="command", required=True)

    model = groups.add_parser("model", help="embedded default checkpoints").add_subparsers(
        dest="model_command", required=True
    )
    make = model.add_parser("make-default", help="write the default Llama checkpoint")
    make.add_argument("--size", choices=["tiny", "small"], default="tiny")
    make.add_argument("--output", type=Path, default=None)
    make.set_defaults(handler=_model_make_default)

    for register in _extra_commands():
        register(groups)
    return parser


Register = Callable[[argparse._SubParsersAction], None]


def _extra_commands() -> list[Register]:
    from cli import render, serve, status, usage

    commands: list[Register] = [serve.register, status.register, render.register, usage.register]
    # The load generator and the fault runner are optional: an install without bench/ has
    # every other command.
    if importlib.util.find_spec("bench") is not None:
        from bench import command as bench_command
        from bench.chaos import command as chaos_command

        commands += [bench_command.register, chaos_command.register]
    return commands


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    return handler(args)


if __name__ == "__main__":
    raise SystemExit(main())
