"""Schema migrations (Alembic) on real SQLite files: a database of release 0.1 upgraded
with every row kept, the frozen baseline equal to that release's schema, the migrated
schema equal to the ORM's, start-up upgrades that are harmless twice and safe when
several processes start at once, and a newer database refused."""

from __future__ import annotations

import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from typer.testing import CliRunner

from dicom_node import db
from dicom_node.cli import app
from dicom_node.db import DeliveryItem, JobState
from dicom_node.jobs import JobResult, JobStore, ReceivedInstance, Route

#: The schema release 0.1 creates (``sqlite3 dicom-node.db .schema``), made by
#: ``JobStore`` at commit 5295c9b, before migrations: the database an upgrade meets.
RELEASE_0_1_DDL = """
CREATE TABLE jobs (
	id INTEGER NOT NULL,
	state VARCHAR(16) NOT NULL,
	created_at DATETIME NOT NULL,
	updated_at DATETIME NOT NULL,
	sop_class_uid VARCHAR(64) NOT NULL,
	sop_instance_uid VARCHAR(64) NOT NULL,
	series_instance_uid VARCHAR(64) NOT NULL,
	study_instance_uid VARCHAR(64) NOT NULL,
	transfer_syntax_uid VARCHAR(64) NOT NULL,
	calling_ae VARCHAR(16) NOT NULL,
	peer_address VARCHAR(64),
	spool_file VARCHAR(64),
	sha256 VARCHAR(64) NOT NULL,
	size_bytes INTEGER NOT NULL,
	intake_reason VARCHAR(128) NOT NULL,
	"view" VARCHAR(16),
	patient_key VARCHAR(16),
	accession_key VARCHAR(16),
	attempts INTEGER NOT NULL,
	lease_owner VARCHAR(128),
	lease_expires_at DATETIME,
	last_error TEXT,
	finished_at DATETIME,
	label VARCHAR(32),
	probabilities JSON,
	model_version VARCHAR(128),
	flags JSON,
	model_validated BOOLEAN,
	study_note TEXT,
	sr_sop_instance_uid VARCHAR(64) NOT NULL,
	sr_series_instance_uid VARCHAR(64) NOT NULL,
	sr_file VARCHAR(64),
	evidence_sop_instance_uid VARCHAR(64),
	evidence_series_instance_uid VARCHAR(64),
	evidence_file VARCHAR(64),
	PRIMARY KEY (id),
	CONSTRAINT uq_jobs_instance_bytes UNIQUE (sop_instance_uid, sha256)
);
CREATE INDEX ix_jobs_study ON jobs (study_instance_uid);
CREATE INDEX ix_jobs_state_id ON jobs (state, id);
CREATE TABLE study_results (
	id INTEGER NOT NULL,
	study_instance_uid VARCHAR(64) NOT NULL,
	version INTEGER NOT NULL,
	state VARCHAR(16) NOT NULL,
	supersedes_id INTEGER,
	opened_at DATETIME NOT NULL,
	last_image_at DATETIME NOT NULL,
	closes_at DATETIME NOT NULL,
	closed_at DATETIME,
	flagged BOOLEAN,
	label VARCHAR(32),
	probabilities JSON,
	flags JSON,
	job_ids JSON,
	problems JSON,
	model_version VARCHAR(128),
	model_validated BOOLEAN,
	updated_at DATETIME NOT NULL,
	PRIMARY KEY (id),
	CONSTRAINT uq_study_version UNIQUE (study_instance_uid, version),
	FOREIGN KEY(supersedes_id) REFERENCES study_results (id)
);
CREATE INDEX ix_study_results_state_closes ON study_results (state, closes_at);
CREATE TABLE deliveries (
	id INTEGER NOT NULL,
	job_id INTEGER,
	study_result_id INTEGER,
	kind VARCHAR(16) NOT NULL,
	destination VARCHAR(512) NOT NULL,
	item VARCHAR(16) NOT NULL,
	payload_file VARCHAR(128),
	message_id VARCHAR(64),
	state VARCHAR(16) NOT NULL,
	attempts INTEGER NOT NULL,
	next_attempt_at DATETIME NOT NULL,
	last_status INTEGER,
	last_error TEXT,
	created_at DATETIME NOT NULL,
	updated_at DATETIME NOT NULL,
	delivered_at DATETIME,
	PRIMARY KEY (id),
	FOREIGN KEY(job_id) REFERENCES jobs (id) ON DELETE CASCADE,
	FOREIGN KEY(study_result_id) REFERENCES study_results (id) ON DELETE CASCADE
);
CREATE UNIQUE INDEX uq_delivery_job_item ON deliveries (job_id, destination, item)
	WHERE job_id IS NOT NULL;
CREATE INDEX ix_deliveries_study ON deliveries (study_result_id);
CREATE INDEX ix_deliveries_pending ON deliveries (state, next_attempt_at);
CREATE UNIQUE INDEX uq_delivery_study_item ON deliveries (study_result_id, destination, item)
	WHERE study_result_id IS NOT NULL;
"""

