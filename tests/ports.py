"""Loopback ports for the servers tests start."""

from __future__ import annotations

import random
import socket

# Below the kernel's ephemeral range (32768-60999 here) and above Ray's worker ports
# (10002-19999). A port handed out by bind(0) is one the kernel will hand out again to the
# next bind(0), so between this pick and its use one of Ray's own processes can take it:
# a node's metrics agent then dies on "Address already in use" and the node never joins.
_RANGE = (20000, 32000)
_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback port free now, outside the ranges other processes pick from, never
    handed out twice in this process."""
    for _ in range(500):
        port = random.randint(*_RANGE)
        if port in _handed_out:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free loopback port in {_RANGE}")
