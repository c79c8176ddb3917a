"""The inference worker: claim a batch, preprocess, one forward pass, SRs and deliveries.

The worker claims up to ``batch_size`` queued jobs (a lease each), waiting at
most ``max_batch_delay_ms`` for the batch to fill; decodes them in a thread
pool through :mod:`model.preprocess`; runs one batched forward pass; writes
each SR durably; then stores the results and queues the deliveries in one
transaction per batch. Three batches are in flight at once: while batch k is in
the network (native code, GIL released), batch k+1 is claimed and decoded and
the SRs of batch k-1 are built, so the network never waits for either. An
input that cannot be decoded fails its job with the reason (retried until
``max_attempts``) while the rest of the batch goes on.
Without a model, jobs simply wait. A newly installed model is picked up
between batches. An idle worker is woken by the receive path when a job is
queued, and otherwise looks once a second (instead of 20 times).
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from pydicom import dcmread
from pydicom.dataset import Dataset

from dicom_node.config import Settings
from dicom_node.db import Job
from dicom_node.deliver import Destination
from dicom_node.jobs import JobResult, JobStore, new_worker_id
from dicom_node.report import Classification, ReportBuilder
from dicom_node.spool import Spool
from model import card as model_card
from model.classes import CLASS_KEYS

LOGGER = logging.getLogger(__name__)

#: How often an idle worker looks for jobs it was not told about, and for a newly
#: installed model.
IDLE_POLL_SECONDS = 1.0


@dataclass
class Prepared:
    """One claimed job, decoded and ready for the network."""

    job: Job
    source: Dataset
    tensor: NDArray[np.float32]


@dataclass
class Batch:
    """Claimed jobs, decoded for one engine, with what claiming and decoding took."""

    engine: Any
    jobs: list[Job]
    prepared: list[Prepared]
    queue_wait: float
    preprocess: float


@dataclass(frozen=True)
class BatchTimings:
    """Seconds spent in each stage of one batch (for logs and the e2e bench)."""

    jobs: int
    queue_wait: float
    preprocess: float
    inference: float
    report: float


class Worker(threading.Thread):
    """Runs batches until stopped; one per process is enough (batching uses the cores)."""

    def __init__(self, settings: Settings, store: JobStore, spool: Spool,
                 on_results: Callable[[], None] | None = None) -> None:
        super().__init__(name="inference-worker", daemon=True)
        self.settings = settings
        self.store = store
        self.spool = spool
        self.owner = new_worker_id()
        self._on_results = on_results
        self._stop_event = threading.Event()
        self._work = threading.Event()  # set when a job is queued (or on stop)
        self._engine: Any = None
        self._engine_path: Path | None = None
        self._reports: ReportBuilder | None = None
        self._pool = ThreadPoolExecutor(max_workers=max(os.cpu_count() or 1, 2),
                                        thread_name_prefix="preprocess")
        # The next batch is claimed and decoded while the current one is in the network.
        self._feeder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="feeder")
        self._next: Future[Batch] | None = None
        # SRs of batch k are built (pure Python) while batch k+1 runs in the network
        # (native code, GIL released); at most one batch is ever waiting to finish.
        self._finisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="report")
        self._finishing: Future[None] | None = None
        self.last_timings: BatchTimings | None = None
        self.model_loaded = threading.Event()

    def stop(self) -> None:
        """Ask the loop to end after the current batch."""
        self._stop_event.set()
        self._work.set()

    def wake(self) -> None:
        """A job was queued: look for work now instead of at the next idle poll."""
        self._work.set()

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                done = self.step()
            except Exception:
                LOGGER.exception("worker step failed; retrying shortly")
                done = 0
            if not done:
                self._drain()
                # Woken by the receive path; the poll finds jobs queued by anyone
                # else (`jobs retry`, lease expiry, another node on the database).
                self._work.wait(IDLE_POLL_SECONDS)
                self._work.clear()
        try:
            while self._next is not None:  # a batch already claimed and decoded: finish it
                self.step()
        except Exception:
            LOGGER.exception("the last claimed batch failed; its leases will expire")
        self._drain()
        self._feeder.shutdown(wait=True)
        self._finisher.shutdown(wait=True)
        self._pool.shutdown(wait=True)

    def _drain(self) -> None:
        """Wait for the batch being finished, if any."""
        if self._finishing is not None:
            try:
                self._finishing.result()
            except Exception:
                LOGGER.exception("finishing a batch failed; its jobs will be retried")
            self._finishing = None

    # --- model ---

    def engine(self) -> Any:
        """The engine for the active model, (re)loaded when the active model changes."""
        active = model_card.active(self.settings.models_path)
        if active is None:
            return None
        if active != self._engine_path:
            from model.engine import Engine

            LOGGER.info("loading model %s", active.name)
            # The previous model's objects go back to the collector with it.
            self._engine = self._reports = None
            gc.unfreeze()
            self._engine = Engine(active, backend=self.settings.inference_backend,
                                  device=self.settings.inference_device,
                                  batch_size=self.settings.batch_size,
                                  threads=self.settings.inference_threads)
            self._engine.warmup()
            self._reports = ReportBuilder(self._engine.card)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._reports.warm_up()
            self._engine_path = active
            _freeze_long_lived()
            LOGGER.info("model %s ready (batches of up to %d)", active.name,
                        self._engine.batch_size)
            self.model_loaded.set()
        return self._engine

    # --- one batch ---

    def step(self) -> int:
        """Claim and finish one batch; return how many jobs it held (0: nothing to do)."""
        engine = self.engine()
        if engine is None:
            return 0
        if self._next is not None:
            batch, self._next = self._next.result(), None
        else:
            batch = self._load_batch(engine)
        if not batch.jobs:
            return 0
        if batch.engine is not engine:  # a new model: decode again for its input size
            batch = self._redo(batch, engine)
        if not self._stop_event.is_set():
            self._next = self._feeder.submit(self._load_batch, engine)
        if not batch.prepared:
            return len(batch.jobs)
        started = time.perf_counter()
        probabilities = engine.predict(np.stack([p.tensor for p in batch.prepared]))
        inference = time.perf_counter() - started
        self._drain()
        assert self._reports is not None  # made with the engine
        self._finishing = self._finisher.submit(
            self._finish_batch, batch.prepared, probabilities, self._reports,
            (len(batch.jobs), batch.queue_wait, batch.preprocess, inference))
        return len(batch.jobs)

    def _load_batch(self, engine: Any) -> Batch:
        jobs = self._claim_batch(engine.batch_size)
        if not jobs:
            return Batch(engine, [], [], 0.0, 0.0)
        started = time.perf_counter()
        queue_wait = max(time.time() - j.created_at.timestamp() for j in jobs)
        prepared = self._prepare(jobs, engine)
        return Batch(engine, jobs, prepared, queue_wait, time.perf_counter() - started)

    def _redo(self, batch: Batch, engine: Any) -> Batch:
        started = time.perf_counter()
        jobs = [p.job for p in batch.prepared]
        return Batch(engine, batch.jobs, self._prepare(jobs, engine), batch.queue_wait,
                     time.perf_counter() - started)

    def _finish_batch(self, prepared: list[Prepared], probabilities: NDArray[np.float32],
                      reports: ReportBuilder, timings: tuple[int, float, float, float]
                      ) -> None:
        started = time.perf_counter()
        results = [result for item, row in zip(prepared, probabilities, strict=True)
                   if (result := self._report(item, row, reports)) is not None]
        stored = self.store.complete_batch(self.owner, results)
        for result, ours in zip(results, stored, strict=True):
            if ours:
                LOGGER.info("job %d: %s (%s)", result.job_id, result.values["label"],
                            ", ".join(f"{k} {v:.3f}"
                                      for k, v in result.values["probabilities"].items()))
            else:
                LOGGER.warning("job %d: lease lost before the result was stored",
                               result.job_id)
        report = time.perf_counter() - started
        count, queue_wait, preprocess, inference = timings
        self.last_timings = BatchTimings(count, queue_wait, preprocess, inference, report)
        LOGGER.info("batch of %d: preprocess %.0f ms, inference %.0f ms, SR %.0f ms",
                    count, 1000 * preprocess, 1000 * inference, 1000 * report)
        if self._on_results is not None:
            self._on_results()

    def _claim_batch(self, size: int) -> list[Job]:
        lease = self.settings.lease_seconds
        jobs = self.store.claim(self.owner, size, lease)
        if not jobs:
            return []
        deadline = time.monotonic() + self.settings.max_batch_delay_ms / 1000
        while len(jobs) < size and time.monotonic() < deadline:
            if self._stop_event.wait(0.02):
                break
            jobs += self.store.claim(self.owner, size - len(jobs), lease)
        return jobs

    def _prepare(self, jobs: list[Job], engine: Any) -> list[Prepared]:
        def load(job: Job) -> Prepared:
            from model import preprocess

            if job.spool_file is None:
                raise FileNotFoundError("job has no spool file")
            source = dcmread(self.spool.path(job.spool_file))
            tensor = preprocess.dicom_tensor(source, engine.input_size,
                                             engine.card.interpolation)
            return Prepared(job, source, tensor)

        prepared = []
        futures = [(job, self._pool.submit(load, job)) for job in jobs]
        for job, future in futures:
            try:
                prepared.append(future.result())
            except Exception as exc:
                state = self.store.fail(job.id, self.owner, f"preprocessing failed: {exc}")
                LOGGER.warning("job %d: preprocessing failed (%s); now %s", job.id,
                               type(exc).__name__, state.value if state else "not ours")
        return prepared

    def _report(self, item: Prepared, row: NDArray[np.float32],
                reports: ReportBuilder) -> JobResult | None:
        """Build and durably write the SR of one classified job; None (and the job
        failed with the reason) if it cannot be built."""
        job = item.job
        card = reports.card
        probabilities = {key: float(p) for key, p in zip(CLASS_KEYS, row, strict=True)}
        label = CLASS_KEYS[int(np.argmax(row))]
        try:
            with warnings.catch_warnings():
                # highdicom's warnings quote attribute values (patient names): keep them
                # out of the log.
                warnings.simplefilter("ignore")
                sr = reports.build(item.source, Classification(label, probabilities),
                                   job.sr_sop_instance_uid, job.sr_series_instance_uid)
            encoded = BytesIO()
            sr.save_as(encoded, enforce_file_format=True)
            sr_name = self.spool.write_report(job.id, encoded.getvalue())
        except Exception as exc:
            self.store.fail(job.id, self.owner, f"SR could not be built: {exc}")
            LOGGER.warning("job %d: SR could not be built (%s)", job.id, type(exc).__name__)
            return None
        values = {"label": label, "probabilities": probabilities,
                  "model_version": f"{card.name} {card.display_version}", "sr_file": sr_name}
        return JobResult(job.id, values, self._destinations(job))

    def _destinations(self, job: Job) -> list[str]:
        destinations = list(self.settings.destinations)
        if self.settings.return_to_calling_ae and job.peer_address:
            port = self.settings.calling_ae_ports.get(job.calling_ae)
            if port:
                destinations.append(str(Destination(job.calling_ae, job.peer_address, port)))
        return destinations


def _freeze_long_lived() -> None:
    """Exempt the objects that live as long as the model from garbage collection.

    TensorFlow, Keras and the loaded model are about 700,000 Python objects. A
    full collection walks all of them: 0.25-0.5 s of CPU holding the GIL on the
    CI machine. Building SRs allocates enough to set one off during a queue of
    100 images, and pynetdicom's server forces one every 30 s even when idle.
    Frozen (:func:`gc.freeze`), they are skipped and a full collection costs
    about a millisecond. They are unfrozen before a new model replaces them, so
    an old model's cycles are still collected.
    """
    gc.collect()
    gc.freeze()
    LOGGER.debug("%d objects exempted from garbage collection", gc.get_freeze_count())
