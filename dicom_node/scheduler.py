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
from datetime import datetime, timedelta
from pathlib import Path

from apscheduler.schedulers.background import BackgroundScheduler

from dicom_node.config import Settings
from dicom_node.db import Delivery, DeliveryItem, DeliveryState, Job, utcnow
from dicom_node.deliver import Attempt, send_many
from dicom_node.destination import Destination, Target
from dicom_node.fhir import send_fhir
from dicom_node.hl7 import send_mllp
from dicom_node.jobs import DeliveryOutcome, JobStore
from dicom_node.messages import Messenger
from dicom_node.spool import Spool
from dicom_node.stow import send_stow
from dicom_node.studies import StudyBook

LOGGER = logging.getLogger(__name__)

DISPATCH_JOB = "dispatch-deliveries"
REAP_JOB = "reap-leases"
STUDIES_JOB = "close-studies"
#: How often open study results are looked at (a result closes at most this late).
STUDIES_INTERVAL_SECONDS = 1.0
_BATCH = 32


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

    def run_once(self, now: datetime | None = None) -> int:
        """Send every due delivery once; return how many were attempted."""
        # A delivery is held for longer than one attempt can take, so a second
        # dispatcher never sends it at the same time.
        hold = 4 * self.settings.delivery_timeout + 30
        attempted = 0
        while due := self.store.claim_due_deliveries(_BATCH, hold, now):
            groups: dict[tuple[str, str], list[tuple[Delivery, Job | None]]] = {}
            for delivery, job in due:
                groups.setdefault((delivery.kind, delivery.destination), []).append(
                    (delivery, job))
            for (kind, destination), items in groups.items():
                self._send_all(kind, destination, items)
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
        return self.spool.root / name if name else None

    def _send_all(self, kind: str, destination: str,
                  items: list[tuple[Delivery, Job | None]]) -> None:
        """Send ``items`` to one destination; record their outcomes in one transaction."""
        s = self.settings
        ready = [(d, j, path) for d, j in items if (path := self._file(d, j)) is not None]
        outcomes = [DeliveryOutcome(d.id, DeliveryState.DEAD, None, f"no {d.item.value} file")
                    for d, j in items if self._file(d, j) is None]
        target = self._target(kind, destination)
        paths = [path for _, _, path in ready]
        attempts: list[Attempt]
        if not ready:
            attempts = []
        elif kind == "dicom":
            attempts = send_many(Destination.parse(destination), paths, s.delivery_calling_ae,
                                 s.delivery_timeout, s.retry_on_warning)
        elif target is None:
            attempts = [Attempt(DeliveryState.PENDING, None,
                                f"no {kind} destination {destination} is configured")] * len(ready)
        elif kind == "dicomweb":
            attempts = send_stow(target.url, paths, s.delivery_timeout, target.bearer_token())
        elif kind == "hl7":
            host, port = target.hl7_endpoint()
            attempts = [send_mllp(host, port, path.read_bytes(), s.delivery_timeout)
                        for path in paths]
        else:
            attempts = [send_fhir(target.url, path.read_bytes(), target.bearer_token(),
                                  s.delivery_timeout) for path in paths]
        outcomes += [self._outcome(delivery, destination, result)
                     for (delivery, _, _), result in zip(ready, attempts, strict=True)]
        self.store.record_outcomes(outcomes)

    def _outcome(self, delivery: Delivery, destination: str, result: Attempt
                 ) -> DeliveryOutcome:
        s = self.settings
        what = (f"job {delivery.job_id}: {delivery.item.value}" if delivery.job_id is not None
                else f"study result {delivery.study_result_id}: {delivery.item.value}")
        status = "" if result.status is None else (
            f" (0x{result.status:04X})" if delivery.kind == "dicom" else f" ({result.status})")
        if result.state is DeliveryState.DONE:
            LOGGER.info("%s delivered to %s %s%s", what, delivery.kind, destination, status)
            return DeliveryOutcome(delivery.id, DeliveryState.DONE, result.status or 0)
        tries = delivery.attempts + 1
        if result.state is DeliveryState.PENDING and tries < s.delivery_max_attempts:
            retry_at = utcnow() + timedelta(seconds=backoff(
                tries, s.retry_base_seconds, s.retry_multiplier, s.retry_max_seconds))
            LOGGER.warning("%s to %s %s failed (%s), retry %d at %s", what, delivery.kind,
                           destination, result.detail, tries, retry_at.strftime("%H:%M:%S"))
            return DeliveryOutcome(delivery.id, DeliveryState.PENDING, result.status,
                                   result.detail, retry_at)
        LOGGER.error("%s to %s %s is dead after %d attempt(s): %s", what, delivery.kind,
                     destination, tries, result.detail)
        return DeliveryOutcome(delivery.id, DeliveryState.DEAD, result.status, result.detail)


class Scheduler:
    """The node's APScheduler: dispatch deliveries, reap expired leases, close studies."""

    def __init__(self, settings: Settings, store: JobStore, spool: Spool) -> None:
        self.dispatcher = Dispatcher(settings, store, spool)
        self.store = store
        self._scheduler = BackgroundScheduler(timezone="UTC")
        self._scheduler.add_job(self.dispatcher.run_once, "interval",
                                seconds=settings.dispatch_interval_seconds, id=DISPATCH_JOB,
                                max_instances=1, coalesce=True, misfire_grace_time=None,
                                next_run_time=datetime.now(tz=utcnow().tzinfo))
        self._scheduler.add_job(store.reap_expired_leases, "interval", seconds=30, id=REAP_JOB,
                                max_instances=1, coalesce=True, misfire_grace_time=None)
        self.studies = StudyBook(store, Messenger(settings, spool).on_close)
        self._scheduler.add_job(self.studies.close_due, "interval",
                                seconds=STUDIES_INTERVAL_SECONDS, id=STUDIES_JOB,
                                max_instances=1, coalesce=True, misfire_grace_time=None)

    def start(self) -> None:
        self._scheduler.start()

    def dispatch_now(self) -> None:
        """Run the dispatcher as soon as possible (new SRs are waiting)."""
        try:
            self._scheduler.modify_job(DISPATCH_JOB, next_run_time=datetime.now(tz=utcnow().tzinfo))
        except Exception:  # the scheduler is shutting down
            LOGGER.debug("dispatch_now ignored", exc_info=True)

    def stop(self) -> None:
        self._scheduler.shutdown(wait=True)
