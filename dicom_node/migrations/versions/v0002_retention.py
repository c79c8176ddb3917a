"""Retention: when a job's and a study result's files were purged; the purge's indexes.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01

Nullable columns (NULL: the files are still there), so every row is kept as it was.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    for table, age in (("jobs", "finished_at"), ("study_results", "closed_at")):
        op.add_column(table, sa.Column("files_purged_at", sa.DateTime(timezone=True),
                                       nullable=True))
        # The purge looks for rows not purged yet (NULL) that are old enough, and
        # later for purged rows past the rows' age: both a range of this index.
        op.create_index(f"ix_{table}_purge", table, ["files_purged_at", age])


def downgrade() -> None:
    for table in ("jobs", "study_results"):
        op.drop_index(f"ix_{table}_purge", table_name=table)
        with op.batch_alter_table(table) as batch:
            batch.drop_column("files_purged_at")
