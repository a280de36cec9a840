"""The stateful API end to end: OpenAI's Responses and Conversations through the official
openai SDK, real Serve HTTP on loopback, the state store on SQLite.

One Tiered app on the session's Ray cluster: a shared pool of 2 replicas (so KV affinity
has a choice to get right), one dedicated tenant, 2 ingress replicas (so a cancel may
reach a replica other than the one generating).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from ray import serve
from sqlalchemy import func, select

from deployments.app import build_from_config
from deployments.config.tiered import TieredConfig
from deployments.state.config import state_dir
from deployments.state.schema import ResponseRow
from deployments.tenancy.keys import hash_key
from tests.serve_helpers import wait_for_usage

MODEL = "tiny-llama"
BLOCK = 16  # the engine's default block_size: cached tokens come in whole blocks
KEYS = {t: f"tk-resp-{t}" for t in ("alice", "bob", "acme", "carol", "brief", "payer", "admin")}
PRICE = {"input_per_1m": 2.0, "cached_input_per_1m": 0.5, "output_per_1m": 8.0}


def _config(model_dir: Path) -> TieredConfig:
    def tenant(name: str, **kw: object) -> dict:
        return {"name": name, "api_key_hashes": [hash_key(KEYS[name])], **kw}

    return TieredConfig.model_validate({
        "models": [{
            "name": MODEL, "path": str(model_dir),
            "engine": {"num_kv_blocks": 512, "max_num_seqs": 4, "max_num_batched_tokens": 1024},
            "shared_pool": {"num_replicas": 2},
        }],
        "tenants": [
            tenant("alice"), tenant("bob"), tenant("carol"), tenant("payer"),
            tenant("acme", tier="dedicated",
                   dedicated={"model": MODEL, "reserved_replicas": 1, "max_replicas": 1}),
            # responses kept 1.5 s: expiry is visible within the test
            tenant("brief", retention={"responses_days": 1.5 / 86400}),
        ],
        "admin_key_hashes": [hash_key(KEYS["admin"])],
        "ingress": {"num_replicas": 2},
        "state": {"url": f"sqlite+aiosqlite:///{state_dir() / 'responses.db'}"},
        "prices": {"tokens": [{"model": MODEL, "tier": "shared", **PRICE}]},
    })


@pytest.fixture(scope="module")
def base_url(ray_cluster, tiny_model_dir: Path) -> Any:
    serve.run(build_from_config(_config(tiny_model_dir)), name="tiered", route_prefix="/")
    yield f"http://127.0.0.1:{ray_cluster.serve_port}/v1"
    serve.delete("tiered")


def client(base_url: str, tenant: str = "alice") -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key=KEYS[tenant], max_retries=0, timeout=60)


def create(c: openai.OpenAI, **kw: Any) -> tuple[Any, httpx.Headers]:
    raw = c.responses.with_raw_response.create(
        **{"model": MODEL, "max_output_tokens": 12, "temperature": 0, **kw}
    )
    return raw.parse(), raw.headers


def test_create_get_and_input_items(base_url: str) -> None:
    c = client(base_url)
    resp, headers = create(c, input="Hello there", instructions="Be brief.",
                           metadata={"case": "create"})
    assert resp.id.startswith("resp_") and resp.object == "response"
    assert resp.status in ("completed", "incomplete") and resp.service_tier == "shared"
    assert headers["x-tiered-service-tier"] == "shared" and headers["x-tiered-replica"]
    (message,) = resp.output
    assert message.type == "message" and message.role == "assistant"
    assert message.content[0].type == "output_text" and message.content[0].annotations == []
    assert resp.output_text == message.content[0].text
    usage = resp.usage
    assert usage.input_tokens > 0 and usage.output_tokens > 0
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.output_tokens_details.reasoning_tokens == 0
    assert resp.instructions == "Be brief." and resp.metadata == {"case": "create"}
    if resp.status == "incomplete":
        assert resp.incomplete_details.reason == "max_output_tokens"
        assert usage.output_tokens == 12

    stored = c.responses.retrieve(resp.id)
    assert stored.model_dump() == resp.model_dump()
    items = c.responses.input_items.list(resp.id)
    assert [(i.role, i.content[0].text) for i in items.data] == [("user", "Hello there")]
    assert items.first_id == items.data[0].id and items.has_more is False

    c.responses.delete(resp.id)
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(resp.id)


def test_a_five_turn_chain_reuses_the_replica_and_its_kv(base_url: str) -> None:
    """Each continuation reaches the replica that served the turn before, and every token
    of the history it holds (prompt and sampled reply, in whole blocks) is a cache hit."""
    c = client(base_url, "carol")
    resp, headers = create(c, input="Tell me about lighthouses and their keepers.")
    replica = headers["x-tiered-replica"]
    for turn in range(2, 6):
        prev_total = resp.usage.input_tokens + resp.usage.output_tokens
        resp, headers = create(c, input=f"And then, part {turn}?", previous_response_id=resp.id)
        assert headers["x-tiered-replica"] == replica, f"turn {turn} left its replica"
        assert resp.previous_response_id is not None
        cached = resp.usage.input_tokens_details.cached_tokens
        # The stored reply may have ended with an end-of-turn token the template re-adds.
        assert cached >= (prev_total - 1) // BLOCK * BLOCK, (turn, cached, prev_total)
        assert resp.usage.input_tokens > prev_total
    chain = c.responses.input_items.list(resp.id)
    assert [i.content[0].text for i in chain.data] == ["And then, part 5?"]


def test_streaming_both_ways(base_url: str) -> None:
    c = client(base_url)
    with c.responses.stream(model=MODEL, input="Stream please", max_output_tokens=10,
                            temperature=0) as stream:
        events = list(stream)
        # The SDK's get_final_response() wants response.completed; a turn cut by
        # max_output_tokens ends with response.incomplete, as at OpenAI.
        final = stream.get_final_response() if events[-1].type == "response.completed" \
            else events[-1].response
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    assert kinds[-4:-1] == ["response.output_text.done", "response.content_part.done",
                            "response.output_item.done"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == final.output_text and final.usage.output_tokens > 0
    assert c.responses.retrieve(final.id).output_text == final.output_text

    streamed = list(c.responses.create(model=MODEL, input="Stream please", stream=True,
                                       max_output_tokens=10, temperature=0))
    assert streamed[-1].response.output_text == final.output_text


def test_conversations_with_items(base_url: str) -> None:
    c = client(base_url)
    conv = c.conversations.create(
        items=[{"type": "message", "role": "user", "content": "My name is Ada."}],
        metadata={"topic": "names"},
    )
    assert conv.id.startswith("conv_") and conv.metadata == {"topic": "names"}
    first, _ = create(c, input="What is my name?", conversation=conv.id)
    second, _ = create(c, input="Say it again.", conversation=conv.id)
    assert second.usage.input_tokens_details.cached_tokens >= BLOCK
    items = c.conversations.items.list(conv.id, order="asc")
    texts = [(i.role, i.content[0].text) for i in items.data]
    assert texts == [
        ("user", "My name is Ada."), ("user", "What is my name?"),
        ("assistant", first.output_text), ("user", "Say it again."),
        ("assistant", second.output_text),
    ]
    page = c.conversations.items.list(conv.id, limit=2, order="asc")
    assert page.has_more and [i.id for i in page.data] == [i.id for i in items.data[:2]]
    rest = c.conversations.items.list(conv.id, after=page.last_id, order="asc")
    assert [i.id for i in rest.data] == [i.id for i in items.data[2:]]

    added = c.conversations.items.create(
        conv.id, items=[{"type": "message", "role": "user", "content": "Extra"}]
    )
    one = c.conversations.items.retrieve(added.data[0].id, conversation_id=conv.id)
    assert one.content[0].text == "Extra"
    c.conversations.items.delete(added.data[0].id, conversation_id=conv.id)
    with pytest.raises(openai.NotFoundError):
        c.conversations.items.retrieve(added.data[0].id, conversation_id=conv.id)
    updated = c.conversations.update(conv.id, metadata={"topic": "renamed"})
    assert c.conversations.retrieve(conv.id).metadata == updated.metadata == {"topic": "renamed"}
    assert c.conversations.delete(conv.id).deleted is True
    with pytest.raises(openai.NotFoundError):
        c.conversations.retrieve(conv.id)


def _error(call: Any) -> dict:
    with pytest.raises(openai.APIStatusError) as err:
        call()
    assert isinstance(err.value.body, dict)  # the SDK hands over the body's "error"
    return {"status": err.value.status_code, "error": err.value.body}


def test_another_tenants_ids_are_a_404_like_missing_ones(base_url: str) -> None:
    a, b = client(base_url, "alice"), client(base_url, "bob")
    resp, _ = create(a, input="secret")
    conv = a.conversations.create()
    missing_resp, missing_conv = "resp_" + "0" * 32, "conv_" + "0" * 32
    probes = [
        (lambda rid: b.responses.retrieve(rid), resp.id, missing_resp),
        (lambda rid: b.responses.delete(rid), resp.id, missing_resp),
        (lambda rid: b.responses.input_items.list(rid), resp.id, missing_resp),
        (lambda rid: b.responses.cancel(rid), resp.id, missing_resp),
        (lambda rid: create(b, input="x", previous_response_id=rid), resp.id, missing_resp),
        (lambda cid: b.conversations.retrieve(cid), conv.id, missing_conv),
        (lambda cid: b.conversations.items.list(cid), conv.id, missing_conv),
        (lambda cid: b.conversations.delete(cid), conv.id, missing_conv),
        (lambda cid: create(b, input="x", conversation=cid), conv.id, missing_conv),
    ]
    for call, foreign, missing in probes:
        theirs = _error(lambda call=call, foreign=foreign: call(foreign))
        nobodys = _error(lambda call=call, missing=missing: call(missing))
        assert theirs["status"] == nobodys["status"] == 404
        assert theirs["error"]["message"].replace(foreign, "ID") == \
            nobodys["error"]["message"].replace(missing, "ID")
    assert a.responses.retrieve(resp.id).id == resp.id  # still there for its owner
    assert a.conversations.retrieve(conv.id).id == conv.id


def _query(statement: Any) -> list[Any]:
    """Rows of the app's state store, read directly (what no OpenAI endpoint lists)."""
    from deployments.state.config import StateSpec
    from deployments.state.store import StateStore

    async def read() -> list[Any]:
        store = await StateStore.open(
            StateSpec(url=f"sqlite+aiosqlite:///{state_dir() / 'responses.db'}")
        )
        try:
            async with store.session() as session:
                return list((await session.execute(statement)).all())
        finally:
            await store.close()

    return asyncio.run(read())