T0 = "2026-11-30 10:00:00.000000"
T1 = "2026-11-30 10:05:00.000000"

_JOB_COLUMNS = ("id, state, created_at, updated_at, sop_class_uid, sop_instance_uid, "
                "series_instance_uid, study_instance_uid, transfer_syntax_uid, calling_ae, "
                "spool_file, sha256, size_bytes, intake_reason, view, attempts, lease_owner, "
                "lease_expires_at, finished_at, label, probabilities, flags, model_validated, "
                "sr_sop_instance_uid, sr_series_instance_uid, sr_file, evidence_file")


def _job(n: int, state: str) -> tuple[object, ...]:
    """A job row of release 0.1 in ``state``, its columns as that release wrote them."""
    done = state == "done"
    return (n, state, T0, T1, "1.2.840.10008.5.1.4.1.1.1.1", f"1.2.3.{n}", "1.2.3.100",
            "1.2.3.1000", "1.2.840.10008.1.2.1", "STORESCU",
            None if state == "ignored" else f"ab/{n:032x}.dcm", f"{n:064x}", 100 + n,
            "chest" if state != "ignored" else "not chest: CT", "frontal",
            1 if state != "queued" else 0, "host:1:abc" if state == "running" else None,
            T1 if state == "running" else None,
            T1 if state in ("done", "failed", "ignored") else None,
            "normal" if done else None, '{"normal": 0.9}' if done else None,
            "[]" if done else None, 1 if done else None, f"2.25.{n}1", f"2.25.{n}2",
            f"sr/job-{n}.dcm" if done else None, f"sr/evidence-{n}.dcm" if done else None)


def release_0_1_database(path: Path) -> None:
    """A database as release 0.1 leaves it: jobs in every state, deliveries of every
    item in every state, study results open, closed and superseded."""
    with sqlite3.connect(path) as conn:
        conn.executescript(RELEASE_0_1_DDL)
        states = ["queued", "running", "done", "failed", "ignored", "done", "done"]
        conn.executemany(f"INSERT INTO jobs ({_JOB_COLUMNS}) VALUES "
                         f"({', '.join('?' * len(_JOB_COLUMNS.split(', ')))})",
                         [_job(n, state) for n, state in enumerate(states, 1)])
        conn.executemany(
            "INSERT INTO study_results (id, study_instance_uid, version, state, supersedes_id, "
            "opened_at, last_image_at, closes_at, closed_at, flagged, label, probabilities, "
            "flags, job_ids, problems, model_version, model_validated, updated_at) VALUES "
            "(?, '1.2.3.1000', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(1, 1, "superseded", None, T0, T0, T0, T0, 0, "normal",
              '{"normal": {"probability": 0.9, "job_id": 3}}', "[]", "[3]", "[]", "cxr 1", 1,
              T1),
             (2, 2, "closed", 1, T0, T1, T1, T1, 1, "pneumonia", "{}", '["pneumonia"]',
              "[3, 6]", '["job 4: failed"]', "cxr 1", 1, T1),
             (3, 3, "open", 2, T1, T1, T1, None, None, None, None, None, None, None, None,
              None, T1)])
        deliveries = [  # (job, study result, kind, destination, item, payload, state)
            (3, None, "dicom", "PACS@10.0.0.5:104", "sr", None, "done"),
            (3, None, "dicom", "PACS@10.0.0.5:104", "evidence", None, "dead"),
            (6, None, "dicom", "PACS@10.0.0.5:104", "sr", None, "pending"),
            (6, None, "dicomweb", "https://pacs/dicom-web", "evidence", None, "done"),
            (7, None, "dicom", "ARCH@10.0.0.6:104", "sr", None, "dead"),
            (None, 1, "hl7", "ris:2575", "oru", "messages/delivery-6.hl7", "dead"),
            (None, 2, "hl7", "ris:2575", "oru", "messages/delivery-7.hl7", "done"),
            (None, 2, "fhir", "https://fhir/r4", "fhir", "messages/delivery-8.json",
             "pending")]
        conn.executemany(
            "INSERT INTO deliveries (id, job_id, study_result_id, kind, destination, item, "
            "payload_file, message_id, state, attempts, next_attempt_at, last_status, "
            "last_error, created_at, updated_at, delivered_at) VALUES "
            "(?, ?, ?, ?, ?, ?, ?, ?, ?, 2, ?, ?, ?, ?, ?, ?)",
            [(i, job, study, kind, dest, item, payload,
              f"m{i}" if study else None, state, T1, 0xA700 if state != "done" else 0,
              "refused" if state == "dead" else None, T0, T1,
              T1 if state == "done" else None)
             for i, (job, study, kind, dest, item, payload, state) in enumerate(deliveries, 1)])


