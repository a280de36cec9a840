"""Load for the ledger fault tests: openai-SDK clients that remember, per response id,
the usage they were told; and the ledger rows read straight from PostgreSQL to compare.

A request counts as received only when the client got all of it: a body, or a stream
through its usage chunk. Anything else (a 503, a connection cut by a dying ingress) is
an attempt the client was not given, and may be billed only with a non-ok status.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx
import openai
import psycopg

Tokens = tuple[int, int, int]  # prompt, cached, completion


@dataclass
class LoadClients:
    base_url: str  # ends in /v1
    api_key: str
    model: str
    threads: int = 3
    received: dict[str, Tokens] = field(default_factory=dict)
    outcomes: Counter[str] = field(default_factory=Counter)
    _stop: threading.Event = field(default_factory=threading.Event)
    _workers: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __enter__(self) -> LoadClients:
        for i in range(self.threads):
            worker = threading.Thread(target=self._run, args=(i,), daemon=True)
            worker.start()
            self._workers.append(worker)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self, timeout_s: float = 90.0) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join(timeout_s)
        assert not any(w.is_alive() for w in self._workers), "a client hung"

    def wait_for(self, count: int, timeout_s: float = 60.0) -> None:
        """Until `count` more requests were received than now."""
        target = len(self.received) + count
        deadline = time.monotonic() + timeout_s
        while len(self.received) < target:
            assert time.monotonic() < deadline, (len(self.received), dict(self.outcomes))
            time.sleep(0.1)

    def _run(self, index: int) -> None:
        client = openai.OpenAI(base_url=self.base_url, api_key=self.api_key, max_retries=0,
                               timeout=60)
        n = 0
        while not self._stop.is_set():
            n += 1
            stream = (index + n) % 2 == 0
            try:
                request_id, tokens = self._one(client, stream, f"load {index} {n}")
            except openai.APIStatusError as exc:
                self._outcome(f"http {exc.status_code}")
                time.sleep(0.2)
                continue
            except (openai.APIConnectionError, httpx.HTTPError) as exc:
                self._outcome(type(exc).__name__)
                time.sleep(0.2)
                continue
            with self._lock:
                assert request_id not in self.received, f"response id {request_id} twice"
                self.received[request_id] = tokens
            self._outcome("ok")

    def _outcome(self, what: str) -> None:
        with self._lock:
            self.outcomes[what] += 1

    def _one(self, client: openai.OpenAI, stream: bool, text: str) -> tuple[str, Tokens]:
        args = {"model": self.model, "messages": [{"role": "user", "content": text}],
                "max_tokens": 6}
        if not stream:
            resp = client.chat.completions.create(**args)  # type: ignore[call-overload]
            return resp.id, _tokens(resp.usage)
        chunks = list(client.chat.completions.create(  # type: ignore[call-overload]
            **args, stream=True, stream_options={"include_usage": True}))
        if not chunks or chunks[-1].usage is None:  # cut before the usage chunk
            raise httpx.RemoteProtocolError("stream ended before its usage")
        return chunks[0].id, _tokens(chunks[-1].usage)


def _tokens(usage: object) -> Tokens:
    details = getattr(usage, "prompt_tokens_details", None)
    cached = getattr(details, "cached_tokens", 0) or 0
    return usage.prompt_tokens, cached, usage.completion_tokens  # type: ignore[attr-defined]


def ledger_rows(url: str, tenant: str) -> dict[str, tuple[Tokens, str]]:
    """request id -> ((prompt, cached, completion), status), straight from the table."""
    dsn = url.replace("postgresql+psycopg://", "postgresql://", 1)
    with psycopg.connect(dsn, connect_timeout=10) as conn:
        rows = conn.execute(
            "SELECT request_id, prompt_tokens, cached_tokens, completion_tokens, status "
            "FROM ledger WHERE tenant = %s", (tenant,)).fetchall()
    return {r[0]: ((r[1], r[2], r[3]), r[4]) for r in rows}


def assert_ledger_matches(url: str, tenant: str, received: dict[str, Tokens],
                          timeout_s: float = 90.0) -> dict[str, tuple[Tokens, str]]:
    """Wait until the ledger's ok rows are exactly what the clients received, request by
    request; rows of other statuses are for attempts no client received."""
    deadline = time.monotonic() + timeout_s
    while True:
        rows = ledger_rows(url, tenant)
        ok = {rid: tokens for rid, (tokens, status) in rows.items() if status == "ok"}
        if ok == received:
            break
        if time.monotonic() > deadline:
            missing = sorted(set(received) - set(ok))[:5]
            extra = sorted(set(ok) - set(received))[:5]
            wrong = [r for r in received if r in ok and ok[r] != received[r]][:5]
            raise AssertionError(
                f"ledger != received after {timeout_s:g}s: {len(received)} received, "
                f"{len(ok)} ok rows; missing {missing}, extra {extra}, different {wrong}")
        time.sleep(0.5)
    return rows
