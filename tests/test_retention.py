"""Retention on a real SQLite job store and spool: files past the age with every
delivery final are deleted and their rows kept; anything pending keeps its files; a dry
run deletes nothing and reports the same set; rows go after their own age."""

from __future__ import annotations

import hashlib
from datetime import timedelta
from pathlib import Path

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from dicom_node.cli import app
from dicom_node.config import Settings
from dicom_node.db import (
    Delivery,
    DeliveryItem,
    DeliveryState,
    JobState,
    StudyResult,
    StudyState,
    utcnow,
)
from dicom_node.jobs import DeliveryOutcome, JobResult, JobStore, ReceivedInstance, Route
from dicom_node.retention import Retention
from dicom_node.scheduler import RETENTION_JOB, Scheduler
from dicom_node.spool import Spool

PACS = "PACS@127.0.0.1:104"
ARCHIVE = "ARCH@127.0.0.1:105"
#: A patient's identifiers as a received image would carry them; never in the output.
PATIENT_STUDY = "1.2.826.0.1.3680043.8.498.77"


def instance(n: int, view: str | None = None) -> ReceivedInstance:
    data = f"instance {n}".encode()
    return ReceivedInstance(
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1", sop_instance_uid=f"1.2.3.{n}",
        series_instance_uid="1.2.3.100", study_instance_uid=f"{PATIENT_STUDY}.{n}",
        transfer_syntax_uid="1.2.840.10008.1.2.1", calling_ae="STORESCU",
        peer_address="127.0.0.1", sha256=hashlib.sha256(data).hexdigest(),
        size_bytes=len(data), view=view)


@pytest.fixture
def store(tmp_path: Path) -> JobStore:
    return JobStore(f"sqlite:///{tmp_path / 'dicom-node.db'}", max_attempts=1)


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "spool")


def classified(store: JobStore, spool: Spool, n: int, *outcomes: DeliveryState,
               view: str | None = None) -> int:
    """A job received, classified (SR and evidence image in the spool) and routed to
    one destination per outcome, each delivery then in that state."""
    received = spool.write([f"image {n}".encode()])
    job = store.record(instance(n, view), received.name, JobState.QUEUED, "chest")
    assert job is not None
    [claimed] = store.claim("w", limit=1, lease_seconds=60)
    routes = [Route("dicom", f"AE{i}@127.0.0.1:{104 + i}", DeliveryItem.SR)
              for i in range(len(outcomes))]
    assert store.complete_batch("w", [JobResult(
        claimed.id, "normal", {"normal": 1.0}, "v1", spool.write_report(claimed.id, b"sr"),
        routes, evidence_file=spool.write_evidence(claimed.id, b"ev"))]) == [True]
    deliveries = store.deliveries([claimed.id])[claimed.id]
    store.record_outcomes([
        DeliveryOutcome(d.id, state, 0, retry_at=utcnow() if state is DeliveryState.PENDING
                        else None)
        for d, state in zip(deliveries, outcomes, strict=True)])
    return claimed.id


def study_result(store: JobStore, spool: Spool, *outcomes: DeliveryState) -> int:
    """A closed study result with one HL7 message per outcome, written to the spool."""
    with store.sessions.begin() as session:
        study = StudyResult(study_instance_uid=PATIENT_STUDY, state=StudyState.CLOSED,
                            closed_at=utcnow(), job_ids=[])
        session.add(study)
        session.flush()
        for i, state in enumerate(outcomes):
            delivery = Delivery(study_result_id=study.id, kind="hl7",
                                destination=f"ris:{2575 + i}", item=DeliveryItem.ORU,
                                state=state, message_id=f"m{i}")
            session.add(delivery)
            session.flush()
            delivery.payload_file = spool.write_message(delivery.id, b"MSH|", ".hl7")
        return study.id


def files(store: JobStore, spool: Spool, job_id: int) -> list[Path]:
    job = store.get(job_id)
    assert job is not None
    return [spool.path(n) for n in (job.spool_file, job.sr_file, job.evidence_file) if n]


def messages(store: JobStore, spool: Spool, study_id: int) -> list[str | None]:
    with store.sessions() as session:
        return [d.payload_file for d in session.query(Delivery).filter(
            Delivery.study_result_id == study_id).order_by(Delivery.id)]


