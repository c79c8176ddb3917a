"""Study results: one answer per study, formed from its frontal images.

Radiologists read studies, not images. Every queued frontal (or view-undetermined)
image opens or extends its study's result (:func:`touch`, in the transaction that
records the image); a result closes ``study_quiet_seconds`` after the study's last
image arrived -- like the series and study timers of DICOM routers -- and once none
of its images is still waiting for the network. Closing (:meth:`StudyBook.close_due`,
run by the node's scheduler) forms the answer from the study's classified images:

* *flagged* when any image reached a class's operating-point threshold;
* per class, the highest probability and the image it came from;
* the label: the class with the highest of those probabilities;
* *problems*: images left out, and why -- another patient or another accession
  than the study's first image (compared through :func:`dicom_node.jobs.study_key`,
  so no identifier is stored), or no result (the job failed).

The per-image SRs are not changed. An image that arrives after its study's result
closed opens a new version that supersedes it (same study, version + 1, the old
one referenced); when it closes, the old version is marked superseded.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import ColumnElement, select, update
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
from model.card import UNVALIDATED_WARNING

if TYPE_CHECKING:
    from dicom_node.jobs import JobStore

LOGGER = logging.getLogger(__name__)

#: The most study results one run of :meth:`StudyBook.close_due` closes.
STUDIES_PER_RUN = 500
#: How long a study result that could not be closed waits before it is tried again.
RETRY_SECONDS = 60.0


def _images_in(*states: JobState) -> tuple[ColumnElement[bool], ...]:
    """Conditions on a job: one of a study's images (its view known: frontal or
    undetermined) in one of ``states``."""
    return Job.view.is_not(None), Job.state.in_(states)


def touch(session: Session, study_instance_uid: str, now: datetime, quiet_seconds: float
          ) -> tuple[StudyResult, bool]:
    """Open the study's result, or extend its quiet period, for an image just queued;
    return it, and whether it reopened a closed one.

    A study whose latest result is closed is reopened as a new version that will
    supersede it.

    Parameters
    ----------
    session
        The transaction that records the image.
    study_instance_uid
        The image's study.
    now
        When the image arrived.
    quiet_seconds
        How long the result stays open after the study's last image.
    """
    closes_at = now + timedelta(seconds=quiet_seconds)
    # FOR UPDATE (PostgreSQL; SQLite's BEGIN IMMEDIATE already serialises writers): a
    # result being closed is not extended behind the closer's back, and vice versa.
    latest = session.scalars(
        select(StudyResult).where(StudyResult.study_instance_uid == study_instance_uid)
        .order_by(StudyResult.version.desc()).limit(1).with_for_update()).first()
    if latest is not None and latest.state is StudyState.OPEN:
        latest.last_image_at, latest.closes_at = now, closes_at
        return latest, False
    opened = StudyResult(
        study_instance_uid=study_instance_uid, state=StudyState.OPEN,
        version=latest.version + 1 if latest is not None else 1,
        supersedes_id=latest.id if latest is not None else None,
        opened_at=now, last_image_at=now, closes_at=closes_at)
    session.add(opened)
    if latest is not None:
        LOGGER.info("study result %d reopened by a late image as version %d", latest.id,
                    opened.version)
    return opened, latest is not None


@dataclass(frozen=True)
class Answer:
    """What a study's classified images come to."""

    flagged: bool | None
    label: str | None
    probabilities: dict[str, Any]
    flags: list[str]
    job_ids: list[int]
    problems: list[str]
    model_version: str | None
    model_validated: bool | None
    #: job id -> why it was left out (stored on the job as its study note)
    left_out: dict[int, str]


