"""The `tiered` command line.

Each command group is one `register(subparsers)` function in `COMMANDS`; a command sets
`handler` (args -> exit code) with `set_defaults`. Heavy imports (torch, Ray) happen inside
handlers, so `tiered --help` stays fast and this module never imports Ray.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path

from rich.console import Console

Handler = Callable[[argparse.Namespace], int]
Register = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]

console = Console(stderr=True)  # decoration on stderr; stdout carries only the result


def _model_make_default(args: argparse.Namespace) -> int:
    from models.default_model import make_default

    with console.status(f"writing the {args.size} default model"):
        path = make_default(args.size, args.output)
    console.print(f"[green]{args.size}[/green] default model at [bold]{path}[/bold]")
    print(path)
    return 0


def register_model(groups: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`tiered model ...`: the embedded default checkpoints."""
    model = groups.add_parser("model", help="embedded default checkpoints")
    commands = model.add_subparsers(dest="model_command", required=True)
    make = commands.add_parser(
        "make-default", help="write the seeded default Llama checkpoint and print its path"
    )
    make.add_argument("--size", choices=["tiny", "small"], default="tiny")
    make.add_argument(
        "--output", type=Path, default=None, help="directory (default: the Tiered cache)"
    )
    make.set_defaults(handler=_model_make_default)


def register_serve(groups: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`tiered serve` and `tiered keys`, defined next to the code they run."""
    from deployments import serve_command

    serve_command.register(groups)


COMMANDS: list[Register] = [register_model, register_serve]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tiered", description="Tiered LLM serving")
    groups = parser.add_subparsers(dest="command", required=True)
    for register in COMMANDS:
        register(groups)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    return handler(args)


if __name__ == "__main__":
    raise SystemExit(main())
