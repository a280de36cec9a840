"""OpenAI's Files API for fine-tuning data: upload, list, read, download, delete.

An upload is checked whole before anything is stored: multipart with `file` and
`purpose: "fine-tune"`, at most `files.max_bytes`, and JSONL in the chat fine-tuning format
(models.chat_data), a bad line refused with its number and the reason. The bytes go to the
files root (fsspec), then the metadata row to the state store; a file is listed only once
both are written. Every id is looked up with the caller's tenant, so another tenant's file
is the same 404 as one that never existed.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import Response
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException

from deployments.api.conversation_objects import item_list, parse_list_params
from deployments.api.errors import OpenAIError, state_unavailable
from deployments.config.fine_tuning import FilesSpec
from deployments.state.blobs import BlobStore
from deployments.state.errors import StateError
from deployments.state.files import FileStore, StoredFile
from deployments.state.store import StateStore
from deployments.state.stored import UnknownCursorError
from models.chat_data import ChatDataError, parse_chat_jsonl

log = logging.getLogger(__name__)
T = TypeVar("T")
FILE_ID_PREFIX = "file-"
PURPOSES = ("fine-tune",)
FORM_FIELDS = ("file", "purpose")
MULTIPART_FRAMING = 64 * 1024  # the body limit of an upload: max_bytes plus this
MAX_FILENAME = 255


async def state_call(work: Coroutine[Any, Any, T]) -> T:
    """A state-store call: an outage is a 503, never a 500."""
    try:
        return await work
    except StateError:
        raise state_unavailable() from None


def file_object(stored: StoredFile) -> dict[str, Any]:
    return {
        "id": stored.id,
        "object": "file",
        "bytes": stored.bytes,
        "created_at": int(stored.created_at.timestamp()),
        "expires_at": None,
        "filename": stored.filename,
        "purpose": stored.purpose,
        "status": "processed",
        "status_details": None,
    }


def file_not_found(file_id: str, param: str | None = None) -> OpenAIError:
    return OpenAIError(404, f"No such File object: {file_id[:128]}", param=param)


def _bad(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code)


class FilesApi:
    """The five endpoints' work; the ingress authenticates first."""

    def __init__(
        self, store: StateStore, spec: FilesSpec, prepare: Callable[[], Coroutine[Any, Any, None]]
    ) -> None:
        self.files = FileStore(store)
        self.blobs = BlobStore(spec.root)
        self.max_bytes = spec.max_bytes
        self._prepare = prepare  # the store migrated (the catalog's once-per-replica step)

    @property
    def upload_body_limit(self) -> int:
        return self.max_bytes + MULTIPART_FRAMING

    async def create(self, tenant: str, request: Request) -> dict[str, Any]:
        purpose, data, filename = await self._read_upload(request)
        try:
            examples = await asyncio.to_thread(parse_chat_jsonl, data)
        except ChatDataError as exc:
            raise _bad(
                f"Invalid file format for fine-tuning: {exc}", "file", "invalid_file_format"
            ) from None
        file_id = FILE_ID_PREFIX + uuid.uuid4().hex[:24]
        stored = StoredFile(
            id=file_id,
            tenant=tenant,
            purpose=purpose,
            filename=filename,
            bytes=len(data),
            path=f"{tenant}/{file_id}",
            created_at=datetime.now(UTC),
            examples=len(examples),
        )
        await self.ready()
        await asyncio.to_thread(self.blobs.put, stored.path, data)
        try:
            await state_call(self.files.create(stored))
        except OpenAIError:
            await asyncio.to_thread(self.blobs.delete, stored.path)
            raise
        return file_object(stored)

    async def ready(self) -> None:
        """The store reachable and migrated (once per replica; a 503 while it is down)."""
        await state_call(self._prepare())

    async def list(self, tenant: str, query: dict[str, str]) -> dict[str, Any]:
        params = parse_list_params(query)
        purpose = query.get("purpose")
        await self.ready()
        try:
            page = await state_call(
                self.files.list(tenant, purpose, params.after, params.limit, params.order)
            )
        except UnknownCursorError:
            raise _bad(f"Invalid value for 'after': no file {params.after!r}.", "after") from None
        return item_list([file_object(f) for f in page.files], page.has_more)

    async def get(self, tenant: str, file_id: str) -> dict[str, Any]:
        return file_object(await self.stored(tenant, file_id))

    async def content(self, tenant: str, file_id: str) -> Response:
        data = await self.read(await self.stored(tenant, file_id))
        return Response(data, media_type="application/octet-stream")

    async def read(self, stored: StoredFile) -> bytes:
        """The file's bytes (also the jobs API's, to count a training file's tokens)."""
        try:
            return await asyncio.to_thread(self.blobs.get, stored.path)
        except FileNotFoundError:
            log.error("file %s has a row but no bytes at %s", stored.id, stored.path)
            raise file_not_found(stored.id) from None

    async def delete(self, tenant: str, file_id: str) -> dict[str, Any]:
        await self.ready()
        gone = await state_call(self.files.delete(tenant, file_id))
        if gone is None:
            raise file_not_found(file_id)
        try:
            await asyncio.to_thread(self.blobs.delete, gone.path)
        except OSError as exc:  # the row is gone: nobody can reach the bytes any more
            log.warning("file %s deleted, its bytes at %s left behind: %s", gone.id, gone.path, exc)
        return {"id": gone.id, "object": "file", "deleted": True}

    async def stored(self, tenant: str, file_id: str, param: str | None = None) -> StoredFile:
        """The tenant's file with this id, else a 404 (also used by the jobs API)."""
        await self.ready()
        stored = await state_call(self.files.get(tenant, file_id))
        if stored is None:
            raise file_not_found(file_id, param)
        return stored

    # ---- steps ---------------------------------------------------------------------------
    async def _read_upload(self, request: Request) -> tuple[str, bytes, str]:
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise _bad("Uploads must be multipart/form-data with 'file' and 'purpose'.")
        try:
            form = await request.form(max_files=1, max_fields=len(FORM_FIELDS))
        except MultiPartException as exc:
            raise _bad(f"Invalid multipart body: {exc.message}") from None
        try:
            for key in form:
                if key not in FORM_FIELDS:
                    raise _bad(f"Unrecognized request argument supplied: {key[:64]}", key[:64])
            purpose, upload = form.get("purpose"), form.get("file")
            if not isinstance(purpose, str):
                raise _bad("Missing required parameter: 'purpose'.", "purpose")
            if purpose not in PURPOSES:
                raise _bad(
                    f"Invalid value for 'purpose': {purpose[:64]!r}; this server supports "
                    f"{', '.join(PURPOSES)}.",
                    "purpose",
                )
            if not isinstance(upload, UploadFile):
                raise _bad("Missing required parameter: 'file' (a file part).", "file")
            data = await upload.read(self.max_bytes + 1)
        finally:
            await form.close()
        if len(data) > self.max_bytes:
            raise OpenAIError(
                413,
                f"The file exceeds the size limit of {self.max_bytes} bytes.",
                param="file",
                code="file_too_large",
            )
        filename = (upload.filename or "upload.jsonl")[:MAX_FILENAME]
        return purpose, data, filename
