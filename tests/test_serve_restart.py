"""`tiered serve` stopped under load and started again: the ledger has every request the
clients received (the stopping ingresses drain their records into it first), and the new
server's /admin/usage bills the same totals. Run as a user runs it: the CLI in its own
process with its own local Ray, stopped with Ctrl-C (SIGINT), on SQLite (what `make
serve` uses) and on a real PostgreSQL."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from deployments.tenancy.keys import hash_key
from tests.ledger_load import LoadClients, Tokens, ledger_rows
from tests.ports import free_port
from tests.postgres_server import PostgresServer
from tests.state_fixtures import postgres_server  # noqa: F401

MODEL = "tiny-llama"
KEY, ADMIN = "tk-restart-acme", "tk-restart-admin"
START_TIMEOUT_S = 240
STOP_TIMEOUT_S = 120


@pytest.fixture(params=["sqlite", "postgres"])
def state_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'tiered.db'}"
        return
    server: PostgresServer = request.getfixturevalue("postgres_server")
    yield server.create_database("serve_restart")
    server.drop_database("serve_restart")


class TieredServe:
    """`tiered serve --config ...` in a child process."""

    def __init__(self, config: Path, tmp_path: Path) -> None:
        self.port = free_port()
        self.root = f"http://127.0.0.1:{self.port}"
        self.log = tmp_path / f"serve-{self.port}.log"
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cli.main", "serve", "--config", str(config),
                 "--port", str(self.port), "--num-cpus", "4"],
                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=Path(__file__).parents[1],
            )

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert self.proc.poll() is None, f"exited: {self.log.read_text()[-3000:]}"
            try:
                up = httpx.get(f"{self.root}/health", timeout=5).status_code == 200
                if up and "Ctrl-C to stop" in self.log.read_text():
                    return
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"not up: {self.log.read_text()[-3000:]}"
            time.sleep(1)

    def interrupt(self) -> None:
        """Ctrl-C, and wait for it to finish shutting down."""
        self.proc.send_signal(signal.SIGINT)
        try:
            assert self.proc.wait(STOP_TIMEOUT_S) == 0, self.log.read_text()[-3000:]
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"no exit after Ctrl-C: {self.log.read_text()[-3000:]}") from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


def _write_config(tmp_path: Path, model_dir: Path, state_url: str) -> Path:
    config = tmp_path / "tiered.yaml"
    config.write_text(yaml.safe_dump({
        "models": [{"name": MODEL, "path": str(model_dir),
                    "engine": {"num_kv_blocks": 256, "max_num_seqs": 8},
                    "shared_pool": {"num_replicas": 1}}],
        "tenants": [{"name": "acme", "api_key_hashes": [hash_key(KEY)]}],
        "admin_key_hashes": [hash_key(ADMIN)],
        "ingress": {"num_replicas": 2},
        "state": {"url": state_url},
        "prices": {"tokens": [{"model": MODEL, "tier": "shared", "input_per_1m": 1.0,
                               "output_per_1m": 4.0}]},
    }))
    return config


def _rows(state_url: str) -> dict[str, tuple[Tokens, str]]:
    if state_url.startswith("postgresql"):
        return ledger_rows(state_url, "acme")
    path = state_url.removeprefix("sqlite+aiosqlite:///")
    with sqlite3.connect(path) as conn:
        got = conn.execute("SELECT request_id, prompt_tokens, cached_tokens, "
                           "completion_tokens, status FROM ledger").fetchall()
    return {r[0]: ((r[1], r[2], r[3]), r[4]) for r in got}


def _sdk(root: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{root}/v1", api_key=KEY, max_retries=0, timeout=60)


def _store_a_conversation(root: str) -> tuple[str, str, str]:
    """A stored response and a conversation with a turn in it: (response id, its text,
    conversation id)."""
    c = _sdk(root)
    resp = c.responses.create(model=MODEL, input="Remember this", max_output_tokens=6)
    conv = c.conversations.create(items=[{"role": "user", "content": "Ada"}])
    c.responses.create(model=MODEL, input="Name?", conversation=conv.id, max_output_tokens=4)
    return resp.id, resp.output_text, conv.id


def _continue_it(root: str, response_id: str, text: str, conv_id: str) -> str:
    """After the restart: both are still there, and both continue (the new turn's id)."""
    c = _sdk(root)
    assert c.responses.retrieve(response_id).output_text == text
    nxt = c.responses.create(model=MODEL, input="Go on", previous_response_id=response_id,
                             max_output_tokens=4)
    assert nxt.status in ("completed", "incomplete")
    roles = [i.role for i in c.conversations.items.list(conv_id, order="asc").data]
    assert roles == ["user", "user", "assistant"]
    return nxt.id


def test_usage_survives_serve_stopped_under_load_and_started_again(
    tmp_path: Path, tiny_model_dir: Path, state_url: str
) -> None:
    config = _write_config(tmp_path, tiny_model_dir, state_url)
    first = TieredServe(config, tmp_path)
    try:
        first.wait_ready()
        assert f"Usage ledger: {state_url}" in first.log.read_text()
        stored = _store_a_conversation(first.root)
        load = LoadClients(f"{first.root}/v1", KEY, MODEL)
        with load:
            load.wait_for(20)
            first.interrupt()  # while the clients are still sending
    finally:
        first.kill()
    received = dict(load.received)
    # Nothing runs any more that could replay a record: the ledger must be complete now.
    ok = {rid: t for rid, (t, status) in _rows(state_url).items()
          if status == "ok" and not rid.startswith("resp_")}  # the stored turns: not load
    assert ok == received, (len(ok), len(received), sorted(set(received) - set(ok))[:5])

    second = TieredServe(config, tmp_path)
    try:
        second.wait_ready()
        report = httpx.get(f"{second.root}/admin/usage", params={"start": "2000-01-01"},
                           headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30).json()
        last_turn = {_continue_it(second.root, *stored)}
    finally:
        second.interrupt()
        second.kill()
    rows = {rid: row for rid, row in _rows(state_url).items()
            if rid not in last_turn}  # written after the report was read
    assert report["totals"]["requests"] == len(rows)
    assert report["totals"]["prompt_tokens"] == sum(t[0] for t, _ in rows.values())
    assert report["totals"]["completion_tokens"] == sum(t[2] for t, _ in rows.values())
    print(f"\n{state_url.split(':')[0]}: {len(received)} received before Ctrl-C, "
          f"{len(rows)} ledger rows, outcomes {dict(load.outcomes)}")
