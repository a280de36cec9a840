"""`tiered config render`: the Tiered YAML as a Serve config for `serve deploy`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from deployments.config.models import ConfigError
from deployments.config.tiered import TieredConfig, load_config


def _render(args: argparse.Namespace) -> int:
    from deployments.render import render_serve_config
    from deployments.replicas.capacity import reservation_problems

    try:  # the weights live on the cluster, not necessarily here
        config = load_config(args.config, checkpoints=False)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    env = dict(item.split("=", 1) for item in args.env)
    try:
        for line in _key_warnings(config, env):
            print(f"warning: {line}", file=sys.stderr)
    except ConfigError as exc:  # a key file here that the cluster would refuse
        print(f"error: {exc}", file=sys.stderr)
        return 2
    problems = reservation_problems(config)
    if problems:
        print("error: the node types cannot hold the reservations:", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        return 2
    runtime_env = {"env_vars": env} if env else None
    rendered = render_serve_config(config, runtime_env=runtime_env, port=args.port)
    text = yaml.safe_dump(rendered, sort_keys=False, width=100)
    if args.output:
        args.output.write_text(text)
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def _key_warnings(config: TieredConfig, env: dict[str, str]) -> list[str]:
    """Tenants no key reaches, counting the YAML's hashes and the keys the rendered
    runtime_env gives the cluster (--env), the key file included when it is here too."""
    from deployments.tenancy.key_source import key_warnings
    from deployments.tenancy.keys import ENV_KEYS_FILE, load_key_rings

    lines = []
    path = env.get(ENV_KEYS_FILE)
    if path and not Path(path).is_file():
        lines.append(f"{ENV_KEYS_FILE}={path} is not on this machine: its keys are not counted")
        env = {k: v for k, v in env.items() if k != ENV_KEYS_FILE}
    return lines + key_warnings(config, load_key_rings(config, env))


def _env_pair(text: str) -> str:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return text


def register(groups: argparse._SubParsersAction) -> None:
    config = groups.add_parser("config", help="Tiered YAML tools").add_subparsers(
        dest="config_command", required=True
    )
    render = config.add_parser("render", help="render a Serve config for `serve deploy`")
    render.add_argument("--config", type=Path, default=None, help="Tiered YAML")
    render.add_argument("--output", "-o", type=Path, default=None)
    render.add_argument("--port", type=int, default=8000, help="Serve HTTP port")
    render.add_argument(
        "--env", type=_env_pair, action="append", default=[], help="runtime_env var KEY=VALUE"
    )
    render.set_defaults(handler=_render)
