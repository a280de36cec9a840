"""`tiered status`: pools, replicas and tenants at a glance, read from Prometheus.

Everything comes from the metrics (docs/METRICS.md), so it shows the same numbers as the
dashboards and works from any machine that reaches Prometheus.
"""

from __future__ import annotations

import argparse
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field

import httpx
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

WINDOW = "1m"
QUERY_TIMEOUT_S = 10.0


class PrometheusError(RuntimeError):
    pass


def instant(url: str, promql: str) -> list[tuple[dict[str, str], float]]:
    """(labels, value) pairs of an instant query, with a deadline."""
    try:
        response = httpx.get(
            f"{url.rstrip('/')}/api/v1/query", params={"query": promql}, timeout=QUERY_TIMEOUT_S
        )
        body = response.json()
    except (httpx.HTTPError, ValueError) as exc:
        raise PrometheusError(f"cannot query Prometheus at {url}: {exc}") from exc
    if body.get("status") != "success":
        raise PrometheusError(f"{promql}: {body.get('error', body)}")
    return [(r["metric"], float(r["value"][1])) for r in body["data"]["result"]]


def _by(url: str, promql: str, *keys: str) -> dict[tuple[str, ...], float]:
    return {tuple(m.get(k, "") for k in keys): v for m, v in instant(url, promql)}


def _rate(metric: str, by: str, window: str, match: str = "") -> str:
    selector = f"ray_{metric}{{{match}}}" if match else f"ray_{metric}"
    return f"sum by ({by}) (rate({selector}[{window}]))"


def _p(q: float, by: str, window: str) -> str:
    return (
        f"histogram_quantile({q}, sum by (le, {by}) "
        f"(rate(ray_tiered_ttft_seconds_bucket[{window}])))"
    )


@dataclass
class Snapshot:
    """The figures of one refresh, keyed by pool, replica and tenant."""

    pools: dict[str, dict[str, float]] = field(default_factory=lambda: defaultdict(dict))
    replicas: dict[tuple[str, str], dict[str, float]] = field(
        default_factory=lambda: defaultdict(dict)
    )
    tenants: dict[str, dict[str, float]] = field(default_factory=lambda: defaultdict(dict))
    window: str = WINDOW


def collect(url: str, window: str = WINDOW) -> Snapshot:
    """One refresh; rates and percentiles over the last `window`."""
    snap = Snapshot(window=window)
    for (pool, kind), v in _by(
        url, "max by (pool, kind) (ray_tiered_pool_replicas)", "pool", "kind"
    ).items():
        snap.pools[pool][kind] = v
    for (pool,), v in _by(url, "max by (pool) (ray_tiered_queue_depth)", "pool").items():
        snap.pools[pool]["queued"] = v
    per_replica = {
        "up": "max by (pool, replica) (ray_tiered_replica_up)",
        "running": "max by (pool, replica) (ray_tiered_engine_running)",
        "waiting": "max by (pool, replica) (ray_tiered_engine_waiting)",
        "kv": "max by (pool, replica) (ray_tiered_kv_blocks_used)"
        " / max by (pool, replica) (ray_tiered_kv_blocks_capacity)",
        "tokens_s": _rate("tiered_engine_generated_tokens_total", "pool, replica", window),
    }
    for name, promql in per_replica.items():
        for key, v in _by(url, promql, "pool", "replica").items():
            snap.replicas[key][name] = v  # type: ignore[index]
    per_tenant = {
        "rps": _rate("tiered_requests_total", "tenant", window),
        "tokens_s": _rate("tiered_tokens_total", "tenant", window, 'kind="completion"'),
        "ttft_p50": _p(0.5, "tenant", window),
        "ttft_p99": _p(0.99, "tenant", window),
        "rejected_s": _rate("tiered_rejections_total", "tenant", window),
        "reservation": "max by (tenant) (ray_tiered_reservation_utilization)",
    }
    for name, promql in per_tenant.items():
        for (tenant,), v in _by(url, promql, "tenant").items():
            snap.tenants[tenant][name] = v
    return snap


def _fmt(value: float | None, unit: str = "") -> str:
    if value is None or math.isnan(value):
        return "-"
    if unit == "%":
        return f"{100 * value:.0f}%"
    if unit == "ms":
        return f"{1000 * value:.0f} ms"
    if not value % 1:
        return f"{value:.0f}"
    return f"{value:.2f}" if abs(value) < 10 else f"{value:.1f}"


def render(snap: Snapshot) -> Group:
    pools = Table(title="Pools")
    for col in ("pool", "replicas (actual/desired)", "KV use", "running", "waiting", "queued"):
        pools.add_column(col)
    for pool in sorted(snap.pools.keys() | {p for p, _ in snap.replicas}):
        figures = snap.pools.get(pool, {})
        mine = [r for (p, _), r in snap.replicas.items() if p == pool]
        kv = [r["kv"] for r in mine if "kv" in r]
        pools.add_row(
            pool,
            f"{_fmt(figures.get('actual'))}/{_fmt(figures.get('desired'))}",
            _fmt(sum(kv) / len(kv) if kv else None, "%"),
            _fmt(sum(r.get("running", 0) for r in mine)),
            _fmt(sum(r.get("waiting", 0) for r in mine)),
            _fmt(figures.get("queued", 0.0)),
        )
    replicas = Table(title="Replicas")
    for col in ("pool", "replica", "up", "running", "waiting", "KV use", "tokens/s"):
        replicas.add_column(col)
    for (pool, replica), r in sorted(snap.replicas.items()):
        replicas.add_row(
            pool,
            replica,
            "yes" if r.get("up") == 1 else "NO",
            _fmt(r.get("running")),
            _fmt(r.get("waiting")),
            _fmt(r.get("kv"), "%"),
            _fmt(r.get("tokens_s")),
        )
    tenants = Table(title=f"Tenants (rates over {snap.window})")
    for col in ("tenant", "req/s", "tokens/s", "TTFT p50", "TTFT p99", "429/s", "reservation"):
        tenants.add_column(col)
    for tenant, t in sorted(snap.tenants.items()):
        tenants.add_row(
            tenant,
            _fmt(t.get("rps")),
            _fmt(t.get("tokens_s")),
            _fmt(t.get("ttft_p50"), "ms"),
            _fmt(t.get("ttft_p99"), "ms"),
            _fmt(t.get("rejected_s")),
            _fmt(t.get("reservation"), "%"),
        )
    return Group(pools, replicas, tenants)


def _status(args: argparse.Namespace) -> int:
    console = Console()
    try:
        if not args.watch:
            console.print(render(collect(args.prometheus, args.window)))
            return 0
        with Live(render(collect(args.prometheus, args.window)), console=console) as live:
            while True:
                time.sleep(args.interval)
                live.update(render(collect(args.prometheus, args.window)))
    except PrometheusError as exc:
        console.print(f"[red]{exc}[/red]")
        return 1
    except KeyboardInterrupt:
        return 0


def register(groups: argparse._SubParsersAction) -> None:
    status = groups.add_parser("status", help="pools, replicas and tenants from Prometheus")
    status.add_argument("--prometheus", default="http://127.0.0.1:9090", help="Prometheus URL")
    status.add_argument("--watch", action="store_true", help="refresh until Ctrl-C")
    status.add_argument("--interval", type=float, default=5.0, help="seconds between refreshes")
    status.add_argument("--window", default=WINDOW, help="rate window, e.g. 1m or 5m")
    status.set_defaults(handler=_status)
