"""Bring an adapter to local disk and read it: rank 0 first (staging), then the followers.

A plain path is read in place. An fsspec URI (file://, s3://, gs://, ...) is copied into a
private directory under the cache root, read, and removed once every rank has its slices:
the weights then live in CPU memory, so the disk copy is only ever transient. Followers on
rank 0's node read rank 0's copy; a follower on another node fetches the URI itself.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import fsspec  # type: ignore[import-untyped]

from models.default_model import cache_dir
from models.errors import LoRALoadError
from models.lora import LoRARequest
from models.lora_files import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    AdapterRules,
    AdapterWeights,
    read_adapter,
)
from models.tp import ParallelContext


@dataclass
class LocalCopy:
    """An adapter directory on this machine; `owned` when it is a temporary download."""

    directory: Path
    owned: bool

    def release(self) -> None:
        if self.owned:
            shutil.rmtree(self.directory, ignore_errors=True)


@dataclass
class StagedAdapter:
    """An adapter rank 0 has fully validated and read, ready to be installed on all ranks."""

    lora: LoRARequest
    copy: LocalCopy
    weights: AdapterWeights
    started: float = field(default_factory=time.monotonic)


def fetch_adapter(path: str) -> LocalCopy:
    """The adapter at `path` on local disk, downloading the two files a URI points at."""
    if "://" not in path:
        local = Path(path).expanduser()
        if not local.is_dir():
            raise LoRALoadError(f"adapter path {path!r} is not a directory")
        return LocalCopy(local, owned=False)
    try:
        fs, root = fsspec.core.url_to_fs(path)
    except (ImportError, ValueError) as exc:  # unknown protocol, or its package is missing
        raise LoRALoadError(f"cannot open adapter URI {path!r}: {exc}") from exc
    parent = cache_dir() / "loras"
    parent.mkdir(parents=True, exist_ok=True)
    copy = LocalCopy(Path(tempfile.mkdtemp(prefix="adapter-", dir=parent)), owned=True)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        try:
            fs.get(f"{root.rstrip('/')}/{name}", str(copy.directory / name))
        except Exception as exc:  # each fsspec backend raises its own error types
            copy.release()
            raise LoRALoadError(f"could not copy {name} from {path!r}: {exc}") from exc
    return copy


def stage_adapter(lora: LoRARequest, rules: AdapterRules, tp: ParallelContext) -> StagedAdapter:
    """Rank 0: fetch, validate and read its own slices; the copy stays for the followers."""
    started = time.monotonic()
    copy = fetch_adapter(lora.path)
    try:
        weights = read_adapter(copy.directory, rules, tp)
    except BaseException:
        copy.release()
        raise
    return StagedAdapter(lora, copy, weights, started)


def read_on_follower(
    directory: str, uri: str, rules: AdapterRules, tp: ParallelContext
) -> AdapterWeights:
    """A follower's slices: from rank 0's directory when this node sees it, else the URI."""
    local = Path(directory)
    if (local / CONFIG_FILE).is_file() and (local / WEIGHTS_FILE).is_file():
        return read_adapter(local, rules, tp)
    copy = fetch_adapter(uri)
    try:
        return read_adapter(copy.directory, rules, tp)
    finally:
        copy.release()
