"""The job store: durable queue of received instances, with atomic claims and leases.

A worker claims up to *n* queued jobs in one statement: on SQLite a conditional
``UPDATE … WHERE id IN (SELECT … WHERE state = 'queued') RETURNING`` inside a
``BEGIN IMMEDIATE`` transaction, on PostgreSQL the sub-select takes
``FOR UPDATE SKIP LOCKED`` in a ``MATERIALIZED`` CTE (:meth:`JobStore._locked`).
A claim sets a lease; a job whose lease expired
(its worker died) goes back to the queue with its attempt count, or fails once
it has used ``max_attempts``.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import socket
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, cast

from pydicom.uid import generate_uid
from sqlalchemy import (
    ColumnElement,
    Select,
    Table,
    and_,
    bindparam,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node import studies
from dicom_node.db import (
    Delivery,
    DeliveryItem,
    DeliveryState,
    Job,
    JobState,
    StudyResult,
    StudyState,
    make_engine,
    make_sessionmaker,
    upgrade_schema,
    utcnow,
)

LOGGER = logging.getLogger(__name__)

_JOBS = cast(Table, Job.__table__)  # a mapped class's table: a Table

#: A classified job's result, for an ``executemany`` over a batch (built once: building
#: an ``UPDATE`` took most of a batch's commit). The evidence UIDs are kept as they
#: are where a result brings none. The lease is checked again, as the select that
#: chose the rows did, so that the statement can never store a result it does not own.
_COMPLETE = (
    update(_JOBS)
    .where(_JOBS.c.id == bindparam("b_id"), _JOBS.c.lease_owner == bindparam("b_owner"),
           _JOBS.c.state == JobState.RUNNING)
    # Each parameter takes its column's type (JSON, UTC times), as a value would.
    .values(state=JobState.DONE, lease_owner=None, lease_expires_at=None, last_error=None,
            finished_at=bindparam("b_now"), updated_at=bindparam("b_now"),
            label=bindparam("b_label"), probabilities=bindparam("b_probabilities"),
            model_version=bindparam("b_model_version"), sr_file=bindparam("b_sr_file"),
            evidence_file=bindparam("b_evidence_file"),
            evidence_sop_instance_uid=func.coalesce(bindparam("b_evidence_sop"),
                                                    _JOBS.c.evidence_sop_instance_uid),
            evidence_series_instance_uid=func.coalesce(bindparam("b_evidence_series"),
                                                       _JOBS.c.evidence_series_instance_uid),
            flags=bindparam("b_flags"), model_validated=bindparam("b_model_validated"))
)


def _completed(result: JobResult, owner: str, now: datetime) -> dict[str, Any]:
    """``result``'s parameters for :data:`_COMPLETE`."""
    evidence = result.evidence_uids or (None, None)
    return dict(b_id=result.job_id, b_owner=owner, b_now=now, b_label=result.label,
                b_probabilities=result.probabilities, b_model_version=result.model_version,
                b_sr_file=result.sr_file, b_evidence_file=result.evidence_file,
                b_evidence_sop=evidence[0], b_evidence_series=evidence[1],
                b_flags=None if result.flags is None else list(result.flags),
                b_model_validated=result.model_validated)


@dataclass(frozen=True)
class ReceivedInstance:
    """What the receive path knows about an instance when it records it."""

    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    transfer_syntax_uid: str
    calling_ae: str
    peer_address: str | None
    sha256: str
    size_bytes: int
    #: ``frontal`` or ``undetermined`` for a queued instance (intake's view).
    view: str | None = None
    #: See :attr:`dicom_node.db.Job.patient_key` (made by :func:`study_key`).
    patient_key: str | None = None
    accession_key: str | None = None


#: The node's secret for :func:`study_key`, in the data directory (beside the database,
#: never in it).
STUDY_KEY_SECRET_FILE = "study-key.secret"  # noqa: S105  # a file name, not a secret


def study_key_secret(data_dir: Path) -> bytes:
    """The node's secret for :func:`study_key`: 32 random bytes in ``data_dir``, made
    once (mode 0600) and read afterwards."""
    path = data_dir / STUDY_KEY_SECRET_FILE
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        secret = path.read_bytes()
        if len(secret) < 32:
            raise RuntimeError(f"{path} is damaged (shorter than 32 bytes)") from None
        return secret
    secret = os.urandom(32)
    with os.fdopen(fd, "wb") as f:
        f.write(secret)
        f.flush()
        os.fsync(f.fileno())
    return secret