def form(jobs: list[Job]) -> Answer:
    """The study's answer from its finished frontal jobs (oldest first).

    The study's first classified image fixes its patient and accession: an image
    of another one is left out, with the reason, rather than mixed in.
    """
    classified = [j for j in jobs if j.state is JobState.DONE and j.probabilities]
    left_out = {j.id: "not classified: the job failed" for j in jobs
                if j.state is JobState.FAILED}
    # Each identifier's reference is the first classified image that carries it: an
    # image without a Patient ID neither defines nor breaks the study's patient.
    patient = next((j for j in classified if j.patient_key), None)
    accession = next((j for j in classified if j.accession_key), None)
    included: list[Job] = []
    for job in classified:
        if patient is not None and job.patient_key and job.patient_key != patient.patient_key:
            left_out[job.id] = (f"another patient than the study's first image "
                                f"(job {patient.id})")
        elif (accession is not None and job.accession_key
              and job.accession_key != accession.accession_key):
            left_out[job.id] = (f"another accession number than the study's first image "
                                f"(job {accession.id})")
        else:
            included.append(job)
    best: dict[str, Any] = {}
    for job in included:
        for key, p in (job.probabilities or {}).items():
            if key not in best or p > best[key]["probability"]:
                best[key] = {"probability": p, "job_id": job.id,
                             "sop_instance_uid": job.sop_instance_uid}
    flags = sorted({f for j in included for f in (j.flags or [])})
    # A job whose model had no operating points has flags None: nothing was checked,
    # so the study cannot say "not flagged".
    checked = all(j.flags is not None for j in included)
    versions = sorted({j.model_version for j in included if j.model_version})
    problems = [f"job {i}: {why}" for i, why in sorted(left_out.items())]
    if len(versions) > 1:
        problems.append(f"images classified by different models: {', '.join(versions)}")
    label = max(best, key=lambda k: best[k]["probability"]) if best else None
    return Answer(
        flagged=(True if flags else (False if checked else None)) if included else None,
        label=label, probabilities=best,
        flags=flags, job_ids=[j.id for j in included], problems=problems,
        model_version=versions[-1] if versions else None,
        model_validated=(all(bool(j.model_validated) for j in included)
                         if included else None),
        left_out=left_out)


