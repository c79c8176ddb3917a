"""Retention: the files of finished work are deleted after ``retention_files_days``, the
rows that tell what was sent where after ``retention_rows_days`` (0: kept for ever).

A **job's files** (the received image, its SR, its evidence image) go once the job
finished (done, failed or ignored) before the files' cutoff, its study has no open
result (closing one reads the first image's identifiers from its file), and each of
its deliveries is final: done, or dead and *acknowledged*. A dead delivery counts as
acknowledged once it has stayed dead for the whole files' age: ``dicom-node jobs retry``
puts it back to pending and every attempt stamps it anew, so an operator has that long
to notice it and send it again; after that nobody will, and its files may go. A
**study result's message files** (its ORU and FHIR Bundle, one per delivery) go by the
same rules, counted from when it closed. Whatever is pending, or a job queued or
running, keeps its files.

Each purge is marked before anything is deleted (``files_purged_at``, in one short
transaction per batch that checks the rules again), so that ``jobs retry`` (which
leaves purged work alone) can never make a delivery pending whose file is gone; then
the files are deleted and their names cleared. A run interrupted in between finishes
the deletion on the next. **Rows** (jobs with their deliveries; the versions of a
study's result, all together, with theirs) go after the rows' age, their files first.

The node runs :meth:`Retention.run` every hour; ``dicom-node jobs purge --dry-run``
reports what would go and why (ids, states and ages; never a patient's data or a file
name taken from received data: the spool's names are its own).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import (
    ColumnElement,
    Update,
    and_,
    case,
    delete,
    exists,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.orm import Session

from dicom_node.db import (
    Delivery,
    DeliveryState,
    Job,
    JobState,
    StudyResult,
    StudyState,
    utcnow,
)
from dicom_node.jobs import JobStore
from dicom_node.spool import Spool

LOGGER = logging.getLogger(__name__)

#: Rows per transaction: a purge never holds the database's write lock for long.
BATCH = 500
_FINISHED = (JobState.DONE, JobState.FAILED, JobState.IGNORED)
_CLOSED = (StudyState.CLOSED, StudyState.SUPERSEDED)
_T = TypeVar("_T")


@dataclass(frozen=True)
class Purged:
    """One job or study result whose files go: its id, how many files, and why (its
    state, its age, its deliveries; no patient data)."""

    kind: str  # "job" or "study result"
    id: int
    files: int
    reason: str


@dataclass
class PurgeReport:
    """What one run deleted (or, dry, would delete), and what it kept although old."""

    now: datetime
    files_cutoff: datetime | None
    rows_cutoff: datetime | None
    dry_run: bool
    purged: list[Purged] = field(default_factory=list)
    #: Files deleted (dry: to delete); files that could not be deleted (kept for the
    #: next run).
    files: int = 0
    failed_files: int = 0
    #: Jobs finished before the files' cutoff whose files stay, per reason.
    kept: Counter[str] = field(default_factory=Counter)
    job_rows: int = 0
    study_result_rows: int = 0
    delivery_rows: int = 0

    def summary(self) -> str:
        """One line of counts."""
        jobs = sum(1 for p in self.purged if p.kind == "job")
        verb = "would delete" if self.dry_run else "deleted"
        kept = ", ".join(f"{n} {why}" for why, n in sorted(self.kept.items())) or "none"
        return (f"retention {verb}: the files of {jobs} job(s) and "
                f"{len(self.purged) - jobs} study result(s) ({self.files} file(s)"
                + (f", {self.failed_files} could not be deleted" if self.failed_files else "")
                + f"); the rows of {self.job_rows} job(s), {self.study_result_rows} study "
                f"result(s) and {self.delivery_rows} delivery(ies); old jobs kept: {kept}")


def _unfinished(cutoff: datetime) -> ColumnElement[bool]:
    """A delivery that still needs its file: pending, or dead for less than the age (not
    yet acknowledged: someone may still `jobs retry` it)."""
    return or_(Delivery.state == DeliveryState.PENDING,
               and_(Delivery.state == DeliveryState.DEAD, Delivery.updated_at >= cutoff))


def job_files_due(cutoff: datetime) -> ColumnElement[bool]:
    """The rule for a job's files: finished before ``cutoff``, not purged yet, no open
    result of its study, every delivery final."""
    return and_(
        Job.files_purged_at.is_(None),
        Job.state.in_(_FINISHED),
        Job.finished_at < cutoff,
        ~exists().where(Delivery.job_id == Job.id, _unfinished(cutoff)),
        ~exists().where(StudyResult.study_instance_uid == Job.study_instance_uid,
                        StudyResult.state == StudyState.OPEN))


def study_files_due(cutoff: datetime) -> ColumnElement[bool]:
    """The rule for a study result's message files: closed (or superseded) before
    ``cutoff``, not purged yet, every message delivery final."""
    return and_(
        StudyResult.files_purged_at.is_(None),
        StudyResult.state.in_(_CLOSED),
        StudyResult.closed_at < cutoff,
        ~exists().where(Delivery.study_result_id == StudyResult.id, _unfinished(cutoff)))


def _job_names(job: Any) -> list[str]:
    return [n for n in (job.spool_file, job.sr_file, job.evidence_file) if n]


def _chunks(ids: Sequence[_T], size: int = BATCH) -> Iterable[Sequence[_T]]:
    for start in range(0, len(ids), size):
        yield ids[start:start + size]


class Retention:
    """Purges files and rows past their age (see the module's docstring)."""

    def __init__(self, store: JobStore, spool: Spool, files_days: int, rows_days: int = 0
                 ) -> None:
        if rows_days and (not files_days or rows_days < files_days):
            raise ValueError("rows are kept at least as long as files")
        self.store = store
        self.spool = spool
        self.files_days = files_days
        self.rows_days = rows_days

    def run(self, now: datetime | None = None, dry_run: bool = False) -> PurgeReport:
        """Purge what is due at ``now`` (dry: only report it); the report either way."""
        now = now or utcnow()
        files_cutoff = now - timedelta(days=self.files_days) if self.files_days else None
        rows_cutoff = now - timedelta(days=self.rows_days) if self.rows_days else None
        report = PurgeReport(now, files_cutoff, rows_cutoff, dry_run)
        self._unfinished_purges(report)
        if files_cutoff is not None:
            self._jobs(files_cutoff, report)
            self._studies(files_cutoff, report)
            self._kept(files_cutoff, report)
        if rows_cutoff is not None and files_cutoff is not None:
            self._rows(rows_cutoff, files_cutoff, report)
        if not dry_run and (report.purged or report.job_rows or report.study_result_rows):
            LOGGER.info("%s", report.summary())
        return report

    def scheduled(self) -> None:
        """The scheduler's hourly run: purge, and log what failed instead of raising."""
        try:
            self.run()
        except Exception:
            LOGGER.exception("retention purge failed; tried again at the next run")

    # --- files ---

    def _unfinished_purges(self, report: PurgeReport) -> None:
        """Files of jobs and study results marked purged whose deletion a stop
        interrupted: deleted now."""
        with self.store.sessions() as session:
            jobs = session.execute(select(
                Job.id, Job.spool_file, Job.sr_file, Job.evidence_file).where(
                Job.files_purged_at.is_not(None),
                or_(Job.spool_file.is_not(None), Job.sr_file.is_not(None),
                    Job.evidence_file.is_not(None)))).all()
            studies = self._messages(session, list(session.scalars(select(
                StudyResult.id).where(StudyResult.files_purged_at.is_not(None)).where(
                exists().where(Delivery.study_result_id == StudyResult.id,
                               Delivery.payload_file.is_not(None))))))
        left = "marked purged by an interrupted run"
        self._delete_jobs({j.id: _job_names(j) for j in jobs},
                          {j.id: left for j in jobs}, report)
        self._delete_studies(studies, dict.fromkeys(studies, left), report)

    def _jobs(self, cutoff: datetime, report: PurgeReport) -> None:
        columns = (Job.id, Job.state, Job.finished_at, Job.spool_file, Job.sr_file,
                   Job.evidence_file)
        while True:
            with self.store.sessions.begin() as session:
                query = select(*columns).where(job_files_due(cutoff)).order_by(Job.id)
                due = session.execute(query if report.dry_run else query.limit(BATCH)).all()
                if not due:
                    return
                reasons = self._reasons(session, due, Delivery.job_id, "deliveries", report.now)
                # Marked first: nothing may need them from now on.
                marked = self._mark(session, Job, job_files_due(cutoff), reasons, report)
            self._delete_jobs({j.id: _job_names(j) for j in due if j.id in marked}, reasons,
                              report)
            if report.dry_run or len(due) < BATCH:
                return

    def _studies(self, cutoff: datetime, report: PurgeReport) -> None:
        while True:
            with self.store.sessions.begin() as session:
                query = (select(StudyResult.id, StudyResult.state, StudyResult.closed_at)
                         .where(study_files_due(cutoff)).order_by(StudyResult.id))
                due = session.execute(query if report.dry_run else query.limit(BATCH)).all()
                if not due:
                    return
                reasons = self._reasons(session, due, Delivery.study_result_id, "messages",
                                        report.now)
                names = self._messages(session, list(reasons))
                marked = self._mark(session, StudyResult, study_files_due(cutoff), reasons,
                                    report)
            self._delete_studies({i: n for i, n in names.items() if i in marked}, reasons,
                                 report)
            if report.dry_run or len(due) < BATCH:
                return

    def _reasons(self, session: Session, due: Sequence[Any], owner: Any, what: str,
                 now: datetime) -> dict[int, str]:
        """Why each due row (id, state, when finished or closed) goes, in order: its
        state, its age, and its deliveries (``owner``: their column naming it)."""
        ids = [row[0] for row in due]
        return {row[0]: f"{row[1].value} {self._days(now, row[2])}; {what}: {summary}"
                for row, summary in zip(due, self._deliveries(session, owner, ids, now),
                                        strict=True)}

    @staticmethod
    def _mark(session: Session, table: type[Job] | type[StudyResult],
              due: ColumnElement[bool], ids: Iterable[int], report: PurgeReport) -> set[int]:
        """Mark ``ids`` of ``table`` whose files are still ``due`` as purged now; the ids
        marked (a dry run marks nothing and returns them all)."""
        if report.dry_run:
            return set(ids)
        return set(session.scalars(
            update(table).where(table.id.in_(list(ids)), due)
            .values(files_purged_at=report.now).returning(table.id)
            .execution_options(synchronize_session=False)))

    @staticmethod
    def _messages(session: Session, ids: Sequence[int]) -> dict[int, list[str]]:
        """Study result id -> its message files."""
        names: dict[int, list[str]] = {i: [] for i in ids}
        for chunk in _chunks(ids):
            for owner, name in session.execute(select(
                    Delivery.study_result_id, Delivery.payload_file).where(
                    Delivery.study_result_id.in_(chunk), Delivery.payload_file.is_not(None))):
                names[int(owner or 0)].append(str(name))
        return names

    def _delete_jobs(self, names: dict[int, list[str]], reasons: dict[int, str],
                     report: PurgeReport) -> None:
        self._delete("job", names, reasons, report, lambda ids: update(Job).where(
            Job.id.in_(ids)).values(spool_file=None, sr_file=None, evidence_file=None))

    def _delete_studies(self, names: dict[int, list[str]], reasons: dict[int, str],
                        report: PurgeReport) -> None:
        self._delete("study result", names, reasons, report, lambda ids: update(
            Delivery).where(Delivery.study_result_id.in_(ids)).values(payload_file=None))

    def _delete(self, kind: str, names: dict[int, list[str]], reasons: dict[int, str],
                report: PurgeReport, clear: Callable[[Sequence[int]], Update]) -> None:
        """Delete each owner's files (dry: count them), then, for the owners whose files
        are all gone, clear the names (``clear``: the update for a chunk of owners).

        Parameters
        ----------
        kind
            What owns the files, for the report and the log.
        names, reasons
            Per owner: its files, and why they go.
        report
            The run's report, counted into.
        clear
            The update that forgets the names of a chunk of owners.
        """
        gone = []
        for owner, files in names.items():
            report.purged.append(Purged(kind, owner, len(files), reasons[owner]))
            report.files += len(files)
            if report.dry_run:
                continue
            failed = 0
            for name in files:
                try:
                    self.spool.remove(name)
                except (OSError, ValueError) as exc:
                    failed += 1
                    LOGGER.error("retention: a file of %s %d cannot be deleted (%s); tried "
                                 "again at the next run", kind, owner, type(exc).__name__)
            report.files -= failed
            report.failed_files += failed
            if not failed:
                gone.append(owner)
        if gone and not report.dry_run:
            with self.store.sessions.begin() as session:
                for chunk in _chunks(gone):
                    session.execute(clear(chunk).execution_options(synchronize_session=False))

    @staticmethod
    def _days(now: datetime, then: datetime | None) -> str:
        return "" if then is None else f"{(now - then).days} day(s) ago"

    @staticmethod
    def _deliveries(session: Session, owner: Any, ids: Sequence[int], now: datetime
                    ) -> list[str]:
        """Per id, in order: its deliveries by state ("2 done, 1 dead for 40 days")."""
        counts: dict[int, dict[DeliveryState, tuple[int, datetime]]] = {i: {} for i in ids}
        for chunk in _chunks(ids):
            for key, state, n, latest in session.execute(
                    select(owner, Delivery.state, func.count(), func.max(Delivery.updated_at))
                    .where(owner.in_(chunk)).group_by(owner, Delivery.state)):
                counts[int(key)][state] = (int(n), latest)
        described = []
        for i in ids:
            parts = [f"{counts[i][DeliveryState.DONE][0]} done"] \
                if DeliveryState.DONE in counts[i] else []
            if DeliveryState.DEAD in counts[i]:
                n, latest = counts[i][DeliveryState.DEAD]
                parts.append(f"{n} dead for {(now - latest).days}+ day(s), not retried")
            described.append(", ".join(parts) or "none")
        return described

    def _kept(self, cutoff: datetime, report: PurgeReport) -> None:
        """Count the jobs finished (or received, if still queued or running) before
        ``cutoff`` whose files stay, by the first reason that keeps them."""
        pending = exists().where(Delivery.job_id == Job.id,
                                 Delivery.state == DeliveryState.PENDING)
        recent = exists().where(Delivery.job_id == Job.id, _unfinished(cutoff))
        open_study = exists().where(StudyResult.study_instance_uid == Job.study_instance_uid,
                                    StudyResult.state == StudyState.OPEN)
        with self.store.sessions() as session:
            rows = session.execute(select(Job.state, pending, recent, open_study).where(
                Job.files_purged_at.is_(None), func.coalesce(Job.finished_at, Job.created_at)
                < cutoff, ~job_files_due(cutoff))).all()
        for state, is_pending, is_recent, is_open in rows:
            report.kept[
                f"still {state.value}" if state not in _FINISHED
                else "with a delivery pending" if is_pending
                else "with a delivery dead for less than the age (may be retried)" if is_recent
                else "in a study whose result is open" if is_open
                else "not finished"] += 1

    # --- rows ---

    def _rows(self, cutoff: datetime, files_cutoff: datetime, report: PurgeReport) -> None:
        """Delete the rows finished before ``cutoff`` whose files are gone: a job with
        its deliveries; a study's result versions, all closed before ``cutoff``, with
        theirs. A dry run counts the rows whose files this run would delete as gone."""
        if report.dry_run:
            files_gone: ColumnElement[bool] = or_(Job.files_purged_at.is_not(None),
                                                  job_files_due(files_cutoff))
            every_version_gone = (func.count(StudyResult.files_purged_at) + func.sum(
                case((study_files_due(files_cutoff), 1), else_=0)) == func.count())
        else:
            files_gone = and_(Job.files_purged_at.is_not(None), Job.spool_file.is_(None),
                              Job.sr_file.is_(None), Job.evidence_file.is_(None))
            message_left = exists().where(Delivery.study_result_id == StudyResult.id,
                                          Delivery.payload_file.is_not(None))
            every_version_gone = and_(
                func.count(StudyResult.files_purged_at) == func.count(),
                func.sum(case((message_left, 1), else_=0)) == 0)
        jobs_due = and_(files_gone, Job.finished_at < cutoff)
        studies_due = (select(StudyResult.study_instance_uid)
                       .group_by(StudyResult.study_instance_uid)
                       .having(every_version_gone, func.max(StudyResult.closed_at) < cutoff))
        while True:
            with self.store.sessions.begin() as session:
                query = select(Job.id).where(jobs_due).order_by(Job.id)
                jobs = list(session.scalars(query if report.dry_run else query.limit(BATCH)))
                uids = list(session.scalars(
                    studies_due if report.dry_run else studies_due.limit(BATCH)))
                studies: list[int] = []
                for uid_chunk in _chunks(uids):
                    studies += session.scalars(select(StudyResult.id).where(
                        StudyResult.study_instance_uid.in_(uid_chunk)))
                for chunk in _chunks(jobs):
                    report.delivery_rows += self._delete_rows(
                        session, Delivery.job_id.in_(chunk), report.dry_run)
                for chunk in _chunks(studies):
                    report.delivery_rows += self._delete_rows(
                        session, Delivery.study_result_id.in_(chunk), report.dry_run)
                if not report.dry_run:
                    for chunk in _chunks(jobs):
                        session.execute(delete(Job).where(Job.id.in_(chunk)))
                    for chunk in _chunks(studies):  # one study's versions refer to each other
                        session.execute(update(StudyResult).where(StudyResult.id.in_(chunk))
                                        .values(supersedes_id=None))
                        session.execute(delete(StudyResult).where(StudyResult.id.in_(chunk)))
                report.job_rows += len(jobs)
                report.study_result_rows += len(studies)
            if report.dry_run or (len(jobs) < BATCH and len(uids) < BATCH):
                return

    @staticmethod
    def _delete_rows(session: Session, which: ColumnElement[bool], dry_run: bool) -> int:
        """Delete the deliveries ``which`` selects (dry: count them); how many."""
        count = int(session.scalar(select(func.count()).select_from(Delivery).where(which))
                    or 0)
        if not dry_run:
            session.execute(delete(Delivery).where(which))
        return count
