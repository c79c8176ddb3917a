"""Database engine and schema of the job store (SQLAlchemy 2 ORM).

SQLite is the embedded default: WAL journal, ``synchronous=FULL`` (a committed
job survives power loss, not only a process crash), a busy timeout, and every
transaction opened with ``BEGIN IMMEDIATE`` so that writers queue on the lock
instead of failing half-way through an upgrade from a read lock. The same
schema runs on PostgreSQL (``database_url = "postgresql+psycopg://..."``).

The schema is Alembic's (:mod:`dicom_node.migrations`): :func:`upgrade_schema` brings a
database to this release's revision at every start-up, and ``dicom-node db upgrade``
on demand.
"""

from __future__ import annotations

import enum
import functools
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import (
    JSON,
    Boolean,
    Connection,
    DateTime,
    Engine,
    Enum,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    create_engine,
    event,
    inspect,
    text,
)
from sqlalchemy.engine import make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from dicom_node.migrations import baseline

LOGGER = logging.getLogger(__name__)

SQLITE_BUSY_TIMEOUT_MS = 30_000
#: Alembic's scripts: env.py and versions/, shipped in the package.
MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
#: PostgreSQL advisory lock held while one process migrates (SQLite: BEGIN IMMEDIATE).
_MIGRATION_LOCK_KEY = 0x64636D6E  # "dcmn"


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A DateTime stored as UTC and always returned timezone-aware, in UTC.

    SQLite has no time zone type; without this, values come back naive. PostgreSQL's
    ``timestamptz`` comes back in the session's ``TimeZone`` (the server's default
    zone): the same instant, but ``jobs list`` would print local wall-clock times.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)


