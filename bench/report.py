"""Output of the bench tools: the `vllm bench serve` result block (overall and per
tenant), a table per phase, the scenario's figures against their goals, and JSON.

`emit` is the small table-and-JSON writer of the older scripts (engine_bench,
replica_bench).
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

WIDTH = 50
LABEL = 40


def emit(title: str, result: dict, out: Path) -> None:
    table = Table(title=title)
    table.add_column("figure")
    table.add_column("value")
    for key, value in result.items():
        table.add_row(key, f"{value:.3f}" if isinstance(value, float) else str(value))
    Console().print(table)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    Console().print(f"wrote {out}")


# ---- the vllm bench serve block -------------------------------------------------------
def _line(label: str, value: Any) -> str:
    if isinstance(value, float):
        value = "n/a" if math.isnan(value) else f"{value:.2f}"
    return f"{label:<{LABEL}} {value!s:<10}".rstrip()


def _rule(title: str, fill: str) -> str:
    return f"{title:{fill}^{WIDTH}}"


SECTIONS = (
    ("ttft", "Time to First Token", "TTFT"),
    ("tpot", "Time per Output Token (excl. 1st token)", "TPOT"),
    ("itl", "Inter-token Latency", "ITL"),
    ("e2el", "End-to-end Latency", "E2EL"),
)


def serving_block(s: dict, title: str = " Serving Benchmark Result ") -> str:
    """One group's figures in the layout `vllm bench serve` prints, then the multi-tenant
    lines: cached prompt tokens, errors by status, and the tier that served each request."""
    lines = [
        _rule(title, "="),
        _line("Successful requests:", s["completed"]),
        _line("Failed requests:", s["failed"]),
        _line("Benchmark duration (s):", float(s["duration_s"])),
        _line("Total input tokens:", s["prompt_tokens"]),
        _line("Total generated tokens:", s["output_tokens"]),
        _line("Request throughput (req/s):", float(s["request_throughput"])),
    ]
    if s.get("goodput") is not None:
        lines.append(_line("Request goodput (req/s):", float(s["goodput"])))
    lines += [
        _line("Output token throughput (tok/s):", float(s["output_throughput"])),
        _line("Peak output token throughput (tok/s):", float(s["peak_output_throughput"])),
        _line("Total Token throughput (tok/s):", float(s["total_token_throughput"])),
    ]
    for key, heading, short in SECTIONS:
        stats = s[key]
        lines.append(_rule(heading, "-"))
        lines.append(_line(f"Mean {short} (ms):", float(stats["mean"])))
        lines.append(_line(f"Median {short} (ms):", float(stats["median"])))
        for q in ("p90", "p99"):
            lines.append(_line(f"P{q[1:]} {short} (ms):", float(stats[q])))
    lines.append(_rule("Multi-tenant", "-"))
    lines.append(_line("Cached prompt tokens:", s["cached_tokens"]))
    for tier, n in s["service_tiers"].items():
        lines.append(_line(f"Served by tier {tier}:", n))
    for code, n in s["errors"].items():
        lines.append(_line(f"Errors {code}:", n))
    lines.append("=" * WIDTH)
    return "\n".join(lines)


# ---- tables ----------------------------------------------------------------------------
def _ms(value: float) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.0f}"


def _counts(d: dict) -> str:
    return " ".join(f"{k}:{v}" for k, v in d.items()) or "-"


def phase_table(summary: dict) -> Table:
    table = Table(title="Per phase and tenant (latencies in ms)")
    for col in ("phase", "tenant", "ok", "failed", "req/s", "out tok/s", "TTFT p50",
                "TTFT p99", "TPOT p50", "ITL p50", "E2EL p99", "tiers", "errors"):
        table.add_column(col, justify="left" if col in ("phase", "tenant") else "right")
    for phase, entry in summary["phases"].items():
        rows = [*entry["tenants"].items()]
        if len(rows) > 1:
            rows.append(("(all)", entry["all"]))
        for tenant, s in rows:
            table.add_row(
                phase, tenant, str(s["completed"]), str(s["failed"]),
                f"{s['request_throughput']:.2f}", f"{s['output_throughput']:.1f}",
                _ms(s["ttft"]["p50"]), _ms(s["ttft"]["p99"]), _ms(s["tpot"]["p50"]),
                _ms(s["itl"]["p50"]), _ms(s["e2el"]["p99"]),
                _counts(s["service_tiers"]), _counts(s["errors"]),
            )
    return table


def _value(fig: dict) -> str:
    v = fig["value"]
    if v is None:
        return "n/a"
    unit = fig["unit"]
    if unit == "×":
        return f"{v:.3f}×"
    if unit == "share":
        return f"{v:.1%}"
    if unit.endswith("/conversation"):
        return f"{v:.6f} {unit}"
    return f"{v:.3f} {unit}".strip() if isinstance(v, float) and v % 1 else f"{v:g} {unit}"


def _note(fig: dict) -> str:
    d = fig["details"]
    if fig["kind"] == "ratio":
        n, m = d["numerator"], d["denominator"]
        counts = f"n={n['completed']}/{m['completed']}"
        return f"{d['metric']}: {n['value']:.1f} / {m['value']:.1f} ({counts})"
    if fig["kind"] == "jain":
        rates = ", ".join(f"{t} {v:.1f}" for t, v in d["tokens_per_s"].items())
        return f"backlogged {d['backlogged_s']:.1f} s; tok/s {rates}"
    if fig["kind"] == "count":
        return f"of {d['of']} requests {_counts(d['by_error'])}"
    if fig["kind"] == "conversation":
        return _conversation_note(d)
    if fig["kind"] == "autoscale":
        keys = ("step_to_replica_running_s", "ttft_p50_baseline_ms",
                "ttft_p50_before_new_replica_ms", "ttft_p50_after_new_replica_ms",
                "ttft_recovery_s")
        return "; ".join(
            f"{k}={d[k]:.2f}" for k in keys if isinstance(d.get(k), float)
        )
    return ""


def _pct(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.0%}"


def _conversation_note(d: dict) -> str:
    if d["figure"] == "cost":
        return (f"{d['completed_conversations']} of {d['conversations']} conversations "
                f"complete; median {d['median']:.6f}")
    if d["figure"] == "affinity":
        load = ", ".join(f"{k[-8:]} {_pct(v['share'])} peak {v['peak_in_flight']}"
                         for k, v in d["replicas"].items())
        seats = d["seats_per_replica"]
        saturated = f"; saturated: {len(d['saturated'])}" if seats else ""
        pool = f"pool {load} (seats {seats}){saturated}"
        return f"{d['same_replica']} of {d['continuations']}; {pool}"
    per_turn = " ".join(_pct(r[d["figure"]]) for r in d["turns"] if r["turn"] >= d["from_turn"])
    return f"turns {d['from_turn']}+: {per_turn}; pooled {_pct(d['pooled'])}"


def turns_table(figures: list[dict]) -> Table | None:
    """Per turn of each conversation tenant (from its first conversation figure)."""
    seen: dict[str, dict] = {}
    for fig in figures:
        if fig["kind"] == "conversation":
            seen.setdefault(fig["details"]["tenant"], fig["details"])
    if not seen:
        return None
    table = Table(title="Conversations per turn (TTFT in ms, tokens per request)")
    for col in ("tenant", "api", "turn", "ok", "TTFT p50", "TTFT p90", "input", "cached",
                "reusable", "cached/input", "cached/reusable", "same replica"):
        table.add_column(col, justify="left" if col in ("tenant", "api") else "right")
    for tenant, d in seen.items():
        for r in d["turns"]:
            table.add_row(
                tenant, d["api"], str(r["turn"]), str(r["completed"]), _ms(r["ttft_p50_ms"]),
                _ms(r["ttft_p90_ms"]), _ms(r["mean_input_tokens"]), _ms(r["mean_cached_tokens"]),
                _ms(r["mean_reusable_tokens"]), _pct(r["cached_share"]),
                _pct(r["reused_share"]),
                f"{r['same_replica']}/{r['continuations']}" if r["continuations"] else "-",
            )
    return table


def figures_table(figures: list[dict]) -> Table:
    table = Table(title="Scenario figures")
    for col in ("figure", "value", "goal", "met", "how"):
        table.add_column(col)
    for fig in figures:
        met = {True: "[green]yes", False: "[red]no", None: "-"}[fig["met"]]
        table.add_row(fig["name"], _value(fig), fig["goal"] or "-", met, _note(fig))
    return table


def sweep_table(fig: dict) -> Table:
    table = Table(title=fig["name"])
    for col in ("phase", "offered req/s", "req/s", "out tok/s", "TTFT p50", "TTFT p99",
                "TPOT p50", "TPOT p99", "failed"):
        table.add_column(col, justify="right")
    for r in fig["details"]["rows"]:
        offered = r["offered_rate"] if r["offered_rate"] is not None else f"c={r['concurrency']}"
        table.add_row(
            r["phase"], str(offered), f"{r['request_throughput']:.2f}",
            f"{r['output_throughput']:.1f}", _ms(r["ttft_p50_ms"]), _ms(r["ttft_p99_ms"]),
            _ms(r["tpot_p50_ms"]), _ms(r["tpot_p99_ms"]), str(r["failed"]),
        )
    return table


def cpu_table(cpu: dict[str, dict[str, float]]) -> Table:
    groups = sorted({g for shares in cpu.values() for g in shares if g != "total"},
                    key=lambda g: -max(s.get(g, 0.0) for s in cpu.values()))
    table = Table(title="CPU of this machine by process group (% of one core, phase average)")
    table.add_column("phase")
    for g in [*groups, "total"]:
        table.add_column(g, justify="right")
    for phase, shares in cpu.items():
        table.add_row(phase, *(f"{shares.get(g, 0.0):.0f}" for g in [*groups, "total"]))
    return table


def render_text(
    title: str,
    summary: dict,
    figures: list[dict],
    cpu: dict[str, dict[str, float]] | None = None,
    width: int = 160,
) -> str:
    """Everything the terminal shows at the end of a run, as plain text."""
    buf = io.StringIO()
    console = Console(file=buf, width=width, no_color=True, force_terminal=False)
    console.print(f"Scenario: {title}", highlight=False)
    console.print(serving_block(summary["overall"]), highlight=False)
    if len(summary["tenants"]) > 1:
        for tenant, s in summary["tenants"].items():
            console.print(serving_block(s, f" Tenant {tenant} "), highlight=False)
    console.print(phase_table(summary))
    for fig in figures:
        if fig["kind"] == "sweep":
            console.print(sweep_table(fig))
    turns = turns_table(figures)
    if turns is not None:
        console.print(turns)
    if cpu:
        console.print(cpu_table(cpu))
    if figures:
        console.print(figures_table(figures))
    return buf.getvalue()


# ---- JSON ------------------------------------------------------------------------------
def clean(value: Any) -> Any:
    """NaN and infinities become null, so the file is strict JSON."""
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean(v) for v in value]
    return value


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(clean(data), indent=2, allow_nan=False))
