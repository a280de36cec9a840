"""`tiered bench`: run a scenario against an endpoint and write the table, JSON and plots.

    tiered bench list
    tiered bench run p4_isolation [--pinned] [--out DIR]
    tiered bench run my.yaml --url http://host:8000/v1 [--goodput ttft:500 tpot:50]

Without --url, a local Ray cluster runs the scenario's Tiered config for the run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

from bench.scenario import Scenario, ScenarioError, load_scenario, shipped

if TYPE_CHECKING:
    from bench.targets import Target
from deployments.proxy_mode import DEFAULT_PROXY_MODE, PROXY_MODES

RESULTS = Path("bench/results")
SLO_METRICS = ("ttft", "tpot", "e2el")


def parse_goodput(items: list[str] | None) -> dict[str, float]:
    """`ttft:500 tpot:50` → {"ttft": 500.0, "tpot": 50.0} (milliseconds)."""
    out: dict[str, float] = {}
    for item in items or []:
        name, _, value = item.partition(":")
        if name not in SLO_METRICS:
            raise ScenarioError(f"--goodput {item!r}: the metric must be one of {SLO_METRICS}")
        try:
            out[name] = float(value)
        except ValueError:
            raise ScenarioError(f"--goodput {item!r}: expected METRIC:MILLISECONDS") from None
        if out[name] <= 0:
            raise ScenarioError(f"--goodput {item!r}: the bound must be positive")
    return out


def parse_endpoints(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, url = item.partition("=")
        if not sep or not name or not url.startswith(("http://", "https://")):
            raise ScenarioError(f"--endpoint {item!r}: expected NAME=http(s)://host:port/v1")
        out[name] = url.rstrip("/")
    return out


def machine() -> dict:
    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpus": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def _command_line(args: argparse.Namespace) -> str:
    parts = ["tiered", "bench", "run", str(args.scenario)]
    if args.url:
        parts += ["--url", args.url]
    for e in args.endpoint:
        parts += ["--endpoint", e]
    if args.goodput:
        parts += ["--goodput", *args.goodput]
    if args.pinned:
        parts.append("--pinned")
    if args.proxy:
        parts += ["--proxy", args.proxy]
    if args.out:
        parts += ["--out", str(args.out)]
    return shlex.join(parts)


def run_scenario(
    scenario: Scenario,
    target: Target,
    out: Path,
    slo_ms: dict[str, float],
    *,
    console: Console,
    progress: bool = True,
    tokenizer: str | None = None,
    command: str = "",
) -> dict:
    """Run, then write table.txt, result.json, requests.jsonl and the PNGs under `out`."""
    from bench import plots
    from bench.analysis import analyse, summaries
    from bench.cpu import CpuSampler
    from bench.report import render_text, write_json
    from bench.runner import Runner
    from bench.split_clients import run_split

    tokenizer = tokenizer or target.tokenizer
    cpu = CpuSampler()
    cpu.start()
    if target.watcher:
        target.watcher.start()
    try:
        if target.client_groups:  # each node's clients on its own cores
            result = run_split(
                scenario, target.endpoints, target.client_groups, tokenizer, progress
            )
        else:
            runner = Runner(
                scenario, target.endpoints, tokenizer=tokenizer, progress=progress,
                console=console,
            )
            result = asyncio.run(runner.run())
    finally:
        samples = target.watcher.stop() if target.watcher else []
        cpu.stop()
    result.samples = samples
    summary = summaries(result, slo_ms)
    figures = analyse(result, slo_ms)
    windows = {n: (result.t0 + a, result.t0 + b) for n, a, b in scenario.phase_windows()}
    cpu_use = cpu.by_window(windows)
    text = render_text(scenario.name, summary, figures, cpu_use)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.txt").write_text(text)
    console.print(text, highlight=False, markup=False, soft_wrap=True)
    with (out / "requests.jsonl").open("w") as f:
        for r in result.records:
            f.write(json.dumps(r.to_json(result.t0)) + "\n")
    data = {
        "scenario": scenario.name,
        "description": scenario.description,
        "source": str(scenario.source) if scenario.source else None,
        "command": command,
        "machine": machine(),
        "target": {"description": target.description, "endpoints": target.endpoints,
                   **target.settings},
        "started_at": result.started_at,
        "duration_s": result.finished - result.t0,
        "phases": [{"name": n, "start_s": a, "end_s": b} for n, a, b in scenario.phase_windows()],
        "goodput_slo_ms": slo_ms,
        "summary": summary,
        "analysis": figures,
        "cpu_percent_of_one_core": cpu_use,
        "replica_samples": [{**s, "t": round(s["t"] - result.t0, 3)} for s in samples],
        "requests_file": "requests.jsonl",
    }
    write_json(out / "result.json", data)
    pngs = plots.write_all(result, figures, out)
    console.print(f"wrote {out / 'table.txt'}, {out / 'result.json'}, {out / 'requests.jsonl'}, "
                  + ", ".join(str(p) for p in pngs))
    return data


def _run(args: argparse.Namespace) -> int:
    from bench.proxy_target import endpoints_for
    from bench.targets import local_target, url_target
    from deployments.proxy_mode import use_proxy_mode

    console = Console()
    try:
        scenario = load_scenario(args.scenario)
        slo = parse_goodput(args.goodput) or {k: float(v) for k, v in scenario.goodput.items()}
        extra = parse_endpoints(args.endpoint)
        if args.pinned and args.url:
            raise ScenarioError("--pinned applies to the local cluster; it cannot pin --url")
        if args.proxy and args.url:
            raise ScenarioError("--proxy applies to the local cluster, not to --url")
        proxy = args.proxy or scenario.target.proxy or DEFAULT_PROXY_MODE
    except ScenarioError as exc:
        console.print(f"[red]{exc}")
        return 2
    suffix = ("-pinned" if args.pinned else "") + (
        "" if proxy == DEFAULT_PROXY_MODE else f"-{proxy}"
    )
    out = args.out or RESULTS / f"{Path(str(args.scenario)).stem}{suffix}"
    kwargs = {"console": console, "progress": not args.no_progress, "tokenizer": args.tokenizer,
              "command": _command_line(args)}
    try:
        if args.url:
            data = run_scenario(scenario, url_target(args.url, extra), out, slo, **kwargs)
        else:
            use_proxy_mode(proxy)  # before local_target starts Ray
            with local_target(scenario, args.pinned, console) as target:
                target.endpoints = endpoints_for(proxy, target.endpoints) | extra
                target.settings["proxy"] = proxy
                data = run_scenario(scenario, target, out, slo, **kwargs)
    except (ScenarioError, ValueError) as exc:
        console.print(f"[red]{exc}")
        return 2
    missed = [f["name"] for f in data["analysis"] if f["met"] is False]
    if missed and args.check:
        console.print(f"[red]goals not met: {', '.join(missed)}")
        return 1
    return 0


def _list(args: argparse.Namespace) -> int:
    from rich.table import Table

    table = Table(title="Shipped scenarios (tiered bench run NAME)")
    table.add_column("name")
    table.add_column("duration")
    table.add_column("what it measures")
    for name, path in shipped().items():
        try:
            s = load_scenario(path)
            table.add_row(name, f"{s.duration_s:.0f} s", s.description.strip().splitlines()[0])
        except ScenarioError as exc:
            table.add_row(name, "-", f"[red]invalid: {exc}")
    Console().print(table)
    return 0


def register(groups: argparse._SubParsersAction) -> None:
    bench = groups.add_parser("bench", help="load generator and benchmark scenarios")
    sub = bench.add_subparsers(dest="bench_command", required=True)
    run = sub.add_parser("run", help="run a scenario (a YAML path or a shipped name)")
    run.add_argument("scenario", help="scenario YAML, or a name from `tiered bench list`")
    run.add_argument("--url", help="base URL of an OpenAI-compatible API (…/v1); "
                     "without it a local Ray cluster runs the scenario's Tiered config")
    run.add_argument("--endpoint", action="append", default=[], metavar="NAME=URL",
                     help="another named endpoint for tenants with `endpoint: NAME`")
    run.add_argument("--out", type=Path, default=None, help="output directory "
                     "(default bench/results/SCENARIO)")
    run.add_argument("--goodput", nargs="+", metavar="METRIC:MS",
                     help="SLOs for goodput, e.g. ttft:500 tpot:50 (also e2el)")
    run.add_argument("--pinned", action="store_true", help="local cluster: two Ray nodes on "
                     "disjoint cores (dedicated tenants, shared pool), clients pinned beside")
    run.add_argument("--proxy", choices=PROXY_MODES, default=None,
                     help="local cluster: how HTTP reaches the ingress (deployments/proxy_mode.py;"
                     f" default: the scenario's target.proxy, else {DEFAULT_PROXY_MODE})")
    run.add_argument("--tokenizer", help="tokenizer.json dir to size prompts exactly")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--check", action="store_true", help="exit 1 when a goal is missed")
    run.set_defaults(handler=_run)
    ls = sub.add_parser("list", help="the shipped scenarios")
    ls.set_defaults(handler=_list)