def study_key(secret: bytes, study_instance_uid: str, value: object) -> str | None:
    """A key that is equal for equal ``value`` within one study and tells nothing of it:
    HMAC-SHA256 under the node's secret (kept out of the database, so that a copy of the
    database alone cannot be searched for a Patient ID) of the study UID and the value,
    16 hex digits; None for an empty value."""
    text = str(value).strip() if value is not None else ""
    if not text:
        return None
    message = f"{study_instance_uid}\0{text}".encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()[:16]


@dataclass(frozen=True)
class Route:
    """One result object of a job to one destination: the destination's kind and key
    (``destination.Target``), and which object (the SR or the evidence image)."""

    kind: str
    destination: str
    item: DeliveryItem = DeliveryItem.SR


@dataclass(frozen=True)
class JobResult:
    """A classified job: its result, its SR file in the spool, and where the SR goes."""

    job_id: int
    label: str
    probabilities: dict[str, float]
    model_version: str
    sr_file: str | None = None
    #: Where its objects go: ``(kind, destination key, item)``, one delivery each.
    routes: Sequence[Route] = ()
    #: The evidence image in the spool, if one was made, and its UIDs (minted with
    #: the job; for a job from before evidence images, when it was made).
    evidence_file: str | None = None
    evidence_uids: tuple[str, str] | None = None
    #: Classes whose operating-point threshold the probability reached; None when the
    #: model has no operating points (nothing was checked).
    flags: Sequence[str] | None = ()
    model_validated: bool | None = None


@dataclass(frozen=True)
class DeliveryOutcome:
    """What one attempt to send an SR came to: ``DONE``, ``PENDING`` again at
    ``retry_at``, or ``DEAD``."""

    delivery_id: int
    state: DeliveryState
    status: int | None
    error: str | None = None
    retry_at: datetime | None = None


