"""Where a fine-tuning job's training task runs: the placement policy (no Ray needed)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydantic import ValidationError

from deployments.config.tiered import TieredConfig
from deployments.state.jobs import Hyperparameters, StoredJob
from deployments.training.runner import placement_options
from deployments.training.waiting import in_the_way, node_types


def config(model_dir: Path, on_reservation: bool, **fine_tuning: object) -> TieredConfig:
    def dedicated(name: str) -> dict:
        return {
            "name": name,
            "tier": "dedicated",
            "dedicated": {
                "model": "tiny",
                "replica": {"node_type_resource": f"{name}_nodes"},
                "fine_tune_on_reservation": on_reservation,
            },
        }

    return TieredConfig.model_validate(
        {
            "models": [
                {
                    "name": "tiny",
                    "path": str(model_dir),
                    "shared_pool": {"node_type_resource": "shared_nodes"},
                }
            ],
            "tenants": [{"name": "globex"}, dedicated("acme"), dedicated("umbrella")],
            "fine_tuning": {"num_cpus": 2, **fine_tuning},
        }
    )


def job(tenant: str) -> StoredJob:
    return StoredJob(
        id="ftjob-1", tenant=tenant, model="tiny", training_file="file-1",
        validation_file=None, hyperparameters=Hyperparameters(1, 1, 1.0), suffix=None,
        seed=0, metadata=None, status="queued", created_at=datetime.now(UTC),
    )  # fmt: skip


def test_shared_pool_node_type_by_default_and_a_tenants_own_reservation_when_opted_in(
    tiny_model_dir: Path,
) -> None:
    shared = config(tiny_model_dir, on_reservation=False)
    for tenant in ("globex", "acme"):
        options = placement_options(shared, job(tenant))
        assert options["resources"] == {"shared_nodes": 0.001}
        assert (options["num_cpus"], options["num_gpus"], options["max_retries"]) == (2, 0, 0)
    own = config(tiny_model_dir, on_reservation=True)
    assert placement_options(own, job("acme"))["resources"] == {"acme_nodes": 0.001}
    assert placement_options(own, job("umbrella"))["resources"] == {"umbrella_nodes": 0.001}
    assert placement_options(own, job("globex"))["resources"] == {"shared_nodes": 0.001}
    pinned = config(tiny_model_dir, on_reservation=False, node_type_resource="train_nodes")
    assert placement_options(pinned, job("globex"))["resources"] == {"train_nodes": 0.001}


def test_training_on_a_reservation_needs_its_node_type(tiny_model_dir: Path) -> None:
    with pytest.raises(ValidationError, match="fine_tune_on_reservation needs"):
        TieredConfig.model_validate(
            {
                "models": [{"name": "tiny", "path": str(tiny_model_dir)}],
                "tenants": [
                    {"name": "acme", "tier": "dedicated",
                     "dedicated": {"model": "tiny", "fine_tune_on_reservation": True}},
                ],
            }
        )  # fmt: skip


def test_a_waiting_replica_stops_training_only_where_it_could_be_placed() -> None:
    replica = {"CPU": 2.0, "memory": 1e9, "node:10.0.0.1": 0.001, "accelerator_type:H100": 1}
    assert node_types(replica) == frozenset()  # Ray's own resources pin no node type
    assert node_types({**replica, "shared_nodes": 0.001}) == {"shared_nodes"}
    assert node_types({"CPU_group_0_abc": 1, "bundle_group_abc": 0.001}) == frozenset()
    assert in_the_way("shared_nodes", frozenset({"shared_nodes"}))
    assert in_the_way("shared_nodes", frozenset())  # an unpinned replica may go anywhere
    assert in_the_way(None, frozenset({"acme_nodes"}))  # unpinned training may be anywhere
    assert not in_the_way("shared_nodes", frozenset({"acme_nodes"}))
