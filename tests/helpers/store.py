"""Checks of the job store that run on each database it supports (SQLite in the unit
tests, PostgreSQL in the scale-out test)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import event

from dicom_node.db import JobState
from dicom_node.jobs import JobResult, JobStore, Route


def statements(engine: Any) -> list[str]:
    """Every SQL statement ``engine`` sends from now on, appended as it is sent."""
    sent: list[str] = []
    event.listen(engine, "before_cursor_execute",
                 lambda _conn, _cursor, sql, *_rest: sent.append(sql))
    return sent


def _result(n: int, job_id: int) -> JobResult:
    """The ``n``-th of a batch's results: every kind of flags, validation and evidence."""
    with_evidence = n % 2 == 0
    return JobResult(
        job_id, ["normal", "pneumonia", "covid"][n % 3],
        {"normal": 0.1 * n, "pneumonia": 0.05, "covid": 1.0 - 0.1 * n - 0.05},
        f"model v{n}", f"sr/job-{job_id}.dcm", [Route("dicom", "PACS@127.0.0.1:104")],
        evidence_file=f"sr/evidence-{job_id}.dcm" if with_evidence else None,
        evidence_uids=(f"1.2.9.{n}", f"1.2.8.{n}") if with_evidence else None,
        flags=[None, (), ("covid",)][n % 3], model_validated=[None, False, True][n % 3])


def a_batch_stores_every_field(store: JobStore, owner: str) -> None:
    """Nine jobs queued in ``store`` are claimed by ``owner`` and completed, one, then
    eight with one twice: each field of a result lands on its job; the evidence UIDs
    minted at receipt are kept where a result brings none; a job named twice is stored
    once (its second entry False, as a job no longer held); and a batch of eight takes
    the same statements as a batch of one (the update is one executemany)."""
    jobs = store.claim(owner, limit=9, lease_seconds=60)
    assert len(jobs) == 9
    minted = {job.id: (job.evidence_sop_instance_uid, job.evidence_series_instance_uid)
              for job in jobs}
    sent = statements(store.engine)
    assert store.complete_batch(owner, [_result(0, jobs[0].id)]) == [True]
    one = len(sent)
    sent.clear()
    batch = [_result(n, job.id) for n, job in enumerate(jobs[1:], start=1)]
    assert store.complete_batch(owner, [*batch, batch[0]]) == [True] * 8 + [False]
    assert len(sent) == one
    deliveries = store.deliveries([job.id for job in jobs])
    for n, job in enumerate(jobs):
        done, wanted = store.get(job.id), _result(n, job.id)
        assert done is not None and done.state is JobState.DONE and done.lease_owner is None
        assert done.lease_expires_at is None and done.last_error is None and done.finished_at
        assert (done.label, done.probabilities, done.model_version, done.sr_file,
                done.evidence_file, done.model_validated) == (
            wanted.label, wanted.probabilities, wanted.model_version, wanted.sr_file,
            wanted.evidence_file, wanted.model_validated)
        assert done.flags == (None if wanted.flags is None else list(wanted.flags))
        assert (done.evidence_sop_instance_uid, done.evidence_series_instance_uid) == (
            wanted.evidence_uids or minted[job.id])
        assert [d.destination for d in deliveries[job.id]] == ["PACS@127.0.0.1:104"]
