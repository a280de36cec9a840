"""Pydantic schema for models and their replica deployments (the `models:` part of the YAML).

Validation happens at load, before anything is scheduled: shape errors against the
checkpoint (TP must split the heads) and resource errors against the cluster's nodes.
Messages name the field, e.g. `models[0].shared_pool.tp_size`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from deployments.config.resources import pack_on_nodes, rank_resources, replica_bundles
from models.default_model import SHAPES
from models.engine_config import EngineConfig

# Rendered into Serve configs by name: the policy must stay importable at this path.
POLICY_PATH = "deployments.autoscaling:llm_pool_policy"
PlacementStrategy = Literal["PACK", "STRICT_PACK", "SPREAD", "STRICT_SPREAD"]
# What clients send as "model": a base model's name or an adapter's.
ModelId = Annotated[str, StringConstraints(min_length=1, pattern=r"^[A-Za-z0-9._:/-]+$")]


class ConfigError(ValueError):
    """A configuration problem found before scheduling; the message names the field."""


class EngineSpec(BaseModel):
    """Engine settings shared by every deployment of a model."""

    model_config = ConfigDict(extra="forbid")

    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: Literal["cpu", "cuda"] = "cpu"
    block_size: int = Field(16, ge=1, le=256)
    num_kv_blocks: int | None = Field(None, ge=2)
    kv_cache_memory_mb: int = Field(256, ge=1)
    max_num_seqs: int = Field(32, ge=1)
    max_num_batched_tokens: int = Field(2048, ge=16)
    max_model_len: int | None = Field(None, ge=16)
    enable_prefix_caching: bool = True
    # LoRA on by default, so an adapter can be hot-loaded without a redeploy.
    max_loras: int = Field(4, ge=0, description="LoRA adapter slots per replica (0 = off).")
    max_lora_rank: int = Field(16, ge=1, description="Largest adapter rank accepted.")
    max_cpu_loras: int | None = Field(
        None, ge=1, description="Adapters kept in CPU memory (LRU); the engine's default."
    )
    collective_timeout_s: float = Field(
        120.0, gt=0, description="How long a TP rank waits in one collective before failing."
    )


class AdapterSpec(BaseModel):
    """A PEFT LoRA adapter on a model, registered in the state store at start (adapters
    hot-loaded through the API live only there)."""

    model_config = ConfigDict(extra="forbid")

    name: ModelId
    path: str = Field(
        min_length=1, description="A directory or an fsspec URI (file://, s3://, gs://)."
    )
    tenants: list[str] = Field(
        default_factory=list, description="Tenants that may use it; empty = all the base's."
    )


class AutoscalingSpec(BaseModel):
    """Bounds, delays and targets for one deployment's replica count."""

    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    upscale_delay_s: float = Field(10.0, ge=0)
    downscale_delay_s: float = Field(60.0, ge=0)
    metrics_interval_s: float = Field(2.0, gt=0)
    target_kv_usage: float = Field(0.75, gt=0, le=1)
    target_seq_usage: float = Field(0.8, gt=0, le=1)
    target_waiting_per_replica: float = Field(1.0, gt=0)
    target_queue_wait_s: float = Field(
        2.0, gt=0, description="Mean fair-queue wait, while requests queue, to hold at."
    )

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas={self.min_replicas} exceeds max_replicas={self.max_replicas}"
            )
        return self

    def serve_config(self, pool: str = "") -> dict[str, Any]:
        """Serve's `autoscaling_config`, with this module's policy and targets; `pool` labels
        the decisions in the `tiered_pool_replicas` metric."""
        return {
            "min_replicas": self.min_replicas,
            "max_replicas": self.max_replicas,
            "initial_replicas": self.min_replicas,
            "upscale_delay_s": self.upscale_delay_s,
            "downscale_delay_s": self.downscale_delay_s,
            "metrics_interval_s": self.metrics_interval_s,
            "look_back_period_s": max(2 * self.metrics_interval_s, 1.0),
            "policy": {
                "policy_function": POLICY_PATH,
                "policy_kwargs": {"targets": self.targets(), "pool": pool},
            },
        }

    def targets(self) -> dict[str, float]:
        return {
            "kv_usage": self.target_kv_usage,
            "seq_usage": self.target_seq_usage,
            "waiting_per_replica": self.target_waiting_per_replica,
            "queue_wait_s": self.target_queue_wait_s,
        }


