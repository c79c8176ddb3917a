"""Baseline: the job store of release 0.1 (jobs, study results, deliveries).

Revision ID: 0001
Revises:
Create Date: 2026-12-01

A database that release made has these tables and no ``alembic_version``:
:func:`dicom_node.db.upgrade_schema` recognises it and stamps it ``0001`` instead of
running this.
"""

from __future__ import annotations

from alembic import op

from dicom_node.migrations import baseline

revision = baseline.REVISION
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    baseline.metadata.create_all(op.get_bind())


def downgrade() -> None:
    baseline.metadata.drop_all(op.get_bind())
