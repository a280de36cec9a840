"""The OpenAI API end to end: real Serve HTTP on loopback, the official openai SDK as client.

One Tiered app on the session's two-node Ray cluster: a shared pool of 1 replica, two
dedicated tenants (with and without spill), shared tenants with limits, 2 ingress replicas.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from ray import serve

from deployments.app import build_from_config
from deployments.config.tiered import TieredConfig
from deployments.state.config import state_dir
from deployments.tenancy.keys import hash_key
from tests.serve_helpers import admin_get, wait_for_usage, wait_until_replica_idle

KEYS = {
    t: f"tk-test-{t}"
    for t in (
        "acme", "stark", "globex", "initech", "limited", "metered", "single", "billed", "admin"
    )
}
REVOKED = "tk-test-revoked"
MODEL = "tiny-llama"


def _config(model_dir: Path) -> TieredConfig:
    engine = {"num_kv_blocks": 256, "max_num_seqs": 2, "max_num_batched_tokens": 512}

    def tenant(name: str, **kw: object) -> dict:
        return {"name": name, "api_key_hashes": [hash_key(KEYS[name])], **kw}

    dedicated = {"model": MODEL, "reserved_replicas": 1, "max_replicas": 1}
    return TieredConfig.model_validate(
        {
            "models": [
                {
                    "name": MODEL,
                    "path": str(model_dir),
                    "engine": engine,
                    "shared_pool": {"num_replicas": 1},
                },
                {
                    "name": "private-model",
                    "path": str(model_dir),
                    "engine": engine,
                    "shared_pool": {"num_replicas": 0},
                },
            ],
            "tenants": [
                tenant(
                    "acme", tier="dedicated", priority=1, dedicated={**dedicated, "spill": True}
                ),
                tenant("stark", tier="dedicated", dedicated={**dedicated, "spill": False}),
                tenant(
                    "globex",
                    models=[MODEL],
                    api_key_hashes=[hash_key(KEYS["globex"]), hash_key(REVOKED)],
                ),
                tenant("initech", models=[MODEL]),
                tenant("limited", rpm=20, models=[MODEL]),
                tenant("metered", tpm=400, models=[MODEL]),
                tenant("single", max_concurrency=1, models=[MODEL]),
                tenant("billed", models=[MODEL]),
            ],
            "admin_key_hashes": [hash_key(KEYS["admin"])],
            "revoked_key_hashes": [hash_key(REVOKED)],
            "dispatch": {"queue_deadline_s": 20},
            "ingress": {"num_replicas": 2, "max_body_bytes": 65536},
            "state": {"url": f"sqlite+aiosqlite:///{state_dir() / 'api.db'}"},
            "prices": {"tokens": [
                {"model": MODEL, "tier": "shared", "input_per_1m": 2.0, "output_per_1m": 8.0},
            ]},
        }
    )


@pytest.fixture(scope="module")
def base_url(ray_cluster, tiny_model_dir: Path) -> str:
    serve.run(build_from_config(_config(tiny_model_dir)), name="tiered", route_prefix="/")
    yield f"http://127.0.0.1:{ray_cluster.serve_port}/v1"
    serve.delete("tiered")


def client(base_url: str, tenant: str = "globex", **kw: object) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=base_url, api_key=KEYS.get(tenant, tenant), max_retries=0, timeout=60, **kw
    )


def chat(c: openai.OpenAI, **kw: object):
    args = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Hello there"}],
        "max_tokens": 8,
        **kw,
    }
    return c.chat.completions.with_raw_response.create(**args)


def test_chat_and_completions_sync_and_streaming(base_url: str) -> None:
    c = client(base_url)
    raw = chat(c, seed=1, temperature=0.7)
    resp = raw.parse()
    assert raw.headers["x-request-id"] and raw.headers["x-tiered-service-tier"] == "shared"
    assert resp.service_tier == "shared" and resp.choices[0].finish_reason in ("stop", "length")
    assert resp.usage.prompt_tokens > 0 and resp.usage.prompt_tokens_details.cached_tokens == 0
    again = chat(c, seed=1, temperature=0.7).parse()
    assert again.choices[0].message.content == resp.choices[0].message.content

    chunks = list(
        c.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
            temperature=0,
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert chunks[-2].choices[0].finish_reason == "length"

    comp = c.completions.create(
        model=MODEL, prompt="The lighthouse", max_tokens=5, temperature=0, logprobs=2, n=2
    )
    assert len(comp.choices) == 2 and comp.usage.completion_tokens == 10
    assert len(comp.choices[0].logprobs.tokens) == 5
    streamed = "".join(
        ch.choices[0].text
        for ch in c.completions.create(
            model=MODEL, prompt="The lighthouse", max_tokens=5, temperature=0, stream=True
        )
    )
    assert streamed == comp.choices[0].text

    models = [m.id for m in c.models.list().data]
    assert models == [MODEL]  # globex may not see private-model


def test_async_client_and_prefix_cache(base_url: str) -> None:
    async def main() -> list:
        ac = openai.AsyncOpenAI(base_url=base_url, api_key=KEYS["initech"], max_retries=0)
        long = "The quick brown fox jumps over the lazy dog. " * 12
        out = []
        for _ in range(2):
            out.append(
                await ac.chat.completions.create(
                    model=MODEL,
                    messages=[{"role": "user", "content": long}],
                    max_tokens=4,
                    temperature=0,
                )
            )
        stream = await ac.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "stream"}], max_tokens=3,
            stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )
        out.append([chunk async for chunk in stream])
        await ac.close()
        return out

    first, second, chunks = asyncio.run(main())
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens_details.cached_tokens > 0
    assert second.choices[0].message.content == first.choices[0].message.content
    # Three tokens, in one to three events: steps that come within ingress.stream_coalesce_ms
    # of each other share one (deployments/api/coalesce.py).
    events = sum(1 for ch in chunks if ch.choices and ch.choices[0].delta.content is not None)
    assert 1 <= events <= 3 and chunks[-1].usage.completion_tokens == 3


def test_sdk_exception_classes(base_url: str) -> None:
    with pytest.raises(openai.AuthenticationError):
        chat(client(base_url, "tk-not-a-key"))
    with pytest.raises(openai.AuthenticationError):
        chat(client(base_url, REVOKED))
    with pytest.raises(openai.PermissionDeniedError):
        chat(client(base_url), model="private-model")
    with pytest.raises(openai.NotFoundError):
        chat(client(base_url), model="no-such-model")
    with pytest.raises(openai.BadRequestError) as err:
        chat(client(base_url), tools=[{"type": "function", "function": {"name": "f"}}])
    assert err.value.body["param"] == "tools"
    with pytest.raises(openai.PermissionDeniedError):
        client(base_url).get("/../admin/usage", cast_to=object)


@pytest.mark.parametrize("trailing", [b"\xa0", b"\x85"])  # NBSP, NEL: str.strip() drops them
def test_a_key_with_trailing_unicode_space_is_refused(base_url: str, trailing: bytes) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
    key = KEYS["globex"].encode()
    for value, status in ((b"Bearer " + key + trailing, 401), (b"Bearer \t" + key, 200)):
        r = httpx.post(
            f"{base_url}/chat/completions", json=body, timeout=30,
            headers=[(b"Authorization", value)],
        )
        assert r.status_code == status, (value, r.text)


def _body(**fields: object) -> bytes:
    base = {"model": MODEL, "messages": [{"role": "user", "content": "x"}]}
    return json.dumps({**base, **fields}).encode()


BAD_BODIES = [
    (b"{not json", None),
    (_body(messages="hi"), "messages"),
    (_body(messages=[]), "messages"),
    (_body(messages=[{"role": "wizard", "content": "x"}]), "messages.0.role"),
    (_body(max_tokens="8"), "max_tokens"),
    (_body(max_tokens=100000), "messages"),
    (_body(temperature=-1), "temperature"),
    (_body(top_p=0), "top_p"),
    (_body(stop=[1]), "stop.0"),
    (_body(bogus=1), "bogus"),
    (_body(response_format={"type": "json_schema"}), "response_format"),
    (_body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]), None),
    (b"[1, 2]", None),
]


def test_token_ids_outside_the_vocabulary_are_a_400_and_hold_nothing(base_url: str) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client(base_url, "single").completions.create(
            model=MODEL, prompt=[1, 2, 10**9], max_tokens=2
        )
    assert err.value.body["param"] == "prompt" and "vocabulary" in err.value.body["message"]
    # the concurrency slot of `single` (max 1) was given back
    assert chat(client(base_url, "single"), max_tokens=1).parse().choices


@pytest.mark.parametrize(("body", "param"), BAD_BODIES)
def test_bad_input_gets_openai_4xx(base_url: str, body: bytes, param: str | None) -> None:
    r = httpx.post(
        f"{base_url}/chat/completions",
        content=body,
        timeout=30,
        headers={"Authorization": f"Bearer {KEYS['globex']}", "Content-Type": "application/json"},
    )
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] is not None and error["param"].startswith(param), error


def test_transport_errors_keep_the_format(base_url: str) -> None:
    auth = {"Authorization": f"Bearer {KEYS['globex']}"}
    big = httpx.post(f"{base_url}/chat/completions", content=b"x" * 70000, headers=auth)
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
    assert httpx.get(f"{base_url}/nowhere", headers=auth).status_code == 404
    wrong = httpx.get(f"{base_url}/chat/completions", headers=auth)
    assert wrong.status_code == 405 and "error" in wrong.json()
    missing = httpx.post(f"{base_url}/chat/completions", json={})
    assert missing.status_code == 401 and missing.json()["error"]["type"] == "authentication_error"


def _long_stream(base_url: str, tenant: str, tiers: list, started: threading.Semaphore) -> None:
    """Hold one slot of `tenant` for a while; signal once the first chunk arrived."""
    c = client(base_url, tenant)
    raw = c.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "go"}], max_tokens=600, stream=True
    )
    tiers.append(raw.headers["x-tiered-service-tier"])
    stream = raw.parse()
    next(iter(stream))
    started.release()
    for _ in stream:
        pass


def _saturate(pool, base_url: str, tenant: str, tiers: list) -> list:
    started = threading.Semaphore(0)
    futures = [pool.submit(_long_stream, base_url, tenant, tiers, started) for _ in range(2)]
    for _ in futures:
        assert started.acquire(timeout=60)
    return futures


def test_isolation_spill_and_no_spill(base_url: str) -> None:
    acme = [chat(client(base_url, "acme")) for _ in range(3)]
    shared = [chat(client(base_url, "globex")) for _ in range(3)]
    acme_replicas = {r.headers["x-tiered-replica"] for r in acme}
    shared_replicas = {r.headers["x-tiered-replica"] for r in shared}
    assert {r.headers["x-tiered-service-tier"] for r in acme} == {"dedicated"}
    assert {r.parse().service_tier for r in shared} == {"shared"}
    assert acme_replicas.isdisjoint(shared_replicas)
    # Saturate each private copy (capacity 2): acme spills to shared, stark is refused.
    tiers: list[str] = []
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        busy = _saturate(pool, base_url, "acme", tiers)
        spilled = chat(client(base_url, "acme"))
        busy += _saturate(pool, base_url, "stark", [])
        with pytest.raises(openai.RateLimitError) as refused:
            chat(client(base_url, "stark"))
        for f in busy:
            f.result(timeout=180)
    assert tiers == ["dedicated", "dedicated"]
    assert spilled.parse().service_tier == "shared"
    assert spilled.headers["x-tiered-replica"] in shared_replicas
    assert refused.value.body["code"] == "dedicated_capacity_exceeded"

    def acme_shared(report: dict) -> list[dict]:
        return [r for r in report["rows"] if r["key"]["tier"] == "shared"]

    report = wait_for_usage(
        base_url.removesuffix("/v1"), KEYS["admin"], lambda r: acme_shared(r),
        tenant="acme", group_by="tenant,tier",
    )
    (row,) = acme_shared(report)
    assert row["spill_requests"] == row["requests"] >= 1  # acme is shared only by spilling
    assert row["spill_tokens"] == row["total_tokens"] > 0


def test_rpm_holds_across_two_ingress_replicas(base_url: str) -> None:
    c = client(base_url, "limited")
    ingresses: set[str] = set()

    def one(_: int) -> int:
        try:
            raw = chat(c, max_tokens=1)
            ingresses.add(raw.headers["x-tiered-ingress"])
            return 200
        except openai.RateLimitError as exc:
            ingresses.add(exc.response.headers["x-tiered-ingress"])
            assert int(exc.response.headers["retry-after"]) >= 1
            assert int(exc.response.headers["retry-after-ms"]) > 0
            return 429

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        codes = list(pool.map(one, range(30)))
    assert len(ingresses) == 2  # both replicas answered, and still one window
    assert codes.count(200) == 20 and codes.count(429) == 10  # rpm=20, exact


def test_tpm_settles_real_usage_streaming_included(base_url: str) -> None:
    c = client(base_url, "metered")
    used = 0
    for i in range(100):
        try:
            if i % 2:
                stream = c.chat.completions.create(
                    model=MODEL,
                    messages=[{"role": "user", "content": "count"}],
                    max_tokens=8,
                    stream=True,
                    stream_options={"include_usage": True},
                )
                used += [ch for ch in stream][-1].usage.total_tokens
            else:
                used += chat(c).parse().usage.total_tokens
        except openai.RateLimitError as exc:
            assert exc.response.headers["x-ratelimit-limit-tokens"] == "400"
            break
    assert 0.95 * 400 <= used <= 400


def test_concurrency_slot_held_until_stream_closes(base_url: str) -> None:
    c = client(base_url, "single")
    stream = c.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "a"}], max_tokens=60, stream=True
    )
    next(iter(stream))
    with pytest.raises(openai.RateLimitError):
        chat(c)
    stream.close()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            chat(c)
            return
        except openai.RateLimitError:
            time.sleep(0.3)
    raise AssertionError("slot not released after the stream closed")


def test_heavy_tenant_cannot_starve_a_light_one(base_url: str) -> None:
    """globex queues 24 requests on a 2-seat pool; initech then sends 2. Fair share
    serves initech next, ahead of most of globex's backlog; FIFO would serve it last,
    after every queued globex request."""

    def done_at(tenant: str) -> float:
        chat(client(base_url, tenant), max_tokens=60)
        return time.monotonic()

    with concurrent.futures.ThreadPoolExecutor(26) as pool:
        heavy = [pool.submit(done_at, "globex") for _ in range(24)]
        deadline = time.monotonic() + 30
        while _queued(base_url) < 12:  # globex has a backlog in the fair queue
            assert time.monotonic() < deadline, "globex never queued"
            time.sleep(0.05)
        light = [pool.submit(done_at, "initech") for _ in range(2)]
        light_done = max(f.result(timeout=180) for f in light)
        heavy_done = [f.result(timeout=180) for f in heavy]
    served_after_light = sum(done > light_done for done in heavy_done)
    assert served_after_light >= 8, (served_after_light, light_done, sorted(heavy_done))


def _queued(base_url: str) -> int:
    snap = admin_get(base_url.removesuffix("/v1"), "/admin/state", KEYS["admin"])
    return snap["pools"][MODEL]["queued"]


def test_client_disconnect_aborts_the_engine_request(base_url: str) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "long"}],
        "max_tokens": 900,
        "stream": True,
    }
    headers = {"Authorization": f"Bearer {KEYS['initech']}"}
    with httpx.stream(
        "POST", f"{base_url}/chat/completions", json=body, headers=headers, timeout=60
    ) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                break  # leaving the block closes the connection mid-stream
    shared = serve.get_deployment_handle("shared-tiny-llama", app_name="tiered")
    wait_until_replica_idle(shared, "after a client disconnect")


async def _disconnect_at(base_url: str, tenant: str, stage: str) -> None:
    """One streamed request whose client goes away at `stage`: "queued" (before any
    byte), "first" (after the first chunk) or "done" (right after `[DONE]`)."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"bye {stage}"}],
        "max_tokens": 40,
        "stream": True,
    }
    headers = {"Authorization": f"Bearer {KEYS[tenant]}"}
    async with httpx.AsyncClient(timeout=60) as c:
        if stage == "queued":  # gone after 0.2 s, most likely still waiting for a seat
            with contextlib.suppress(httpx.ReadTimeout):
                await c.post(
                    f"{base_url}/chat/completions", json=body, headers=headers, timeout=0.2
                )
            return
        async with c.stream(
            "POST", f"{base_url}/chat/completions", json=body, headers=headers
        ) as response:
            async for line in response.aiter_lines():
                if stage == "first" and line.startswith("data: {"):
                    return
                if line == "data: [DONE]":
                    return


