"""Periodic work, driven by APScheduler: delivery dispatch, lease reaping, and closing
study results whose quiet period ended.

APScheduler runs *when*; the job store holds *what* (its own job store would
drop a job that was running when the process died). Each periodic job has
``max_instances=1`` and ``coalesce=True`` so runs never overlap or pile up, and
``misfire_grace_time=None`` so a late run still happens; the dispatcher reads
what is due from the database, so nothing due is skipped after a restart.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from apscheduler.schedulers.background import BackgroundScheduler

from dicom_node.config import Settings
from dicom_node.db import Delivery, DeliveryState, Job, utcnow
from dicom_node.deliver import Attempt, send_many
from dicom_node.destination import Destination
from dicom_node.jobs import DeliveryOutcome, JobStore
from dicom_node.spool import Spool
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
    """Sends due SR deliveries and records each outcome."""

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
            by_destination: dict[str, list[tuple[Delivery, Job]]] = {}
            for delivery, job in due:
                by_destination.setdefault(delivery.destination, []).append((delivery, job))
            for destination, items in by_destination.items():
                self._send_all(destination, items)
                attempted += len(items)
            if len(due) < _BATCH:
                break
        return attempted

    def _send_all(self, destination: str, items: list[tuple[Delivery, Job]]) -> None:
        """One association to ``destination`` for all of its due SRs; their outcomes
        are recorded in one transaction."""
        s = self.settings
        ready = [(d, j) for d, j in items if j.sr_file is not None]
        outcomes = [DeliveryOutcome(d.id, DeliveryState.DEAD, None, "job has no SR")
                    for d, j in items if j.sr_file is None]
        if ready:
            attempts = send_many(Destination.parse(destination),
                                 [self.spool.root / str(j.sr_file) for _, j in ready],
                                 s.delivery_calling_ae, s.delivery_timeout, s.retry_on_warning)
            outcomes += [self._outcome(delivery, destination, job.id, result)
                         for (delivery, job), result in zip(ready, attempts, strict=True)]
        self.store.record_outcomes(outcomes)

    def _outcome(self, delivery: Delivery, destination: str, job_id: int,
                 result: Attempt) -> DeliveryOutcome:
        s = self.settings
        if result.state is DeliveryState.DONE:
            LOGGER.info("job %d: SR stored at %s (0x%04X)", job_id, destination,
                        result.status or 0)
            return DeliveryOutcome(delivery.id, DeliveryState.DONE, result.status or 0)
        tries = delivery.attempts + 1
        if result.state is DeliveryState.PENDING and tries < s.delivery_max_attempts:
            retry_at = utcnow() + timedelta(seconds=backoff(
                tries, s.retry_base_seconds, s.retry_multiplier, s.retry_max_seconds))
            LOGGER.warning("job %d: SR to %s failed (%s), retry %d at %s", job_id, destination,
                           result.detail, tries, retry_at.strftime("%H:%M:%S"))
            return DeliveryOutcome(delivery.id, DeliveryState.PENDING, result.status,
                                   result.detail, retry_at)
        LOGGER.error("job %d: SR to %s is dead after %d attempt(s): %s", job_id, destination,
                     tries, result.detail)
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
        self.studies = StudyBook(store)
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
