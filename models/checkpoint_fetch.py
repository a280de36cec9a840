"""A checkpoint given as an fsspec URI (s3://, gs://, file://, ...), copied once per node
into the local cache, so every process on the node reads the same directory.

The copy lands in `<cache>/checkpoints/<hash of the URI>/<its last path segment>` (the
last segment keeps the checkpoint's own name, which adapters' base_model_name_or_path
refers to). It is written into a temporary sibling and renamed into place whole, so a
copy cut short is never taken for a checkpoint; concurrent fetches on one node each copy
and the first rename wins.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import fsspec  # type: ignore[import-untyped]

from models.default_model import cache_dir


class CheckpointFetchError(ValueError):
    """The URI cannot be read: unknown protocol, missing package, no such object."""


def cached_checkpoint_dir(uri: str) -> Path:
    digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
    name = uri.rstrip("/").rsplit("/", 1)[-1] or "checkpoint"
    return cache_dir() / "checkpoints" / digest / name


def fetch_checkpoint(uri: str) -> Path:
    """The local copy of the checkpoint directory at `uri`, downloaded on first use."""
    target = cached_checkpoint_dir(uri)
    if (target / "config.json").is_file():
        return target
    try:
        fs, root = fsspec.core.url_to_fs(uri)
    except (ImportError, ValueError) as exc:  # unknown protocol, or its package is missing
        raise CheckpointFetchError(f"cannot open checkpoint URI {uri!r}: {exc}") from None
    root = root.rstrip("/")
    try:
        found = fs.exists(f"{root}/config.json")
    except OSError as exc:  # each backend's access errors are OSError subclasses
        raise CheckpointFetchError(f"cannot read checkpoint URI {uri!r}: {exc}") from None
    if not found:
        raise CheckpointFetchError(f"checkpoint URI {uri!r} has no config.json")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".fetch-", dir=target.parent))
    try:
        fs.get(f"{root}/", f"{staging}/", recursive=True)
        os.rename(staging, target)
    except OSError as exc:
        if (target / "config.json").is_file():  # another process on this node won
            return target
        raise CheckpointFetchError(f"could not copy checkpoint {uri!r}: {exc}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
