"""Which adapter a request runs with: the one type that crosses the engine/serving line."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoRARequest:
    """Which adapter a request runs with.

    `version` is unique per (re)load under `name`, so `key` names one set of weights: it
    keys the CPU cache and the prefix cache, and reloading a name never reuses stale KV.
    """

    name: str  # the model id clients send ("model": "<name>")
    version: int  # unique per (re)load under this name; part of the prefix-cache key
    path: str  # a local directory or an fsspec URI (file://, s3://, gs://)

    @property
    def key(self) -> str:
        return f"{self.name}@{self.version}"
