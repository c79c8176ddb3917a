"""The job store's schema as release 0.1 created it: revision ``0001``, frozen.

:mod:`dicom_node.db` moves on with every revision; this does not, so that a new database
is built the way an existing one was (``0001`` creates these tables, later revisions
change them) and a database of release 0.1, which has no ``alembic_version`` table, can
be checked against it before it is stamped ``0001``. Types are the plain ones the ORM's
compile to (an enum column is ``VARCHAR(16)``, a UTC timestamp ``DateTime(timezone=True)``).
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)

REVISION = "0001"

metadata = MetaData()


def _when(name: str, nullable: bool = False) -> Column[object]:
    return Column(name, DateTime(timezone=True), nullable=nullable)


def _state(name: str) -> Column[object]:
    return Column(name, String(16), nullable=False)


jobs = Table(
    "jobs", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    _state("state"),
    _when("created_at"),
    _when("updated_at"),
    Column("sop_class_uid", String(64), nullable=False),
    Column("sop_instance_uid", String(64), nullable=False),
    Column("series_instance_uid", String(64), nullable=False),
    Column("study_instance_uid", String(64), nullable=False),
    Column("transfer_syntax_uid", String(64), nullable=False),
    Column("calling_ae", String(16), nullable=False),
    Column("peer_address", String(64)),
    Column("spool_file", String(64)),
    Column("sha256", String(64), nullable=False),
    Column("size_bytes", Integer, nullable=False),
    Column("intake_reason", String(128), nullable=False),
    Column("view", String(16)),
    Column("patient_key", String(16)),
    Column("accession_key", String(16)),
    Column("attempts", Integer, nullable=False),
    Column("lease_owner", String(128)),
    _when("lease_expires_at", nullable=True),
    Column("last_error", Text),
    _when("finished_at", nullable=True),
    Column("label", String(32)),
    Column("probabilities", JSON),
    Column("model_version", String(128)),
    Column("flags", JSON),
    Column("model_validated", Boolean),
    Column("study_note", Text),
    Column("sr_sop_instance_uid", String(64), nullable=False),
    Column("sr_series_instance_uid", String(64), nullable=False),
    Column("sr_file", String(64)),
    Column("evidence_sop_instance_uid", String(64)),
    Column("evidence_series_instance_uid", String(64)),
    Column("evidence_file", String(64)),
    UniqueConstraint("sop_instance_uid", "sha256", name="uq_jobs_instance_bytes"),
    Index("ix_jobs_state_id", "state", "id"),
    Index("ix_jobs_study", "study_instance_uid"),
)

study_results = Table(
    "study_results", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("study_instance_uid", String(64), nullable=False),
    Column("version", Integer, nullable=False),
    _state("state"),
    Column("supersedes_id", Integer, ForeignKey("study_results.id")),
    _when("opened_at"),
    _when("last_image_at"),
    _when("closes_at"),
    _when("closed_at", nullable=True),
    Column("flagged", Boolean),
    Column("label", String(32)),
    Column("probabilities", JSON),
    Column("flags", JSON),
    Column("job_ids", JSON),
    Column("problems", JSON),
    Column("model_version", String(128)),
    Column("model_validated", Boolean),
    _when("updated_at"),
    UniqueConstraint("study_instance_uid", "version", name="uq_study_version"),
    Index("ix_study_results_state_closes", "state", "closes_at"),
)

deliveries = Table(
    "deliveries", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("job_id", Integer, ForeignKey("jobs.id", ondelete="CASCADE")),
    Column("study_result_id", Integer, ForeignKey("study_results.id", ondelete="CASCADE")),
    Column("kind", String(16), nullable=False),
    Column("destination", String(512), nullable=False),
    _state("item"),
    Column("payload_file", String(128)),
    Column("message_id", String(64)),
    _state("state"),
    Column("attempts", Integer, nullable=False),
    _when("next_attempt_at"),
    Column("last_status", Integer),
    Column("last_error", Text),
    _when("created_at"),
    _when("updated_at"),
    _when("delivered_at", nullable=True),
    Index("uq_delivery_job_item", "job_id", "destination", "item", unique=True,
          sqlite_where=text("job_id IS NOT NULL"), postgresql_where=text("job_id IS NOT NULL")),
    Index("uq_delivery_study_item", "study_result_id", "destination", "item", unique=True,
          sqlite_where=text("study_result_id IS NOT NULL"),
          postgresql_where=text("study_result_id IS NOT NULL")),
    Index("ix_deliveries_pending", "state", "next_attempt_at"),
    Index("ix_deliveries_study", "study_result_id"),
)
