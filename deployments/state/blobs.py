"""Bytes of files and checkpoints, through fsspec: a local directory or any fsspec URL.

Keys are relative POSIX paths under the root (`<tenant>/<file id>`). Writes go to a
temporary key and are renamed into place where the filesystem can, so a reader never
sees half a file. Calls are blocking: async callers run them in a thread.
"""

from __future__ import annotations

import posixpath
import uuid
from pathlib import Path

import fsspec  # type: ignore[import-untyped]


class BlobStore:
    """One fsspec filesystem and a root inside it."""

    def __init__(self, root: str) -> None:
        fs, path = fsspec.core.url_to_fs(root)
        self.fs: fsspec.AbstractFileSystem = fs
        self.root = path.rstrip("/")
        self.url = root

    def path(self, key: str) -> str:
        """The filesystem path of `key`; refuses keys that would leave the root."""
        clean = posixpath.normpath(key)
        if clean.startswith(("/", "..")) or clean in (".", ""):
            raise ValueError(f"blob key {key!r} is not a relative path under the root")
        return f"{self.root}/{clean}"

    def uri(self, key: str) -> str:
        """`key` as a URL another process can open with fsspec (a local path stays one)."""
        path = self.path(key)
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        return path if protocol in ("file", "local") else f"{protocol}://{path}"

    def put(self, key: str, data: bytes) -> None:
        path = self.path(key)
        self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
        staging = f"{path}.tmp-{uuid.uuid4().hex}"
        with self.fs.open(staging, "wb") as out:
            out.write(data)
        self.fs.mv(staging, path)

    def get(self, key: str) -> bytes:
        with self.fs.open(self.path(key), "rb") as source:
            data: bytes = source.read()
        return data

    def put_dir(self, key: str, local: Path) -> None:
        """Copy the files of a flat local directory (a checkpoint) under `key`."""
        for child in sorted(local.iterdir()):
            if child.is_file():
                self.put(f"{key}/{child.name}", child.read_bytes())

    def get_dir(self, key: str, local: Path) -> Path:
        """Copy the files under `key` into the local directory `local`."""
        local.mkdir(parents=True, exist_ok=True)
        for path in self.fs.ls(self.path(key), detail=False):
            name = posixpath.basename(str(path).rstrip("/"))
            (local / name).write_bytes(self.get(f"{key}/{name}"))
        return local

    def delete(self, key: str) -> None:
        """Remove a file or a directory tree; a key already gone is no error."""
        path = self.path(key)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)