def _held(base_url: str) -> dict:
    snap = admin_get(base_url.removesuffix("/v1"), "/admin/state", KEYS["admin"])
    held = {f"pool:{k}": v["in_use"] + v["queued"] for k, v in snap["pools"].items()}
    return held | {f"dedicated:{k}": v["in_use"] for k, v in snap["dedicated"].items()}


def test_disconnects_at_any_stage_leave_no_slot_held(base_url: str) -> None:
    """Clients that leave while queued, mid-stream or right at [DONE] (dedicated, spilled
    and shared): every seat comes back. Ray cancels a cancelled request's child calls, so
    the release must not be one of them."""

    async def wave() -> None:
        jobs = [
            _disconnect_at(base_url, tenant, stage)
            for tenant in ("acme", "globex", "initech")
            for stage in ("done", "first", "queued", "done")
        ]
        await asyncio.gather(*jobs)

    for _ in range(2):
        asyncio.run(asyncio.wait_for(wave(), 120))
    deadline = time.monotonic() + 30
    held = _held(base_url)
    while time.monotonic() < deadline and any(held.values()):
        time.sleep(0.5)
        held = _held(base_url)
    assert not any(held.values()), f"seats still held after every client left: {held}"
    # and the pool still serves
    assert chat(client(base_url, "globex")).parse().choices[0].finish_reason == "length"


