"""The node as one process: recover, then receive until told to stop."""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass
from socket import gethostname
from types import FrameType

from dicom_node import audit
from dicom_node.config import Settings
from dicom_node.datadir import DataDirLock
from dicom_node.errors import ConfigError
from dicom_node.health import Probes, StatusServer
from dicom_node.jobs import JobStore
from dicom_node.libraries import configure
from dicom_node.model_holder import unservable_reason
from dicom_node.scheduler import Scheduler
from dicom_node.scp import StorageSCP, check_calling_ae_policy
from dicom_node.spool import Spool
from dicom_node.worker import Worker
from model import card

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class RecoveryReport:
    """What start-up recovery found (also logged)."""

    partial_files: int
    orphan_files: int
    requeued_jobs: int
    failed_jobs: int
    missing_files: int


class Node:
    """Job store, spool and SCP wired together."""

    def __init__(self, settings: Settings, receive: bool = True) -> None:
        """Wire the parts; ConfigError, before anything is created, when the node is to
        receive and the settings let no calling AE associate.

        With ``receive`` False the node only classifies and delivers (``dicom-node
        worker``): one more worker on the same job store and spool.
        """
        if receive:
            check_calling_ae_policy(settings)
        configure()
        self.settings = settings
        # One receiving node per data directory and per spool, locked before anything in
        # them is touched (the schema, the spool, a model installed by `serve --model`)
        # and until stop: DataDirInUse, a ConfigError, names the node running.
        self.locks = [DataDirLock(settings.data_dir, "data directory"),
                      DataDirLock(settings.storage_dir, "spool directory")] if receive else []
        try:
            for lock in self.locks:
                lock.acquire()
            settings.data_dir.mkdir(parents=True, exist_ok=True)
            self.store = JobStore(settings.database_url, max_attempts=settings.max_attempts,
                                  study_quiet_seconds=settings.study_quiet_seconds)
            self.spool = Spool(settings.storage_dir, settings.min_free_disk_mb * 2**20)
            self.scheduler = Scheduler(settings, self.store, self.spool)
            self.worker = Worker(settings, self.store, self.spool,
                                 on_results=self.scheduler.dispatch_now,
                                 on_idle=self.scheduler.dispatch_at_once)
            self.scp = (StorageSCP(settings, self.store, self.spool,
                                   on_queued=self.worker.wake) if receive else None)
            self.status = StatusServer(self._probes()) if settings.metrics_port else None
        except BaseException:
            self._release()
            raise
        self._stop = threading.Event()
        self._stopped = False

    def recover(self) -> RecoveryReport:
        """Bring disk and database back in line after a crash (before serving).

        ``.part`` files are removed; spool files without a job row (renamed, but
        the row never committed, so never acknowledged) are quarantined; jobs
        leased by dead local workers are requeued.
        """
        partial = self.spool.remove_partials()
        known = self.store.spool_files()
        on_disk = set(self.spool.files())
        orphans = self.spool.quarantine(sorted(on_disk - known))
        missing = len(known - on_disk)
        if missing:
            LOGGER.error("%d job(s) reference a spool file that is missing", missing)
        requeued, failed = self.store.recover_dead_local_workers()
        report = RecoveryReport(partial, orphans, requeued, failed, missing)
        LOGGER.info("recovery: %s", report)
        return report

    def start(self) -> None:
        """Judge the active model, recover, then start the SCP, the scheduler and the
        worker.

        ConfigError, before anything is touched, when the active model may not serve
        (:meth:`check_model`). A node that does not receive recovers only the jobs of
        dead local workers: the spool is the receiving node's, and a file it has just
        renamed may not have its job row yet.
        """
        try:
            active = self.check_model()
            s = self.settings
            self.trail = audit.open_trail(
                s.audit_dir, "node" if self.scp is not None else f"worker-{gethostname()}",
                s.ae_title, s.audit_max_mb * 2**20, s.audit_backups, s.audit_syslog,
                s.audit_syslog_ca)
            if self.scp is not None:
                self.recover()
            else:
                self.store.recover_dead_local_workers()
            self._report_model(active)
            if self.status is not None:  # first: a port in use stops the start here
                self.status.start()
            if self.scp is not None:
                self.scp.start()
            self.scheduler.start()
            self.worker.start()
            audit.application(started=True)
        except BaseException:
            self._release()
            raise

    def _probes(self) -> Probes:
        threads = {"worker": self.worker.is_alive, "scheduler": self.scheduler.running}
        if self.scp is not None:
            threads["receiver"] = self.scp.serving
        return Probes(self.settings, self.store, self.spool, self.worker.models.holds_active,
                      threads)

    def check_model(self) -> card.ModelCard | None:
        """The active model's card (None: no model yet; instances are received and wait
        for one), or ConfigError when it may not serve (see
        :func:`dicom_node.model_holder.unservable_reason`). Reads the card only:
        TensorFlow is not loaded by the receive path."""
        artifact = card.active(self.settings.model_dir)
        if artifact is None:
            return None
        try:
            active = card.read_card(artifact)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"the active model's card cannot be read: {exc}") from exc
        refusal = unservable_reason(active, self.settings)
        if refusal is not None:
            raise ConfigError(f"the active model {refusal}")
        return active

    @staticmethod
    def _report_model(active: card.ModelCard | None) -> None:
        if active is None:
            LOGGER.warning("no model installed: instances are received and queued; "
                           "install one with `dicom-node model install DIR`")
            return
        status = card.validation_status(active)
        LOGGER.info("active model: %s %s (%s, %dpx), %s%s", active.name, active.display_version,
                    active.architecture, active.input_size,
                    "validated" if status.validated else
                    f"{card.UNVALIDATED_WARNING} ({status.reason})",
                    "" if active.trained else " -- UNTRAINED, for demos only")

    def stop(self) -> None:
        """Stop receiving, let the current batch finish, stop the scheduler, close the DB
        (once: a second call does nothing)."""
        if self._stopped:
            return
        self._stopped = True
        if self.status is not None:
            self.status.stop()
        if self.scp is not None:
            self.scp.stop()
        if self.worker.is_alive():
            self.worker.stop()
            self.worker.join(timeout=120)
        self.scheduler.stop()
        self.store.close()
        audit.application(started=False)
        self._release()
        LOGGER.info("stopped")

    def _release(self) -> None:
        trail = getattr(self, "trail", None)
        if trail is not None:
            trail.close()
        for lock in getattr(self, "locks", []):
            lock.release()

    def run(self) -> None:
        """Start and block until SIGTERM or SIGINT."""
        def _request_stop(signum: int, _frame: FrameType | None) -> None:
            LOGGER.info("signal %d received, stopping", signum)
            self._stop.set()

        signal.signal(signal.SIGTERM, _request_stop)
        signal.signal(signal.SIGINT, _request_stop)
        self.start()
        try:
            while not self._stop.wait(1.0):
                pass
        finally:
            self.stop()
