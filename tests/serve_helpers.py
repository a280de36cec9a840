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
