"""`files:` in the Tiered config: where uploaded files' bytes live and how large they may be.

The bytes go through fsspec: a local directory by default (under the state directory, next
to the SQLite ledger), or any fsspec URL (`s3://bucket/prefix` needs s3fs, `gs://...`
gcsfs, in the ingress replicas' and the training workers' environment). Metadata lives in
the state store.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from deployments.state.config import state_dir

MIB = 1024 * 1024


def default_files_root() -> str:
    return str(state_dir() / "files")


class FilesSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    root: str = Field(
        default_factory=default_files_root,
        min_length=1,
        description="An fsspec URL or a local directory for file bytes and checkpoints.",
    )
    max_bytes: int = Field(
        64 * MIB, ge=1024, description="The largest file `POST /v1/files` accepts (413 above)."
    )