def _rows(path: Path) -> dict[str, list[tuple[object, ...]]]:
    """Every row of release 0.1's tables, its columns only, by id."""
    with sqlite3.connect(path) as conn:
        found = {}
        for table in ("jobs", "study_results", "deliveries"):
            columns = [r[1] for r in conn.execute(f"PRAGMA table_info({table})")
                       if r[1] != "files_purged_at"]
            found[table] = conn.execute(f"SELECT {', '.join(columns)} FROM {table} "
                                        "ORDER BY id").fetchall()
        return found


def _columns(path: Path, table: str) -> set[str]:
    with sqlite3.connect(path) as conn:
        return {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}


def _schema(conn: sqlite3.Connection) -> set[tuple[str, str]]:
    """(name, SQL with its whitespace normalised) of every table and index, Alembic's
    own left out."""
    return {(name, re.sub(r"\s+", " ", sql).replace("( ", "(").replace(" )", ")"))
            for name, sql in conn.execute("SELECT name, sql FROM sqlite_master "
                                          "WHERE sql IS NOT NULL")
            if not name.startswith("alembic")}


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "dicom-node.db"


def test_a_release_0_1_database_is_upgraded_and_loses_no_row(path: Path) -> None:
    release_0_1_database(path)
    before = _rows(path)
    assert [len(rows) for rows in before.values()] == [7, 3, 8]
    with JobStore(f"sqlite:///{path}") as store:
        assert store.counts() == {"queued": 1, "running": 1, "done": 3, "failed": 1,
                                  "ignored": 1}
        assert store.delivery_counts() == {"done": 3, "dead": 3, "pending": 2}
        job = store.get(3)
        assert job is not None and job.files_purged_at is None
        assert job.probabilities == {"normal": 0.9} and job.sr_file == "sr/job-3.dcm"
    assert _rows(path) == before
    assert "files_purged_at" in _columns(path, "jobs") & _columns(path, "study_results")
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchall() == [
            (db.head_revision(),)]
        indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master "
                                              "WHERE type = 'index'")}
        assert {"ix_jobs_purge", "ix_study_results_purge"} <= indexes
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []


def test_the_baseline_revision_is_the_schema_of_release_0_1(path: Path, tmp_path: Path
                                                            ) -> None:
    engine = db.make_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        command.upgrade(db.alembic_config(conn), db.baseline.REVISION)
    engine.dispose()
    release = sqlite3.connect(tmp_path / "release.db")
    release.executescript(RELEASE_0_1_DDL)
    with sqlite3.connect(path) as conn:
        assert _schema(conn) == _schema(release)
    release.close()


def test_the_migrated_schema_is_the_orm_schema(path: Path) -> None:
    """A column or index added to db.py without its revision fails here."""
    engine = db.make_engine(f"sqlite:///{path}")
    db.upgrade_schema(engine)
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(context, db.Base.metadata) == []
    engine.dispose()


