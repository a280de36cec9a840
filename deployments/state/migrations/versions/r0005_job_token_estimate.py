"""A fine-tuning job's estimated trained tokens (the per-tenant daily token limit).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Jobs created before this revision count with what they trained (NULL estimate).
    op.add_column("fine_tuning_jobs", sa.Column("estimated_tokens", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("fine_tuning_jobs") as batch:  # SQLite rebuilds the table
        batch.drop_column("estimated_tokens")