class ReplicaSpec(BaseModel):
    """How one deployment's replicas are shaped and placed."""

    model_config = ConfigDict(extra="forbid")

    tp_size: int = Field(1, ge=1)
    placement_strategy: PlacementStrategy = "PACK"
    bundle_resources: dict[str, float] | None = Field(
        None, description="Per-rank bundle; default {CPU: 1} on CPU, {GPU: 1} on CUDA."
    )
    node_type_resource: str | None = Field(
        None, description="Custom resource that pins replicas to one node type."
    )
    num_replicas: int = Field(1, ge=0)
    max_ongoing_requests: int = Field(64, ge=1)
    cpu_affinity: list[list[int]] | None = Field(None, description="CPU set per rank (CPU).")
    num_threads: int | None = Field(None, ge=1)
    drain_timeout_s: float = Field(10.0, ge=0)
    stall_timeout_s: float = Field(30.0, gt=0)
    health_check_period_s: float = Field(2.0, gt=0)
    autoscaling: AutoscalingSpec | None = Field(
        None, description="Scale on LLM signals between bounds; replaces num_replicas."
    )
    price_per_replica_hour: float = Field(
        0.0, ge=0, description="Cost of one replica-hour, for the cost metrics and dashboards."
    )

    @model_validator(mode="after")
    def _affinity_per_rank(self) -> ReplicaSpec:
        if self.cpu_affinity is not None:
            if len(self.cpu_affinity) != self.tp_size:
                raise ValueError(
                    f"cpu_affinity has {len(self.cpu_affinity)} CPU sets but tp_size is "
                    f"{self.tp_size}"
                )
            if any(not cpus or min(cpus) < 0 for cpus in self.cpu_affinity):
                raise ValueError("cpu_affinity: every rank needs a non-empty set of CPU ids >= 0")
        return self


class ModelSpec(BaseModel):
    """One served model: its checkpoint, engine settings and shared-pool deployment."""

    model_config = ConfigDict(extra="forbid")

    name: ModelId
    path: str = Field(
        "default:tiny",
        min_length=1,
        description="default:tiny|small, a checkpoint directory on the replicas' nodes, or "
        "an fsspec URI of one (s3://, gs://), which each node copies into its cache.",
    )
    tokenizer: str | None = Field(
        None,
        min_length=1,
        description="A directory or fsspec URI holding only the tokenizer files "
        "(tokenizer.json, tokenizer_config.json, config.json) for the ingress; "
        "default: the ingress asks the model's replicas for them.",
    )
    engine: EngineSpec = EngineSpec()
    shared_pool: ReplicaSpec = ReplicaSpec()
    adapters: list[AdapterSpec] = []

    def engine_config(self, replica: ReplicaSpec, rank: int, model_dir: str) -> EngineConfig:
        """The EngineConfig one rank of one replica runs with."""
        threads = replica.num_threads
        if threads is None and self.engine.device == "cpu":
            # One torch thread per reserved CPU, so TP ranks on one box do not oversubscribe.
            threads = max(1, int(rank_resources(self, replica).get("CPU", 1)))
        return EngineConfig(
            model=model_dir,
            tp_size=replica.tp_size,
            cpu_affinity=replica.cpu_affinity[rank] if replica.cpu_affinity else None,
            num_threads=threads,
            served_model_name=self.name,
            **self.engine.model_dump(),
        )


def initial_replicas(replica: ReplicaSpec) -> int:
    """Replicas a deployment starts with (its autoscaling floor, if it scales)."""
    return replica.autoscaling.min_replicas if replica.autoscaling else replica.num_replicas


def checkpoint_shape(path: str) -> dict[str, int] | None:
    """Head counts of a checkpoint, without building it; None if it cannot be read here."""
    if path.startswith("default:"):
        return SHAPES.get(path.split(":", 1)[1])
    config = Path(path).expanduser() / "config.json"
    if not config.is_file():
        return None
    raw = json.loads(config.read_text())
    heads = raw.get("num_attention_heads", 0)
    return {
        "num_attention_heads": heads,
        "num_key_value_heads": raw.get("num_key_value_heads") or heads,
        "intermediate_size": raw.get("intermediate_size", 0),
    }


def local_adapter_dir(path: str) -> Path | None:
    """The directory of an adapter path on this machine; None for a remote URI (s3://,
    gs://, ...), which only the replicas read."""
    scheme, sep, rest = path.partition("://")
    if sep and scheme not in ("file", "local"):
        return None
    return Path(rest if sep else path).expanduser()


