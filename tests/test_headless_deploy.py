"""A cluster's head has no weights: the app builder (run by `serve deploy` and KubeRay on
the head) and the ingress never open a checkpoint directory. The ingress gets tokenizer
files from a model-server replica or a named artifact; each replica resolves its
checkpoint on its own node (a local path, or an fsspec URI fetched into the node's cache)
and checks it there, failing with the field named when it is missing."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import httpx
import pytest
import yaml
from ray import serve

from deployments.api.prompts import ServedModel
from deployments.api.tokenizers import load_served_models, read_artifact, tokenizer_source
from deployments.app import build
from deployments.config.models import ConfigError, ModelSpec, ReplicaSpec
from deployments.config.tiered import TieredConfig
from deployments.replicas.model_server import local_checkpoint
from deployments.tenancy.keys import hash_key
from models.checkpoint_fetch import CheckpointFetchError, cached_checkpoint_dir
from models.default_model import resolve_model_path
from models.tokenizer import TOKENIZER_FILES, tokenizer_files

NOWHERE = "/nonexistent/tiered/Llama-3-8B"
KEY = "tk-headless"


def tiered(path: str, **model: object) -> dict:
    return {
        "models": [{"name": "m", "path": path, "engine": {"kv_cache_memory_mb": 16,
                    "max_num_seqs": 4}, "shared_pool": {"num_replicas": 1}, **model}],
        "tenants": [
            {"name": "globex", "api_key_hashes": [hash_key(KEY)]},
            {"name": "acme", "tier": "dedicated", "dedicated": {"model": "m"}},
        ],
        "ingress": {"num_replicas": 1},
    }  # fmt: skip


def test_the_build_step_never_opens_the_checkpoint(tmp_path: Path) -> None:
    """No checkpoint here at all, or one whose shape the replica will refuse: the builder
    binds the app either way (it cannot tell, and must not try)."""
    assert isinstance(build({"tiered": tiered(NOWHERE)}), serve.Application)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text('{"num_attention_heads": 3}')
    data = tiered(str(bad), shared_pool={"num_replicas": 1, "tp_size": 2})
    (tmp_path / "tiered.yaml").write_text(yaml.safe_dump(data))
    assert isinstance(build({"config": str(tmp_path / "tiered.yaml")}), serve.Application)
    with pytest.raises(ConfigError, match=r"args\.tiered: models\[0\]\.namez"):  # still strict
        build({"tiered": {**tiered(NOWHERE), "models": [{"name": "m", "namez": 1}]}})
    with pytest.raises(ConfigError, match=r"^models\[0\]\.shared_pool\.tp_size: 3 does not"):
        build({"tiered": tiered("default:tiny", shared_pool={"tp_size": 3})})  # no file needed


def test_a_replica_checks_its_checkpoint_on_its_node(tmp_path: Path, tiny_model_dir: Path) -> None:
    pool, model = "models[0].shared_pool", "models[0]"
    with pytest.raises(ConfigError, match=r"^models\[0\]\.shared_pool\.path: no checkpoint on "
                       r"node \S+: model path '/nonexistent/tiered/Llama-3-8B' has no config"):
        local_checkpoint(ModelSpec(name="m", path=NOWHERE), ReplicaSpec(), pool, model)
    tiny = ModelSpec(name="m", path=str(tiny_model_dir))
    with pytest.raises(ConfigError, match=r"^tenants\[1\]\.dedicated\.replica\.tp_size: 3 does "
                       "not divide num_attention_heads=8"):
        local_checkpoint(tiny, ReplicaSpec(tp_size=3), "tenants[1].dedicated.replica", model)
    adapter = {"name": "a", "path": str(tmp_path)}
    with pytest.raises(ConfigError, match=r"^models\[0\]\.adapters\[0\]\.path: no adapter"):
        local_checkpoint(ModelSpec(name="m", path=str(tiny_model_dir), adapters=[adapter]),
                         ReplicaSpec(), pool, model)  # fmt: skip
    sent = tokenizer_files(local_checkpoint(tiny, ReplicaSpec(tp_size=2), pool, model))
    assert set(sent) == set(TOKENIZER_FILES)  # the tiny checkpoint has all four
    assert sent == {name: (tiny_model_dir / name).read_bytes() for name in TOKENIZER_FILES}


def test_a_uri_checkpoint_is_fetched_once_into_the_nodes_cache(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TIERED_CACHE_DIR", str(tmp_path / "cache"))
    source = tmp_path / "bucket" / "Llama-tiny"
    shutil.copytree(tiny_model_dir, source)
    uri = f"file://{source}"
    local = resolve_model_path(uri)
    assert local == cached_checkpoint_dir(uri) and local.name == "Llama-tiny"
    assert local.is_relative_to(tmp_path / "cache")
    assert sorted(p.name for p in local.iterdir()) == sorted(p.name for p in source.iterdir())
    shutil.rmtree(source)  # the node's copy is used from now on
    assert resolve_model_path(uri) == local
    with pytest.raises(CheckpointFetchError, match=r"has no config\.json"):
        resolve_model_path(f"file://{tmp_path}/bucket/other")
    with pytest.raises(CheckpointFetchError, match="cannot open checkpoint URI 'nosuch://x'"):
        resolve_model_path("nosuch://x")
    assert not [p for p in (tmp_path / "cache" / "checkpoints").rglob(".fetch-*")]


class _FakePool:
    """A model-server handle answering tokenizer_files as a replica does."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.calls = 0
        self.tokenizer_files = self

    async def _answer(self) -> dict[str, bytes]:
        return self.files

    def remote(self):  # type: ignore[no-untyped-def]
        self.calls += 1
        return self._answer()


