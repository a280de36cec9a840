"""The tenancy core under faults and changes, end to end on the session's Ray cluster.

- The admission actor is killed under load (restarted by Ray, or killed for good and
  made again by the ingress): no 500, no hang, a clean 503 with Retry-After meanwhile,
  service back by itself within 30 s, and no seat leaked afterwards.
- A config change deployed over the running app keeps rate windows and usage.
- Cheap rejections: a tenant over its limit is refused before its body is even parsed.
- The configured body limit is the one enforced (above the old 1 MiB cap, chunked too).
- A client's X-Request-ID never becomes the engine's request id.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import ray
from ray import serve

from deployments.app import build_from_config
from deployments.config.plan import ADMISSION_NAMESPACE, admission_actor_name
from deployments.config.tiered import TieredConfig
from deployments.state.config import state_dir
from deployments.tenancy.keys import hash_key
from tests.serve_helpers import admin_get, wait_for_usage

APP = "faults"
MODEL = "tiny-llama"
KEYS = {t: f"tk-faults-{t}" for t in ("acme", "limited", "admin")}
MIB = 1 << 20


def _config(model_dir: Path, limited_rpm: int = 4) -> TieredConfig:
    engine = {"num_kv_blocks": 256, "max_num_seqs": 4, "max_num_batched_tokens": 512}
    return TieredConfig.model_validate(
        {
            "models": [
                {"name": MODEL, "path": str(model_dir), "engine": engine,
                 "shared_pool": {"num_replicas": 1}},
            ],
            "tenants": [
                {"name": "acme", "api_key_hashes": [hash_key(KEYS["acme"])]},
                {"name": "limited", "rpm": limited_rpm,
                 "api_key_hashes": [hash_key(KEYS["limited"])]},
            ],
            "admin_key_hashes": [hash_key(KEYS["admin"])],
            "dispatch": {"queue_deadline_s": 20},
            "ingress": {"num_replicas": 2, "max_body_bytes": 2 * MIB},
            "state": {"url": f"sqlite+aiosqlite:///{state_dir() / 'faults.db'}"},
        }
    )


@pytest.fixture(scope="module")
def base(ray_cluster, tiny_model_dir: Path) -> str:
    serve.run(build_from_config(_config(tiny_model_dir)), name=APP, route_prefix="/")
    yield f"http://127.0.0.1:{ray_cluster.serve_port}"
    serve.delete(APP)


def _chat(tenant: str = "acme", **extra: object) -> dict:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Tell me about lighthouses"}],
        "max_tokens": 4,
        **extra,
    }


def _headers(tenant: str) -> dict[str, str]:
    return {"authorization": f"Bearer {KEYS[tenant]}"}


@dataclass
class Outcome:
    sent: float
    done: float
    status: int
    retry_after: str | None


def _load(base: str, stop: threading.Event, out: list[Outcome], limit: int = 400) -> None:
    """One client: requests back to back until told to stop (bounded in count)."""
    with httpx.Client(base_url=base, timeout=60) as http:
        for _ in range(limit):
            if stop.is_set():
                return
            sent = time.monotonic()
            resp = http.post("/v1/chat/completions", json=_chat(), headers=_headers("acme"))
            out.append(Outcome(sent, time.monotonic(), resp.status_code,
                               resp.headers.get("retry-after")))
            if resp.status_code == 503:
                time.sleep(0.2)


def _wait_idle_pool(base: str, timeout_s: float = 30) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        snapshot = admin_get(base, "/admin/state", KEYS["admin"])
        pool = snapshot["pools"][MODEL]
        if pool["in_use"] == 0 and pool["queued"] == 0:
            return snapshot
        time.sleep(0.5)
    raise AssertionError(f"seats still held after {timeout_s}s: {snapshot['pools']}")


@pytest.mark.parametrize("restart", [True, False], ids=["ray-restarts-it", "killed-for-good"])
def test_admission_actor_killed_under_load(base: str, restart: bool) -> None:
    outcomes: list[Outcome] = []
    stop = threading.Event()
    clients = [threading.Thread(target=_load, args=(base, stop, outcomes)) for _ in range(3)]
    for c in clients:
        c.start()
    time.sleep(3)
    served_before = sum(o.status == 200 for o in outcomes)
    actor = ray.get_actor(admission_actor_name(APP), namespace=ADMISSION_NAMESPACE)
    killed = time.monotonic()
    ray.kill(actor, no_restart=not restart)
    deadline = killed + 40
    while time.monotonic() < deadline:
        if any(o.status == 200 and o.sent > killed + 0.5 for o in outcomes):
            break
        time.sleep(0.2)
    time.sleep(2)
    stop.set()
    for c in clients:
        c.join(timeout=60)
    assert not any(c.is_alive() for c in clients), "a client hung"
    statuses = {o.status for o in outcomes}
    assert served_before > 0 and statuses <= {200, 503}, statuses
    assert all(o.retry_after for o in outcomes if o.status == 503)
    recovered = min(o.done for o in outcomes if o.status == 200 and o.sent > killed + 0.5)
    print(f"\nadmission actor killed (restart={restart}): service back after "
          f"{recovered - killed:.1f}s; {sum(o.status == 503 for o in outcomes)} requests got 503")
    assert recovered - killed < 30
    _wait_idle_pool(base)  # every seat of the requests that ran through the outage is back


def test_a_config_change_keeps_rate_windows_and_usage(base: str, tiny_model_dir: Path) -> None:
    with httpx.Client(base_url=base, timeout=60) as http:
        codes = [
            http.post("/v1/chat/completions", json=_chat(), headers=_headers("limited"))
            .status_code for _ in range(4)
        ]
        assert codes == [200] * 4
        wait_for_usage(base, KEYS["admin"], lambda r: r["totals"]["requests"] == 4,
                       tenant="limited")
        # a new limit for the tenant: the redeploy replaces every ingress replica
        serve.run(build_from_config(_config(tiny_model_dir, limited_rpm=5)), name=APP,
                  route_prefix="/")
        assert http.post("/v1/chat/completions", json=_chat(),
                         headers=_headers("limited")).status_code == 200  # 5th of 5
        refused = http.post("/v1/chat/completions", json=_chat(), headers=_headers("limited"))
        assert refused.status_code == 429, refused.text  # the window survived the redeploy
        assert refused.headers["x-ratelimit-limit-requests"] == "5"
        wait_for_usage(base, KEYS["admin"], lambda r: r["totals"]["requests"] >= 5,
                       tenant="limited")
        time.sleep(1)  # nothing counted twice: the total stays at 5
        report = admin_get(base, "/admin/usage", KEYS["admin"], tenant="limited")
        assert report["totals"]["requests"] == 5, report["totals"]


def test_a_blocked_tenant_is_refused_before_its_body_is_read(base: str) -> None:
    with httpx.Client(base_url=base, timeout=60) as http:
        codes = []
        for _ in range(8):
            resp = http.post("/v1/chat/completions", json=_chat(), headers=_headers("limited"))
            codes.append(resp.status_code)
        assert 429 in codes
        garbage = http.post("/v1/chat/completions", content=b"{not json",
                            headers=_headers("limited"))
        assert garbage.status_code == 429, garbage.text  # not 400: nothing was parsed
        assert int(garbage.headers["retry-after"]) >= 1
        assert garbage.json()["error"]["code"] == "rate_limit_exceeded"


def test_the_configured_body_limit_is_enforced_chunked_too(base: str) -> None:
    big = "word " * (300_000)  # 1.5 MB of text: over the old fixed 1 MiB cap
    with httpx.Client(base_url=base, timeout=120) as http:
        fits = http.post("/v1/chat/completions", headers=_headers("acme"),
                         json=_chat(messages=[{"role": "user", "content": big}]))
        assert fits.status_code == 400, fits.text  # read and tokenized: too long a context
        assert fits.json()["error"]["code"] == "context_length_exceeded"
        payload = b'{"model": "x", "messages": [{"role": "user", "content": "' + b"a" * (
            2 * MIB + 100) + b'"}]}'

        def chunks():
            for i in range(0, len(payload), 64 * 1024):
                yield payload[i:i + 64 * 1024]

        over = http.post("/v1/chat/completions", content=chunks(), headers=_headers("acme"))
        assert over.status_code == 413 and over.json()["error"]["code"] == "request_too_large"


def test_a_client_request_id_never_collides_in_the_engine(base: str) -> None:
    c = openai.OpenAI(base_url=f"{base}/v1", api_key=KEYS["acme"], max_retries=0, timeout=60)
    results: list[object] = []

    def call() -> None:
        try:
            results.append(c.chat.completions.create(
                **_chat(max_tokens=16), extra_headers={"x-request-id": "same-id"}))
        except openai.APIError as exc:
            results.append(exc)

    threads = [threading.Thread(target=call) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(results) == 3 and all(not isinstance(r, Exception) for r in results), results
    ids = {r.id for r in results}  # type: ignore[attr-defined]
    assert len(ids) == 3 and all(i.startswith("chatcmpl-") for i in ids)
