"""The metric catalogue end to end: real traffic through a Tiered app on the session's
two-node Ray cluster, read back from each node's Ray metrics agent.

Traffic is shaped to exercise every series: a dedicated tenant saturating its copy and
spilling, a shared tenant repeating a prompt (prefix hits), a tenant over its RPM (429),
a small KV cache that forces preemption, a queue in the shared pool, and three LoRA
adapters taking turns in one adapter slot and two places in CPU memory (every turn loads
one, and evicts the one in the slot).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from ray import serve

from deployments.app import build_from_config
from deployments.config.tiered import TieredConfig
from deployments.observability.metrics import CATALOGUE
from deployments.tenancy.keys import hash_key
from tests.lora_adapters import write_adapter

# Names of this module's own: other modules' apps on the same cluster leave series of
# theirs (tiny-llama, acme, ...) in the metrics agents.
MODEL = "obs-llama"
ACME, GLOBEX, LIMITED = "obs-acme", "obs-globex", "obs-limited"
KEYS = {t: f"tk-metrics-{t}" for t in (ACME, GLOBEX, LIMITED)}
ADAPTERS = ("obs-sql", "obs-chat", "obs-code")
PROMPT = "the quick brown fox jumps over the lazy dog " * 6


def metrics_config(model_dir: Path, adapters: dict[str, Path]) -> TieredConfig:
    # 4 seats per replica; 40 blocks of 16 tokens cannot hold 4 long sequences: preemption.
    # Three adapters in turn, one slot, two in CPU memory: each turn reads the adapter the
    # CPU cache dropped longest ago, and pushes the previous one out of the slot.
    engine = {
        "num_kv_blocks": 40,
        "max_num_seqs": 4,
        "max_num_batched_tokens": 512,
        "max_loras": 1,
        "max_cpu_loras": 2,
    }

    def tenant(name: str, **kw: object) -> dict:
        return {"name": name, "api_key_hashes": [hash_key(KEYS[name])], **kw}

    return TieredConfig.model_validate(
        {
            "models": [
                {
                    "name": MODEL,
                    "path": str(model_dir),
                    "engine": engine,
                    "shared_pool": {"num_replicas": 1, "price_per_replica_hour": 2.0},
                    "adapters": [{"name": n, "path": str(p)} for n, p in adapters.items()],
                }
            ],
            "tenants": [
                tenant(
                    ACME,
                    tier="dedicated",
                    priority=1,
                    dedicated={
                        "model": MODEL,
                        "reserved_replicas": 1,
                        "spill": True,
                        "replica": {"price_per_replica_hour": 8.0},
                    },
                ),
                tenant(GLOBEX),
                tenant(LIMITED, rpm=2),
            ],
            "dispatch": {"queue_deadline_s": 60},
            "ingress": {"num_replicas": 1},
        }
    )


def client(base_url: str, tenant: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key=KEYS[tenant], max_retries=0, timeout=120)


def _stream(base_url: str, tenant: str, max_tokens: int, prompt: str = PROMPT) -> str:
    stream = client(base_url, tenant).chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    tier = ""
    for chunk in stream:
        tier = chunk.service_tier or tier
    return tier


def send_traffic(base_url: str) -> dict[str, list[str]]:
    """Both tiers, spill, a queue, prefix hits, preemption and 429s; returns tiers seen."""
    tiers: dict[str, list[str]] = {ACME: [], GLOBEX: []}
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        acme = [pool.submit(_stream, base_url, ACME, 120) for _ in range(6)]
        globex = [pool.submit(_stream, base_url, GLOBEX, 120) for _ in range(4)]
        for f in acme:
            tiers[ACME].append(f.result(timeout=300))
        for f in globex:
            tiers[GLOBEX].append(f.result(timeout=300))
    for _ in range(2):  # the same prompt again: prefix-cache hits
        client(base_url, GLOBEX).completions.create(model=MODEL, prompt=PROMPT, max_tokens=4)
    for name in ADAPTERS * 2:  # one at a time, so each takes the slot from the last
        client(base_url, GLOBEX).completions.create(model=name, prompt="hi", max_tokens=2)
    refused = 0
    for _ in range(4):
        try:
            client(base_url, LIMITED).completions.create(model=MODEL, prompt="hi", max_tokens=2)
        except openai.RateLimitError:
            refused += 1
    assert refused >= 1, "the rpm=2 tenant was never refused"
    bad = httpx.post(f"{base_url}/completions", headers={"Authorization": "Bearer nope"}, json={})
    assert bad.status_code == 401
    return tiers


@pytest.fixture(scope="module")
def traffic(ray_cluster, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    where = tmp_path_factory.mktemp("obs-adapters")
    adapters = {
        name: write_adapter(tiny_model_dir, where / name, seed=i) for i, name in enumerate(ADAPTERS)
    }
    config = metrics_config(tiny_model_dir, adapters)
    serve.run(build_from_config(config), name="tiered", route_prefix="/")
    base_url = f"http://127.0.0.1:{ray_cluster.serve_port}/v1"
    ports = ray_cluster.metrics_ports
    with sampling(ports, "tiered_reservation_utilization", tenant=ACME) as reservation:
        tiers = send_traffic(base_url)
    yield {"tiers": tiers, "ports": ports, "base_url": base_url, "reservation": reservation}
    serve.delete("tiered")


def scrape(ports: list[int]) -> str:
    return "\n".join(httpx.get(f"http://127.0.0.1:{p}/metrics", timeout=10).text for p in ports)


def values(text: str, name: str, **labels: str) -> list[float]:
    """The values of the samples of `name` (exactly: no histogram parts) with `labels`."""
    return [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(f"ray_{name}{{") and all(f'{k}="{v}"' in line for k, v in labels.items())
    ]


def poll_values(
    ports: list[int], want: list[float], name: str, timeout_s: float = 30, **labels: str
) -> list[float]:
    """Scrape until `name`'s values read `want` (a gauge lags its source by the export and
    report intervals), or the deadline passes; returns the values last read."""
    deadline = time.monotonic() + timeout_s
    while (seen := values(scrape(ports), name, **labels)) != want and time.monotonic() < deadline:
        time.sleep(0.5)
    return seen


@contextlib.contextmanager
def sampling(ports: list[int], name: str, **labels: str) -> Iterator[list[float]]:
    """Scrape the agents every half second while the block runs; yields the values seen."""
    seen: list[float] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            with contextlib.suppress(httpx.HTTPError):
                seen.extend(values(scrape(ports), name, **labels))
            stop.wait(0.5)

    sampler = threading.Thread(target=sample, name="metrics-sampler", daemon=True)
    sampler.start()
    try:
        yield seen
    finally:
        stop.set()
        sampler.join(timeout=30)


SAMPLE = re.compile(r"^(?P<name>ray_tiered_\w+?)(?:_bucket|_sum|_count)?\{(?P<labels>[^}]*)\}")


def series(text: str) -> dict[str, list[dict[str, str]]]:
    """Metric name (as in the catalogue) -> the label sets exported for it."""
    out: dict[str, list[dict[str, str]]] = {}
    for line in text.splitlines():
        m = SAMPLE.match(line)
        if not m:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m["labels"]))
        name = m["name"].removeprefix("ray_")
        for known in CATALOGUE:  # histogram parts map back to their metric
            if name == known or (name.startswith(known) and CATALOGUE[known][0] == "histogram"):
                out.setdefault(known, []).append(labels)
    return out


def wait_for_all_series(ports: list[int], deadline_s: float = 60.0) -> dict:
    deadline = time.monotonic() + deadline_s
    found: dict = {}
    while time.monotonic() < deadline:
        found = series(scrape(ports))
        if set(CATALOGUE) <= set(found) and _ours_exported(found):
            return found
        time.sleep(1.0)
    missing = sorted(set(CATALOGUE) - set(found))
    raise AssertionError(
        f"after {deadline_s}s: series missing {missing}; this module's tenants, pools and "
        f"spill exported: {_ours_exported(found)}"
    )


def _ours_exported(found: dict) -> bool:
    """This module's traffic has reached the agents (other apps' series are there already):
    its three tenants and the 401's "unknown", both its pools, and acme's spill."""
    tenants = {s.get("tenant") for name in found for s in found[name]}
    pools = {s["pool"] for s in found.get("tiered_replica_seconds_total", [])}
    spill = {
        s.get("tenant") for s in found.get("tiered_tokens_total", []) if s.get("tier") == "spill"
    }
    ours = {ACME, GLOBEX, LIMITED, "unknown"} <= tenants
    return ours and {MODEL, f"dedicated:{ACME}"} <= pools and ACME in spill


def test_every_catalogue_metric_is_exported_with_bounded_labels(traffic: dict) -> None:
    assert "dedicated" in traffic["tiers"][ACME] and "shared" in traffic["tiers"][ACME]
    found = wait_for_all_series(traffic["ports"])
    tenants = {s["tenant"] for name in found for s in found[name] if "tenant" in s}
    # Configured names only (other test modules' apps add theirs to the same cluster);
    # the bad key of the 401 is counted as "unknown", never by its value.
    assert {ACME, GLOBEX, LIMITED, "unknown"} <= tenants
    assert not any(t.startswith("tk-") or t == "nope" for t in tenants), tenants
    assert all(re.fullmatch(r"[a-z0-9][a-z0-9_-]*", t) for t in tenants), tenants
    unauthenticated = {
        s["tenant"] for s in found["tiered_requests_total"] if s["code"] == "401"
    }
    assert unauthenticated == {"unknown"}, unauthenticated
    tiers = {s["tier"] for s in found["tiered_requests_total"]}
    assert {"dedicated", "shared", "spill"} <= tiers
    codes = {s["code"] for s in found["tiered_requests_total"]}
    assert {"200", "429", "401"} <= codes
    assert {s["reason"] for s in found["tiered_rejections_total"]} >= {"rpm"}
    assert {s["kind"] for s in found["tiered_tokens_total"]} == {"prompt", "cached", "completion"}
    pools = {s["pool"] for s in found["tiered_replica_seconds_total"]}
    assert {MODEL, f"dedicated:{ACME}"} <= pools
    assert {s["kind"] for s in found["tiered_pool_replicas"]} == {"desired", "actual"}


def test_prefix_hits_preemption_and_spill_are_counted(traffic: dict) -> None:
    wait_for_all_series(traffic["ports"])
    text = scrape(traffic["ports"])

    def total(name: str, **labels: str) -> float:
        return sum(values(text, name, **labels))

    assert total("tiered_prefix_cache_hits_total") > 0
    assert total("tiered_engine_preemptions_total") > 0
    assert total("tiered_spill_requests_total", tenant=ACME) >= 1
    assert total("tiered_spill_tokens_total", tenant=ACME) > 0
    assert total("tiered_replica_hour_price", pool=f"dedicated:{ACME}") == 8.0
    # Reservation use is exported for the dedicated tenant only. Acme spilled, which it
    # does only with every reserved seat taken: while its traffic ran the gauge read 1.0
    # (its streams start and end together, so the full stretch is most of its traffic);
    # once the traffic is over every seat is back: 0.
    sampled = traffic["reservation"]
    assert sampled and all(0.0 <= v <= 1.0 for v in sampled), sampled
    assert 1.0 in sampled, f"acme's reservation never read full while it spilled: {sampled}"
    assert not values(text, "tiered_reservation_utilization", tenant=GLOBEX)
    now = poll_values(traffic["ports"], [0.0], "tiered_reservation_utilization", tenant=ACME)
    assert now == [0.0], f"acme's reservation after its traffic ended: {now}"


def test_lora_loads_evictions_and_slots_are_exported_per_replica(traffic: dict) -> None:
    """Per replica, never per adapter: no label value names one."""
    found = wait_for_all_series(traffic["ports"])
    text = scrape(traffic["ports"])

    def total(name: str) -> float:
        return sum(values(text, name, pool=MODEL))

    assert total("tiered_lora_loads_total") >= len(ADAPTERS)
    assert total("tiered_lora_evictions_total") >= 1  # one slot, taken in turns
    assert total("tiered_lora_load_seconds_total") > 0
    assert values(text, "tiered_lora_slots_capacity", pool=MODEL) == [1.0]
    assert values(text, "tiered_lora_slots_capacity", pool=f"dedicated:{ACME}") == [1.0]
    lora_labels = [s for name in found if name.startswith("tiered_lora_") for s in found[name]]
    assert lora_labels and all({"pool", "replica"} <= set(s) for s in lora_labels)
    named = [s for s in lora_labels if set(s.values()) & set(ADAPTERS)]
    assert not named, named


RAY_LABELS = re.compile(r'(SessionName|NodeAddress|Version|Component|WorkerId|JobId)="[^"]*",?')
CAMEL_CASE = "label names should be written in 'snake_case' not 'camelCase'"


def promtool_check(exposition: str) -> tuple[int, list[str]]:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: .ci/run installs Debian's prometheus package"
    result = subprocess.run(
        [promtool, "check", "metrics"], input=exposition, capture_output=True, text=True
    )
    return result.returncode, [ln for ln in (result.stdout + result.stderr).splitlines() if ln]


def test_promtool_accepts_the_exposition(traffic: dict) -> None:
    """Our names, types and labels lint clean. Ray's agent adds camelCase labels of its
    own (SessionName, NodeAddress, ...), the one complaint promtool has, so the check runs
    twice: as exported (only that complaint allowed), and without Ray's labels (clean)."""
    wait_for_all_series(traffic["ports"])
    for port in traffic["ports"]:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        ours = "\n".join(line for line in text.splitlines() if "ray_tiered_" in line) + "\n"
        _, problems = promtool_check(ours)
        assert all(p.endswith(CAMEL_CASE) for p in problems), problems
        stripped = RAY_LABELS.sub("", ours).replace(",}", "}").replace("{}", "")
        code, problems = promtool_check(stripped)
        assert code == 0, problems