def test_start_up_upgrades_and_a_second_start_changes_nothing(path: Path) -> None:
    release_0_1_database(path)
    engine = db.make_engine(f"sqlite:///{path}")
    assert db.current_revision(engine) is None
    with JobStore(f"sqlite:///{path}"):  # what the node and `dicom-node worker` start with
        pass
    head = db.head_revision()
    assert db.current_revision(engine) == head
    rows = _rows(path)
    assert db.upgrade_schema(engine) == (head, head)
    with JobStore(f"sqlite:///{path}") as store:
        assert store.counts()["done"] == 3
    assert _rows(path) == rows
    engine.dispose()


def test_db_upgrade_and_db_current_commands(tmp_path: Path) -> None:
    release_0_1_database(tmp_path / "dicom-node.db")
    runner = CliRunner()
    current = runner.invoke(app, ["db", "current", "--data-dir", str(tmp_path)])
    assert current.exit_code == 1, current.output
    assert "no revision" in current.output
    upgraded = runner.invoke(app, ["db", "upgrade", "--data-dir", str(tmp_path)])
    assert upgraded.exit_code == 0, upgraded.output
    head = db.head_revision()
    assert f"upgraded from no revision to revision {head}" in upgraded.output
    again = runner.invoke(app, ["db", "upgrade", "--data-dir", str(tmp_path)])
    assert again.exit_code == 0 and f"at revision {head} (already)" in again.output
    current = runner.invoke(app, ["db", "current", "--data-dir", str(tmp_path)])
    assert current.exit_code == 0 and f"database: {head}" in current.output


#: What JobStore does first at every start (the rest of the node is not needed here).
_START = """
import sys
from sqlalchemy import text
from dicom_node import db
engine = db.make_engine(sys.argv[1])
db.upgrade_schema(engine)
with engine.connect() as conn:
    print(conn.execute(text("SELECT count(*) FROM jobs WHERE state = 'done'")).scalar())
"""


