"""The model/replica schema and its checks, with no Ray running: every bad configuration
fails with a message that names the field, before anything could be scheduled."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from deployments.config.models import (
    ConfigError,
    ModelSpec,
    ReplicaSpec,
    validate_against_checkpoint,
    validate_against_cluster,
)
from deployments.config.resources import replica_bundles
from deployments.replicas.placement import replica_actor_options, worker_actor_options

GPU_NODES = [{"CPU": 8, "GPU": 4}, {"CPU": 8, "GPU": 4}]
WHERE = "models[0].shared_pool"


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    """Just the config.json the checks read: 8 query heads, 2 KV heads."""
    config = {"num_attention_heads": 8, "num_key_value_heads": 2, "intermediate_size": 688}
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def _loc(exc: pytest.ExceptionInfo[ValidationError]) -> tuple:
    return exc.value.errors()[0]["loc"]


def test_yaml_round_trip_and_defaults() -> None:
    text = """
    name: tiny-llama
    path: default:tiny
    engine: {dtype: bfloat16, max_num_seqs: 8, kv_cache_memory_mb: 64}
    shared_pool:
      tp_size: 2
      placement_strategy: SPREAD
      node_type_resource: pool_shared
      num_replicas: 3
      drain_timeout_s: 5
    """
    spec = ModelSpec.model_validate(yaml.safe_load(text))
    assert spec.engine.dtype == "bfloat16" and spec.shared_pool.tp_size == 2
    assert spec.shared_pool.placement_strategy == "SPREAD"
    assert ReplicaSpec().placement_strategy == "PACK"
    validate_against_checkpoint(spec)  # 2 divides tiny's 8 heads and 4 KV heads


@pytest.mark.parametrize(
    ("data", "loc"),
    [
        ({"name": "m", "engine": {"dtype": "float8"}}, ("engine", "dtype")),
        ({"name": "m", "engine": {"device": "tpu"}}, ("engine", "device")),
        ({"name": "m", "shared_pool": {"tp_size": 0}}, ("shared_pool", "tp_size")),
        (
            {"name": "m", "shared_pool": {"placement_strategy": "RANDOM"}},
            ("shared_pool", "placement_strategy"),
        ),
        ({"name": "m", "shared_pool": {"tp": 2}}, ("shared_pool", "tp")),
        ({"name": "m", "engine": {"max_num_seqs": 0}}, ("engine", "max_num_seqs")),
        ({"name": "bad name!"}, ("name",)),
    ],
)
def test_schema_errors_name_the_field(data: dict, loc: tuple) -> None:
    with pytest.raises(ValidationError) as exc:
        ModelSpec.model_validate(data)
    assert _loc(exc) == loc
    assert ".".join(map(str, loc)) in str(exc.value).replace("\n", ".")


def test_cpu_affinity_is_one_set_per_rank() -> None:
    with pytest.raises(ValidationError, match="cpu_affinity has 1 CPU sets but tp_size is 2"):
        ReplicaSpec(tp_size=2, cpu_affinity=[[0]])
    with pytest.raises(ValidationError, match="non-empty set"):
        ReplicaSpec(tp_size=2, cpu_affinity=[[0], []])


def test_tp_must_divide_heads(ckpt: Path) -> None:
    spec = ModelSpec(name="m", path=str(ckpt))
    with pytest.raises(ConfigError) as exc:
        validate_against_checkpoint(spec, ReplicaSpec(tp_size=3), WHERE)
    assert (
        str(exc.value) == "models[0].shared_pool.tp_size: 3 does not divide num_attention_heads=8"
    )
    with pytest.raises(ConfigError, match=r"tp_size: 4 does not divide num_key_value_heads=2"):
        validate_against_checkpoint(spec, ReplicaSpec(tp_size=4), WHERE)
    validate_against_checkpoint(spec, ReplicaSpec(tp_size=2), WHERE)
    bad_default = ModelSpec(name="m", shared_pool={"tp_size": 3})
    with pytest.raises(ConfigError, match=r"^shared_pool\.tp_size: 3 does not divide"):
        validate_against_checkpoint(bad_default)  # the shared pool by default


def test_missing_or_unknown_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"models\[0\]\.shared_pool\.path: no config.json"):
        validate_against_checkpoint(ModelSpec(name="m", path=str(tmp_path)), None, WHERE)
    with pytest.raises(ConfigError, match=r"path: unknown default model 'default:huge'"):
        validate_against_checkpoint(ModelSpec(name="m", path="default:huge"))


def test_bundles_must_match_the_device(ckpt: Path) -> None:
    gpu = ModelSpec(name="g", path=str(ckpt), engine={"device": "cuda"})
    with pytest.raises(
        ConfigError, match=r"bundle_resources: device is cuda, so every rank needs GPU"
    ):
        validate_against_checkpoint(gpu, ReplicaSpec(bundle_resources={"CPU": 4}), WHERE)
    cpu = ModelSpec(name="c", path=str(ckpt))
    with pytest.raises(ConfigError, match=r"bundle_resources: device is cpu but each rank asks"):
        validate_against_checkpoint(cpu, ReplicaSpec(bundle_resources={"GPU": 1}), WHERE)


def test_bundles_per_rank() -> None:
    cpu, gpu = ModelSpec(name="c"), ModelSpec(name="g", engine={"device": "cuda"})
    assert replica_bundles(cpu, ReplicaSpec(tp_size=2)) == [{"CPU": 1.0}, {"CPU": 1.0}]
    bundles = replica_bundles(gpu, ReplicaSpec(tp_size=2, node_type_resource="acme"))
    # the replica actor (rank 0) brings its own CPU into bundle 0; GPU bundles carry none
    assert bundles == [{"GPU": 1.0, "CPU": 1.0, "acme": 0.01}, {"GPU": 1.0, "acme": 0.01}]
    assert replica_actor_options(bundles[0]) == {"num_cpus": 1.0, "num_gpus": 1.0}
    assert worker_actor_options(bundles[1]) == {"num_cpus": 0.0, "num_gpus": 1.0}
    wide = replica_bundles(cpu, ReplicaSpec(bundle_resources={"CPU": 2}))
    assert wide == [{"CPU": 2}] and replica_actor_options(wide[0]) == {"num_cpus": 2}


def test_engine_config_per_rank() -> None:
    spec = ModelSpec(name="c", engine={"max_num_seqs": 4})
    replica = ReplicaSpec(tp_size=2, cpu_affinity=[[0], [1]], bundle_resources={"CPU": 2})
    ranks = [spec.engine_config(replica, r, "/ckpt") for r in (0, 1)]
    assert [c.cpu_affinity for c in ranks] == [[0], [1]]
    assert all(c.tp_size == 2 and c.max_num_seqs == 4 and c.model == "/ckpt" for c in ranks)
    assert ranks[0].num_threads == 2  # one torch thread per reserved CPU by default
    pinned = replica.model_copy(update={"num_threads": 1})
    assert spec.engine_config(pinned, 0, "/ckpt").num_threads == 1


@pytest.mark.parametrize(
    ("replica", "message"),
    [
        (
            {"tp_size": 8, "placement_strategy": "STRICT_PACK"},
            r"^models\[0\]\.shared_pool\.tp_size: tp_size=8: STRICT_PACK needs \{CPU: 1, GPU: 8\} "
            r"on one node",
        ),
        (
            {"tp_size": 16},
            r"shared_pool\.tp_size: tp_size=16: a replica needs \{GPU: 16\} in all; "
            r"the cluster has \{CPU: 16, GPU: 8\}",
        ),
        (
            {"tp_size": 4, "placement_strategy": "STRICT_SPREAD"},
            r"shared_pool\.placement_strategy: tp_size=4: STRICT_SPREAD needs 4 nodes",
        ),
        (
            {"bundle_resources": {"GPU": 8}},
            r"shared_pool\.bundle_resources: a rank needs 8 GPU but the largest node has 4",
        ),
        (
            {"node_type_resource": "acme_nodes"},
            r"shared_pool\.node_type_resource: no node provides 'acme_nodes'",
        ),
    ],
)
def test_replica_must_fit_the_cluster(replica: dict, message: str) -> None:
    gpu = ModelSpec(name="g", engine={"device": "cuda"})
    with pytest.raises(ConfigError, match=message):
        validate_against_cluster(gpu, GPU_NODES, ReplicaSpec(**replica), WHERE)


def test_replicas_that_fit() -> None:
    gpu = ModelSpec(name="g", engine={"device": "cuda"})
    for replica in (
        ReplicaSpec(tp_size=4, placement_strategy="STRICT_PACK"),
        ReplicaSpec(tp_size=8),  # PACK is best effort: 8 GPUs over two 4-GPU nodes
        ReplicaSpec(tp_size=2, placement_strategy="STRICT_SPREAD"),
    ):
        validate_against_cluster(gpu, GPU_NODES, replica, WHERE)
    validate_against_cluster(gpu, [], ReplicaSpec(tp_size=64), WHERE)  # no nodes: no check


def test_node_type_resource_narrows_the_nodes() -> None:
    """Only nodes of the pinned type count: 4 GPUs there, however many elsewhere."""
    gpu = ModelSpec(name="g", engine={"device": "cuda"})
    nodes = [{"CPU": 8, "GPU": 8}, {"CPU": 8, "GPU": 4, "acme": 1}]
    validate_against_cluster(gpu, nodes, ReplicaSpec(tp_size=4, node_type_resource="acme"), WHERE)
    with pytest.raises(
        ConfigError, match=r"needs \{GPU: 8\} in all; the cluster has \{CPU: 8, GPU: 4, acme: 1\}"
    ):
        validate_against_cluster(
            gpu, nodes, ReplicaSpec(tp_size=8, node_type_resource="acme"), WHERE
        )


def test_cpu_replica_cross_node() -> None:
    cpu = ModelSpec(name="c")
    nodes = [{"CPU": 2}, {"CPU": 2}]
    validate_against_cluster(cpu, nodes, ReplicaSpec(tp_size=2, placement_strategy="SPREAD"))
    with pytest.raises(
        ConfigError, match=r"^replica\.tp_size: tp_size=2: STRICT_PACK needs \{CPU: 4\}"
    ):
        validate_against_cluster(
            cpu,
            nodes,
            ReplicaSpec(tp_size=2, bundle_resources={"CPU": 2}, placement_strategy="STRICT_PACK"),
        )


def test_deployment_builder_refuses_bad_config_without_touching_ray() -> None:
    import ray

    from deployments.replicas.model_server import model_server_deployment

    started = ray.is_initialized()
    spec = ModelSpec(name="m", path="default:tiny")  # a shape known without opening a file
    with pytest.raises(ConfigError, match=r"^shared-m\.tp_size: 3 does not divide"):
        model_server_deployment(spec, ReplicaSpec(tp_size=3), "shared-m")
    with pytest.raises(ConfigError, match=r"^shared-m\.tp_size: tp_size=2: a replica needs"):
        model_server_deployment(spec, ReplicaSpec(tp_size=2), "shared-m", nodes=[{"CPU": 1}])
    assert ray.is_initialized() == started


def test_the_embedded_default_config_loads_without_a_path() -> None:
    """`make serve` runs `tiered serve` with no --config: the default must be found."""
    from deployments.config.tiered import DEFAULT_CONFIG, load_config

    assert DEFAULT_CONFIG.is_file(), DEFAULT_CONFIG
    config = load_config(checkpoints=False)
    assert [t.name for t in config.tenants if t.dedicated] == ["acme"]