class StudyBook:
    """Closes due study results and lists them; shares the job store's database.

    ``on_close(session, study, jobs)``, when given, runs in the transaction that
    closes each result (the worklist messages are added there, so a closed result
    never lacks them); None when there is nothing to add (no worklist destination).
    """

    def __init__(self, store: JobStore,
                 on_close: Callable[[Session, StudyResult, list[Job]], None] | None = None
                 ) -> None:
        self.store = store
        self.on_close = on_close

    def close_due(self, now: datetime | None = None) -> list[StudyResult]:
        """Close the open results whose quiet period ended and whose images are all
        classified (or failed), the longest due first, at most :data:`STUDIES_PER_RUN`;
        return the results closed."""
        now = now or utcnow()
        # An image of the study still in the queue: it closes once the network has seen
        # every image.
        waiting = select(Job.id).where(
            Job.study_instance_uid == StudyResult.study_instance_uid,
            *_images_in(JobState.QUEUED, JobState.RUNNING)).exists()
        with self.store.sessions.begin() as session:
            # At most STUDIES_PER_RUN a run (after an outage thousands may be due; the
            # next run, a second later, takes the next ones), and only those that can
            # close, so that studies still waiting never hold back those behind them.
            due = session.scalars(select(StudyResult).where(
                StudyResult.state == StudyState.OPEN, StudyResult.closes_at <= now,
                ~waiting).order_by(StudyResult.closes_at, StudyResult.id)
                .limit(STUDIES_PER_RUN).with_for_update(skip_locked=True)).all()
            if not due:
                return []
            uids = [study.study_instance_uid for study in due]  # one open result a study
            # Asked again now that the rows are locked: on PostgreSQL the query above saw
            # the jobs committed before it began, and an image queued (its study touched)
            # between then and the lock would be missed. Later ones wait for our lock.
            still_waiting = self._waiting(session, uids)
            # One query for all of them, not one a study: their images classified or failed.
            finished = self._finished(session, uids)
            ready = [study for study in due if study.study_instance_uid not in still_waiting]
            closed = self._close_all(session, ready, finished, now)
        for study in closed:
            LOGGER.info("study result %d (version %d) closed: %s%s, %d image(s)%s%s", study.id,
                        study.version, study.label or "no result",
                        ", flagged " + "+".join(study.flags or []) if study.flagged else "",
                        len(study.job_ids or []),
                        f"; {len(study.problems or [])} problem(s): "
                        + "; ".join(study.problems or []) if study.problems else "",
                        "" if study.model_validated is not False
                        else f" -- {UNVALIDATED_WARNING}")
        return closed

    def _close_all(self, session: Session, studies: list[StudyResult],
                   finished: dict[str, list[Job]], now: datetime) -> list[StudyResult]:
        """Close ``studies`` with their ``finished`` images; return those closed. One
        study's failure is its own: it waits :data:`RETRY_SECONDS`, the others close.

        Without ``on_close`` (no worklist destination), closing writes only to the
        database: all are closed in one savepoint and one flush (their updates go as
        one ``executemany``), and, should any fail, that savepoint is rolled back and
        they are closed one by one. ``on_close`` writes message files, which a rolled-
        back savepoint would leave without their rows: then each study is closed in
        its own savepoint from the start.
        """
        if not studies:
            return []
        if self.on_close is None:
            try:
                with session.begin_nested():
                    for study in studies:
                        self._close_one(session, study, finished, now)
                return studies
            except Exception as exc:  # which one is logged below, if it fails again
                LOGGER.info("closing %d study results together failed (%s): one by one now",
                            len(studies), type(exc).__name__)
        closed = []
        for study in studies:
            try:
                with session.begin_nested():
                    self._close_one(session, study, finished, now)
            except Exception as exc:
                # Not first in line again at the next run: enough results that keep
                # failing would fill every run and hold back those behind them.
                study.closes_at = now + timedelta(seconds=RETRY_SECONDS)
                LOGGER.error("study result %d could not be closed (%s); tried again "
                             "in %.0f s", study.id, type(exc).__name__, RETRY_SECONDS)
                continue
            closed.append(study)
        return closed

    def _close_one(self, session: Session, study: StudyResult,
                   finished: dict[str, list[Job]], now: datetime) -> None:
        jobs = finished.get(study.study_instance_uid, [])
        self._close(session, study, jobs, now)
        if self.on_close is not None:
            self.on_close(session, study, jobs)

    @staticmethod
    def _waiting(session: Session, study_instance_uids: list[str]) -> set[str]:
        """Those of ``study_instance_uids`` with an image still queued or running."""
        return set(session.scalars(select(Job.study_instance_uid).distinct().where(
            Job.study_instance_uid.in_(study_instance_uids),
            *_images_in(JobState.QUEUED, JobState.RUNNING))))

    @staticmethod
    def _finished(session: Session, study_instance_uids: list[str]) -> dict[str, list[Job]]:
        """The images of each of ``study_instance_uids`` that were classified or failed,
        in the order they were received."""
        found: dict[str, list[Job]] = {}
        for job in session.scalars(select(Job).where(
                Job.study_instance_uid.in_(study_instance_uids),
                *_images_in(JobState.DONE, JobState.FAILED)).order_by(Job.id)):
            found.setdefault(job.study_instance_uid, []).append(job)
        return found

    @staticmethod
    def _close(session: Session, study: StudyResult, jobs: list[Job], now: datetime) -> None:
        """Close ``study`` with the answer of ``jobs``, its classified and failed images."""
        answer = form(jobs)
        for job in jobs:
            job.study_note = answer.left_out.get(job.id)
        study.state, study.closed_at = StudyState.CLOSED, now
        study.flagged, study.label = answer.flagged, answer.label
        study.probabilities, study.flags = answer.probabilities, answer.flags
        study.job_ids, study.problems = answer.job_ids, answer.problems
        study.model_version, study.model_validated = answer.model_version, answer.model_validated
        if study.supersedes_id is not None:
            previous = session.get(StudyResult, study.supersedes_id)
            if previous is not None:
                previous.state = StudyState.SUPERSEDED
                # Its messages not yet delivered would follow the correction and undo it
                # (an F after the C at the RIS; the FHIR report put back to final).
                session.execute(update(Delivery).where(
                    Delivery.study_result_id == previous.id,
                    Delivery.state == DeliveryState.PENDING).values(
                    state=DeliveryState.DEAD, updated_at=now,
                    last_error=f"superseded by version {study.version}"))

    def list(self, limit: int = 100, study_instance_uid: str | None = None
             ) -> list[StudyResult]:
        """The newest results first (every version), optionally of one study."""
        query = select(StudyResult).order_by(StudyResult.id.desc()).limit(limit)
        if study_instance_uid is not None:
            query = query.where(StudyResult.study_instance_uid == study_instance_uid)
        with self.store.sessions() as session:
            return list(session.scalars(query))


def describe(study: StudyResult) -> dict[str, Any]:
    """A JSON-friendly view of one result (``dicom-node studies list --json``)."""
    return {
        "id": study.id, "study_instance_uid": study.study_instance_uid,
        "version": study.version, "state": study.state.value,
        "supersedes": study.supersedes_id,
        "opened_at": study.opened_at.isoformat(),
        "last_image_at": study.last_image_at.isoformat(),
        "closes_at": study.closes_at.isoformat(),
        "closed_at": study.closed_at.isoformat() if study.closed_at else None,
        "flagged": study.flagged, "label": study.label, "flags": study.flags or [],
        "probabilities": study.probabilities or {}, "job_ids": study.job_ids or [],
        "problems": study.problems or [], "model_version": study.model_version,
        "model_validated": study.model_validated,
        **({"warning": UNVALIDATED_WARNING} if study.model_validated is False else {}),
    }
