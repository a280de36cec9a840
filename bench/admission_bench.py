"""Admission figures, measured side by side in one run on a local Ray.

1. The admission actor alone: admit+finish pairs per second with C calls in flight from
   the driver (C = 1, 16, 64) and from two caller actors (two ingress replicas), the admit
   round trip (p50/p99), the actor's own CPU per pair, and refusals per second for a
   tenant over its RPM (what a noisy tenant costs the actor when nothing caches it);
   beside them, the same pairs on AdmissionState in-process (the logic without Ray).
2. The front door: a real app (`deployments.app.build_from_config`, tiny model, one shared
   replica, one ingress replica). The ingress process's CPU per request (/proc utime +
   stime, less its idle rate) and the client's latency for (a) a tenant over its RPM,
   answered 429 from the ingress's local cache, (b) served requests with max_tokens=1,
   (c) 429s that are not cached (a TPM refusal while tokens remain: body parse,
   tokenization and an actor round trip each time), and (d) a 404 on the same ingress,
   the floor every request pays (Serve, FastAPI, the metrics middleware). Blocks of the
   four kinds alternate in rounds, so drift on a shared box spreads over all of them.

    python -m bench.admission_bench [--out bench/results/admission.json] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import platform
import socket
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import ray
from ray import serve

from bench.metrics import percentile
from bench.report import emit
from deployments.config.plan import admission_actor_name
from deployments.tenancy.actor import get_admission
from deployments.tenancy.types import (
    AdmissionConfig,
    AdmissionRequest,
    PoolSeats,
    TenantPolicy,
    UsageRecord,
)

MODEL = "tiny-llama"
COST = 64  # tokens reserved per admission (prompt + max_tokens)
ACTOR_APP = "admission-bench-actor"  # part 1's actor: its own name, never an app's
APP = "admission-bench"
KEYS = {t: f"tk-admission-bench-{t}" for t in ("noisy", "good", "bulky")}
BULKY_TPM = 1000
TICK = os.sysconf("SC_CLK_TCK")
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me about lighthouses"}]}


# ---- helpers ---------------------------------------------------------------------------
def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def actor_pids(match: str) -> list[int]:
    """Pids of this cluster's ALIVE actors whose class name or actor name contains
    `match`. Read from this cluster's GCS: `ray.util.state.list_actors` needs the
    dashboard, and without one it silently answers for another Ray cluster on the box."""
    from ray._private.state import actors

    return [
        a["Pid"] for a in actors().values()
        if a.get("State") == "ALIVE"
        and (match in (a.get("ActorClassName") or "") or match in (a.get("Name") or ""))
    ]


def ms(values: list[float], q: float) -> float:
    return percentile(values, q) * 1000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---- part 1: the actor ---------------------------------------------------------------
def _usage(claim_id: str, tenant: str) -> UsageRecord:
    now = time.time()
    return UsageRecord(claim_id, tenant, MODEL, "shared", False, COST - 1, 0, 1, now, now)


async def drive(
    actor: Any, tenant: str, n: int, concurrency: int, prefix: str, start_at: float = 0.0
) -> dict:
    """n admissions (each admitted one finished with its usage), `concurrency` in flight.
    Returns wall-clock start and end, admit round trips (s), when each pair ended
    (wall clock) and the outcomes."""
    while time.time() < start_at:  # callers on other processes start together
        await asyncio.sleep(min(0.01, start_at - time.time()))
    ids = itertools.count()
    admits: list[float] = []
    done: list[float] = []
    outcomes: Counter[str] = Counter()

    async def worker() -> None:
        while (i := next(ids)) < n:
            claim = f"{prefix}-{i}"
            t0 = time.perf_counter()
            admission = await actor.admit.remote(
                AdmissionRequest(claim, tenant, MODEL, COST, owner=prefix)
            )
            admits.append(time.perf_counter() - t0)
            if admission.admitted:
                outcomes["admitted"] += 1
                await actor.finish.remote(claim, _usage(claim, tenant))
            else:
                outcomes[admission.refusal.reason] += 1
            done.append(time.time())

    start = time.time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {"start": start, "end": time.time(), "admits": admits, "done": done,
            "outcomes": dict(outcomes)}


@ray.remote(num_cpus=0)
class Caller:
    """Stands for one ingress replica calling the admission actor."""

    async def drive(self, actor: Any, tenant: str, n: int, concurrency: int, prefix: str,
                    start_at: float) -> dict:
        return await drive(actor, tenant, n, concurrency, prefix, start_at)


def _figures(name: str, runs: list[dict], actor_cpu: float, driver_cpu: float | None) -> dict:
    n = sum(len(r["admits"]) for r in runs)
    wall = max(r["end"] for r in runs) - min(r["start"] for r in runs)
    admits = [x for r in runs for x in r["admits"]]
    outcomes: Counter[str] = Counter()
    for r in runs:
        outcomes.update(r["outcomes"])
    out = {
        f"{name}_per_s": n / wall,
        f"{name}_admit_p50_ms": ms(admits, 50),
        f"{name}_admit_p99_ms": ms(admits, 99),
        f"{name}_actor_cpu_ms_each": actor_cpu / n * 1000,
        f"{name}_samples": n,
    }
    if driver_cpu is not None:
        out[f"{name}_caller_cpu_ms_each"] = driver_cpu / n * 1000
    if set(outcomes) - {"admitted", "rpm"}:
        out[f"{name}_outcomes"] = dict(outcomes)
    return out


def _config() -> AdmissionConfig:
    """One shared pool with seats to spare; a tenant without limits, one with rpm=1."""
    return AdmissionConfig(
        tenants={"free": TenantPolicy("free"), "capped": TenantPolicy("capped", rpm=1)},
        pools={MODEL: PoolSeats(MODEL, "shared", 1_000_000)},
        max_queue_len=10_000,
        version=1.0,
    )


def in_process(quick: bool) -> dict:
    """The same pairs on AdmissionState in this process, no Ray: what the logic costs,
    against which the actor's CPU per pair shows what the two Ray calls cost. Timed in
    stretches: a finish scans every claim finished in the last FORGET_AFTER_S (120 s),
    so the cost of a pair grows with the claims finished before it."""
    from deployments.tenancy.admission import AdmissionState

    marks = (2000, 10_000, 20_000) if not quick else (2000, 5000)

    async def pairs(state: AdmissionState, tenant: str, upto: tuple[int, ...]) -> list[float]:
        """CPU µs per pair in each stretch (0, upto[0]], (upto[0], upto[1]], ..."""
        per, t0, i0 = [], time.process_time(), 0
        for i in range(upto[-1]):
            claim = f"p-{tenant}-{i}"
            admission = await state.admit(AdmissionRequest(claim, tenant, MODEL, COST, owner="p"))
            if admission.admitted:
                state.finish(claim, _usage(claim, tenant))
            if i + 1 in upto:
                t1 = time.process_time()
                per.append((t1 - t0) / (i + 1 - i0) * 1e6)
                t0, i0 = t1, i + 1
        return per

    stretches = asyncio.run(pairs(AdmissionState(_config()), "free", marks))
    (refusal,) = asyncio.run(pairs(AdmissionState(_config()), "capped", (5000,)))
    out = {"in_process_pair_us_first_2000": stretches[0]}
    for (a, b), us in zip(itertools.pairwise(marks), stretches[1:], strict=True):
        out[f"in_process_pair_us_{a}_to_{b}"] = us
    out["in_process_refusal_us"] = refusal
    return out


def actor_throughput(quick: bool) -> dict:
    """Each phase on a fresh actor (the per-finish scan above would otherwise make every
    phase slower than the one before); then one long phase showing that slowdown."""
    scale = 0.2 if quick else 1.0
    me = os.getpid()
    result: dict = {}
    phases = iter(itertools.count())

    def fresh() -> tuple[Any, int]:
        app = f"{ACTOR_APP}-{next(phases)}"
        actor = get_admission(app, _config())
        ray.get(actor.ping.remote(), timeout=60)
        (pid,) = actor_pids(admission_actor_name(app))
        asyncio.run(drive(actor, "free", 300, 16, "warm"))
        return actor, pid

    def timed(name: str, runs_of: Any, from_driver: bool) -> list[dict]:
        actor, pid = fresh()
        a0, d0 = cpu_s(pid), cpu_s(me)
        runs = runs_of(actor)
        a1, d1 = cpu_s(pid), cpu_s(me)
        ray.kill(actor, no_restart=True)
        result.update(_figures(name, runs, a1 - a0, d1 - d0 if from_driver else None))
        return runs

    for c, n in ((1, 2000), (16, 5000), (64, 5000)):
        n = int(n * scale)
        timed(f"driver_c{c}", lambda a, c=c, n=n: [asyncio.run(drive(a, "free", n, c, f"d{c}"))],
              True)
    callers = [Caller.remote() for _ in range(2)]
    ray.get([c.__ray_ready__.remote() for c in callers])
    for c in (16, 64):
        n = int(2500 * scale)

        def two(actor: Any, c: int = c, n: int = n) -> list[dict]:
            at = time.time() + 1.0
            return ray.get([k.drive.remote(actor, "free", n, c, f"i{j}-{c}", at)
                            for j, k in enumerate(callers)])

        timed(f"2callers_c{c}", two, False)
    for k in callers:
        ray.kill(k)

    # the capped tenant: its first request is admitted, every later one refused (rpm)
    def refusals(actor: Any) -> list[dict]:
        asyncio.run(drive(actor, "capped", 1, 1, "cap-first"))
        return [asyncio.run(drive(actor, "capped", int(5000 * scale), 16, "cap"))]

    timed("refusals_driver_c16", refusals, True)
    # sustained: pairs/s over the first and the last 2000 of a long run on one actor
    n = int(25_000 * scale)
    (run,) = timed("sustained_driver_c16",
                   lambda a: [asyncio.run(drive(a, "free", n, 16, "long"))], True)
    done, k = sorted(run["done"]), min(2000, n // 5)
    result["sustained_first_pairs_per_s"] = k / (done[k - 1] - run["start"])
    result["sustained_last_pairs_per_s"] = k / (done[-1] - done[-k - 1])
    result["sustained_window_pairs"] = k
    return result


# ---- part 2: the front door ----------------------------------------------------------
def _tiered_config(model_dir: str):  # type: ignore[no-untyped-def]
    from deployments.config.tiered import TieredConfig
    from deployments.tenancy.keys import hash_key

    engine = {"num_kv_blocks": 256, "max_num_seqs": 8, "max_num_batched_tokens": 512}
    return TieredConfig.model_validate({
        "models": [{"name": MODEL, "path": model_dir, "engine": engine,
                    "shared_pool": {"num_replicas": 1}}],
        "tenants": [
            {"name": "noisy", "rpm": 1, "api_key_hashes": [hash_key(KEYS["noisy"])]},
            {"name": "good", "api_key_hashes": [hash_key(KEYS["good"])]},
            {"name": "bulky", "tpm": BULKY_TPM, "api_key_hashes": [hash_key(KEYS["bulky"])]},
        ],
        "ingress": {"num_replicas": 1},
    })


def _post(
    http: httpx.Client, tenant: str, max_tokens: int, path: str = "/v1/chat/completions"
) -> tuple[float, int, str | None]:
    t0 = time.perf_counter()
    resp = http.post(path, json={**CHAT, "max_tokens": max_tokens},
                     headers={"authorization": f"Bearer {KEYS[tenant]}"})
    took = time.perf_counter() - t0
    code = resp.json().get("error", {}).get("code") if resp.status_code != 200 else None
    return took, resp.status_code, code


# What each kind of request is: (tenant, path, what it should answer).
KINDS = {
    "noisy": ("noisy", "/v1/chat/completions", "429 rate_limit_exceeded"),  # cached 429
    "bulky": ("bulky", "/v1/chat/completions", "429 rate_limit_exceeded"),  # actor's 429
    "good": ("good", "/v1/chat/completions", "200"),  # served, max_tokens=1
    # routing only: the floor every request pays
    "floor": ("good", "/v1/no-such-route", "404 unknown_url"),
}


def front_door(quick: bool) -> dict:
    from deployments.app import build_from_config
    from models.default_model import default_model_path

    rounds = 3
    per_round = {"noisy": 100, "bulky": 100, "good": 34, "floor": 100}
    if quick:
        per_round = {k: max(1, n // 5) for k, n in per_round.items()}
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    t0 = time.perf_counter()
    serve.run(build_from_config(_tiered_config(str(default_model_path("tiny")))), name=APP,
              route_prefix="/")
    result: dict = {"deploy_s": time.perf_counter() - t0}
    (ingress,) = actor_pids(f"ServeReplica:{APP}:ingress")
    watched = {
        "ingress": [ingress],
        "proxy": actor_pids("ProxyActor"),
        "admission": actor_pids(admission_actor_name(APP)),
        "replica": actor_pids(f"ServeReplica:{APP}:shared-"),
    }

    def cpu_now() -> dict[str, float]:
        return {g: sum(cpu_s(p) for p in pids) for g, pids in watched.items()}

    samples: dict[str, list[float]] = {k: [] for k in KINDS}
    cpu: dict[str, Counter[str]] = {k: Counter() for k in KINDS}
    wall: Counter[str] = Counter()
    statuses: dict[str, Counter[str]] = {k: Counter() for k in KINDS}
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
        for _ in range(20):  # warm: tokenizer, handles, connections
            assert _post(http, "good", 1)[1] == 200
            assert _post(http, "good", 1, KINDS["floor"][1])[1] == 404
        # the idle rate of each process, subtracted below (health checks, metrics pushes)
        idle_s = 3.0
        c0 = cpu_now()
        time.sleep(idle_s)
        c1 = cpu_now()
        idle = {g: (c1[g] - c0[g]) / idle_s for g in c0}
        # noisy: one served, one refused by the actor (rpm, ~60 s); the rest is local
        primed = [_post(http, "noisy", 1)[1], _post(http, "noisy", 1)[1]]
        # bulky: one served request leaves its tokens in the window; then each request
        # asks for exactly the limit: refused (tpm) by the actor every time and never
        # cached, since tokens remain and a smaller request could still fit
        first = http.post("/v1/chat/completions", json={**CHAT, "max_tokens": 1},
                          headers={"authorization": f"Bearer {KEYS['bulky']}"}).json()
        bulky_max = BULKY_TPM - first["usage"]["prompt_tokens"]
        order = list(KINDS)
        started = time.monotonic()
        for r in range(rounds):
            for kind in order[r % len(order):] + order[: r % len(order)]:
                tenant, path, _ = KINDS[kind]
                n = per_round[kind] - (1 if kind == "good" and r and not quick else 0)
                max_tokens = bulky_max if kind == "bulky" else 1
                c0, w0 = cpu_now(), time.perf_counter()
                for _ in range(n):
                    took, status, code = _post(http, tenant, max_tokens, path)
                    samples[kind].append(took)
                    statuses[kind][f"{status} {code}" if code else str(status)] += 1
                c1, w1 = cpu_now(), time.perf_counter()
                wall[kind] += w1 - w0
                for g in c0:
                    cpu[kind][g] += c1[g] - c0[g]
        window_s = time.monotonic() - started
    serve.delete(APP)
    serve.shutdown()

    result |= {"noisy_primed_statuses": primed, "rounds_took_s": window_s,
               "idle_ingress_cpu_pct": 100 * idle["ingress"]}
    unexpected = {k: dict(c) for k, c in statuses.items() if set(c) != {KINDS[k][2]}}
    if unexpected:
        result["unexpected_statuses"] = unexpected
    for kind in KINDS:
        n = len(samples[kind])
        net = {g: max(0.0, cpu[kind][g] - idle[g] * wall[kind]) for g in cpu[kind]}
        result |= {
            f"{kind}_samples": n,
            f"{kind}_ingress_cpu_ms_each": net["ingress"] / n * 1000,
            f"{kind}_ingress_cpu_raw_ms_each": cpu[kind]["ingress"] / n * 1000,
            f"{kind}_proxy_cpu_ms_each": net["proxy"] / n * 1000,
            f"{kind}_admission_cpu_ms_each": net["admission"] / n * 1000,
            f"{kind}_replica_cpu_ms_each": net["replica"] / n * 1000,
            f"{kind}_client_p50_ms": ms(samples[kind], 50),
            f"{kind}_client_p99_ms": ms(samples[kind], 99),
        }

    def ratio(a: str, b: str, groups: tuple[str, ...] = ("ingress",)) -> float:
        num = sum(result[f"{a}_{g}_cpu_ms_each"] for g in groups)
        return num / max(1e-9, sum(result[f"{b}_{g}_cpu_ms_each"] for g in groups))

    front = ("ingress", "proxy", "admission")
    result |= {
        "ingress_cpu_served_vs_cached_429": ratio("good", "noisy"),
        "ingress_cpu_uncached_vs_cached_429": ratio("bulky", "noisy"),
        "ingress_cpu_cached_429_vs_404_floor": ratio("noisy", "floor"),
        "front_door_cpu_served_vs_cached_429": ratio("good", "noisy", front),
        "front_door_cpu_uncached_vs_cached_429": ratio("bulky", "noisy", front),
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/admission.json"))
    parser.add_argument("--quick", action="store_true", help="a fifth of the samples")
    parser.add_argument("--num-cpus", type=int, default=8, help="Ray's logical CPUs")
    args = parser.parse_args()
    result: dict = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "load_avg_1m_at_start": os.getloadavg()[0],
    }
    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False,
             log_to_driver=False)  # a fresh local instance, never another cluster
    try:
        result |= in_process(args.quick)
        result |= actor_throughput(args.quick)
        result |= front_door(args.quick)
    finally:
        ray.shutdown()
    result["load_avg_1m_at_end"] = os.getloadavg()[0]
    emit("Admission (one run, local Ray, CPU)", result, args.out)


if __name__ == "__main__":
    main()
