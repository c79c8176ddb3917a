"""The batch pipeline: claim up to a batch of queued jobs under a lease, decode them.

Claiming waits at most ``max_batch_delay_ms`` for the batch to fill. Decoding
reads each spooled file and turns it into the model's input through
:mod:`model.preprocess`, in a thread pool; an input that cannot be decoded fails
its job with the reason (retried until ``max_attempts``) and the rest of the
batch goes on.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset

from dicom_node.config import Settings
from dicom_node.db import Job
from dicom_node.jobs import JobStore
from dicom_node.spool import Spool
from model import preprocess

if TYPE_CHECKING:
    from model.engine import Engine

LOGGER = logging.getLogger(__name__)

#: How often a batch that is filling looks for more jobs.
_FILL_POLL_SECONDS = 0.02


@dataclass
class Prepared:
    """One claimed job, decoded and ready for the network."""

    job: Job
    source: Dataset
    tensor: NDArray[np.float32]


@dataclass
class Batch:
    """Claimed jobs, decoded for one engine, with what waiting and decoding took."""

    engine: Engine
    jobs: list[Job]
    prepared: list[Prepared]
    queue_wait: float
    preprocess: float


class HeldJobs:
    """The ids of the jobs a worker is working on: claimed, and not yet stored, given
    back, or dropped after an error. Only these leases are renewed; a job dropped
    here keeps its lease until it expires, and is then retried."""

    def __init__(self) -> None:
        self._ids: set[int] = set()
        self._lock = threading.Lock()

    def add(self, jobs: Iterable[Job]) -> None:
        with self._lock:
            self._ids.update(job.id for job in jobs)

    def drop(self, jobs: Iterable[Job]) -> None:
        with self._lock:
            self._ids.difference_update(job.id for job in jobs)

    def ids(self) -> list[int]:
        with self._lock:
            return sorted(self._ids)


class BatchLoader:
    """Claims batches for ``owner`` and decodes them."""

    def __init__(self, settings: Settings, store: JobStore, spool: Spool, owner: str,
                 stopping: threading.Event) -> None:
        self.settings = settings
        self.store = store
        self.spool = spool
        self.owner = owner
        #: What this loader claimed and its worker has not finished with.
        self.held = HeldJobs()
        self._stopping = stopping
        self._pool = ThreadPoolExecutor(max_workers=max(os.cpu_count() or 1, 2),
                                        thread_name_prefix="preprocess")

    def load(self, engine: Engine) -> Batch:
        """Claim up to ``engine.batch_size`` jobs and decode them for ``engine``."""
        jobs = self.claim(engine.batch_size)
        if not jobs:
            return Batch(engine, [], [], 0.0, 0.0)
        started = time.perf_counter()
        queue_wait = max(time.time() - j.created_at.timestamp() for j in jobs)
        prepared = self.prepare(jobs, engine)
        return Batch(engine, jobs, prepared, queue_wait, time.perf_counter() - started)

    def redo(self, batch: Batch, engine: Engine) -> Batch:
        """``batch`` decoded again for another engine (a new model's input size)."""
        started = time.perf_counter()
        jobs = [p.job for p in batch.prepared]
        return Batch(engine, batch.jobs, self.prepare(jobs, engine), batch.queue_wait,
                     time.perf_counter() - started)

    def claim(self, size: int) -> list[Job]:
        """Up to ``size`` jobs, waiting at most ``max_batch_delay_ms`` for more once one
        is claimed."""
        lease = self.settings.lease_seconds
        jobs = self.store.claim(self.owner, size, lease)
        self.held.add(jobs)
        if not jobs:
            return []
        deadline = time.monotonic() + self.settings.max_batch_delay_ms / 1000
        while len(jobs) < size and time.monotonic() < deadline:
            if self._stopping.wait(_FILL_POLL_SECONDS):
                break
            more = self.store.claim(self.owner, size - len(jobs), lease)
            self.held.add(more)
            jobs += more
        return jobs

    def prepare(self, jobs: list[Job], engine: Engine) -> list[Prepared]:
        """Decode ``jobs`` in parallel; a job that cannot be decoded is failed with the
        reason and left out."""
        def load(job: Job) -> Prepared:
            if job.spool_file is None:
                raise FileNotFoundError("job has no spool file")
            source = preprocess.read_source(self.spool.path(job.spool_file))
            tensor = preprocess.dicom_tensor(source, engine.input_size,
                                             engine.card.interpolation)  # type: ignore[arg-type]
            return Prepared(job, source, tensor)

        prepared = []
        futures = [(job, self._pool.submit(load, job)) for job in jobs]
        for job, future in futures:
            try:
                prepared.append(future.result())
            except Exception as exc:  # a decoder's panic is already a PreprocessError
                self.held.drop([job])
                state = self.store.fail(job.id, self.owner, f"preprocessing failed: {exc}")
                LOGGER.warning("job %d: preprocessing failed (%s); now %s", job.id,
                               type(exc).__name__, state.value if state else "not ours")
        return prepared

    def close(self) -> None:
        """Wait for decodes in flight."""
        self._pool.shutdown(wait=True)
