"""Load shedding (deployments.api.load_shedding) on a real FastAPI app through httpx.

The lag is real: a route that blocks the event loop, as a flood's per-request work would
(a long prompt's tokenization no longer does: it runs off the loop, which
tests/test_ingress_hygiene.py shows on a real ingress). This module pins the rules (what
is shed, for how long, with which answer) without Ray.
"""

from __future__ import annotations

import asyncio
import time

import httpx
from fastapi import FastAPI

from deployments.api.errors import install_error_handlers, set_body_limit
from deployments.api.load_shedding import HOLD_S, LoadShedding, set_shed_deadline

DEADLINE_S = 0.15  # far above a loaded box's timer noise, far below the block


def _app(deadline_s: float) -> FastAPI:
    app = FastAPI(title=f"shed-test-{deadline_s}")
    install_error_handlers(app)
    app.add_middleware(LoadShedding, key=app.title)
    set_body_limit(app, 65536)
    set_shed_deadline(app, deadline_s)

    @app.post("/v1/echo")
    async def echo() -> dict:
        return {"ok": True}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": []}

    @app.post("/v1/block")
    async def block() -> dict:
        time.sleep(0.6)  # the loop does nothing else meanwhile
        return {"blocked": True}

    return app


async def _session(app: FastAPI) -> dict[str, httpx.Response]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        out = {"before": await c.post("/v1/echo")}
        await asyncio.sleep(0.1)  # the monitor ticks on time
        out["calm"] = await c.post("/v1/echo")
        out["block"] = await c.post("/v1/block")
        out["lagging"] = await c.post("/v1/echo")
        out["lagging_get"] = await c.get("/v1/models")
        await asyncio.sleep(HOLD_S + 0.3)
        out["after"] = await c.post("/v1/echo")
        for _ in range(20):  # a loaded box may lag a tick past the deadline once more
            if out["after"].status_code == 200:
                break
            await asyncio.sleep(0.25)
            out["after"] = await c.post("/v1/echo")
    return out


def test_a_lagging_loop_sheds_new_requests_with_retry_after() -> None:
    out = asyncio.run(_session(_app(DEADLINE_S)))
    assert [out[k].status_code for k in ("before", "calm", "block")] == [200, 200, 200]
    shed = out["lagging"]
    assert shed.status_code == 503
    assert shed.headers["retry-after"] == "1" and shed.headers["retry-after-ms"] == "1000"
    assert shed.json() == {
        "error": {
            "message": "The server is overloaded; retry shortly.",
            "type": "service_unavailable",
            "param": None,
            "code": "server_overloaded",
        }
    }
    assert out["lagging_get"].status_code == 200  # reads and health are never shed
    assert out["after"].status_code == 200  # the loop is on time again: served


def test_a_zero_deadline_never_sheds() -> None:
    out = asyncio.run(_session(_app(0.0)))
    assert {k: r.status_code for k, r in out.items()} == dict.fromkeys(out, 200)
