"""What the ingress sends a model-server replica, and what comes back per engine step."""

from __future__ import annotations

from dataclasses import dataclass

from deployments.tenancy.types import ServedUsage
from models.lora import LoRARequest
from models.outputs import RequestOutput
from models.sampling_params import SamplingParams


@dataclass(frozen=True)
class GenerateRequest:
    """One admitted request, already validated: the ingress checked the context length,
    the vocabulary range and the sampling parameters once."""

    request_id: str  # made by the ingress, never taken from a client header
    prompt: list[int]
    params: SamplingParams
    priority: int = 0  # the engine's band: the tenant's, or shared priority when spilled
    cache_salt: str | None = None  # the tenant: prefix-cache hits never cross tenants
    # The replica (`ServedOutput.replica_id`) that served this conversation's previous
    # turn: its KV cache holds the prefix, so the router prefers it unless it is gone or
    # saturated (deployments/replicas/affinity_router.py).
    affinity_replica: str | None = None
    # A stored conversation's turn: its KV blocks are evicted after ordinary requests'.
    retain: bool = False
    # The adapter to run with (loaded on demand, evicting the least recently used): the
    # router prefers a replica that already holds this name and version.
    lora: LoRARequest | None = None
    # The usage record the ingress will make, with no tokens yet: the replica fills in
    # what it produced and reports it to admission, which bills it only if the ingress
    # died before finishing the request (deployments.tenancy.types.ServedUsage).
    billing: ServedUsage | None = None
    # The ingress replica's actor name: if it dies mid-stream, the model server stops
    # the stream (deployments/replicas/caller_watch.py).
    caller: str | None = None


@dataclass
class ServedOutput:
    """One engine step's output for a request, stamped with the replica that produced it."""

    output: RequestOutput
    replica_id: str