class JobState(enum.StrEnum):
    """Life cycle of a job: queued → running → done (or failed); ignored at intake."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    IGNORED = "ignored"


class StudyState(enum.StrEnum):
    """Life cycle of one version of a study result: open (gathering images until its
    quiet period ends) → closed; superseded when a late image reopened the study."""

    OPEN = "open"
    CLOSED = "closed"
    SUPERSEDED = "superseded"


class DeliveryState(enum.StrEnum):
    """Life cycle of one SR sent to one destination: pending → done, or dead."""

    PENDING = "pending"
    DONE = "done"
    DEAD = "dead"


class Base(DeclarativeBase):
    """Declarative base of the job store schema."""


def _state_column(default: enum.StrEnum) -> Any:
    """A life-cycle column: the enum's values stored as text (no database enum type, so
    adding a state needs no migration), ``default`` for new rows."""
    return mapped_column(
        Enum(type(default), native_enum=False, length=16,
             values_callable=lambda members: [m.value for m in members]),
        default=default,
    )


class Job(Base):
    """One received instance and everything the node does with it."""

    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("sop_instance_uid", "sha256", name="uq_jobs_instance_bytes"),
        Index("ix_jobs_state_id", "state", "id"),
        Index("ix_jobs_study", "study_instance_uid"),
        Index("ix_jobs_purge", "files_purged_at", "finished_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    state: Mapped[JobState] = _state_column(JobState.QUEUED)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)

    sop_class_uid: Mapped[str] = mapped_column(String(64))
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    series_instance_uid: Mapped[str] = mapped_column(String(64))
    study_instance_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    calling_ae: Mapped[str] = mapped_column(String(16))
    peer_address: Mapped[str | None] = mapped_column(String(64), default=None)

    #: Relative name in the spool; None when the instance was not kept (ignored).
    spool_file: Mapped[str | None] = mapped_column(String(64), default=None)
    #: sha256 of the data set as received (the bytes after the File Meta group).
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(Integer)
    intake_reason: Mapped[str] = mapped_column(String(128), default="")
    #: The view intake found (see :mod:`dicom_node.intake`): ``frontal`` or
    #: ``undetermined`` for a queued job, ``lateral`` etc. for one ignored for its view;
    #: None when the view was not judged (not chest) or for a job from before views.
    view: Mapped[str | None] = mapped_column(String(16), default=None)
    #: Keys that tell whether two images of a study belong to the same patient and the
    #: same accession, without storing either: HMAC-SHA256 under the node's secret
    #: (:func:`dicom_node.jobs.study_key`) of (Study Instance UID, value), cut to 16 hex
    #: digits; None when the image has no such value.
    patient_key: Mapped[str | None] = mapped_column(String(16), default=None)
    accession_key: Mapped[str | None] = mapped_column(String(16), default=None)

    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(128), default=None)
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    last_error: Mapped[str | None] = mapped_column(Text, default=None)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)

    label: Mapped[str | None] = mapped_column(String(32), default=None)
    probabilities: Mapped[dict[str, float] | None] = mapped_column(JSON, default=None)
    model_version: Mapped[str | None] = mapped_column(String(128), default=None)
    #: Classes whose operating-point threshold the probability reached.
    flags: Mapped[list[str] | None] = mapped_column(JSON, default=None)
    #: Whether the model that classified the job was validated (see model.card).
    model_validated: Mapped[bool | None] = mapped_column(Boolean, default=None)
    #: Why the study result left this job out (e.g. another patient), if it did.
    study_note: Mapped[str | None] = mapped_column(Text, default=None)
    #: Minted once when the job is created, so a re-sent SR is the same object.
    sr_sop_instance_uid: Mapped[str] = mapped_column(String(64))
    sr_series_instance_uid: Mapped[str] = mapped_column(String(64))
    #: The SR file in the spool, written once per successful classification.
    sr_file: Mapped[str | None] = mapped_column(String(64), default=None)
    #: The evidence image (Secondary Capture): UIDs minted once like the SR's (None
    #: for a job from before evidence images: minted when first needed), its file.
    evidence_sop_instance_uid: Mapped[str | None] = mapped_column(String(64), default=None)
    evidence_series_instance_uid: Mapped[str | None] = mapped_column(String(64), default=None)
    evidence_file: Mapped[str | None] = mapped_column(String(64), default=None)
    #: When retention deleted its files (received, SR, evidence image; see
    #: :mod:`dicom_node.retention`); None while they are kept. The names stay until
    #: the files are gone, then are cleared.
    files_purged_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)


class StudyResult(Base):
    """One version of the answer for a whole study, formed from its frontal images."""

    __tablename__ = "study_results"
    __table_args__ = (
        UniqueConstraint("study_instance_uid", "version", name="uq_study_version"),
        Index("ix_study_results_state_closes", "state", "closes_at"),
        Index("ix_study_results_purge", "files_purged_at", "closed_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer, default=1)
    state: Mapped[StudyState] = _state_column(StudyState.OPEN)
    #: The version this one replaces (a late image reopened a closed study).
    supersedes_id: Mapped[int | None] = mapped_column(ForeignKey("study_results.id"),
                                                      default=None)
    opened_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_image_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    #: The end of the quiet period after the last image (it closes then, or once the
    #: study's images still in the queue are done).
    closes_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    closed_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    #: Set when closed: the study's answer.
    flagged: Mapped[bool | None] = mapped_column(Boolean, default=None)
    label: Mapped[str | None] = mapped_column(String(32), default=None)
    #: class -> {"probability": highest, "job_id": ..., "sop_instance_uid": ...}
    probabilities: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    flags: Mapped[list[str] | None] = mapped_column(JSON, default=None)
    job_ids: Mapped[list[int] | None] = mapped_column(JSON, default=None)
    #: Images of the study left out, and why (no patient data).
    problems: Mapped[list[str] | None] = mapped_column(JSON, default=None)
    model_version: Mapped[str | None] = mapped_column(String(128), default=None)
    model_validated: Mapped[bool | None] = mapped_column(Boolean, default=None)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)
    #: When retention deleted its message files (the deliveries' payload files).
    files_purged_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)


class DeliveryItem(enum.StrEnum):
    """What a delivery carries: a job's SR or evidence image (DICOM objects), or a
    study result's HL7 ORU^R01 or FHIR Bundle (a message file)."""

    SR = "sr"
    EVIDENCE = "evidence"
    ORU = "oru"
    FHIR = "fhir"


