"""`tiered usage`: the billing report (tokens, cost, reserved capacity) from the ledger.

It reads the database the config's `state:` names (or --state-url, or $TIERED_STATE_URL)
and the config's `prices:`; the model weights need not be here. Every mistake ends in one
`error:` line and exit status 2, never a traceback and never the URL's password.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console
from sqlalchemy.exc import SQLAlchemyError

from deployments.config.models import ConfigError
from deployments.config.prices import PricesSpec
from deployments.config.tiered import DEFAULT_CONFIG, load_config
from deployments.state.config import StateSpec, normalise_url, parse_url, resolve_state_spec
from deployments.state.errors import StateError
from deployments.state.ledger import Ledger
from deployments.state.report import (
    UsageQueryError,
    UsageReport,
    build_usage_report,
    parse_usage_query,
    render_reservations,
    render_table,
    to_csv,
)
from deployments.state.store import StateStore, short_reason
from deployments.state.types import UsageQuery

WIDE = 240  # columns for a table written to a pipe or file: never wrap the numbers


def _error(message: str) -> int:
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    return 2


def _state_spec(config_spec: StateSpec, state_url: str | None) -> StateSpec:
    """--state-url, else $TIERED_STATE_URL, else the config's state.url."""
    if state_url is None:
        return resolve_state_spec(config_spec)
    try:
        url = normalise_url(state_url)
    except ValueError as exc:
        raise ValueError(f"--state-url: {exc}") from None
    return config_spec.model_copy(update={"url": url})


async def _report(spec: StateSpec, prices: PricesSpec, query: UsageQuery) -> UsageReport:
    store = await StateStore.open(spec)
    try:
        return await build_usage_report(Ledger(store), prices, query)
    finally:
        await store.close()


def usage_command(args: argparse.Namespace) -> int:
    try:  # the query first: a typo in --start needs no database
        query = parse_usage_query(
            args.start, args.end, args.tenant, args.group_by, datetime.now(UTC))
        config = load_config(args.config, checkpoints=False)
        spec = _state_spec(config.state, args.state_url)
    except UsageQueryError as exc:
        return _error(f"--{exc.param.replace('_', '-')}: {exc.reason}")
    except ValueError as exc:  # ConfigError, a bad --state-url or $TIERED_STATE_URL
        return _error(str(exc))
    try:
        report = asyncio.run(_report(spec, config.prices, query))
    except (StateError, ConfigError) as exc:
        return _error(str(exc))
    except (SQLAlchemyError, OSError, TimeoutError) as exc:  # lost the database mid-report
        url = parse_url(spec.url)
        return _error(f"state.url: cannot read the ledger: {short_reason(exc, url)}")
    if args.format == "json":
        sys.stdout.write(report.model_dump_json(indent=2) + "\n")
    elif args.format == "csv":
        sys.stdout.write(to_csv(report))
    else:
        console = Console(width=None if sys.stdout.isatty() else WIDE)
        console.print(render_table(report))
        reservations = render_reservations(report)
        if reservations is not None:
            console.print(reservations)
    return 0


def register(groups: argparse._SubParsersAction) -> None:
    cmd = groups.add_parser("usage", help="usage and cost per tenant, tier and model")
    cmd.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                     help="Tiered YAML (state.url and prices)")
    cmd.add_argument("--state-url", default=None,
                     help="database URL; default $TIERED_STATE_URL, else the config's")
    cmd.add_argument("--start", default=None,
                     help="ISO date or datetime, UTC if naive (default: start of this month)")
    cmd.add_argument("--end", default=None, help="exclusive; ISO date or datetime (default: now)")
    cmd.add_argument("--tenant", default=None, help="only this tenant")
    cmd.add_argument("--group-by", default=None,
                     help="comma list of tenant,tier,model,day,spill,adapter "
                          "(default tenant,tier,model)")
    cmd.add_argument("--format", choices=["table", "csv", "json"], default="table")
    cmd.set_defaults(handler=usage_command)
