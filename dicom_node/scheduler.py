"""Periodic work, driven by APScheduler: delivery dispatch (every kind of destination),
lease reaping, and closing study results whose quiet period ended (with their worklist
messages).

APScheduler runs *when*; the job store holds *what* (its own job store would
drop a job that was running when the process died). Each periodic job has
``max_instances=1`` and ``coalesce=True`` so runs never overlap or pile up, and
``misfire_grace_time=None`` so a late run still happens; the dispatcher reads
what is due from the database, so nothing due is skipped after a restart.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path

from apscheduler.schedulers.background import BackgroundScheduler
from pydicom.uid import Comprehensive3DSRStorage, SecondaryCaptureImageStorage

from dicom_node import audit, metrics
from dicom_node.config import Settings
from dicom_node.db import Delivery, DeliveryItem, DeliveryState, Job, utcnow
from dicom_node.deliver import Attempt, send_many
from dicom_node.destination import Destination, Target
from dicom_node.fhir import send_fhir
from dicom_node.hl7 import send_mllp
from dicom_node.jobs import DeliveryOutcome, JobStore
from dicom_node.messages import Messenger
from dicom_node.retention import Retention
from dicom_node.spool import Spool
from dicom_node.stow import send_stow
from dicom_node.studies import StudyBook

LOGGER = logging.getLogger(__name__)

DISPATCH_JOB = "dispatch-deliveries"
REAP_JOB = "reap-leases"
STUDIES_JOB = "close-studies"
RETENTION_JOB = "retention-purge"
#: How often retention purges (its ages are days: an hour late is nothing).
RETENTION_INTERVAL_SECONDS = 3600.0
#: How often open study results are looked at (a result closes at most this late).
STUDIES_INTERVAL_SECONDS = 1.0
_BATCH = 32
#: At most this much DICOM in one STOW-RS request (an uncompressed evidence image of a
#: large CR is some 20 MB).
STOW_REQUEST_BYTES = 64 * 2**20


def _by_size(items: list[tuple[Delivery, Job | None, Path]], budget: int
             ) -> list[list[tuple[Delivery, Job | None, Path]]]:
    """``items`` in order, in chunks of at most ``budget`` bytes of files (one file
    alone may exceed it); a file whose size cannot be read counts as nothing (its send
    reports it)."""
    chunks: list[list[tuple[Delivery, Job | None, Path]]] = [[]]
    size = 0
    for item in items:
        try:
            length = item[2].stat().st_size
        except OSError:
            length = 0
        if chunks[-1] and size + length > budget:
            chunks.append([])
            size = 0
        chunks[-1].append(item)
        size += length
    return chunks


def _audit_sent(kind: str, destination: str, items: list[tuple[Delivery, Job | None, Path]],
                attempts: list[Attempt]) -> None:
    """Each object a DICOM destination acknowledged, in the audit trail."""
    for (delivery, job, _), attempt in zip(items, attempts, strict=True):
        if attempt.state is not DeliveryState.DONE or job is None:
            continue
        if delivery.item is DeliveryItem.SR:
            audit.sent(kind, destination, job.study_instance_uid, Comprehensive3DSRStorage,
                       job.sr_sop_instance_uid)
        elif delivery.item is DeliveryItem.EVIDENCE and job.evidence_sop_instance_uid:
            audit.sent(kind, destination, job.study_instance_uid,
                       SecondaryCaptureImageStorage, job.evidence_sop_instance_uid)


def backoff(attempts: int, base: float, multiplier: float, cap: float) -> float:
    """Seconds before the next try: ``base * multiplier ** (attempts - 1)``, at most ``cap``.

    Parameters
    ----------
    attempts
        Failed attempts so far (>= 1).
    base, multiplier, cap
        ``retry_base_seconds``, ``retry_multiplier``, ``retry_max_seconds``.
    """
    return float(min(cap, base * multiplier ** max(attempts - 1, 0)))


class Dispatcher:
    """Sends due deliveries, whatever their kind, and records each outcome.

    Due deliveries are grouped per destination: a dicom destination gets its
    objects over one association and a dicomweb one in one STOW-RS request; an
    hl7 or fhir destination gets one message per connection or request. The
    outcomes of a group are recorded in one transaction.
    """

    def __init__(self, settings: Settings, store: JobStore, spool: Spool) -> None:
        self.settings = settings
        self.store = store
        self.spool = spool
        #: When the last dispatch started, ``time.monotonic()`` (None: none yet).
        self.last_started: float | None = None

    def run_once(self, now: datetime | None = None) -> int:
        """Send every due delivery once; return how many were attempted."""
        self.last_started = time.monotonic()
        # A delivery is held for longer than one attempt can take, so a second
        # dispatcher never sends it at the same time.
        hold = 4 * self.settings.delivery_timeout + 30
        attempted = 0
        while due := self.store.claim_due_deliveries(_BATCH, hold, now):
            # Leave time for one more send (an MLLP connect and its ACK) within the hold.
            deadline = time.monotonic() + hold - 2 * self.settings.delivery_timeout - 5
            groups: dict[tuple[str, str], list[tuple[Delivery, Job | None]]] = {}
            for delivery, job in due:
                groups.setdefault((delivery.kind, delivery.destination), []).append(
                    (delivery, job))
            for (kind, destination), items in groups.items():
                self._send_all(kind, destination, items, deadline)
                attempted += len(items)
            if len(due) < _BATCH:
                break
        return attempted

    def _target(self, kind: str, destination: str) -> Target | None:
        return next((t for t in self.settings.destinations
                     if t.kind == kind and t.key == destination), None)

    def _file(self, delivery: Delivery, job: Job | None) -> Path | None:
        if delivery.item is DeliveryItem.SR:
            name = job.sr_file if job is not None else None
        elif delivery.item is DeliveryItem.EVIDENCE:
            name = job.evidence_file if job is not None else None
        else:
            name = delivery.payload_file
        return self.spool.path(name) if name else None

    def _send_all(self, kind: str, destination: str,
                  items: list[tuple[Delivery, Job | None]], deadline: float) -> None:
        """Send ``items`` to one destination and record their outcomes: the DICOM
        objects of a group in one transaction, each message as soon as it is sent.

        ``deadline`` (``time.monotonic``) is when the hold on the claimed deliveries
        may run out with a send still to make: a message not started by then is left
        held and unsent, so that no other dispatcher, finding it due again, sends it
        at the same time.
        """
        s = self.settings
        files = [(d, j, self._file(d, j)) for d, j in items]
        ready = [(d, j, path) for d, j, path in files if path is not None]
        missing = [DeliveryOutcome(d.id, DeliveryState.DEAD, None, f"no {d.item.value} file")
                   for d, _, path in files if path is None]
        if missing:
            self.store.record_outcomes(missing)
            for _ in missing:
                metrics.DELIVERIES.labels(kind, "dead").inc()
        if not ready:
            return
        target = self._target(kind, destination)
        if kind != "dicom" and target is None:
            absent = Attempt(DeliveryState.PENDING, None,
                             f"no {kind} destination {destination} is configured")
            self._record(destination, [(d, absent) for d, _, _ in ready])
        elif kind == "dicom":
            attempts = send_many(Destination.parse(destination), [p for _, _, p in ready],
                                 s.delivery_calling_ae, s.delivery_timeout, s.retry_on_warning,
                                 target.client_tls if target is not None else None)
            self._record(destination, [(d, a) for (d, _, _), a in
                                       zip(ready, attempts, strict=True)])
            _audit_sent(kind, destination, ready, attempts)
        elif kind == "dicomweb" and target is not None:
            for chunk in _by_size(ready, STOW_REQUEST_BYTES):
                attempts = send_stow(target.url, [p for _, _, p in chunk], s.delivery_timeout,
                                     target.bearer_token())
                self._record(destination, [(d, a) for (d, _, _), a in
                                           zip(chunk, attempts, strict=True)])
                _audit_sent(kind, destination, chunk, attempts)
        elif target is not None:
            for index, (delivery, _, path) in enumerate(ready):
                if time.monotonic() > deadline:
                    LOGGER.warning("%s %s: %d message(s) left for the next dispatch (slow "
                                   "destination)", kind, destination, len(ready) - index)
                    return
                self._record(destination, [(delivery, self._send_message(target, path))])

    def _send_message(self, target: Target, path: Path) -> Attempt:
        """One ORU or FHIR Bundle, as written; an unreadable file is dead on its own."""
        try:
            payload = path.read_bytes()
        except OSError as exc:
            return Attempt(DeliveryState.DEAD, None, f"message file unreadable: "
                                                     f"{type(exc).__name__}")
        timeout = self.settings.delivery_timeout
        if target.kind == "hl7":
            host, port = target.hl7_endpoint()
            return send_mllp(host, port, payload, timeout)
        return send_fhir(target.url, payload, target.bearer_token(), timeout)

    def _record(self, destination: str, attempts: list[tuple[Delivery, Attempt]]) -> None:
        outcomes = [self._outcome(delivery, destination, attempt)
                    for delivery, attempt in attempts]
        self.store.record_outcomes(outcomes)
        for (delivery, _), outcome in zip(attempts, outcomes, strict=True):
            metrics.delivery_outcome(delivery.kind, outcome.state, delivery.created_at)

    def _outcome(self, delivery: Delivery, destination: str, result: Attempt
                 ) -> DeliveryOutcome:
        s = self.settings
        what = (f"job {delivery.job_id}: {delivery.item.value}" if delivery.job_id is not None
                else f"study result {delivery.study_result_id}: {delivery.item.value}")
        status = "" if result.status is None else (
            f" (0x{result.status:04X})" if delivery.kind == "dicom" else f" ({result.status})")
        # A RIS's or FHIR server's error text may quote the patient: the log gets its
        # kind ("ACK AE", "HTTP 400"); the whole text is kept for `jobs show`.
        said = result.detail if delivery.kind == "dicom" else result.detail.split(":")[0]
        if result.state is DeliveryState.DONE:
            LOGGER.info("%s delivered to %s %s%s", what, delivery.kind, destination, status)
            return DeliveryOutcome(delivery.id, DeliveryState.DONE, result.status or 0)
        tries = delivery.attempts + 1
        if result.state is DeliveryState.PENDING and tries < s.delivery_max_attempts:
            retry_at = utcnow() + timedelta(seconds=backoff(
                tries, s.retry_base_seconds, s.retry_multiplier, s.retry_max_seconds))
            LOGGER.warning("%s to %s %s failed (%s), retry %d at %s", what, delivery.kind,
                           destination, said, tries, retry_at.strftime("%H:%M:%S"))
            return DeliveryOutcome(delivery.id, DeliveryState.PENDING, result.status,
                                   result.detail, retry_at)
        LOGGER.error("%s to %s %s is dead after %d attempt(s): %s", what, delivery.kind,
                     destination, tries, said)
        return DeliveryOutcome(delivery.id, DeliveryState.DEAD, result.status, result.detail)


class Scheduler:
    """The node's APScheduler: dispatch deliveries, reap expired leases, close studies,
    and purge by retention (hourly, when ``retention_files_days`` is set)."""

    def __init__(self, settings: Settings, store: JobStore, spool: Spool) -> None:
        self.dispatcher = Dispatcher(settings, store, spool)
        self.store = store
        self._scheduler = BackgroundScheduler(timezone="UTC")
        # Set while a dispatch runs, and when results are waiting (see dispatch_now).
        self._dispatching = threading.Event()
        self._requested = threading.Event()
        self._at_once = threading.Event()  # ...and the worker has no work left
        # APScheduler's shutdown holds its job store's lock while it waits for the running
        # dispatch, which may be scheduling the next: once stopping, nothing is scheduled.
        self._schedule_lock = threading.Lock()
        self._stopping = False
        self._scheduler.add_job(self._dispatch, "interval",
                                seconds=settings.dispatch_interval_seconds, id=DISPATCH_JOB,
                                max_instances=1, coalesce=True, misfire_grace_time=None,
                                next_run_time=datetime.now(tz=utcnow().tzinfo))
        self._scheduler.add_job(store.reap_expired_leases, "interval", seconds=30, id=REAP_JOB,
                                max_instances=1, coalesce=True, misfire_grace_time=None)
        messenger = Messenger(settings, spool)
        # No worklist destination: closing a study writes to the database only.
        self.studies = StudyBook(store, messenger.on_close if messenger.targets else None)
        self._scheduler.add_job(self.studies.close_due, "interval",
                                seconds=STUDIES_INTERVAL_SECONDS, id=STUDIES_JOB,
                                max_instances=1, coalesce=True, misfire_grace_time=None)
        if settings.retention_files_days:
            retention = Retention(store, spool, settings.retention_files_days,
                                  settings.retention_rows_days)
            self._scheduler.add_job(retention.scheduled, "interval",
                                    seconds=RETENTION_INTERVAL_SECONDS, id=RETENTION_JOB,
                                    max_instances=1, coalesce=True, misfire_grace_time=None)

    def start(self) -> None:
        self._scheduler.start()

    def _dispatch(self) -> None:
        """The dispatcher's run; results stored while it ran are dispatched after it,
        as :meth:`dispatch_now` says (APScheduler would skip a run asked for while one
        runs, and they would wait for the next regular one)."""
        self._dispatching.set()
        self._requested.clear()  # what was stored until now, this run claims
        self._at_once.clear()
        try:
            self.dispatcher.run_once()
        finally:
            self._dispatching.clear()
            if self._requested.is_set():
                self._schedule(at_once=self._at_once.is_set())

    def dispatch_now(self) -> None:
        """Run the dispatcher soon: new SRs are waiting.

        At once, unless the last dispatch started less than ``dispatch_min_gap_seconds``
        ago: then when that gap has passed, or at the next regular run if that is
        sooner; if a dispatch is running, after it on the same terms. Each dispatch
        opens an association per destination, and its setup costs about as much CPU
        as sending five SRs (pynetdicom); while the worker has work, the results of
        the batches made meanwhile go together. When it has none left,
        :meth:`dispatch_at_once` sends what waits.
        """
        self._schedule(at_once=False)

    def dispatch_at_once(self) -> None:
        """Run the dispatcher at once (after the running one, if any), whatever the
        gap: the worker has no work left, so no more results are coming to share an
        association with the last ones."""
        self._schedule(at_once=True)

    def _schedule(self, at_once: bool) -> None:
        if at_once:
            self._at_once.set()
        self._requested.set()
        if self._dispatching.is_set():
            return  # the running dispatch schedules the next when it ends
        wait = 0.0
        last = self.dispatcher.last_started
        if last is not None and not at_once:  # a monotonic clock: wall-clock steps do not count
            wait = max(0.0, last + self.dispatcher.settings.dispatch_min_gap_seconds
                       - time.monotonic())
        soon = utcnow() + timedelta(seconds=wait)
        with self._schedule_lock:
            if self._stopping:
                return
            try:
                planned = self._scheduler.get_job(DISPATCH_JOB).next_run_time
                if planned is not None and planned < soon:  # the next regular run is sooner
                    return
                self._scheduler.modify_job(DISPATCH_JOB, next_run_time=soon)
            except Exception:  # the scheduler is not running
                LOGGER.debug("dispatch_now ignored", exc_info=True)

    def running(self) -> bool:
        """Whether the scheduler's thread is running its jobs."""
        return bool(self._scheduler.running)

    def stop(self) -> None:
        with self._schedule_lock:
            self._stopping = True
        self._scheduler.shutdown(wait=True)