def test_admin_usage_is_the_priced_ledger_request_by_request(base_url: str) -> None:
    """What the clients were told they used is what the ledger bills, request by request;
    tenant keys get 403, bad query parameters a 400 naming the parameter."""
    root = base_url.removesuffix("/v1")
    c = client(base_url, "billed")
    told = [chat(c, max_tokens=3 + i).parse().usage for i in range(3)]
    prompt = sum(u.prompt_tokens for u in told)
    completion = sum(u.completion_tokens for u in told)
    report = wait_for_usage(
        root, KEYS["admin"], lambda r: r["totals"]["requests"] == 3, tenant="billed",
    )
    (row,) = report["rows"]
    assert row["key"] == {"tenant": "billed", "tier": "shared", "model": MODEL}
    assert (row["prompt_tokens"], row["completion_tokens"]) == (prompt, completion)
    assert row["cost"] == pytest.approx((prompt * 2.0 + completion * 8.0) / 1e6)
    by_day = admin_get(root, "/admin/usage", KEYS["admin"], tenant="billed", group_by="day")
    assert [r["requests"] for r in by_day["rows"]] == [3]
    for params, param in [
        ({"start": "yesterday"}, "start"),
        ({"group_by": "tenant,colour"}, "group_by"),
        ({"start": "2026-12-02", "end": "2026-12-01"}, "end"),
        ({"tenants": "billed"}, "tenants"),
    ]:
        bad = httpx.get(f"{root}/admin/usage", params=params,
                        headers={"Authorization": f"Bearer {KEYS['admin']}"}, timeout=30)
        assert bad.status_code == 400, bad.text
        assert bad.json()["error"]["param"] == param
    for path in ("/admin/usage", "/admin/state"):
        tenant = httpx.get(
            f"{root}{path}", headers={"Authorization": f"Bearer {KEYS['billed']}"}, timeout=30
        )
        assert tenant.status_code == 403 and tenant.json()["error"]["code"] == "forbidden"
        assert httpx.get(f"{root}{path}", timeout=30).status_code == 401
