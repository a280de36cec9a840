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
from deployments.config.models import ModelSpec
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


def tokenizer_source(config: TieredConfig, spec: ModelSpec) -> str | None:
    """The pool key whose replicas hand `spec`'s tokenizer over: one that starts with
    replicas (the shared pool first), else any (a call scales it up from zero); None when
    no deployment serves the model."""
    plans = [p for p in deployment_plan(config) if p.model.name == spec.name]
    if not plans:
        return None
    return next((p.key for p in plans if p.floor > 0), plans[0].key)


async def load_served_models(
    config: TieredConfig, handles: Mapping[str, DeploymentHandle]
) -> dict[str, ServedModel]:
    """The ServedModel of every base model that can serve (one that names an artifact, or
    has a deployment), fetched concurrently; a model with neither is left out (the
    catalog answers 503 for it)."""

    async def one(spec: ModelSpec) -> ServedModel | None:
        if spec.tokenizer is not None:
            files = await asyncio.to_thread(read_artifact, spec.tokenizer)
        else:
            source = tokenizer_source(config, spec)
            if source is None:
                return None
            files = await handles[source].tokenizer_files.remote()
        return ServedModel.from_files(spec, files)

    served = await asyncio.gather(*(one(m) for m in config.models))
    return {s.name: s for s in served if s is not None}