def test_every_dashboard_panel_has_data_in_a_real_prometheus(traffic: dict, tmp_path: Path) -> None:
    """Prometheus scrapes both nodes' metrics agents; each panel query of each dashboard,
    with its variables at their defaults, returns data, and the rules load and evaluate."""
    from deployments.observability.dashboards import panel_queries, substitute
    from tests.prometheus_server import prometheus, query, scrape_errors

    wait_for_all_series(traffic["ports"])
    targets = [f"127.0.0.1:{p}" for p in traffic["ports"]]
    with prometheus(targets, tmp_path, [fast_rules(tmp_path)]) as url:
        deadline = time.monotonic() + 30
        while not query(url, "ray_tiered_requests_total") and time.monotonic() < deadline:
            time.sleep(0.5)
        send_traffic(traffic["base_url"])  # while Prometheus watches: rates see it
        # A panel passes once it has shown data. A failed scrape marks its target's series
        # stale at once, so on a busy box a slow metrics agent can blank some panels at any
        # given instant even though each one has data between failures.
        unseen = panel_queries()
        deadline = time.monotonic() + 90
        while unseen and time.monotonic() < deadline:
            unseen = [
                (board, title, expr)
                for board, title, expr in unseen
                if not _has_numbers(query(url, substitute(expr, rate_interval="5m")))
            ]
            if unseen:
                time.sleep(2)
        empty = [f"{board}/{title}: {expr}" for board, title, expr in unseen]
        assert not empty, "panels without data:\n" + "\n".join(empty + scrape_errors(url))
        recorded = ("tiered:spend_per_hour:pool", "tiered:cost_per_million_tokens:tier")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            groups = httpx.get(f"{url}/api/v1/rules", timeout=10).json()["data"]["groups"]
            rules_ = [r for g in groups for r in g["rules"]]
            health = {r["name"]: (r["health"], r.get("lastError")) for r in rules_}
            if all(h == "ok" for h, _ in health.values()) and all(
                _has_numbers(query(url, name)) for name in recorded
            ):
                break
            time.sleep(1)
        assert {g["name"] for g in groups} == {"tiered.recording", "tiered.alerts"}
        assert all(h == "ok" for h, _ in health.values()), health
        for name in recorded:
            assert _has_numbers(query(url, name)), name
        check_status_command(url)