LATER = timedelta(days=31)  # past the files' age of 30 days


def test_files_past_the_age_with_every_delivery_final_are_purged_rows_kept(
        store: JobStore, spool: Spool) -> None:
    delivered = classified(store, spool, 1, DeliveryState.DONE, DeliveryState.DONE)
    dead = classified(store, spool, 2, DeliveryState.DONE, DeliveryState.DEAD)
    study = study_result(store, spool, DeliveryState.DONE, DeliveryState.DEAD)
    paths = files(store, spool, delivered) + files(store, spool, dead)
    written = [spool.path(str(n)) for n in messages(store, spool, study)]
    assert len(paths) == 6 and all(p.exists() for p in paths + written)

    report = Retention(store, spool, files_days=30).run(now=utcnow() + LATER)

    assert [(p.kind, p.id, p.files) for p in report.purged] == [
        ("job", delivered, 3), ("job", dead, 3), ("study result", study, 2)]
    assert report.files == 8 and not any(p.exists() for p in paths + written)
    for job_id in (delivered, dead):
        job = store.get(job_id)
        assert job is not None and job.files_purged_at is not None
        assert (job.spool_file, job.sr_file, job.evidence_file) == (None, None, None)
        assert job.label == "normal" and len(store.deliveries([job_id])[job_id]) == 2
    assert messages(store, spool, study) == [None, None]
    assert store.spool_files() == set()  # recovery finds nothing missing
    # A purged job's dead delivery cannot be retried: its file is gone.
    assert store.retry_dead_deliveries(dead) == 0
    # Nothing more on the next run.
    assert Retention(store, spool, files_days=30).run(now=utcnow() + LATER).purged == []


def test_pending_or_recently_dead_deliveries_keep_the_files(store: JobStore, spool: Spool
                                                            ) -> None:
    pending = classified(store, spool, 1, DeliveryState.DONE, DeliveryState.PENDING)
    dead = classified(store, spool, 2, DeliveryState.DEAD)
    open_study = classified(store, spool, 3, DeliveryState.DONE, view="frontal")
    queued = store.record(instance(4), spool.write([b"queued"]).name, JobState.QUEUED, "x")
    assert queued is not None
    study = study_result(store, spool, DeliveryState.PENDING)
    # The dead delivery was retried, and died again, 20 days in: it stays unacknowledged
    # for another 30 days.
    with store.sessions.begin() as session:
        for d in session.query(Delivery).filter(Delivery.job_id == dead):
            d.updated_at = utcnow() + timedelta(days=20)
    kept = [p for job in (pending, dead, open_study, queued.id) for p in files(store, spool, job)]

    report = Retention(store, spool, files_days=30).run(now=utcnow() + LATER)

    assert report.purged == [] and all(p.exists() for p in kept)
    assert messages(store, spool, study) != [None]
    assert dict(report.kept) == {
        "with a delivery pending": 1, "still queued": 1, "in a study whose result is open": 1,
        "with a delivery dead for less than the age (may be retried)": 1}
    # Once acknowledged (dead for the whole age), it goes.
    later = Retention(store, spool, files_days=30).run(now=utcnow() + timedelta(days=51))
    assert dead in [p.id for p in later.purged if p.kind == "job"]
    assert pending not in [p.id for p in later.purged if p.kind == "job"]


def test_a_dry_run_deletes_nothing_and_reports_the_same_set(store: JobStore, spool: Spool
                                                           ) -> None:
    for n in range(1, 4):
        classified(store, spool, n, DeliveryState.DONE)
    classified(store, spool, 4, DeliveryState.PENDING)
    study_result(store, spool, DeliveryState.DONE)
    ignored = store.record(instance(5), None, JobState.IGNORED, "not chest")
    assert ignored is not None
    retention = Retention(store, spool, files_days=30, rows_days=60)
    on_disk = sorted(p for p in spool.root.rglob("*") if p.is_file())
    now = utcnow() + timedelta(days=61)

    dry = retention.run(now=now, dry_run=True)

    assert sorted(p for p in spool.root.rglob("*") if p.is_file()) == on_disk
    assert all(store.get(n).files_purged_at is None for n in range(1, 6))  # type: ignore[union-attr]
    real = retention.run(now=now)
    assert [(p.kind, p.id, p.files, p.reason) for p in dry.purged] == [
        (p.kind, p.id, p.files, p.reason) for p in real.purged]
    assert (dry.files, dry.job_rows, dry.study_result_rows, dry.delivery_rows) == (
        real.files, real.job_rows, real.study_result_rows, real.delivery_rows) == (
        10, 4, 1, 4)
    assert dry.kept == real.kept and dict(real.kept) == {"with a delivery pending": 1}