def test_the_ingress_gets_tokenizers_from_replicas_or_an_artifact(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """Neither source is the checkpoint: its path is nowhere here."""
    artifact = tmp_path / "tokenizer-only"
    artifact.mkdir()
    for name, data in tokenizer_files(tiny_model_dir).items():
        (artifact / name).write_bytes(data)
    config = TieredConfig.model_validate({
        **tiered(NOWHERE),
        "models": [tiered(NOWHERE)["models"][0],
                   {"name": "n", "path": NOWHERE, "tokenizer": f"file://{artifact}",
                    "shared_pool": {"num_replicas": 0}}],
    })  # fmt: skip
    pool = _FakePool(tokenizer_files(tiny_model_dir))
    assert tokenizer_source(config, config.models[0]) == "m"  # the shared pool, not acme's
    models = asyncio.run(load_served_models(config, {"m": pool, "dedicated:acme": pool}))
    assert pool.calls == 1 and sorted(models) == ["m", "n"]
    reference = ServedModel.from_files(config.models[0], tokenizer_files(tiny_model_dir))
    for served in models.values():
        assert served.tokenizer.encode("Hello there") == reference.tokenizer.encode("Hello there")
        assert served.context == reference.context
    assert read_artifact(str(artifact)) == tokenizer_files(tiny_model_dir)
    assert tokenizer_source(config, config.models[1]) is None  # only its artifact
    undeployed = config.model_copy(update={"models": [config.models[0],
                                   config.models[1].model_copy(update={"tokenizer": None})]})
    assert sorted(asyncio.run(load_served_models(undeployed, {"m": pool}))) == ["m"]


@pytest.mark.ray
def test_a_uri_model_serves_and_a_missing_checkpoint_shows_in_the_status(
    ray_cluster, tiny_model_dir: Path, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """The app as `serve deploy` builds it, with a model `path` that exists nowhere: the
    URI names no directory, and the weights are only node-local, in the nodes' cache
    where a fetch of that URI would have put them. The build step and the ingress would
    fail on opening the path; the replicas load their node's copy, and the ingress
    answers with the tokenizer a replica sent. A checkpoint that is nowhere fails its
    replicas, and the deployment's status says which field and why."""
    uri = f"file://{tmp_path}/bucket/Llama-tiny"  # no such directory
    node_copy = cached_checkpoint_dir(uri)  # under the session's TIERED_CACHE_DIR
    shutil.copytree(tiny_model_dir, node_copy)
    serve.run(build({"tiered": tiered(uri)}), name="headless", route_prefix="/headless")
    try:
        reply = httpx.post(
            f"http://127.0.0.1:{ray_cluster.serve_port}/headless/v1/chat/completions",
            headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
            json={"model": "m", "messages": [{"role": "user", "content": "Hi"}],
                  "max_tokens": 4},
        )  # fmt: skip
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] == 4
        assert not (tmp_path / "bucket").exists()
    finally:
        serve.delete("headless")
        shutil.rmtree(node_copy.parent)
    try:
        with pytest.raises(RuntimeError, match="Deploying application weightless failed"):
            serve.run(build({"tiered": tiered(NOWHERE)}), name="weightless",
                      route_prefix="/weightless")  # fmt: skip
        # The app fails with its first failed deployment; the others may still be on
        # their last retry then (CI saw shared-m UPDATING), so wait for shared-m's own.
        deadline = time.monotonic() + 60
        shared = serve.status().applications["weightless"].deployments["shared-m"]
        while shared.status == "UPDATING" and time.monotonic() < deadline:
            time.sleep(0.5)
            shared = serve.status().applications["weightless"].deployments["shared-m"]
        assert shared.status == "DEPLOY_FAILED", shared
        assert "models[0].shared_pool.path: no checkpoint on node" in shared.message
        assert f"model path {NOWHERE!r} has no config.json" in shared.message
    finally:
        serve.delete("weightless")
