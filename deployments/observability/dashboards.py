"""The three Grafana dashboards, as code (grafana-foundation-sdk).

Panels are declared as data (`PANELS`): title, unit and PromQL per dashboard. The same
declarations build the dashboards and give the tests every query to run against a real
Prometheus. Names are the `ray_`-prefixed ones of docs/METRICS.md; `sum by`/`max by`
drop the labels Ray adds (SessionName, NodeAddress, ...).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from grafana_foundation_sdk.builders import dashboard, prometheus, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import (
    DataSourceRef,
    VariableOption,
    VariableRefresh,
)

DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
RATE = "$__rate_interval"
SLO_VARIABLE = "slo_ttft_seconds"
DEFAULT_SLO_TTFT_S = "0.5"


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str


@dataclass(frozen=True)
class PanelSpec:
    title: str
    unit: str
    queries: tuple[Query, ...]
    description: str = ""


def _selector(metric: str, match: str) -> str:
    return f"ray_{metric}{{{match}}}" if match else f"ray_{metric}"


def _quantile(q: float, metric: str, by: str, match: str = "") -> str:
    series = _selector(f"{metric}_bucket", match)
    return f"histogram_quantile({q}, sum by (le, {by}) (rate({series}[{RATE}])))"


def _rate(metric: str, by: str, match: str = "") -> str:
    return f"sum by ({by}) (rate({_selector(metric, match)}[{RATE}]))"


SLO_LINE = Query(f"vector(${SLO_VARIABLE})", "SLO")
TENANT = 'tenant=~"$tenant"'
POOL = 'pool=~"$pool"'
# Spilled tokens run on the shared pool, so they count against its cost.
TOKENS_BY_POOL_TIER = (
    'sum by (tier) (label_replace(rate(ray_tiered_tokens_total{kind="completion"}'
    f'[{RATE}]), "tier", "shared", "tier", "spill"))'
)
SPEND_PER_HOUR = (
    f"sum by (pool, tier) (rate(ray_tiered_replica_seconds_total[{RATE}]))"
    " * on (pool, tier) max by (pool, tier) (ray_tiered_replica_hour_price)"
)
COST_PER_MTOK = (
    f"sum by (tier) ({SPEND_PER_HOUR}) / 3600 / {TOKENS_BY_POOL_TIER} * 1e6"
)

PANELS: dict[str, tuple[str, list[PanelSpec]]] = {
    "overview": ("Tiered overview", [
        PanelSpec("Requests by tier", "reqps", (
            Query(_rate("tiered_requests_total", "tier"), "{{tier}}"),)),
        PanelSpec("Completion tokens by tier", "short", (
            Query(_rate("tiered_tokens_total", "tier", 'kind="completion"'), "{{tier}}"),)),
        PanelSpec("TTFT p50 / p99 against the SLO", "s", (
            Query(_quantile(0.5, "tiered_ttft_seconds", "tier"), "p50 {{tier}}"),
            Query(_quantile(0.99, "tiered_ttft_seconds", "tier"), "p99 {{tier}}"),
            SLO_LINE)),
        PanelSpec("TPOT p50 / p99 and ITL p99", "s", (
            Query(_quantile(0.5, "tiered_tpot_seconds", "tier"), "TPOT p50 {{tier}}"),
            Query(_quantile(0.99, "tiered_tpot_seconds", "tier"), "TPOT p99 {{tier}}"),
            Query(_quantile(0.99, "tiered_itl_seconds", "tier"), "ITL p99 {{tier}}"))),
        PanelSpec("Errors by status code", "reqps", (
            Query(_rate("tiered_requests_total", "code", 'code!="200"'), "{{code}}"),)),
        PanelSpec("429s by reason", "reqps", (
            Query(_rate("tiered_rejections_total", "reason"), "{{reason}}"),)),
        PanelSpec("Replicas: desired and actual", "short", (
            Query("max by (pool, kind) (ray_tiered_pool_replicas)", "{{pool}} {{kind}}"),)),
        PanelSpec("End-to-end latency p99", "s", (
            Query(_quantile(0.99, "tiered_e2e_latency_seconds", "tier"), "{{tier}}"),)),
    ]),
    "tenants": ("Tiered tenants", [
        PanelSpec("Requests by tenant and tier", "reqps", (
            Query(_rate("tiered_requests_total", "tenant, tier", TENANT),
                  "{{tenant}} {{tier}}"),)),
        PanelSpec("Tokens by tenant", "short", (
            Query(_rate("tiered_tokens_total", "tenant, kind", TENANT),
                  "{{tenant}} {{kind}}"),)),
        PanelSpec("Limits hit", "reqps", (
            Query(_rate("tiered_rejections_total", "tenant, reason", TENANT),
                  "{{tenant}} {{reason}}"),)),
        PanelSpec("Reservation utilization", "percentunit", (
            Query(f"max by (tenant) (ray_tiered_reservation_utilization{{{TENANT}}})",
                  "{{tenant}}"),)),
        PanelSpec("Spill to the shared pool", "short", (
            Query(_rate("tiered_spill_tokens_total", "tenant", TENANT), "{{tenant}} tokens"),
            Query(_rate("tiered_spill_requests_total", "tenant", TENANT),
                  "{{tenant}} requests"))),
        PanelSpec("Dedicated TTFT p99 by tenant", "s", (
            Query(_quantile(0.99, "tiered_ttft_seconds", "tenant",
                            f'tier="dedicated", {TENANT}'), "{{tenant}}"),
            SLO_LINE)),
        PanelSpec("Spend per hour by pool", "currencyUSD", (
            Query(SPEND_PER_HOUR, "{{pool}}"),)),
        PanelSpec("Cost per 1M completion tokens by tier", "currencyUSD", (
            Query(COST_PER_MTOK, "{{tier}}"),),
            "Replica-hours times the configured price, over completion tokens served."),
    ]),
    "engine": ("Tiered replicas and engine", [
        PanelSpec("KV cache use", "percentunit", (
            Query(f"sum by (pool, replica) (ray_tiered_kv_blocks_used{{{POOL}}}) / "
                  f"sum by (pool, replica) (ray_tiered_kv_blocks_capacity{{{POOL}}})",
                  "{{pool}} {{replica}}"),)),
        PanelSpec("Running and waiting sequences", "short", (
            Query(f"sum by (replica) (ray_tiered_engine_running{{{POOL}}})",
                  "running {{replica}}"),
            Query(f"sum by (replica) (ray_tiered_engine_waiting{{{POOL}}})",
                  "waiting {{replica}}"))),
        PanelSpec("Batch size p50 / p99", "short", (
            Query(_quantile(0.5, "tiered_engine_batch_size", "pool", POOL), "p50 {{pool}}"),
            Query(_quantile(0.99, "tiered_engine_batch_size", "pool", POOL),
                  "p99 {{pool}}"))),
        PanelSpec("Prefix cache hit rate", "percentunit", (
            Query(f"{_rate('tiered_prefix_cache_hits_total', 'pool', POOL)} / "
                  f"{_rate('tiered_prefix_cache_queries_total', 'pool', POOL)}",
                  "{{pool}}"),)),
        PanelSpec("Preemptions", "short", (
            Query(_rate("tiered_engine_preemptions_total", "pool", POOL), "{{pool}}"),)),
        PanelSpec("Generated tokens per replica", "short", (
            Query(_rate("tiered_engine_generated_tokens_total", "pool, replica", POOL),
                  "{{replica}}"),)),
        PanelSpec("Fair-queue depth and wait p99", "short", (
            Query(f"max by (pool, band) (ray_tiered_queue_depth{{{POOL}}})",
                  "depth {{pool}} band {{band}}"),
            Query(_quantile(0.99, "tiered_queue_wait_seconds", "pool", POOL),
                  "wait p99 {{pool}}"))),
        PanelSpec("LoRA adapter slots", "short", (
            Query(f"sum by (pool, replica) (ray_tiered_lora_slots_used{{{POOL}}})",
                  "used {{replica}}"),
            Query(f"sum by (pool, replica) (ray_tiered_lora_slots_capacity{{{POOL}}})",
                  "capacity {{replica}}"))),
        PanelSpec("LoRA adapter loads and evictions", "ops", (
            Query(_rate("tiered_lora_loads_total", "pool", POOL), "loads {{pool}}"),
            Query(_rate("tiered_lora_evictions_total", "pool", POOL), "evictions {{pool}}")),
            "Evictions close behind loads: more adapters in use than a replica holds."),
        PanelSpec("LoRA adapter load time (mean)", "s", (
            Query(f"{_rate('tiered_lora_load_seconds_total', 'pool', POOL)} / "
                  f"{_rate('tiered_lora_loads_total', 'pool', POOL)}",
                  "{{pool}}"),)),
        PanelSpec("Replica health", "short", (
            Query(f"max by (pool, replica) (ray_tiered_replica_up{{{POOL}}})",
                  "up {{replica}}"),
            Query(f"sum by (pool) (increase(ray_tiered_replica_starts_total{{{POOL}}}[1h]))",
                  "starts/h {{pool}}"))),
    ]),
}  # fmt: skip


def _variables(uid: str) -> list:
    variables = [
        dashboard.DatasourceVariable("datasource").label("Data source").type("prometheus"),
        dashboard.ConstantVariable(SLO_VARIABLE).value(DEFAULT_SLO_TTFT_S),
    ]
    for name, metric in (("tenant", "ray_tiered_requests_total"),
                         ("pool", "ray_tiered_engine_running")):  # fmt: skip
        if uid == "overview":
            break
        variables.append(
            dashboard.QueryVariable(name)
            .label(name.title())
            .datasource(DATASOURCE)
            .query(f"label_values({metric}, {name})")
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
            .multi(True)
            .include_all(True)
            .all_value(".*")
            .current(VariableOption(selected=True, text="All", value="$__all"))
        )
    return variables


def build_dashboard(uid: str) -> dict:
    title, panels = PANELS[uid]
    board = (
        dashboard.Dashboard(title)
        .uid(f"tiered-{uid}")
        .tags(["tiered", "llm"])
        .refresh("30s")
        .time("now-1h", "now")
        .timezone("browser")
        .variables(_variables(uid))
    )
    for spec in panels:
        panel = timeseries.Panel().title(spec.title).unit(spec.unit).span(12).height(8)
        panel = panel.datasource(DATASOURCE)
        if spec.description:
            panel = panel.description(spec.description)
        for i, query in enumerate(spec.queries):
            panel = panel.with_target(
                prometheus.Dataquery()
                .expr(query.expr)
                .legend_format(query.legend)
                .ref_id(chr(ord("A") + i))
            )
        board = board.with_panel(panel)
    return json.loads(json.dumps(board.build(), cls=JSONEncoder))


def all_dashboards() -> dict[str, dict]:
    return {uid: build_dashboard(uid) for uid in PANELS}


def panel_queries() -> list[tuple[str, str, str]]:
    """(dashboard, panel title, PromQL) for every query of every panel."""
    return [
        (uid, spec.title, query.expr)
        for uid, (_, panels) in PANELS.items()
        for spec in panels
        for query in spec.queries
    ]


def substitute(expr: str, rate_interval: str = "5m", slo: str = DEFAULT_SLO_TTFT_S) -> str:
    """The query Grafana would send with every variable at its default ("All")."""
    return (
        expr.replace("$__rate_interval", rate_interval)
        .replace("$tenant", ".*")
        .replace("$pool", ".*")
        .replace(f"${SLO_VARIABLE}", slo)
    )
