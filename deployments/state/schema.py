"""The tables, as SQLAlchemy declarative models. Migrations (not `create_all`) build them:
a change here needs a new revision under migrations/versions.

Times are timezone-aware UTC everywhere. SQLite has no timestamp-with-zone type, so
`UTCDateTime` converts to UTC on the way in and labels results UTC on the way out; both
dialects then store the same instant and compare it the same way.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    func,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

# Deterministic constraint names, so later (batch) migrations can name what they alter.
NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[datetime]):
    """DateTime(timezone=True) that refuses naive values and always returns UTC."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: the state store takes timezone-aware UTC times")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class LedgerRow(Base):
    """One finished request, as billing reads it. `request_id` makes writes idempotent."""

    __tablename__ = "ledger"

    request_id: Mapped[str] = mapped_column(String, primary_key=True)
    tenant: Mapped[str] = mapped_column(String)
    model: Mapped[str] = mapped_column(String)
    adapter: Mapped[str | None] = mapped_column(String, nullable=True)  # a LoRA's name
    tier: Mapped[str] = mapped_column(String)  # "dedicated" | "shared"
    spill: Mapped[bool] = mapped_column(Boolean)
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    cached_tokens: Mapped[int] = mapped_column(Integer)
    completion_tokens: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    ended_at: Mapped[datetime] = mapped_column(UTCDateTime)
    status: Mapped[str] = mapped_column(String)  # "ok" | "client_disconnect" | "error"
    recorded_at: Mapped[datetime] = mapped_column(UTCDateTime, server_default=func.now())

    __table_args__ = (
        Index("ix_ledger_tenant_ended_at", "tenant", "ended_at"),
        Index("ix_ledger_ended_at", "ended_at"),
    )


class ReservationSecondsRow(Base):
    """Replica-seconds a dedicated tenant's reserved replicas were alive, per UTC hour."""

    __tablename__ = "reservation_seconds"

    tenant: Mapped[str] = mapped_column(String, primary_key=True)
    replica_id: Mapped[str] = mapped_column(String, primary_key=True)
    hour: Mapped[datetime] = mapped_column(UTCDateTime, primary_key=True)  # the hour's start
    model: Mapped[str] = mapped_column(String)
    seconds: Mapped[float] = mapped_column(Float)


class ResponseRow(Base):
    """A stored Response (`store: true`). `previous_response_id` is no foreign key: the
    previous one may be deleted or purged, and a chain that crosses it then reads as
    broken instead of the delete being refused. Items are JSON lists of
    {"id", "item", "token_ids"}."""

    __tablename__ = "responses"

    id: Mapped[str] = mapped_column(String, primary_key=True)  # "resp_…"
    tenant: Mapped[str] = mapped_column(String)
    model: Mapped[str] = mapped_column(String)
    status: Mapped[str] = mapped_column(String)  # in_progress|completed|incomplete|failed|cancelled
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)  # None: never
    previous_response_id: Mapped[str | None] = mapped_column(String, nullable=True)
    conversation_id: Mapped[str | None] = mapped_column(String, nullable=True)
    body: Mapped[dict[str, Any]] = mapped_column(JSON)  # the Response object as last returned
    input_items: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    output_items: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    replica_id: Mapped[str | None] = mapped_column(String, nullable=True)  # for KV affinity

    __table_args__ = (
        Index("ix_responses_tenant_created_at", "tenant", "created_at"),
        Index("ix_responses_expires_at", "expires_at"),
        Index("ix_responses_status", "status"),
        # a conversation's latest response (its replica, for affinity)
        Index("ix_responses_conversation_id_created_at", "conversation_id", "created_at"),
    )


class ConversationRow(Base):
    """A conversation; its items live in conversation_items."""

    __tablename__ = "conversations"

    id: Mapped[str] = mapped_column(String, primary_key=True)  # "conv_…"
    tenant: Mapped[str] = mapped_column(String)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    metadata_: Mapped[dict[str, str]] = mapped_column("metadata", JSON)

    __table_args__ = (Index("ix_conversations_expires_at", "expires_at"),)


class ConversationItemRow(Base):
    """One item of a conversation; `seq` orders them. The FK cascades on PostgreSQL only
    (SQLite leaves foreign keys off), so deletes remove items explicitly as well."""

    __tablename__ = "conversation_items"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String, unique=True)  # "msg_…"
    conversation_id: Mapped[str] = mapped_column(
        String, ForeignKey("conversations.id", ondelete="CASCADE")
    )
    tenant: Mapped[str] = mapped_column(String)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    item: Mapped[dict[str, Any]] = mapped_column(JSON)
    token_ids: Mapped[list[int] | None] = mapped_column(JSON(none_as_null=True), nullable=True)

    __table_args__ = (
        Index("ix_conversation_items_conversation_id_seq", "conversation_id", "seq"),
    )


