"""The load a fault runs under: closed-loop streaming clients per tenant (bench.client's
`stream_request`, the load generator `tiered bench` uses), some of which disconnect
mid-stream or mid-queue. Every request has a deadline; one that outlives it is hung.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import httpx

from bench.client import RequestRecord, request_body, stream_request

PROMPT = "Tell me a long story about lighthouses and the keepers who ran them."


@dataclass(frozen=True)
class TenantLoad:
    """Who sends, how many clients back to back, and how many tokens each asks for."""

    name: str
    key: str
    clients: int = 2
    max_tokens: int = 48
    disconnect_every: int = 0  # every Nth request of a client is dropped by the client
    bad_every: int = 0  # every Nth request of a client is invalid (the API must say 400)


@dataclass
class ChaosRecord:
    """One request of the load, with when it was sent relative to the fault."""

    record: RequestRecord
    disconnected: str | None = None  # "mid_stream" / "mid_queue" when the client left
    bad: bool = False  # sent invalid on purpose
    hung: bool = False


@dataclass
class ChaosLoad:
    """Runs until `stop()`; `records` grows as requests end."""

    base_url: str  # …/v1
    model: str
    tenants: list[TenantLoad]
    deadline_s: float = 60.0
    records: list[ChaosRecord] = field(default_factory=list)
    in_flight: dict[int, RequestRecord] = field(default_factory=dict)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task] = field(default_factory=list)

    def start(self) -> None:
        client = httpx.AsyncClient(
            timeout=httpx.Timeout(self.deadline_s, connect=10.0),
            limits=httpx.Limits(max_connections=None),
        )
        self._client = client
        for tenant in self.tenants:
            for i in range(tenant.clients):
                self._tasks.append(asyncio.create_task(self._user(tenant, i)))

    async def stop(self) -> None:
        """Stop sending; wait (bounded by the request deadline) for what is in flight."""
        self._stop.set()
        done, pending = await asyncio.wait(self._tasks, timeout=self.deadline_s + 10)
        for task in pending:  # cannot happen while every request has its own deadline
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._client.aclose()
        for task in done:
            task.result()  # a bug in the load itself surfaces here

    async def _user(self, tenant: TenantLoad, index: int) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            how = None
            if tenant.disconnect_every and n % tenant.disconnect_every == 0:
                how = "mid_stream" if n % 2 else "mid_queue"
            bad = bool(tenant.bad_every) and n % tenant.bad_every == 0
            await self.one(tenant, how, bad)
            if self.records and self.records[-1].record.status not in (0, 200):
                await asyncio.sleep(0.2)  # a 429/503 asks the client to come back later

    async def one(self, tenant: TenantLoad, disconnect: str | None = None,
                  bad: bool = False) -> ChaosRecord:
        """One streamed request; `disconnect` drops it after its first chunk (mid_stream)
        or before any (mid_queue); `bad` sends a temperature the API must refuse."""
        body = request_body("chat", self.model, [{"role": "user", "content": PROMPT}],
                            tenant.max_tokens)
        body["logprobs"] = True  # one entry per token: what a cut stream received, exactly
        if bad:
            body["temperature"] = -1
        record = RequestRecord(tenant.name, "chaos", 0.0)
        out = ChaosRecord(record, bad=bad)
        work = asyncio.create_task(
            stream_request(self._client, self.base_url, tenant.key, body, record)
        )
        self.in_flight[id(record)] = record
        try:
            if disconnect is None:
                await asyncio.wait_for(asyncio.shield(work), self.deadline_s)
            else:
                await self._drop(work, record, disconnect)
                out.disconnected = disconnect
        except TimeoutError:
            out.hung = True
            record.error = f"hung: no end within {self.deadline_s:.0f}s"
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
        finally:
            self.in_flight.pop(id(record), None)
        self.records.append(out)
        return out

    async def _drop(self, work: asyncio.Task, record: RequestRecord, how: str) -> None:
        deadline = time.perf_counter() + self.deadline_s
        if how == "mid_stream":
            while not record.chunks and not work.done():
                if time.perf_counter() > deadline:
                    raise TimeoutError
                await asyncio.sleep(0.01)
        else:
            await asyncio.sleep(0.05)  # sent, and most likely queued behind the load
        work.cancel()
        await asyncio.gather(work, return_exceptions=True)
        record.end = time.perf_counter()
        record.error = record.error or f"disconnected: {how}"