def fast_rules(workdir: Path) -> Path:
    """The shipped rules, evaluated every second instead of every 30 s: a first evaluation
    made before Prometheus holds two samples records nothing, and the next one would be
    30 s later."""
    shipped = Path(__file__).resolve().parent.parent / "deployments/observability/alerts.yaml"
    rules = yaml.safe_load(shipped.read_text())
    for group in rules["groups"]:
        group["interval"] = "1s"
    path = workdir / "alerts.yaml"
    path.write_text(yaml.safe_dump(rules))
    return path


def _has_numbers(result: list[dict]) -> bool:
    """Data a panel would draw: at least one series with a number (not NaN)."""
    return any(r["value"][1] not in ("NaN", "+Inf", "-Inf") for r in result)


def check_status_command(url: str) -> None:
    """`tiered status` reads the same Prometheus: pools, replicas and both tenant kinds."""
    from rich.console import Console

    from cli.status import collect, render
    from tests.prometheus_server import query

    # The traffic is over: acme's seats are all back, once that reaches Prometheus.
    deadline = time.monotonic() + 30
    while (snap := collect(url, window="5m")).tenants[ACME].get("reservation") != 0.0:
        if time.monotonic() > deadline:
            break
        time.sleep(1)
    assert {MODEL, f"dedicated:{ACME}"} <= set(snap.pools)
    ours = {k: v for k, v in snap.replicas.items() if k[0] in (MODEL, f"dedicated:{ACME}")}
    assert all(r.get("up") == 1 for r in ours.values()) and len(ours) == 2, ours
    assert {ACME, GLOBEX} <= set(snap.tenants)
    assert snap.tenants[ACME]["ttft_p99"] > 0
    assert snap.tenants[ACME].get("reservation") == 0.0, snap.tenants[ACME]
    assert "reservation" not in snap.tenants[GLOBEX], snap.tenants[GLOBEX]  # shared: none
    # ... and while the traffic Prometheus watched ran, they were all taken (acme spilled).
    peak = query(url, f'max_over_time(ray_tiered_reservation_utilization{{tenant="{ACME}"}}[5m])')
    assert [float(r["value"][1]) for r in peak] == [1.0], peak
    console = Console(width=160, record=True)
    console.print(render(snap))
    text = console.export_text()
    for expected in ("Pools", "Replicas", "Tenants", f"dedicated:{ACME}", ACME, GLOBEX):
        assert expected in text
    print(text)
