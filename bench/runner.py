"""Drive a scenario against endpoints: phases, arrivals, conversations, a concurrency cap.

Everything runs on one asyncio loop. Each phase starts its loads at its start time:
open-loop loads sleep to each scheduled offset and start a request (or a conversation)
without waiting for the previous one; closed-loop loads run `concurrency` clients back to
back. A request belongs to the phase whose load sent it (a conversation's later turns
too). After the last phase, requests still in flight get `drain_s` to finish; the rest are
cancelled and recorded as such. Every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import httpx
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from bench.arrivals import schedule
from bench.client import RequestRecord, request_body, stream_request
from bench.prompts import PromptFactory, load_tokenizer
from bench.scenario import Load, Scenario, TenantLoad

LEAD_S = 0.2  # the schedule starts this long after setup, so the first arrivals are on time


@dataclass
class RunResult:
    scenario: Scenario
    endpoints: dict[str, str]
    t0: float  # perf_counter() at the start of the first phase
    started_at: str
    records: list[RequestRecord] = field(default_factory=list)
    finished: float = 0.0  # perf_counter() when the last request ended
    samples: list[dict] = field(default_factory=list)  # replica counts of a watched target

    def rel(self, t: float) -> float:
        return t - self.t0


@dataclass
class _Segment:
    phase: str
    load: Load
    start: float  # perf_counter() seconds
    end: float


def _active(segment: _Segment, client: int, sent: int) -> bool:
    """Whether closed-loop client number `client` sends in this segment."""
    load = segment.load
    return client < (load.concurrency or 0) and sent < (load.max_requests or float("inf"))


@dataclass
class _Tenant:
    name: str
    spec: TenantLoad
    url: str
    key: str
    model: str
    prompts: PromptFactory
    rng: random.Random


class Runner:
    """One run of one scenario; `run()` returns every request's record."""

    def __init__(
        self,
        scenario: Scenario,
        endpoints: dict[str, str],
        *,
        tokenizer: str | None = None,
        progress: bool = True,
        console: Console | None = None,
    ) -> None:
        self.scenario = scenario
        self.endpoints = endpoints
        self.console = console or Console()
        self.show_progress = progress
        missing = {t.endpoint for t in scenario.tenants.values()} - endpoints.keys()
        if missing:
            raise ValueError(
                f"scenario {scenario.name!r} needs endpoint(s) {sorted(missing)}; "
                f"have {sorted(endpoints)} (give --endpoint NAME=URL)"
            )
        tok = load_tokenizer(tokenizer or scenario.tokenizer)
        self.tenants = {
            name: _Tenant(
                name=name,
                spec=spec,
                url=endpoints[spec.endpoint],
                key=spec.api_key(),
                model=spec.model or scenario.model,
                prompts=PromptFactory(f"{scenario.seed}:{name}:prompts", tok),
                rng=random.Random(f"{scenario.seed}:{name}:lengths"),
            )
            for name, spec in scenario.tenants.items()
        }
        self.records: list[RequestRecord] = []
        self.in_flight = 0
        self._conversations = 0
        self._cap = (
            asyncio.Semaphore(scenario.max_concurrency) if scenario.max_concurrency else None
        )

    # ---- one request, one conversation --------------------------------------------
    async def _request(
        self, client: httpx.AsyncClient, tenant: _Tenant, phase: str,
        prompt: str | list[dict[str, str]], max_tokens: int, turn: int = 1,
        conversation: int | None = None, keep: bool = True,
        previous: RequestRecord | None = None,
    ) -> RequestRecord:
        """One request; `previous` is the conversation's previous turn (its response id
        is continued with api: responses, its replica and tokens are recorded)."""
        spec = tenant.spec
        body = request_body(
            spec.api, tenant.model, prompt, max_tokens, ignore_eos=spec.ignore_eos,
            temperature=spec.temperature, service_tier=spec.service_tier,
            previous_response_id=previous.response_id if previous else None,
        )
        record = RequestRecord(tenant.name, phase, 0.0, turn=turn, conversation=conversation)
        if previous is not None:
            record.previous_replica = previous.replica
            if previous.prompt_tokens is not None:
                record.reusable_tokens = previous.prompt_tokens + previous.output_tokens
        if self._cap is not None:
            await self._cap.acquire()
        self.in_flight += 1
        try:
            await stream_request(client, tenant.url, tenant.key, body, record, spec.api)
        except asyncio.CancelledError:
            record.error, record.end = "cancelled: past the drain deadline", time.perf_counter()
            raise
        finally:
            self.in_flight -= 1
            if self._cap is not None:
                self._cap.release()
            if keep:
                self.records.append(record)
        return record

    async def _unit(self, client: httpx.AsyncClient, tenant: _Tenant, phase: str) -> None:
        """One arrival: a single request, or a whole conversation turn after turn."""
        spec, rng = tenant.spec, tenant.rng
        first = tenant.prompts.text(spec.prompt_tokens.sample(rng))
        if spec.conversation is None:
            prompt = spec.first_input(first)
            await self._request(client, tenant, phase, prompt, spec.output_tokens.sample(rng))
            return
        self._conversations += 1
        conv, messages = self._conversations, [{"role": "user", "content": first}]
        previous: RequestRecord | None = None
        for turn in range(1, spec.conversation.turns + 1):
            # chat resends the whole history; responses sends the new message only
            new = messages if spec.api == "chat" or previous is None else messages[-1:]
            record = await self._request(
                client, tenant, phase, list(new), spec.output_tokens.sample(rng),
                turn=turn, conversation=conv, previous=previous,
            )
            if not record.ok or (spec.api == "responses" and record.response_id is None):
                return
            previous = record
            messages.append({"role": "assistant", "content": record.text})
            text = tenant.prompts.text(spec.conversation.turn_tokens.sample(rng))
            messages.append({"role": "user", "content": text})
            await asyncio.sleep(spec.conversation.think_time_s)

    # ---- loads -----------------------------------------------------------------------
    async def _open_loop(
        self, client: httpx.AsyncClient, tenant: _Tenant, phase: str, load: Load,
        start: float, duration: float, units: set[asyncio.Task],
    ) -> None:
        rng = random.Random(f"{self.scenario.seed}:{tenant.name}:{phase}:arrivals")
        for offset in schedule(load, duration, rng):
            delay = start + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(self._unit(client, tenant, phase))
            units.add(task)
            task.add_done_callback(units.discard)

    async def _closed_loop(
        self, client: httpx.AsyncClient, tenant: _Tenant, segments: list[_Segment]
    ) -> None:
        """Closed-loop clients across consecutive phases: client i runs while the current
        phase's concurrency exceeds i, so a tenant keeps N requests outstanding from one
        phase to the next instead of piling a new set of clients on the old one's tail.
        Each request is labelled with the phase it was sent in."""
        sent: dict[str, int] = {}

        def segment_at(now: float) -> _Segment | None:
            return next((g for g in segments if g.start <= now < g.end), None)

        async def user(i: int) -> None:
            while True:
                now = time.perf_counter()
                seg = segment_at(now)
                if seg is None or not _active(seg, i, sent.get(seg.phase, 0)):
                    later = [g.start for g in segments if g.start > now and _active(g, i, 0)]
                    if not later:
                        return
                    await asyncio.sleep(min(later) - now)
                    continue
                sent[seg.phase] = sent.get(seg.phase, 0) + 1
                await self._unit(client, tenant, seg.phase)
                if seg.load.think_time_s:
                    await asyncio.sleep(seg.load.think_time_s)

        clients = max(g.load.concurrency or 0 for g in segments)
        await asyncio.sleep(max(0.0, segments[0].start - time.perf_counter()))
        await asyncio.gather(*(user(i) for i in range(clients)))

    async def _warmup(self, client: httpx.AsyncClient) -> None:
        for tenant in self.tenants.values():
            for _ in range(self.scenario.warmup_requests):
                prompt = tenant.spec.first_input(tenant.prompts.text(16))
                r = await self._request(client, tenant, "warmup", prompt, 4, keep=False)
                if not r.ok:
                    self.console.print(f"[yellow]warm-up of {tenant.name} failed: {r.error}")

    # ---- the run ---------------------------------------------------------------------
    async def run(self, start_gate: Callable[[], object] | None = None) -> RunResult:
        """`start_gate`: a blocking call made after the warm-up, before the first phase
        (runners in several processes start their phases together: bench.split_clients)."""
        scenario = self.scenario
        timeout = httpx.Timeout(scenario.request_timeout_s, connect=10.0)
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=512)
        async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
            await asyncio.wait_for(self._warmup(client), scenario.request_timeout_s * 2 + 30)
            if start_gate is not None:
                await asyncio.to_thread(start_gate)
            t0 = time.perf_counter() + LEAD_S
            result = RunResult(
                scenario, self.endpoints, t0, datetime.now(UTC).isoformat(timespec="seconds")
            )
            units: set[asyncio.Task] = set()
            loads: list[asyncio.Task] = []
            closed: dict[str, list[_Segment]] = {}
            for phase, (name, start, end) in zip(
                scenario.phases, scenario.phase_windows(), strict=True
            ):
                for tenant_name, load in scenario.phase_loads(phase).items():
                    tenant = self.tenants[tenant_name]
                    if load.concurrency is None:
                        coro = self._open_loop(
                            client, tenant, name, load, t0 + start, end - start, units
                        )
                        loads.append(asyncio.create_task(coro))
                    else:
                        segment = _Segment(name, load, t0 + start, t0 + end)
                        closed.setdefault(tenant_name, []).append(segment)
            for tenant_name, segments in closed.items():
                coro = self._closed_loop(client, self.tenants[tenant_name], segments)
                loads.append(asyncio.create_task(coro))
            ticker = asyncio.create_task(self._progress(t0))
            deadline = t0 + scenario.duration_s + scenario.drain_s
            try:
                await asyncio.wait(loads, timeout=max(0.0, deadline - time.perf_counter()))
                # Trailing phases without load (an idle phase to watch a scale-down) still run.
                await asyncio.sleep(max(0.0, t0 + scenario.duration_s - time.perf_counter()))
                if units:
                    await asyncio.wait(
                        set(units), timeout=max(0.0, deadline - time.perf_counter())
                    )
            finally:
                leftover = [t for t in [*loads, *units] if not t.done()]
                for task in leftover:
                    task.cancel()
                await asyncio.gather(*leftover, return_exceptions=True)
                ticker.cancel()
                await asyncio.gather(ticker, return_exceptions=True)
        result.records = sorted(self.records, key=lambda r: r.send)
        result.finished = max((r.end for r in self.records), default=t0)
        return result

    async def _progress(self, t0: float) -> None:
        scenario = self.scenario
        windows = scenario.phase_windows()
        columns = [
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[stats]}"),
        ]
        with Progress(*columns, console=self.console, disable=not self.show_progress) as bar:
            task = bar.add_task(scenario.name, total=scenario.duration_s, stats="")
            while True:
                now = time.perf_counter() - t0
                phase = next((n for n, a, b in windows if a <= now < b), "draining")
                failed = sum(not r.ok for r in self.records)
                stats = (
                    f"{phase} · done {len(self.records) - failed} · errors {failed} · "
                    f"in flight {self.in_flight}"
                )
                bar.update(task, completed=min(max(now, 0.0), scenario.duration_s), stats=stats)
                await asyncio.sleep(0.25)