class Delivery(Base):
    """One result object to send to one destination, with its retry state.

    An image's objects (SR, evidence image) hang on its job; a study result's
    messages (ORU, FHIR) on the study result. Each is unique per destination.
    """

    __tablename__ = "deliveries"
    __table_args__ = (
        Index("uq_delivery_job_item", "job_id", "destination", "item", unique=True,
              sqlite_where=text("job_id IS NOT NULL"),
              postgresql_where=text("job_id IS NOT NULL")),
        Index("uq_delivery_study_item", "study_result_id", "destination", "item", unique=True,
              sqlite_where=text("study_result_id IS NOT NULL"),
              postgresql_where=text("study_result_id IS NOT NULL")),
        Index("ix_deliveries_pending", "state", "next_attempt_at"),
        Index("ix_deliveries_study", "study_result_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"),
                                               default=None)
    study_result_id: Mapped[int | None] = mapped_column(
        ForeignKey("study_results.id", ondelete="CASCADE"), default=None)
    #: The destination's kind (``dicom``, ``dicomweb``, ``hl7``, ``fhir``) and key
    #: (``AET@host:port``, ``host:port`` or the URL; see ``destination.Target.key``).
    kind: Mapped[str] = mapped_column(String(16), default="dicom")
    destination: Mapped[str] = mapped_column(String(512))
    item: Mapped[DeliveryItem] = _state_column(DeliveryItem.SR)
    #: The message file in the spool (ORU, FHIR); the DICOM objects are the job's files.
    payload_file: Mapped[str | None] = mapped_column(String(128), default=None)
    #: HL7 MSH-10 / the FHIR report's identifier: the same on every retry.
    message_id: Mapped[str | None] = mapped_column(String(64), default=None)
    state: Mapped[DeliveryState] = _state_column(DeliveryState.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_status: Mapped[int | None] = mapped_column(Integer, default=None)
    last_error: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # Let SQLAlchemy's "begin" event issue BEGIN IMMEDIATE instead of pysqlite's
    # implicit deferred BEGIN (SQLAlchemy's documented pysqlite recipe).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA journal_mode = WAL")
    cursor.execute("PRAGMA synchronous = FULL")
    cursor.execute("PRAGMA foreign_keys = ON")
    cursor.close()


def _sqlite_begin(conn: Any) -> None:
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def make_engine(url: str) -> Engine:
    """Create the engine for ``url``; for SQLite, create its directory and set the pragmas."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True)
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False}
    )
    event.listen(engine, "connect", _sqlite_pragmas)
    event.listen(engine, "begin", _sqlite_begin)
    return engine


def alembic_config(connection: Connection | None = None) -> Config:
    """Alembic's configuration, in code (no ``alembic.ini``): the package's scripts, and
    the connection to migrate on (None for what only reads the scripts)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    return config


@functools.cache
def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def head_revision() -> str:
    """This release's schema revision: the newest in ``migrations/versions``."""
    head = _scripts().get_current_head()
    if head is None:
        raise RuntimeError(f"no migration in {MIGRATIONS_DIR}")
    return head


def current_revision(engine: Engine) -> str | None:
    """The database's schema revision; None when it has none (empty, or made by release
    0.1, which had no migrations: :func:`upgrade_schema` adopts it)."""
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade_schema(engine: Engine) -> tuple[str | None, str]:
    """Bring the database to this release's revision; return the revisions before and
    after (equal when there was nothing to do).

    Safe when several processes start at once (a node and its workers): the whole
    upgrade is one transaction that holds the database's write lock on SQLite
    (``BEGIN IMMEDIATE``: the others wait, then find nothing to do) and an advisory
    lock on PostgreSQL; both have transactional DDL, so a failed upgrade leaves the
    database as it was. An empty database gets every revision from ``0001``. One made
    by release 0.1 (its tables, no revision) is first given that release's shape where
    it is older still (:func:`_adopt`), then stamped ``0001`` and upgraded. A revision
    this release does not know (a newer release's database) is refused with
    RuntimeError, before anything changes.
    """
    head = head_revision()
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"),
                         {"key": _MIGRATION_LOCK_KEY})
        before = MigrationContext.configure(conn).get_current_revision()
        if before == head:
            return before, head
        if before is not None and before not in {s.revision for s in
                                                 _scripts().walk_revisions()}:
            raise RuntimeError(f"the database's schema is at revision {before}, which this "
                               f"release (at {head}) does not know: run the release that "
                               "made it")
        config = alembic_config(conn)
        was = f"revision {before}"
        if before is None:
            was = "an empty database"
            if inspect(conn).has_table("jobs"):
                was = "release 0.1 (no revision)"
                _adopt(conn)
                command.stamp(config, baseline.REVISION)
        command.upgrade(config, "head")
    LOGGER.info("database schema upgraded from %s to revision %s", was, head)
    return before, head