ADAPTER_ACTIVE = "loaded_at IS NOT NULL AND unloaded_at IS NULL"


class AdapterRow(Base):
    """One load of a LoRA adapter under a name. Rows are never deleted, so a name's
    versions never repeat (the version is part of the prefix-cache key). A row is
    reserved (loaded_at NULL) while a replica validates it, active once loaded, and
    unloaded for good; at most one row per name is active (a partial unique index)."""

    __tablename__ = "adapters"

    name: Mapped[str] = mapped_column(String)
    version: Mapped[int] = mapped_column(Integer)
    base_model: Mapped[str] = mapped_column(String)
    path: Mapped[str] = mapped_column(String)  # a directory or an fsspec URI
    tenants: Mapped[list[str]] = mapped_column(JSON)  # empty: every tenant of the base
    source: Mapped[str] = mapped_column(String)  # "config" | "api"
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    loaded_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    unloaded_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)

    __table_args__ = (
        PrimaryKeyConstraint("name", "version"),
        Index(
            "ix_adapters_name_active", "name", unique=True,
            sqlite_where=text(ADAPTER_ACTIVE), postgresql_where=text(ADAPTER_ACTIVE),
        ),
    )


class FileRow(Base):
    """An uploaded file (OpenAI's Files API): metadata here, bytes at `path` in the files
    root (fsspec). Deleting a file deletes its row and its bytes."""

    __tablename__ = "files"

    id: Mapped[str] = mapped_column(String, primary_key=True)  # "file-…"
    tenant: Mapped[str] = mapped_column(String)
    purpose: Mapped[str] = mapped_column(String)  # "fine-tune"
    filename: Mapped[str] = mapped_column(String)
    bytes: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(String)  # relative to the files root
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    examples: Mapped[int] = mapped_column(Integer)  # lines accepted at upload

    __table_args__ = (Index("ix_files_tenant_created_at", "tenant", "created_at"),)


class FineTuningJobRow(Base):
    """A fine-tuning job (OpenAI's object, plus what the runner needs to own and resume
    it). `hyperparameters` are resolved (no "auto"); `error` is {code, message, param}."""

    __tablename__ = "fine_tuning_jobs"

    id: Mapped[str] = mapped_column(String, primary_key=True)  # "ftjob-…"
    tenant: Mapped[str] = mapped_column(String)
    model: Mapped[str] = mapped_column(String)  # the base model
    training_file: Mapped[str] = mapped_column(String)
    validation_file: Mapped[str | None] = mapped_column(String, nullable=True)
    hyperparameters: Mapped[dict[str, Any]] = mapped_column(JSON)
    suffix: Mapped[str | None] = mapped_column(String, nullable=True)
    seed: Mapped[int] = mapped_column(Integer)
    metadata_: Mapped[dict[str, str] | None] = mapped_column(
        "metadata", JSON(none_as_null=True), nullable=True
    )
    status: Mapped[str] = mapped_column(String)  # OpenAI's job status values
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    trained_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True), nullable=True)
    fine_tuned_model: Mapped[str | None] = mapped_column(String, nullable=True)
    result_files: Mapped[list[str]] = mapped_column(JSON)
    owner: Mapped[str | None] = mapped_column(String, nullable=True)  # the runner running it
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer)  # training starts, resumes included
    resume_from: Mapped[str | None] = mapped_column(String, nullable=True)  # a checkpoint key
    # The training file's tokens x n_epochs, counted at create (the daily token limit).
    estimated_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)

    __table_args__ = (
        Index("ix_fine_tuning_jobs_tenant_created_at", "tenant", "created_at"),
        Index("ix_fine_tuning_jobs_status", "status"),
    )


class FineTuningEventRow(Base):
    """One event of a job; `seq` orders them."""

    __tablename__ = "fine_tuning_events"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String, unique=True)  # "ftevent-…"
    job_id: Mapped[str] = mapped_column(String)
    tenant: Mapped[str] = mapped_column(String)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    level: Mapped[str] = mapped_column(String)  # info | warn | error
    type: Mapped[str] = mapped_column(String)  # message | metrics
    message: Mapped[str] = mapped_column(String)
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True), nullable=True)

    __table_args__ = (Index("ix_fine_tuning_events_job_id_seq", "job_id", "seq"),)


class FineTuningCheckpointRow(Base):
    """A checkpoint a job wrote (PEFT format, at `path` in the files root)."""

    __tablename__ = "fine_tuning_checkpoints"

    id: Mapped[str] = mapped_column(String, primary_key=True)  # "ftckpt-…"
    job_id: Mapped[str] = mapped_column(String)
    tenant: Mapped[str] = mapped_column(String)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    step_number: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    path: Mapped[str] = mapped_column(String)  # the BlobStore key of the directory

    __table_args__ = (
        Index("ix_fine_tuning_checkpoints_job_id_step_number", "job_id", "step_number"),
    )
