"""The inference worker: a thread that keeps three batches or more in flight.

Each step takes the batch claimed and decoded ahead (:mod:`dicom_node.batches`),
runs it through the network of the active model (:mod:`dicom_node.model_holder`)
in one forward pass, and hands the probabilities to the result writer
(:mod:`dicom_node.results`). While batch k is in the network (native code, GIL
released), batch k+1 is claimed and decoded and the SRs of batch k-1 are
written (the writer may fall :data:`WRITER_BEHIND` batches behind), so the network
waits for neither. An engine of several lanes (OpenVINO
on a CPU, :attr:`model.engine.Engine.lanes`) takes batch k+1 while batch k is
still in it, each called from a lane thread: its streams go on to the next batch
instead of waiting for each other at the end of one. Without a model, jobs simply wait; a
newly installed model is picked up between batches. An idle worker is woken by
the receive path when a job is queued, and otherwise looks once a second.
Figures: docs/performance.md.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from dicom_node import metrics
from dicom_node.batches import Batch, BatchLoader
from dicom_node.config import Settings
from dicom_node.jobs import JobStore, new_worker_id
from dicom_node.model_holder import LoadedModel, ModelHolder
from dicom_node.report import ReportBuilder
from dicom_node.results import ResultWriter
from dicom_node.spool import Spool

if TYPE_CHECKING:
    from model.engine import Engine

LOGGER = logging.getLogger(__name__)

#: How often an idle worker looks for jobs it was not told about, and for a newly
#: installed model.
IDLE_POLL_SECONDS = 1.0

#: How many classified batches may wait for the result writer (one being written, the
#: rest queued) before the loop waits for it: the bound on results held in memory, and
#: the backpressure when SRs are written more slowly than the network classifies.
WRITER_BEHIND = 2


@dataclass(frozen=True)
class BatchTimings:
    """Seconds spent in each stage of one batch (for logs and the e2e bench)."""

    jobs: int
    queue_wait: float
    preprocess: float
    inference: float
    report: float


#: A batch's probabilities, its class maps (None without evidence images), and the
#: seconds its forward pass took.
Inferred = tuple[NDArray[np.float32], NDArray[np.float32] | None, float]


def _infer(engine: Engine, images: NDArray[np.float32]) -> Inferred:
    """One forward pass of ``images``; the class maps come from the same pass."""
    started = time.perf_counter()
    maps = None
    if engine.evidence:
        probabilities, maps = engine.predict_with_maps(images)
    else:
        probabilities = engine.predict(images)
    return probabilities, maps, time.perf_counter() - started


class Worker(threading.Thread):
    """Runs batches until stopped; one per process is enough (batching uses the cores)."""

    def __init__(self, settings: Settings, store: JobStore, spool: Spool,
                 on_results: Callable[[], None] | None = None,
                 on_idle: Callable[[], None] | None = None) -> None:
        """``on_results`` is called when a batch's results are stored, ``on_idle`` when
        the worker runs out of work and every result it made is stored."""
        super().__init__(name="inference-worker", daemon=True)
        self.owner = new_worker_id()
        self._store = store
        self._lease_seconds = settings.lease_seconds
        self._stop_event = threading.Event()
        self._work = threading.Event()  # set when a job is queued (or on stop)
        self.models = ModelHolder(settings)
        self.batches = BatchLoader(settings, store, spool, self.owner, self._stop_event)
        self.results = ResultWriter(settings, store, spool, self.owner)
        self._on_results = on_results
        self._on_idle = on_idle
        self._busy = False  # a batch ran since the loop last went idle
        # The next batch is claimed and decoded while the current one is in the network.
        self._feeder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="feeder")
        self._next: Future[Batch] | None = None
        # SRs of batch k are written (pure Python) while later batches run in the
        # network; the writer may fall WRITER_BEHIND batches behind before the loop
        # waits for it, so that a lane done with its batch takes the next one at once
        # rather than after the writer catches up.
        self._finisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="report")
        self._finishing: deque[Future[None]] = deque()
        # Batches in the network, oldest first: one, or with an engine of several lanes
        # (OpenVINO on a CPU) up to that many, each called from a lane thread.
        self._inflight: deque[tuple[Batch, Future[Inferred], LoadedModel]] = deque()
        # Threads start as batches are submitted: no more than the engine's lanes (none
        # for an engine of one lane, which is called inline).
        self._lane_pool = ThreadPoolExecutor(thread_name_prefix="lane")
        self.last_timings: BatchTimings | None = None
        #: How many times the loop found nothing to do (no model, or no job) and
        #: went idle; it then sleeps until woken or for IDLE_POLL_SECONDS.
        self.idle_passes = 0

    def stop(self) -> None:
        """Ask the loop to end after the current batch."""
        self._stop_event.set()
        self._work.set()

    def wake(self) -> None:
        """A job was queued: look for work now instead of at the next idle poll."""
        self._work.set()

    def run(self) -> None:
        finished = threading.Event()  # set when the loop and the last batch are done
        renewer = threading.Thread(target=self._renew_leases, args=(finished,),
                                   name="lease-renewer", daemon=True)
        renewer.start()
        try:
            self._loop()
        finally:
            finished.set()
            renewer.join()

    def _renew_leases(self, finished: threading.Event) -> None:
        """Renew the leases of the jobs this worker is working on (claimed ahead, in the
        network, or being written: ``batches.held``) every third of a lease until
        ``finished``: a batch may take longer than one lease, and must not be
        reclaimed and classified twice meanwhile. A batch that failed is dropped
        from ``held``, so its leases expire and it is retried; if the process dies or
        is paused, the renewals stop and every lease expires. (A forward pass that
        hangs keeps its batch: a liveness matter for the node's health, not for
        the leases.)"""
        interval = self._lease_seconds / 3
        while not finished.wait(interval):
            try:
                self._store.extend_leases(self.owner, self._lease_seconds,
                                          self.batches.held.ids())
            except Exception:
                LOGGER.exception("renewing the worker's leases failed; trying again in %.0f s",
                                 interval)

    def _loop(self) -> None:
        while not self._stop_event.is_set():
            try:
                done = self.step()
            except Exception:
                LOGGER.exception("worker step failed; retrying shortly")
                done = 0
            if done:
                self._busy = True
            else:
                self._settle_all()
                self._drain()
                if self._busy and self._on_idle is not None:
                    self._busy = False
                    self._on_idle()
                self.idle_passes += 1
                # Woken by the receive path; the poll finds jobs queued by anyone
                # else (`jobs retry`, lease expiry, another node on the database).
                self._work.wait(IDLE_POLL_SECONDS)
                self._work.clear()
        try:
            # A batch already claimed and decoded: finish it (unless the model can no longer
            # serve; then its leases expire and another worker takes it).
            while self._next is not None and self.step():
                pass
        except Exception:
            LOGGER.exception("the last claimed batch failed; its leases will expire")
        self._settle_all()
        self._drain()
        self._feeder.shutdown(wait=True)
        self._lane_pool.shutdown(wait=True)
        self._finisher.shutdown(wait=True)
        self.batches.close()

    def step(self) -> int:
        """Run one batch through the network; return how many jobs it held (0: nothing
        to do). Its results are written in the background."""
        loaded = self.models.current()
        if loaded is None:
            if self._next is not None and self._next.done() and self._next.exception() is None:
                # No model to finish it with: its leases may expire for another worker.
                self.batches.held.drop(self._next.result().jobs)
            return 0
        engine = loaded.engine
        # A batch the network is done with goes to the result writer now, not once the
        # next batch is claimed and decoded.
        while self._inflight and self._inflight[0][1].done():
            self._settle()
        if self._next is not None:
            batch, self._next = self._next.result(), None
            self.batches.held.add(batch.jobs)  # dropped above if the model went away
        else:
            batch = self.batches.load(engine)
        if not batch.jobs:
            return 0
        try:
            return self._run(batch, loaded, engine)
        except BaseException:
            # Given up here: the leases expire and the jobs are retried. (A batch still
            # in the network is not: an older batch's forward pass failed.)
            if not any(waiting.jobs is batch.jobs for waiting, _, _ in self._inflight):
                self.batches.held.drop(batch.jobs)
            raise

    def _run(self, batch: Batch, loaded: LoadedModel, engine: Engine) -> int:
        if batch.engine is not engine:  # a new model: decode again for its input size
            batch = self.batches.redo(batch, engine)
        if not self._stop_event.is_set():
            self._next = self._feeder.submit(self.batches.load, engine)
        if not batch.prepared:
            return len(batch.jobs)
        images = np.stack([p.tensor for p in batch.prepared])
        if engine.lanes == 1:
            done: Future[Inferred] = Future()
            done.set_result(_infer(engine, images))
        else:
            done = self._lane_pool.submit(_infer, engine, images)
        self._inflight.append((batch, done, loaded))
        # With one lane this batch is done; with more, the next batch goes into the
        # network before this one is waited for.
        while len(self._inflight) >= engine.lanes:
            self._settle()
        return len(batch.jobs)

    def _settle(self) -> None:
        """Wait for the oldest batch in the network and hand its outputs to the result
        writer; a batch whose forward pass failed is given up (its leases expire and
        it is retried) and the failure raised."""
        batch, done, loaded = self._inflight.popleft()
        try:
            probabilities, maps, inference = done.result()
        except BaseException:
            self.batches.held.drop(batch.jobs)
            raise
        metrics.BATCH_SIZE.observe(len(batch.prepared))
        metrics.BATCH_SECONDS.observe(inference)
        self._drain(keep=WRITER_BEHIND - 1)
        self._finishing.append(self._finisher.submit(
            self._finish, batch, probabilities, maps, loaded.reports, inference))

    def _settle_all(self) -> None:
        """Settle every batch in the network (before going idle or stopping)."""
        while self._inflight:
            try:
                self._settle()
            except Exception:
                LOGGER.exception("a forward pass failed; its jobs will be retried")

    def _finish(self, batch: Batch, probabilities: NDArray[np.float32],
                maps: NDArray[np.float32] | None, reports: ReportBuilder,
                inference: float) -> None:
        started = time.perf_counter()
        try:
            self.results.write_batch(batch.prepared, probabilities, reports, maps)
        finally:  # stored, failed, lost, or given up: no longer this worker's to renew
            self.batches.held.drop(batch.jobs)
        timings = BatchTimings(len(batch.jobs), batch.queue_wait, batch.preprocess, inference,
                               time.perf_counter() - started)
        self.last_timings = timings
        LOGGER.info("batch of %d: preprocess %.0f ms, inference %.0f ms, SR %.0f ms",
                    timings.jobs, 1000 * timings.preprocess, 1000 * timings.inference,
                    1000 * timings.report)
        if self._on_results is not None:
            self._on_results()

    def _drain(self, keep: int = 0) -> None:
        """Wait, oldest first, until at most ``keep`` batches are being written."""
        while len(self._finishing) > keep:
            try:
                self._finishing[0].result()  # counted as being written until it is done
            except Exception:
                LOGGER.exception("finishing a batch failed; its jobs will be retried")
            self._finishing.popleft()