def _adopt(conn: Connection) -> None:
    """Give a database made before migrations the schema of release 0.1 (revision
    ``0001``), every row kept: a previous release's ``deliveries`` is rebuilt, missing
    tables are created and missing nullable columns added. Any other difference is
    refused with the names: it would need a migration of its own.
    """
    _rebuild_deliveries(conn)
    baseline.metadata.create_all(conn)
    existing = inspect(conn)
    for table in baseline.metadata.sorted_tables:
        present = {c["name"] for c in existing.get_columns(table.name)}
        missing = [c for c in table.columns if c.name not in present]
        if any(not c.nullable for c in missing):
            raise RuntimeError(f"database table {table.name} lacks the columns "
                               f"{', '.join(c.name for c in missing)} and they cannot be "
                               "added in place; move the database aside to start afresh")
        for column in missing:
            kind = column.type.compile(dialect=conn.dialect)
            conn.execute(text(f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" {kind}'))


#: Columns of the previous release's ``deliveries`` table, copied by the rebuild.
_OLD_DELIVERY_COLUMNS = ("id", "job_id", "destination", "state", "attempts", "next_attempt_at",
                         "last_status", "last_error", "created_at", "updated_at", "delivered_at")


def _rebuild_deliveries(conn: Connection) -> None:
    """Give a previous release's ``deliveries`` table release 0.1's shape, rows kept.

    That table was one SR per (job, destination): ``job_id`` NOT NULL and unique with
    the destination. Result objects of several kinds (an evidence image beside the
    SR, a study's messages without a job) need a nullable ``job_id`` and other
    unique keys, which SQLite cannot alter in place; so the table is renamed, the
    new one created and every row copied (as the SR it was, to a ``dicom``
    destination), in the upgrade's transaction. The tests run it on SQLite; the
    PostgreSQL path (constraint indexes kept, the id sequence moved past the copied
    rows) has not met a server yet.
    """
    columns = ", ".join(_OLD_DELIVERY_COLUMNS)
    existing = inspect(conn)
    if "deliveries" not in existing.get_table_names():
        return
    if "item" in {c["name"] for c in existing.get_columns("deliveries")}:
        return  # release 0.1's already
    # Plain indexes only: PostgreSQL lists a unique constraint's index too, and it
    # goes with the renamed table's constraint.
    for index in existing.get_indexes("deliveries"):
        if index["name"] and not index.get("duplicates_constraint"):
            conn.execute(text(f'DROP INDEX "{index["name"]}"'))
    conn.execute(text("ALTER TABLE deliveries RENAME TO deliveries_previous"))
    baseline.deliveries.create(conn)  # with its indexes
    # The column names are the constant above, never data.
    conn.execute(text(f"INSERT INTO deliveries ({columns}, kind, item) "  # noqa: S608
                      f"SELECT {columns}, 'dicom', 'sr' FROM deliveries_previous"))
    if conn.dialect.name == "postgresql":  # the new id sequence starts after the rows
        conn.execute(text("SELECT setval(pg_get_serial_sequence('deliveries', 'id'), "
                          "COALESCE(MAX(id), 1)) FROM deliveries"))
    conn.execute(text("DROP TABLE deliveries_previous"))


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    """A session factory whose objects stay readable after commit."""
    return sessionmaker(engine, expire_on_commit=False)