def test_rows_go_after_the_rows_age_files_first(store: JobStore, spool: Spool) -> None:
    job = classified(store, spool, 1, DeliveryState.DONE, DeliveryState.DEAD)
    waiting = classified(store, spool, 2, DeliveryState.PENDING)
    study = study_result(store, spool, DeliveryState.DONE)
    retention = Retention(store, spool, files_days=30, rows_days=90)

    first = retention.run(now=utcnow() + LATER)
    assert (first.job_rows, first.study_result_rows) == (0, 0) and store.get(job) is not None

    last = retention.run(now=utcnow() + timedelta(days=91))
    assert (last.job_rows, last.study_result_rows, last.delivery_rows) == (1, 1, 3)
    assert store.get(job) is None and store.deliveries([job])[job] == []
    with store.sessions() as session:
        assert session.get(StudyResult, study) is None
    assert store.get(waiting) is not None and all(p.exists() for p in files(store, spool,
                                                                             waiting))


def test_an_interrupted_purge_is_finished_by_the_next_run(store: JobStore, spool: Spool
                                                          ) -> None:
    job = classified(store, spool, 1, DeliveryState.DONE)
    paths = files(store, spool, job)
    with store.sessions.begin() as session:  # marked, then the node stopped
        session.get_one(__import__("dicom_node.db").db.Job, job).files_purged_at = utcnow()
    report = Retention(store, spool, files_days=30).run()
    assert [(p.id, p.files) for p in report.purged] == [(job, 3)]
    assert not any(p.exists() for p in paths) and store.spool_files() == set()


def test_rows_are_kept_at_least_as_long_as_files() -> None:
    with pytest.raises(ValidationError, match="retention_rows_days"):
        Settings(retention_files_days=30, retention_rows_days=10)
    with pytest.raises(ValidationError, match="retention_rows_days"):
        Settings(retention_rows_days=10)
    assert Settings().retention_files_days == Settings().retention_rows_days == 0


def test_the_scheduler_purges_hourly_only_when_retention_is_set(store: JobStore, spool: Spool
                                                                ) -> None:
    on = Scheduler(Settings(retention_files_days=30), store, spool)
    assert on._scheduler.get_job(RETENTION_JOB) is not None
    off = Scheduler(Settings(), store, spool)
    assert off._scheduler.get_job(RETENTION_JOB) is None


def test_jobs_purge_dry_run_names_ids_and_reasons_never_the_study(tmp_path: Path) -> None:
    data = tmp_path / "data"
    settings = Settings(data_dir=data)
    with JobStore(settings.database_url) as store:
        job = classified(store, Spool(settings.storage_dir), 1, DeliveryState.DONE)
    config = tmp_path / "node.toml"
    config.write_text(f'data_dir = "{data}"\nretention_files_days = 1\n')
    runner = CliRunner()
    # Nothing is a day old yet.
    result = runner.invoke(app, ["jobs", "purge", "--dry-run", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert "the files of 0 job(s)" in result.output
    with JobStore(settings.database_url) as store, store.sessions.begin() as session:
        session.get_one(__import__("dicom_node.db").db.Job, job).finished_at = (
            utcnow() - timedelta(days=2))
    result = runner.invoke(app, ["jobs", "purge", "--dry-run", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert f"job {job}: 3 file(s); done 2 day(s) ago; deliveries: 1 done" in result.output
    assert "would delete: the files of 1 job(s)" in result.output
    assert PATIENT_STUDY not in result.output and "1.2.3.1" not in result.output
    assert spool_has(settings.storage_dir, 3)
    result = runner.invoke(app, ["jobs", "purge", "--config", str(config)])
    assert result.exit_code == 0 and "deleted: the files of 1 job(s)" in result.output
    assert spool_has(settings.storage_dir, 0)


def spool_has(root: Path, n: int) -> bool:
    return len([p for p in root.rglob("*.dcm") if ".tmp" not in p.parts]) == n