def test_processes_starting_at_once_upgrade_it_once(path: Path) -> None:
    """A node and a worker started together on a release 0.1 database: one upgrades, the
    other waits for its transaction and finds nothing to do."""
    release_0_1_database(path)
    rows = _rows(path)
    starts = [subprocess.Popen([sys.executable, "-c", _START, f"sqlite:///{path}"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for _ in range(2)]
    results = [(p.wait(timeout=60), *p.communicate()) for p in starts]
    assert [(code, out.strip()) for code, out, _ in results] == [(0, "3")] * 2, results
    assert _rows(path) == rows
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchall() == [
            (db.head_revision(),)]


def test_a_database_of_a_newer_release_is_refused_unchanged(path: Path) -> None:
    JobStore(f"sqlite:///{path}").close()  # made at this release's revision
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE alembic_version SET version_num = '9999'")
    schema = sqlite3.connect(path)
    before = _schema(schema)
    with pytest.raises(RuntimeError, match="revision 9999, which this release"):
        JobStore(f"sqlite:///{path}")
    assert _schema(schema) == before
    schema.close()


def test_a_fresh_database_gets_every_revision(path: Path) -> None:
    with JobStore(f"sqlite:///{path}") as store:
        assert store.record(_instance(), "ab/1.dcm", JobState.QUEUED, "chest") is not None
        assert store.counts() == {"queued": 1}
    assert "files_purged_at" in _columns(path, "jobs")
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchall() == [
            (db.head_revision(),)]


def _instance() -> ReceivedInstance:
    return ReceivedInstance(
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1", sop_instance_uid="1.2.3.1",
        series_instance_uid="1.2.3.100", study_instance_uid="1.2.3.1000",
        transfer_syntax_uid="1.2.840.10008.1.2.1", calling_ae="STORESCU",
        peer_address="127.0.0.1", sha256="0" * 64, size_bytes=1)


def test_a_database_older_than_release_0_1_gains_its_columns_then_the_revisions(
        path: Path) -> None:
    """Before 0.1, jobs lacked the view, key, flag and study columns and there were no
    study results: the columns are added in place (nullable), then it is stamped and
    upgraded like a 0.1 database."""
    release_0_1_database(path)
    added = ["view", "patient_key", "accession_key", "flags", "model_validated", "study_note"]
    with sqlite3.connect(path) as conn:
        for column in added:
            conn.execute(f'ALTER TABLE jobs DROP COLUMN "{column}"')
        conn.execute("DELETE FROM deliveries WHERE study_result_id IS NOT NULL")
        conn.execute("DROP TABLE study_results")
    with JobStore(f"sqlite:///{path}") as upgraded:
        kept = upgraded.get(3)
        assert kept is not None and kept.sop_instance_uid == "1.2.3.3" and kept.view is None
        assert upgraded.counts()["done"] == 3
        assert upgraded.record(_instance(), "ab/1.dcm", JobState.QUEUED, "chest") is not None
    assert {*added, "files_purged_at"} <= _columns(path, "jobs")
    assert "files_purged_at" in _columns(path, "study_results")


#: The deliveries table before 0.1, as SQLite holds it: one SR per (job, destination),
#: job_id NOT NULL.
_PREVIOUS_DELIVERIES = """CREATE TABLE deliveries (
	id INTEGER NOT NULL, job_id INTEGER NOT NULL, destination VARCHAR(128) NOT NULL,
	state VARCHAR(16) NOT NULL, attempts INTEGER NOT NULL, next_attempt_at DATETIME NOT NULL,
	last_status INTEGER, last_error TEXT, created_at DATETIME NOT NULL,
	updated_at DATETIME NOT NULL, delivered_at DATETIME, PRIMARY KEY (id),
	CONSTRAINT uq_delivery_job_destination UNIQUE (job_id, destination),
	FOREIGN KEY(job_id) REFERENCES jobs (id) ON DELETE CASCADE)"""


def test_deliveries_older_than_release_0_1_are_rebuilt_and_none_is_lost(path: Path) -> None:
    release_0_1_database(path)
    with sqlite3.connect(path) as conn:
        conn.execute("DROP TABLE deliveries")
        conn.execute(_PREVIOUS_DELIVERIES)
        conn.execute("CREATE INDEX ix_deliveries_due ON deliveries (state, next_attempt_at)")
        rows = [(1, 3, "PACS@127.0.0.1:104", "done", 1), (2, 3, "ARCH@127.0.0.1:105", "dead", 10),
                (3, 2, "PACS@127.0.0.1:104", "pending", 2)]
        conn.executemany("INSERT INTO deliveries (id, job_id, destination, state, attempts, "
                         "next_attempt_at, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                         [(*row, T0, T0, T0) for row in rows])
    with JobStore(f"sqlite:///{path}") as upgraded:
        kept = upgraded.deliveries([3, 2])
        assert [(d.id, d.destination, d.state.value, d.attempts, d.kind, d.item)
                for d in kept[3] + kept[2]] == [
            (1, "PACS@127.0.0.1:104", "done", 1, "dicom", DeliveryItem.SR),
            (2, "ARCH@127.0.0.1:105", "dead", 10, "dicom", DeliveryItem.SR),
            (3, "PACS@127.0.0.1:104", "pending", 2, "dicom", DeliveryItem.SR)]
        # The evidence image now goes beside the SR to the same destination...
        assert upgraded.complete_batch("host:1:abc", [JobResult(
            2, "normal", {"normal": 1.0}, "v1", "sr/x.dcm",
            [Route("dicom", "PACS@127.0.0.1:104", DeliveryItem.EVIDENCE)])]) == [True]
        assert [d.item for d in upgraded.deliveries([2])[2]] == [
            DeliveryItem.SR, DeliveryItem.EVIDENCE]
    with sqlite3.connect(path) as conn:
        # ...and each object still goes once per destination.
        with pytest.raises(sqlite3.IntegrityError):
            conn.execute("INSERT INTO deliveries (job_id, destination, kind, item, state, "
                         "attempts, next_attempt_at, created_at, updated_at) VALUES "
                         "(2, 'PACS@127.0.0.1:104', 'dicom', 'sr', 'pending', 0, ?, ?, ?)",
                         (T0, T0, T0))
        assert not conn.execute("SELECT name FROM sqlite_master WHERE name = "
                                "'deliveries_previous'").fetchall()