def validate_adapters(spec: ModelSpec, where: str) -> None:
    """A local adapter path must hold PEFT's adapter_config.json (its weights and rank are
    checked by the replica that loads it)."""
    for i, adapter in enumerate(spec.adapters):
        local = local_adapter_dir(adapter.path)
        if local is not None and not (local / "adapter_config.json").is_file():
            raise ConfigError(
                f"{where}.adapters[{i}].path: no adapter_config.json at {adapter.path!r}"
            )


def _target(
    spec: ModelSpec, replica: ReplicaSpec | None, where: str | None
) -> tuple[ReplicaSpec, str]:
    """The replica to check (the shared pool's by default) and its field path."""
    if replica is None:
        return spec.shared_pool, where or "shared_pool"
    return replica, where or "replica"


def validate_against_checkpoint(
    spec: ModelSpec, replica: ReplicaSpec | None = None, where: str | None = None
) -> None:
    """Static checks against the checkpoint's config.json (read here: on the replica's
    node, where the weights are): TP must split the heads and the MLP evenly, and each
    rank's bundle must hold the device it runs on. `where` prefixes the field."""
    replica, where = _target(spec, replica, where)
    _check_default_name(spec, where)
    shape = checkpoint_shape(spec.path)
    if shape is None:
        raise ConfigError(f"{where}.path: no config.json at {spec.path!r}")
    _check_shape(shape, replica, where)
    _check_devices(spec, replica, where)


def validate_without_checkpoint(
    spec: ModelSpec, replica: ReplicaSpec | None = None, where: str | None = None
) -> None:
    """What the app builder checks where the weights are not (a cluster's head): the
    devices, and the shape of an embedded default model, which needs no file. The rest
    is validate_against_checkpoint's, in each replica."""
    replica, where = _target(spec, replica, where)
    _check_default_name(spec, where)
    if spec.path.startswith("default:"):
        _check_shape(SHAPES[spec.path.split(":", 1)[1]], replica, where)
    _check_devices(spec, replica, where)


def _check_default_name(spec: ModelSpec, where: str) -> None:
    if spec.path.startswith("default:") and spec.path.split(":", 1)[1] not in SHAPES:
        raise ConfigError(f"{where}.path: unknown default model {spec.path!r}")


def _check_shape(shape: dict[str, int], replica: ReplicaSpec, where: str) -> None:
    for key in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        if shape[key] % replica.tp_size:
            raise ConfigError(
                f"{where}.tp_size: {replica.tp_size} does not divide {key}={shape[key]}"
            )


def _check_devices(spec: ModelSpec, replica: ReplicaSpec, where: str) -> None:
    gpus = rank_resources(spec, replica).get("GPU", 0.0)
    if spec.engine.device == "cuda" and gpus < 1:
        raise ConfigError(
            f"{where}.bundle_resources: device is cuda, so every rank needs GPU >= 1 (has {gpus:g})"
        )
    if spec.engine.device == "cpu" and gpus > 0:
        raise ConfigError(f"{where}.bundle_resources: device is cpu but each rank asks for GPU")


def validate_against_cluster(
    spec: ModelSpec,
    nodes: list[dict[str, float]],
    replica: ReplicaSpec | None = None,
    where: str | None = None,
) -> None:
    """One replica must fit the nodes (each node's total resources) under its strategy."""
    replica, where = _target(spec, replica, where)
    if not nodes:
        return
    if replica.node_type_resource and not any(replica.node_type_resource in n for n in nodes):
        raise ConfigError(
            f"{where}.node_type_resource: no node provides {replica.node_type_resource!r}"
        )
    if replica.node_type_resource:
        nodes = [n for n in nodes if replica.node_type_resource in n]
    bundles = replica_bundles(spec, replica)
    for name, amount in rank_resources(spec, replica).items():
        biggest = max(n.get(name, 0.0) for n in nodes)
        if biggest < amount:
            raise ConfigError(
                f"{where}.bundle_resources: a rank needs {amount:g} {name} but the largest "
                f"node has {biggest:g}"
            )
    problem = pack_on_nodes(bundles, nodes, replica.placement_strategy)
    if problem:
        field = "placement_strategy" if replica.placement_strategy == "STRICT_SPREAD" else "tp_size"
        raise ConfigError(f"{where}.{field}: tp_size={replica.tp_size}: {problem}")
