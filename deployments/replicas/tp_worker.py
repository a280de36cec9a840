"""Ranks 1..N-1 of a tensor-parallel replica: Ray actors in the replica's own bundles.

Each worker joins the replica's process group and follows rank 0's steps until told to
stop. The actor is threaded so that `ping` answers while `run` is busy; the replica owns
these actors, so when Serve kills the replica they die with it.
"""

from __future__ import annotations

import os
import socket

import ray

from models.engine_config import EngineConfig


@ray.remote(max_concurrency=4)  # type: ignore[call-overload]  # stub lacks max_concurrency
class TPWorker:
    def __init__(self, rank: int) -> None:
        self.rank = rank

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def ping(self) -> int:
        return self.rank

    def pid(self) -> int:
        """The OS process, for tests that freeze a rank to simulate a hang."""
        return os.getpid()

    def run(self, config: EngineConfig, world_size: int, init_method: str) -> int:
        """Join the group and serve steps; returns the rank when rank 0 shuts down."""
        from models.default_model import resolve_model_path
        from models.runner import run_worker
        from models.tp import init_parallel

        # `config.model` as written in the Tiered config: this node's copy of it.
        config = config.model_copy(update={"model": str(resolve_model_path(config.model))})
        parallel = init_parallel(
            self.rank, world_size, init_method, config.device, config.collective_timeout_s
        )
        run_worker(config, parallel)
        return self.rank


def rendezvous_address() -> str:
    """tcp:// address on this node (rank 0's) with a port that is free right now."""
    ip = ray.util.get_node_ip_address()
    with socket.socket() as sock:
        sock.bind((ip, 0))
        port = sock.getsockname()[1]
    return f"tcp://{ip}:{port}"