def new_worker_id() -> str:
    """A lease owner id: ``host:pid:random``, so recovery can tell whose leases are dead."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class JobStore:
    """Operations on the job table; every method is one short transaction."""

    def __init__(self, url: str, max_attempts: int = 3, study_quiet_seconds: float = 30.0
                 ) -> None:
        self.engine = make_engine(url)
        self.max_attempts = max_attempts
        self.study_quiet_seconds = study_quiet_seconds
        upgrade_schema(self.engine)
        self._sessions = make_sessionmaker(self.engine)
        self._dialect = self.engine.dialect.name

    @property
    def sessions(self) -> sessionmaker[Session]:
        """The session factory (for :mod:`dicom_node.studies`, which shares the schema)."""
        return self._sessions

    def close(self) -> None:
        """Release every connection."""
        self.engine.dispose()

    def __enter__(self) -> JobStore:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # --- receive path ---

    def find_duplicate(self, sop_instance_uid: str, sha256: str) -> Job | None:
        """The job of the same instance with the same bytes, if any."""
        with self._sessions() as session:
            return session.scalars(
                select(Job).where(Job.sop_instance_uid == sop_instance_uid, Job.sha256 == sha256)
            ).first()

    def record(
        self,
        instance: ReceivedInstance,
        spool_file: str | None,
        state: JobState,
        reason: str,
    ) -> Job | None:
        """Commit a new job row; return None when the same instance and bytes already exist.

        Parameters
        ----------
        instance
            What the receive path knows of the instance.
        spool_file
            Its name in the spool; None when it was not kept (ignored).
        state
            ``QUEUED``, or ``IGNORED`` for an instance the intake rules passed over.
        reason
            The intake decision's reason (no patient data; cut to 128 characters).

        The commit is durable (SQLite WAL with ``synchronous=FULL``) when this returns.
        """
        fields = dict(
            state=state,
            sop_class_uid=instance.sop_class_uid,
            sop_instance_uid=instance.sop_instance_uid,
            series_instance_uid=instance.series_instance_uid,
            study_instance_uid=instance.study_instance_uid,
            transfer_syntax_uid=instance.transfer_syntax_uid,
            calling_ae=instance.calling_ae,
            peer_address=instance.peer_address,
            spool_file=spool_file,
            sha256=instance.sha256,
            size_bytes=instance.size_bytes,
            intake_reason=reason[:128],
            view=instance.view,
            patient_key=instance.patient_key,
            accession_key=instance.accession_key,
            sr_sop_instance_uid=generate_uid(),
            sr_series_instance_uid=generate_uid(),
            evidence_sop_instance_uid=generate_uid() if state is JobState.QUEUED else None,
            evidence_series_instance_uid=generate_uid() if state is JobState.QUEUED else None,
            finished_at=utcnow() if state is JobState.IGNORED else None,
        )
        gathered = state is JobState.QUEUED and instance.view is not None
        # Twice at most: the same instance and bytes fail at once; on PostgreSQL, another
        # receive may open the study's result at the same moment, and the second try
        # joins it.
        retried = False
        while True:
            job = Job(**fields)
            try:
                with self._sessions.begin() as session:
                    session.add(job)
                    if gathered:  # the study's result waits for this image
                        opened, reopened = studies.touch(
                            session, instance.study_instance_uid, utcnow(),
                            self.study_quiet_seconds)
                        if reopened:
                            job.intake_reason = (f"{reason}; arrived after the "
                                                 f"study's result was formed: reopened as "
                                                 f"version {opened.version}")[:128]
                return job
            except IntegrityError:
                if retried or self.find_duplicate(instance.sop_instance_uid, instance.sha256):
                    return None
                retried = True

    # --- workers ---

    def claim(self, owner: str, limit: int, lease_seconds: float) -> list[Job]:
        """Atomically move up to ``limit`` queued jobs to running under ``owner``'s lease."""
        now = utcnow()
        candidates = (
            select(Job.id).where(Job.state == JobState.QUEUED).order_by(Job.id).limit(limit)
        )
        statement = (
            update(Job)
            .where(Job.id.in_(self._locked(candidates)), Job.state == JobState.QUEUED)
            .values(
                state=JobState.RUNNING,
                lease_owner=owner,
                lease_expires_at=now + timedelta(seconds=lease_seconds),
                attempts=Job.attempts + 1,
                updated_at=now,
            )
            .returning(Job)
        )
        with self._sessions.begin() as session:
            jobs = list(session.scalars(statement.execution_options(synchronize_session=False)))
        return sorted(jobs, key=lambda j: j.id)

    def _locked(self, candidates: Select[int]) -> Select[int]:
        """The ids ``candidates`` selects, for an ``UPDATE … WHERE key IN (…)`` that claims
        them. On PostgreSQL they are locked with ``FOR UPDATE SKIP LOCKED`` (another
        claim at the same moment takes other rows) and selected once, in a
        ``MATERIALIZED`` CTE: as a plain sub-select the planner may rescan it for each
        row it updates (a nested-loop semi-join), and every rescan skips the rows this
        very statement has already changed and locks the next ones, past the limit, so
        one claim took the whole queue. SQLite (``BEGIN IMMEDIATE``: one writer at a
        time) evaluates the sub-select once."""
        if self._dialect != "postgresql":
            return candidates
        claimed = candidates.with_for_update(skip_locked=True).cte().prefix_with("MATERIALIZED")
        return select(*claimed.c)  # its one column: the id

    def extend_leases(self, owner: str, lease_seconds: float, job_ids: Sequence[int]) -> int:
        """Renew ``owner``'s leases on ``job_ids`` to ``lease_seconds`` from now; how many.

        A worker calls this for the jobs it is working on, so that a batch slower
        than one lease (a slow GPU, a large batch) is not reclaimed by another
        worker and classified twice. A lease that already expired and was reaped
        is not ours any more and stays with whoever holds it now.
        """
        if not job_ids:
            return 0
        now = utcnow()
        with self._sessions.begin() as session:
            renewed = session.execute(
                update(Job)
                .where(Job.id.in_(list(job_ids)), Job.lease_owner == owner,
                       Job.state == JobState.RUNNING)
                .values(lease_expires_at=now + timedelta(seconds=lease_seconds))
                .execution_options(synchronize_session=False))
        return int(getattr(renewed, "rowcount", 0))

    def complete_batch(self, owner: str, results: Sequence[JobResult]) -> list[bool]:
        """Store each result and queue one delivery per destination, all in one transaction.

        One commit for a whole batch (one fsync on SQLite, not one per job), and two
        statements whatever its size: the jobs ``owner`` still holds are selected
        (locked, on PostgreSQL), then updated in one ``executemany`` of a statement
        built once. A job ``owner`` no longer holds is left unchanged, and its entry
        is False; the others are stored all the same.
        """
        if not results:
            return []
        now = utcnow()
        held = (select(Job.id)
                .where(Job.id.in_([result.job_id for result in results]),
                       Job.lease_owner == owner, Job.state == JobState.RUNNING)
                .with_for_update())  # SQLite: BEGIN IMMEDIATE holds the database already
        with self._sessions.begin() as session:
            ours = set(session.scalars(held))
            done = []
            stored = []
            for result in results:  # a job named twice is stored once
                stored.append(result.job_id in ours)
                if stored[-1]:
                    done.append(result)
                    ours.discard(result.job_id)
            if not done:
                return stored
            connection = session.connection()
            connection.execute(_COMPLETE, [_completed(result, owner, now) for result in done])
            deliveries = [dict(job_id=result.job_id, kind=route.kind,
                               destination=route.destination, item=route.item,
                               next_attempt_at=now)
                          for result in done for route in dict.fromkeys(result.routes)]
            if deliveries:  # one executemany, not an ORM flush of an object a row
                session.execute(insert(Delivery), deliveries)
        return stored

    def fail(self, job_id: int, owner: str, error: str, retry: bool = True) -> JobState | None:
        """Give a job back after an error: queued again, or failed after ``max_attempts``.

        Returns the new state, or None if ``owner`` no longer held the job.

        Parameters
        ----------
        job_id, owner
            The job and the lease owner that claimed it.
        error
            Why (stored as the job's last error, cut to 2000 characters).
        retry
            False fails the job at once, whatever its attempts.
        """
        with self._sessions() as session:
            job = session.get(Job, job_id)
            attempts = job.attempts if job is not None else 0
        state = JobState.QUEUED if retry and attempts < self.max_attempts else JobState.FAILED
        now = utcnow()
        with self._sessions.begin() as session:
            result = session.execute(
                update(Job)
                .where(Job.id == job_id, Job.lease_owner == owner, Job.state == JobState.RUNNING)
                .values(state=state, last_error=error[:2000], lease_owner=None,
                        lease_expires_at=None, updated_at=now,
                        finished_at=now if state is JobState.FAILED else None)
            )
        return state if int(getattr(result, "rowcount", 0)) == 1 else None

    # --- deliveries ---

    def claim_due_deliveries(self, limit: int, hold_seconds: float,
                             now: datetime | None = None) -> list[tuple[Delivery, Job | None]]:
        """Due pending deliveries with their jobs (None for a study result's message);
        each is held ``hold_seconds``.

        Holding (moving ``next_attempt_at`` forward) keeps a second dispatcher
        from sending the same SR at once; if this process dies mid-send, the
        delivery simply becomes due again.
        """
        now = now or utcnow()
        due = (select(Delivery.id)
               .where(Delivery.state == DeliveryState.PENDING, Delivery.next_attempt_at <= now)
               .order_by(Delivery.next_attempt_at, Delivery.id).limit(limit))
        with self._sessions.begin() as session:
            held = list(session.scalars(
                update(Delivery)
                .where(Delivery.id.in_(self._locked(due)),
                       Delivery.state == DeliveryState.PENDING)
                .values(next_attempt_at=now + timedelta(seconds=hold_seconds), updated_at=now)
                .returning(Delivery)
                .execution_options(synchronize_session=False)
            ))
            jobs = {j.id: j for j in session.scalars(
                select(Job).where(Job.id.in_([d.job_id for d in held if d.job_id])))}
        return [(d, jobs.get(d.job_id) if d.job_id else None)
                for d in sorted(held, key=lambda d: d.id)]

    def record_outcomes(self, outcomes: Sequence[DeliveryOutcome]) -> None:
        """Record the attempts of one association, in one transaction."""
        now = utcnow()
        # The deliveries done, one statement per status (most are all 0x0000).
        done: dict[int | None, list[int]] = {}
        others = []
        for outcome in outcomes:
            if outcome.state is DeliveryState.DONE:
                done.setdefault(outcome.status, []).append(outcome.delivery_id)
            else:
                others.append(outcome)
        # The session holds no Delivery: nothing of it to bring up to date
        # (synchronize_session=False).
        with self._sessions.begin() as session:
            for status, ids in done.items():
                session.execute(update(Delivery).where(Delivery.id.in_(ids))
                                .values(last_status=status, updated_at=now,
                                        attempts=Delivery.attempts + 1,
                                        state=DeliveryState.DONE, delivered_at=now,
                                        last_error=None)
                                .execution_options(synchronize_session=False))
            for outcome in others:
                values: dict[str, Any] = {"last_status": outcome.status, "updated_at": now,
                                          "attempts": Delivery.attempts + 1}
                if outcome.state is DeliveryState.DEAD:
                    values.update(state=DeliveryState.DEAD, last_error=(outcome.error or "")[:2000])
                else:
                    if outcome.retry_at is None:
                        raise ValueError("a delivery to retry needs its retry time")
                    values.update(next_attempt_at=outcome.retry_at,
                                  last_error=(outcome.error or "")[:2000])
                session.execute(update(Delivery).where(Delivery.id == outcome.delivery_id)
                                .values(**values).execution_options(synchronize_session=False))

    def retry_dead_deliveries(self, job_id: int) -> int:
        """Requeue the dead deliveries of a job and of its study's results
        (``dicom-node jobs retry``); return how many. Those whose files retention
        deleted stay dead."""
        now = utcnow()
        with self._sessions.begin() as session:
            # The job's row first, locked on PostgreSQL (SQLite's BEGIN IMMEDIATE locks
            # all): a purge deciding at the same moment either has marked it, or waits.
            files_kept = session.execute(
                select(Job.id).where(Job.id == job_id, Job.files_purged_at.is_(None))
                .with_for_update()).first() is not None
            study = select(Job.study_instance_uid).where(Job.id == job_id).scalar_subquery()
            # The study's current result only (a superseded one's messages stay dead),
            # and only messages that were written (one refused for want of a Patient
            # ID keeps its reason) and not purged.
            results = select(StudyResult.id).where(StudyResult.study_instance_uid == study,
                                                   StudyResult.state == StudyState.CLOSED,
                                                   StudyResult.files_purged_at.is_(None))
            messages = and_(Delivery.study_result_id.in_(results),
                            Delivery.payload_file.is_not(None))
            which = or_(Delivery.job_id == job_id, messages) if files_kept else messages
            result = session.execute(
                update(Delivery)
                .where(which,
                       Delivery.state == DeliveryState.DEAD)
                .values(state=DeliveryState.PENDING, attempts=0, next_attempt_at=now,
                        updated_at=now)
            )
        return int(getattr(result, "rowcount", 0))

    def requeue_failed_job(self, job_id: int) -> bool:
        """Give a failed job a fresh set of attempts (its study's result reopens, so that
        it counts there once classified); not once retention deleted its image."""
        now = utcnow()
        with self._sessions.begin() as session:
            result = session.execute(
                update(Job).where(Job.id == job_id, Job.state == JobState.FAILED,
                                  Job.files_purged_at.is_(None))
                .values(state=JobState.QUEUED, attempts=0, finished_at=None, updated_at=now)
            )
            requeued = int(getattr(result, "rowcount", 0)) == 1
            job = session.get(Job, job_id) if requeued else None
            if job is not None and job.view is not None:
                studies.touch(session, job.study_instance_uid, now, self.study_quiet_seconds)
        return requeued

    def deliveries(self, job_ids: Sequence[int]) -> dict[int, list[Delivery]]:
        """Deliveries per job id: its own objects', then its study results' messages
        (study results that include the job)."""
        found: dict[int, list[Delivery]] = {i: [] for i in job_ids}
        with self._sessions() as session:
            for delivery in session.scalars(
                    select(Delivery).where(Delivery.job_id.in_(job_ids)).order_by(Delivery.id)):
                found[int(delivery.job_id or 0)].append(delivery)
            uids = set(session.scalars(select(Job.study_instance_uid)
                                       .where(Job.id.in_(job_ids))))
            for study in session.scalars(select(StudyResult).where(
                    StudyResult.study_instance_uid.in_(uids), StudyResult.job_ids.is_not(None))):
                messages = list(session.scalars(select(Delivery).where(
                    Delivery.study_result_id == study.id).order_by(Delivery.id)))
                for job_id in study.job_ids or []:
                    if job_id in found:
                        found[job_id].extend(messages)
        return found

    def ping(self) -> None:
        """One round trip to the database (raises when it cannot be reached)."""
        with self._sessions() as session:
            session.execute(select(1)).scalar_one()

    def failing_destinations(self, for_seconds: float, now: datetime | None = None
                             ) -> list[tuple[str, str, datetime]]:
        """``(kind, destination, since)`` of every destination with a delivery that has
        failed at least once, is still pending, and was queued more than
        ``for_seconds`` ago (``since``: the oldest such delivery's queueing time)."""
        cutoff = (now or utcnow()) - timedelta(seconds=for_seconds)
        query = (select(Delivery.kind, Delivery.destination, func.min(Delivery.created_at))
                 .where(Delivery.state == DeliveryState.PENDING, Delivery.attempts > 0,
                        Delivery.created_at < cutoff)
                 .group_by(Delivery.kind, Delivery.destination)
                 .order_by(Delivery.kind, Delivery.destination))
        with self._sessions() as session:
            return [(kind, destination, since)
                    for kind, destination, since in session.execute(query).all()]

    def delivery_counts(self) -> dict[str, int]:
        """Number of deliveries per state."""
        with self._sessions() as session:
            rows = session.execute(
                select(Delivery.state, func.count()).group_by(Delivery.state)).all()
        return {state.value: int(n) for state, n in rows}

    # --- recovery ---

    def reap_expired_leases(self, now: datetime | None = None) -> tuple[int, int]:
        """Requeue running jobs whose lease expired; fail those out of attempts.

        Returns ``(requeued, failed)``.
        """
        now = now or utcnow()
        expired = (Job.state == JobState.RUNNING) & (Job.lease_expires_at < now)
        return self._release(expired, now, "lease expired")

    def recover_dead_local_workers(self) -> tuple[int, int]:
        """Release jobs leased by processes on this host that no longer run.

        Called at start-up: a node killed mid-inference gets its jobs back at
        once instead of waiting for the lease to expire.
        """
        host = socket.gethostname()
        with self._sessions() as session:
            owners = session.scalars(
                select(Job.lease_owner).where(Job.state == JobState.RUNNING).distinct()
            ).all()
        dead = []
        for owner in owners:
            parts = (owner or "").split(":")
            if len(parts) == 3 and parts[0] == host and parts[1].isdigit():
                if not _pid_alive(int(parts[1])) or int(parts[1]) == os.getpid():
                    dead.append(owner)
        if not dead:
            return (0, 0)
        condition = (Job.state == JobState.RUNNING) & Job.lease_owner.in_(dead)
        return self._release(condition, utcnow(), "worker process died")

    def _release(self, condition: ColumnElement[bool], now: datetime, reason: str
                 ) -> tuple[int, int]:
        with self._sessions.begin() as session:
            failed = session.execute(
                update(Job)
                .where(condition, Job.attempts >= self.max_attempts)
                .values(state=JobState.FAILED, lease_owner=None, lease_expires_at=None,
                        last_error=f"{reason} after {self.max_attempts} attempt(s)",
                        finished_at=now, updated_at=now)
            )
            requeued = session.execute(
                update(Job)
                .where(condition)
                .values(state=JobState.QUEUED, lease_owner=None, lease_expires_at=None,
                        last_error=reason, updated_at=now)
            )
        counts = (int(getattr(requeued, "rowcount", 0)), int(getattr(failed, "rowcount", 0)))
        if any(counts):
            LOGGER.warning("%s: %d job(s) requeued, %d failed", reason, *counts)
        return counts

    def spool_files(self) -> set[str]:
        """Every received file name in the spool referenced by a job."""
        with self._sessions() as session:
            return {
                name for name in session.scalars(
                    select(Job.spool_file).where(Job.spool_file.is_not(None))
                )
                if name is not None
            }

    # --- queries ---

    def get(self, job_id: int) -> Job | None:
        """One job by id."""
        with self._sessions() as session:
            return session.get(Job, job_id)

    def list(self, state: JobState | None = None, limit: int = 100) -> list[Job]:
        """The newest jobs first, optionally of one state."""
        query = select(Job).order_by(Job.id.desc()).limit(limit)
        if state is not None:
            query = query.where(Job.state == state)
        with self._sessions() as session:
            return list(session.scalars(query))

    def counts(self) -> dict[str, int]:
        """Number of jobs per state."""
        with self._sessions() as session:
            rows = session.execute(select(Job.state, func.count()).group_by(Job.state)).all()
        return {state.value: int(n) for state, n in rows}

