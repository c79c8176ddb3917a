"""The job store: durable rows, duplicates, atomic claims, leases and recovery."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import threading
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import event as sqlalchemy_event
from sqlalchemy import text

from dicom_node.db import DeliveryState, JobState, utcnow
from dicom_node.jobs import (
    DeliveryOutcome,
    JobResult,
    JobStore,
    ReceivedInstance,
    Route,
    new_worker_id,
)

from helpers.store import a_batch_stores_every_field


def instance(n: int, payload: bytes | None = None) -> ReceivedInstance:
    data = payload if payload is not None else f"instance {n}".encode()
    return ReceivedInstance(
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1",
        sop_instance_uid=f"1.2.3.{n}",
        series_instance_uid="1.2.3.100",
        study_instance_uid="1.2.3.1000",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        calling_ae="STORESCU",
        peer_address="127.0.0.1",
        sha256=hashlib.sha256(data).hexdigest(),
        size_bytes=len(data),
    )


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'jobs.db'}"


@pytest.fixture
def store(url: str) -> JobStore:
    return JobStore(url, max_attempts=2)


def fill(store: JobStore, n: int) -> None:
    for i in range(n):
        assert store.record(instance(i), f"ab/{i:032x}.dcm", JobState.QUEUED, "test")


def test_sqlite_is_wal_and_synchronous_full(store: JobStore) -> None:
    with store.engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA synchronous")).scalar() == 2  # FULL


def test_record_mints_sr_uid_once_and_refuses_same_bytes(store: JobStore) -> None:
    job = store.record(instance(1), "ab/1.dcm", JobState.QUEUED, "chest")
    assert job is not None and job.state is JobState.QUEUED
    assert job.sr_sop_instance_uid.startswith("1.2.826.0.1.3680043.")
    assert store.record(instance(1), "cd/2.dcm", JobState.QUEUED, "chest") is None
    assert store.find_duplicate("1.2.3.1", instance(1).sha256).id == job.id  # type: ignore[union-attr]
    changed = store.record(instance(1, b"corrected"), "ef/3.dcm", JobState.QUEUED, "chest")
    assert changed is not None and changed.sr_sop_instance_uid != job.sr_sop_instance_uid


def test_claim_takes_oldest_and_sets_lease(store: JobStore) -> None:
    fill(store, 5)
    jobs = store.claim("w1", limit=3, lease_seconds=60)
    assert [j.id for j in jobs] == [1, 2, 3]
    assert all(j.state is JobState.RUNNING and j.attempts == 1 for j in jobs)
    assert all(j.lease_expires_at and j.lease_expires_at > utcnow() for j in jobs)
    assert [j.id for j in store.claim("w2", limit=10, lease_seconds=60)] == [4, 5]
    assert store.claim("w3", limit=10, lease_seconds=60) == []


def test_racing_workers_never_share_a_job(url: str) -> None:
    JobStore(url)  # schema
    fill(JobStore(url), 200)
    claimed: dict[str, list[int]] = {}

    def worker(name: str) -> None:
        own = JobStore(url)  # own engine, like another process
        got: list[int] = []
        while batch := own.claim(name, limit=3, lease_seconds=60):
            got.extend(j.id for j in batch)
        claimed[name] = got
        own.close()

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    all_ids = [i for ids in claimed.values() for i in ids]
    assert sorted(all_ids) == list(range(1, 201))


def test_complete_and_fail_need_the_lease(store: JobStore) -> None:
    fill(store, 2)
    a, b = store.claim("w1", limit=2, lease_seconds=60)
    result = JobResult(a.id, "normal", {"normal": 0.9, "pneumonia": 0.05, "covid": 0.05}, "v1")
    assert store.complete_batch("intruder", [result]) == [False]
    assert store.complete_batch("w1", [result]) == [True]
    done = store.get(a.id)
    assert done is not None and done.state is JobState.DONE and done.label == "normal"
    assert done.probabilities == {"normal": 0.9, "pneumonia": 0.05, "covid": 0.05}
    assert store.fail(b.id, "w1", "boom") is JobState.QUEUED
    (again,) = store.claim("w1", limit=1, lease_seconds=60)
    assert again.id == b.id and again.attempts == 2
    assert store.fail(b.id, "w1", "boom again") is JobState.FAILED
    failed = store.get(b.id)
    assert failed is not None and failed.last_error == "boom again" and failed.finished_at


def test_a_batch_is_stored_in_one_commit_except_jobs_whose_lease_was_lost(
        store: JobStore) -> None:
    fill(store, 3)
    (a,) = store.claim("w1", limit=1, lease_seconds=1)
    store.reap_expired_leases(utcnow() + timedelta(seconds=5))  # w1 lost a's lease...
    assert [j.id for j in store.claim("w2", limit=1, lease_seconds=60)] == [a.id]  # ...to w2
    b, c = store.claim("w1", limit=2, lease_seconds=60)
    commits = []
    sqlalchemy_event.listen(store.engine, "commit", lambda _conn: commits.append(1))
    stored = store.complete_batch("w1", [
        JobResult(job.id, "normal", {"normal": 1.0}, "v1", f"sr/job-{job.id}.dcm",
                  [Route("dicom", "PACS@127.0.0.1:104"), Route("dicom", "PACS@127.0.0.1:104"),
                   Route("dicom", "ARCHIVE@127.0.0.1:105")])
        for job in (a, b, c)])
    assert stored == [False, True, True] and len(commits) == 1
    taken = store.get(a.id)
    assert taken is not None and taken.state is JobState.RUNNING and taken.lease_owner == "w2"
    deliveries = store.deliveries([a.id, b.id, c.id])
    assert deliveries[a.id] == []
    for job in (b, c):
        done = store.get(job.id)
        assert done is not None and done.state is JobState.DONE
        assert done.sr_file == f"sr/job-{job.id}.dcm" and done.lease_owner is None
        assert [d.destination for d in deliveries[job.id]] == ["PACS@127.0.0.1:104",
                                                               "ARCHIVE@127.0.0.1:105"]


def test_a_batch_stores_every_field_of_each_result_in_as_many_statements_as_one_job(
        store: JobStore) -> None:
    fill(store, 9)
    a_batch_stores_every_field(store, "w1")


def test_delivery_outcomes_of_an_association_are_recorded_together(store: JobStore) -> None:
    fill(store, 5)
    jobs = store.claim("w1", limit=5, lease_seconds=60)
    assert store.complete_batch("w1", [
        JobResult(j.id, "normal", {"normal": 1.0}, "v1", routes=[Route("dicom", "P@h:1")])
        for j in jobs]) == [True] * 5
    due = store.claim_due_deliveries(10, hold_seconds=60)
    assert len(due) == 5
    retry_at = utcnow() + timedelta(seconds=30)
    (d1, _), (d2, _), (d3, _), (d4, _), (d5, _) = due
    store.record_outcomes([
        DeliveryOutcome(d1.id, DeliveryState.DONE, 0x0000),
        DeliveryOutcome(d2.id, DeliveryState.PENDING, 0xA700, "out of resources", retry_at),
        DeliveryOutcome(d3.id, DeliveryState.DEAD, 0xC000, "cannot understand"),
        DeliveryOutcome(d4.id, DeliveryState.DONE, 0xB000),  # stored with a warning
        DeliveryOutcome(d5.id, DeliveryState.DONE, 0x0000),
    ])
    (done,), (retrying,), (dead,), (warned,), (done_too,) = store.deliveries(
        [j.id for j in jobs]).values()
    for stored, status in ((done, 0), (warned, 0xB000), (done_too, 0)):
        assert stored.state is DeliveryState.DONE and stored.delivered_at
        assert stored.attempts == 1 and stored.last_status == status
        assert stored.last_error is None
    assert retrying.state is DeliveryState.PENDING and retrying.attempts == 1
    assert retrying.last_status == 0xA700 and retrying.last_error == "out of resources"
    assert retrying.next_attempt_at.replace(tzinfo=None) == retry_at.replace(tzinfo=None)
    assert dead.state is DeliveryState.DEAD and dead.last_error == "cannot understand"
    assert store.delivery_counts() == {"done": 3, "pending": 1, "dead": 1}
    store.record_outcomes([DeliveryOutcome(d2.id, DeliveryState.DONE, 0x0000)])
    (retried,) = store.deliveries([jobs[1].id])[jobs[1].id]
    assert retried.state is DeliveryState.DONE and retried.attempts == 2
    assert retried.last_error is None and retried.last_status == 0
    with pytest.raises(ValueError, match="retry time"):
        store.record_outcomes([DeliveryOutcome(d2.id, DeliveryState.PENDING, None, "x")])


def test_expired_lease_requeues_then_fails_after_max_attempts(store: JobStore) -> None:
    fill(store, 1)
    store.claim("w1", limit=1, lease_seconds=1)
    later = utcnow() + timedelta(seconds=5)
    assert store.reap_expired_leases(later) == (1, 0)
    job = store.get(1)
    assert job is not None and job.state is JobState.QUEUED and job.attempts == 1
    store.claim("w1", limit=1, lease_seconds=1)
    assert store.reap_expired_leases(later + timedelta(seconds=5)) == (0, 1)
    job = store.get(1)
    assert job is not None and job.state is JobState.FAILED
    assert "lease expired" in (job.last_error or "")


def test_renewing_extends_only_the_owners_running_leases_it_names(store: JobStore) -> None:
    fill(store, 4)
    store.claim("w1", limit=3, lease_seconds=1)  # jobs 1-3
    store.claim("w2", limit=1, lease_seconds=1)  # job 4
    assert store.extend_leases("w1", 600, [1, 2, 4]) == 2  # job 4 is w2's; 3 not named
    assert store.extend_leases("w1", 600, []) == 0
    later = utcnow() + timedelta(seconds=5)  # the first leases would have expired
    assert store.reap_expired_leases(later) == (2, 0)  # w1's job 3 and w2's job 4
    assert [(j.state, j.lease_owner) for j in sorted(store.list(), key=lambda j: j.id)] == [
        (JobState.RUNNING, "w1"), (JobState.RUNNING, "w1"), (JobState.QUEUED, None),
        (JobState.QUEUED, None)]
    assert store.extend_leases("w2", 600, [4]) == 0  # reaped: not w2's any more


def test_jobs_of_a_dead_local_process_are_recovered(store: JobStore, url: str) -> None:
    fill(store, 4)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    owner = new_worker_id().split(":")
    dead_owner = f"{owner[0]}:{dead.stdout.strip()}:deadbeef"
    first, *_ = store.claim(dead_owner, limit=3, lease_seconds=3600)
    # What it finished before it died stays done: only the jobs it still held go back.
    assert store.complete_batch(dead_owner, [JobResult(first.id, "normal", {"normal": 1.0},
                                                       "v1", f"sr/job-{first.id}.dcm")])
    store.claim("otherhost:1:cafe", limit=1, lease_seconds=3600)
    assert store.recover_dead_local_workers() == (2, 0)
    assert store.counts() == {"done": 1, "queued": 2, "running": 1}
    job = store.get(first.id)
    assert job is not None and job.attempts == 1 and job.sr_file == f"sr/job-{first.id}.dcm"
    assert job.lease_owner is None  # a finished job is nobody's, dead or alive


def test_concurrent_writers_do_not_fail(url: str) -> None:
    JobStore(url)
    errors: list[BaseException] = []

    def writer(k: int) -> None:
        own = JobStore(url)
        try:
            for i in range(25):
                own.record(instance(k * 1000 + i), f"ab/{k}-{i}.dcm", JobState.QUEUED, "t")
        except BaseException as exc:  # pragma: no cover - the assertion reports it
            errors.append(exc)
        finally:
            own.close()

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    store = JobStore(url)
    assert store.counts() == {"queued": 200}
    with store.engine.connect() as conn:
        assert conn.execute(text("PRAGMA integrity_check")).scalar() == "ok"


@pytest.mark.slow
def test_a_backlog_of_5000_survives_a_restart_and_each_job_is_done_once(url: str) -> None:
    """5,000 queued jobs, 8 of them claimed by a worker that then dies with the node;
    after the restart the dead worker's jobs are requeued, the claim reads the
    (state, id) index instead of scanning the table, and two workers racing through
    the backlog complete every job exactly once."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    dead_owner = f"{new_worker_id().split(':')[0]}:{dead}:deadbeef"
    total = 5000
    with JobStore(url) as before:
        fill(before, total)
        assert len(before.claim(dead_owner, limit=8, lease_seconds=3600)) == 8
    with JobStore(url) as store:  # the restart
        assert store.recover_dead_local_workers() == (8, 0)
        assert store.counts() == {"queued": total}
        statements: list[tuple[str, object]] = []

        def capture(_conn: object, _cursor: object, statement: str, parameters: object,
                    _context: object, _many: bool) -> None:
            statements.append((statement, parameters))

        sqlalchemy_event.listen(store.engine, "before_cursor_execute", capture)
        (probe,) = store.claim("probe", limit=1, lease_seconds=60)
        sqlalchemy_event.remove(store.engine, "before_cursor_execute", capture)
        (claim, parameters), = [(s, p) for s, p in statements if s.lstrip().startswith("UPDATE")]
        with store.engine.connect() as connection:
            plan = " ".join(str(row[-1]) for row in connection.exec_driver_sql(
                f"EXPLAIN QUERY PLAN {claim}", parameters))  # type: ignore[arg-type]
        assert "ix_jobs_state_id" in plan and "SCAN jobs" not in plan, plan
        assert store.fail(probe.id, "probe", "probe") is JobState.QUEUED  # given back

        done: dict[str, list[int]] = {"w1": [], "w2": []}

        def work(owner: str) -> None:
            while jobs := store.claim(owner, limit=16, lease_seconds=60):
                stored = store.complete_batch(owner, [
                    JobResult(job.id, "normal", {"normal": 1.0}, "v1", f"sr/job-{job.id}.dcm",
                              []) for job in jobs])
                assert all(stored)
                done[owner] += [job.id for job in jobs]

        workers = [threading.Thread(target=work, args=(owner,)) for owner in done]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=300)
        assert not set(done["w1"]) & set(done["w2"])
        assert sorted(done["w1"] + done["w2"]) == list(range(1, total + 1))
        assert store.counts() == {"done": total}
        attempts = [j.attempts for j in store.list(limit=total)]
        # The dead worker's 8 were claimed twice; the first of them, by the probe, three times.
        assert sorted(attempts) == [1] * (total - 8) + [2] * 7 + [3]
