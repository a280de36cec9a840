"""Helpers for tests that talk to model-server replicas through Serve handles."""

from __future__ import annotations

import time


def wait_until_replica_idle(handle, what: str, timeout_s: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    """Poll the replica's stats until nothing runs and no KV block is held."""
    deadline = time.monotonic() + timeout_s
    stats: dict = {}
    while time.monotonic() < deadline:
        stats = handle.stats.remote().result(timeout_s=30)
        if stats["num_running"] == 0 and stats["kv_blocks_used"] == 0:
            return
        time.sleep(0.2)
    raise AssertionError(f"{what}: replica still busy after {timeout_s}s: {stats}")


def admin_get(base: str, path: str, admin_key: str, **params: str) -> dict:
    """GET an admin endpoint (base: the server root, no /v1); asserts a 200."""
    import httpx

    resp = httpx.get(
        f"{base}{path}", params=params, headers={"Authorization": f"Bearer {admin_key}"},
        timeout=30,
    )
    assert resp.status_code == 200, resp.text
    return resp.json()


def wait_for_usage(  # type: ignore[no-untyped-def]
    base: str, admin_key: str, done, timeout_s: float = 30.0, **params: str
) -> dict:
    """Poll GET /admin/usage until `done(report)` holds: the ledger is written off the
    request path, a moment after the response."""
    deadline = time.monotonic() + timeout_s
    while True:
        report = admin_get(base, "/admin/usage", admin_key, **params)
        if done(report):
            return report
        if time.monotonic() > deadline:
            raise AssertionError(f"ledger never reached the expected usage: {report}")
        time.sleep(0.2)