def _count_stored(tenant: str) -> int:
    count = select(func.count()).select_from(ResponseRow).where(ResponseRow.tenant == tenant)
    return int(_query(count)[0][0])


def test_bad_input_is_a_4xx_and_stores_nothing(base_url: str) -> None:
    c = client(base_url, "bob")
    before = _count_stored("bob")
    conv = c.conversations.create()
    cases: list[tuple[dict[str, Any], str | None]] = [
        ({"input": "x", "previous_response_id": "resp_1", "conversation": conv.id},
         "previous_response_id"),
        ({"input": "x", "tools": [{"type": "function", "name": "f", "parameters": {}}]},
         "tools"),
        ({"input": "x", "reasoning": {"effort": "high"}}, "reasoning"),
        ({"input": [{"role": "user", "content": [
            {"type": "input_image", "image_url": "http://x/y.png", "detail": "auto"}]}]},
         "input[0].content[0]"),
        ({"input": [{"type": "function_call_output", "call_id": "c", "output": "o"}]},
         "input[0]"),
        ({"input": [{"type": "telepathy", "text": "x"}]}, "input[0].type"),
        ({"input": "x", "metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
        ({"input": "x", "metadata": {"k": "v" * 513}}, "metadata"),
        ({"input": "x" * 20000}, "input"),
    ]
    for body, param in cases:
        error = _error(lambda body=body: create(c, **body))
        assert 400 <= error["status"] < 500 and error["status"] != 404, (body, error)
        assert error["error"]["param"] == param, (body, error)
    assert _count_stored("bob") == before  # conversations are not responses


def test_a_chain_past_the_context_and_a_deleted_link(base_url: str) -> None:
    c = client(base_url, "bob")
    long = "lighthouse keeper " * 300  # ~600 tokens a turn, the context is 2048
    r1, _ = create(c, input=long)
    r2, _ = create(c, input=long, previous_response_id=r1.id)
    r3, _ = create(c, input=long, previous_response_id=r2.id)
    error = _error(lambda: create(c, input=long, previous_response_id=r3.id))
    assert error["status"] == 400 and error["error"]["code"] == "context_length_exceeded"

    c.responses.delete(r2.id)
    broken = _error(lambda: create(c, input="x", previous_response_id=r3.id))
    assert broken["status"] == 400 and r2.id in broken["error"]["message"]
    assert broken["error"]["param"] == "previous_response_id"
    assert create(c, input="x", previous_response_id=r1.id)[0].status != "failed"


def test_store_false_stores_nothing(base_url: str) -> None:
    c = client(base_url)
    resp, _ = create(c, input="forget me", store=False)
    assert resp.store is False
    assert _error(lambda: c.responses.retrieve(resp.id))["status"] == 404
    assert _error(lambda: create(c, input="x", previous_response_id=resp.id))["status"] == 404


def test_dedicated_tenant_is_served_dedicated(base_url: str) -> None:
    resp, headers = create(client(base_url, "acme"), input="Hello")
    assert resp.service_tier == "dedicated" and headers["x-tiered-service-tier"] == "dedicated"


def test_cancel_a_response_in_progress(base_url: str) -> None:
    """A cancel that may reach either ingress replica stops the generation; the finished
    response reads back cancelled, and cancelling a finished one is a 400."""
    c = client(base_url)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(lambda: c.responses.create(
            model=MODEL, input="Count slowly", max_output_tokens=1500, temperature=0,
        ))
        rid = _in_progress_id("alice")
        assert c.responses.cancel(rid).status == "cancelled"
        done = running.result(timeout=60)
    assert done.status == "cancelled" and done.usage.output_tokens < 1500
    assert c.responses.retrieve(rid).status == "cancelled"
    finished, _ = create(c, input="quick")
    assert _error(lambda: c.responses.cancel(finished.id))["status"] == 400


def _in_progress_id(tenant: str, timeout_s: float = 30.0) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        rows = _query(select(ResponseRow.id).where(
            ResponseRow.tenant == tenant, ResponseRow.status == "in_progress"))
        if rows:
            return rows[0][0]
        time.sleep(0.1)
    raise AssertionError("no response went in progress")


def test_expired_responses_are_gone(base_url: str) -> None:
    c = client(base_url, "brief")
    resp, _ = create(c, input="short-lived")
    assert c.responses.retrieve(resp.id).id == resp.id
    time.sleep(2.0)
    assert _error(lambda: c.responses.retrieve(resp.id))["status"] == 404


def test_cached_input_is_billed_at_its_own_price(base_url: str) -> None:
    c = client(base_url, "payer")
    root = base_url.removesuffix("/v1")
    resp, _ = create(c, input="Billing check, a first turn.")
    resp, _ = create(c, input="And a second.", previous_response_id=resp.id)
    assert resp.usage.input_tokens_details.cached_tokens > 0

    report = wait_for_usage(
        root, KEYS["admin"], lambda r: r["totals"]["requests"] == 2, tenant="payer"
    )
    (row,) = report["rows"]
    assert row["cached_tokens"] > 0
    expected = ((row["prompt_tokens"] - row["cached_tokens"]) * PRICE["input_per_1m"]
                + row["cached_tokens"] * PRICE["cached_input_per_1m"]
                + row["completion_tokens"] * PRICE["output_per_1m"]) / 1e6
    assert row["cost"] == pytest.approx(expected)
