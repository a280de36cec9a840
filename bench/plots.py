"""PNG plots of a run (matplotlib, Agg: no display needed).

- latency_cdf.png: the CDF of TTFT, TPOT, ITL and e2e latency, one line per tenant;
- timeseries.png: TTFT of each request at its send time, output tokens/s per tenant, and
  errors/s, with the phases marked (and the replica count of a watched deployment);
- sweep.png (sweep scenarios): offered rate against TTFT and TPOT.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from bench.metrics import binned, e2el, itls, token_times, tpot, ttft
from bench.runner import RunResult

BIN_S = 1.0


def _by_tenant(result: RunResult) -> dict[str, list]:
    out: dict[str, list] = {t: [] for t in result.scenario.tenants}
    for r in result.records:
        out.setdefault(r.tenant, []).append(r)
    return out


def _mark_phases(ax, result: RunResult, label: bool) -> None:  # type: ignore[no-untyped-def]
    for name, start, _ in result.scenario.phase_windows():
        ax.axvline(start, color="grey", linestyle="--", linewidth=0.8)
        if label:
            ax.annotate(name, (start, 1.0), xycoords=("data", "axes fraction"),
                        xytext=(3, -12), textcoords="offset points", fontsize=8, color="grey")


def latency_cdf(result: RunResult, path: Path) -> Path:
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    panels = (("TTFT", ttft), ("TPOT", tpot), ("ITL", None), ("E2E latency", e2el))
    for ax, (title, fn) in zip(axes.flat, panels, strict=True):
        for tenant, records in _by_tenant(result).items():
            if fn is None:
                values = sorted(g * 1000 for r in records for g in itls(r))
            else:
                values = sorted(v * 1000 for r in records if (v := fn(r)) is not None)
            if values:
                ys = [(i + 1) / len(values) for i in range(len(values))]
                ax.step(values, ys, where="post", label=f"{tenant} (n={len(values)})")
        ax.set_title(f"{title} CDF")
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of requests" if fn else "fraction of gaps")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.set_xscale("log")
            ax.legend(fontsize=8)
    fig.suptitle(f"{result.scenario.name}: latency CDFs per tenant")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def timeseries(result: RunResult, path: Path) -> Path:
    t0 = result.t0
    end = max(result.finished, t0 + result.scenario.duration_s) - t0
    groups = _by_tenant(result)
    errors = any(not r.ok for r in result.records)
    rows = 3 if errors else 2
    fig, axes = plt.subplots(rows, 1, figsize=(11, 3.2 * rows), sharex=True)
    ax = axes[0]
    for tenant, records in groups.items():
        pts = [(r.send - t0, v * 1000) for r in records if (v := ttft(r)) is not None]
        if pts:
            ax.scatter(*zip(*pts, strict=True), s=6, alpha=0.6, label=tenant)
    ax.set_ylabel("TTFT (ms)")
    ax.set_yscale("log")
    ax.set_title(f"{result.scenario.name}: TTFT at send time, and throughput")
    ax.grid(alpha=0.3)
    if ax.collections:
        ax.legend(fontsize=8, markerscale=2)
    ax = axes[1]
    xs = [i * BIN_S for i in range(max(1, int(end / BIN_S) + 1))]
    for tenant, records in groups.items():
        events = [(t - t0, n) for r in records for t, n in token_times(r)]
        ax.plot(xs, binned(events, 0.0, xs[-1] + BIN_S, BIN_S), label=f"{tenant} tok/s")
    ax.set_ylabel("output tokens/s")
    ax.grid(alpha=0.3)
    if result.samples:
        twin = ax.twinx()
        for dep in sorted({s["deployment"] for s in result.samples}):
            pts = [(s["t"] - t0, s["running"]) for s in result.samples if s["deployment"] == dep]
            twin.step(*zip(*pts, strict=True), where="post", color="black", linewidth=1,
                      label=f"{dep} replicas")
        twin.set_ylabel("replicas")
        twin.legend(fontsize=8, loc="upper right")
    ax.legend(fontsize=8, loc="upper left")
    if errors:
        ax = axes[2]
        for tenant, records in groups.items():
            events = [(r.end - t0, 1.0) for r in records if not r.ok]
            if events:
                ax.plot(xs, binned(events, 0.0, xs[-1] + BIN_S, BIN_S), label=f"{tenant}")
        ax.set_ylabel("errors/s")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for i, ax in enumerate(axes):
        _mark_phases(ax, result, label=i == 0)
    axes[-1].set_xlabel("seconds since the start of the run")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def sweep(figure: dict, path: Path) -> Path:
    rows = figure["details"]["rows"]
    xs = [r["offered_rate"] if r["offered_rate"] is not None else i for i, r in enumerate(rows)]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric in ((a, "ttft"), (b, "tpot")):
        for q in ("p50", "p99"):
            ax.plot(xs, [r[f"{metric}_{q}_ms"] for r in rows], marker="o", label=q)
        ax.set_xlabel("offered rate (req/s)")
        ax.set_ylabel(f"{metric.upper()} (ms)")
        ax.set_title(f"{metric.upper()} against rate")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(figure["name"])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_all(result: RunResult, figures: list[dict], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [
        latency_cdf(result, out / "latency_cdf.png"),
        timeseries(result, out / "timeseries.png"),
    ]
    for i, fig in enumerate(f for f in figures if f["kind"] == "sweep"):
        paths.append(sweep(fig, out / ("sweep.png" if i == 0 else f"sweep-{i}.png")))
    return paths
