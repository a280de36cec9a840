"""Where the ingress gets each model's tokenizer: never from the checkpoint directory,
which is on the replicas' nodes and not on the ingress's (a cluster's head has no
weights). A model that names a `tokenizer` artifact (a directory or fsspec URI holding
the tokenizer files alone) is read from there; any other asks one of its own model-server
replicas, which sends the files of the checkpoint it loaded."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import fsspec  # type: ignore[import-untyped]
from ray.serve.handle import DeploymentHandle

from deployments.api.prompts import ServedModel
from deployments.config.models import ConfigError, ModelSpec
from deployments.config.plan import deployment_plan
from deployments.config.tiered import TieredConfig
from models.tokenizer import TOKENIZER_FILES


def read_artifact(uri: str) -> dict[str, bytes]:
    """The tokenizer files present at a directory or fsspec URI."""
    fs, root = fsspec.core.url_to_fs(uri)
    root = root.rstrip("/")
    return {
        name: fs.cat_file(f"{root}/{name}")
        for name in TOKENIZER_FILES
        if fs.exists(f"{root}/{name}")
    }


def tokenizer_source(config: TieredConfig, spec: ModelSpec) -> str:
    """The pool key whose replicas hand `spec`'s tokenizer over: one that starts with
    replicas (the shared pool first), else any (a call scales it up from zero)."""
    plans = [p for p in deployment_plan(config) if p.model.name == spec.name]
    if not plans:
        raise ConfigError(
            f"model {spec.name!r}: no deployment serves it and it names no `tokenizer` artifact"
        )
    return next((p.key for p in plans if p.floor > 0), plans[0].key)


async def load_served_models(
    config: TieredConfig, handles: Mapping[str, DeploymentHandle]
) -> dict[str, ServedModel]:
    """Every base model's ServedModel, fetched concurrently."""

    async def one(spec: ModelSpec) -> ServedModel:
        if spec.tokenizer is not None:
            files = await asyncio.to_thread(read_artifact, spec.tokenizer)
        else:
            handle = handles[tokenizer_source(config, spec)]
            files = await handle.tokenizer_files.remote()
        return ServedModel.from_files(spec, files)

    served = await asyncio.gather(*(one(m) for m in config.models))
    return {s.name: s for s in served}
