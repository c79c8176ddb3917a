"""When the dispatcher runs: at once for new results, at most once a gap under load."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from io import BytesIO
from pathlib import Path

import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation  # type: ignore

from dicom_node.config import Settings
from dicom_node.db import DeliveryItem, DeliveryState, JobState, utcnow
from dicom_node.jobs import JobResult, JobStore, ReceivedInstance, Route
from dicom_node.loopback import free_port
from dicom_node.scheduler import DISPATCH_JOB, Scheduler
from dicom_node.spool import Spool
from dicom_node.tcp import NO_DELAY

from dicom_factory import chest_image


def _next_dispatch(scheduler: Scheduler) -> timedelta:
    """How long from now until the dispatcher's next run."""
    return scheduler._scheduler.get_job(DISPATCH_JOB).next_run_time - utcnow()


def _scheduler(tmp_path: Path, **settings: object) -> Scheduler:
    """A scheduler (not started) whose next regular dispatch is an hour away."""
    configured = Settings(data_dir=tmp_path, **settings)  # type: ignore[arg-type]
    scheduler = Scheduler(configured, JobStore(configured.database_url),
                          Spool(configured.storage_dir))
    scheduler._scheduler.modify_job(DISPATCH_JOB, next_run_time=utcnow() + timedelta(hours=1))
    return scheduler


def test_new_results_are_dispatched_at_once_when_the_last_dispatch_is_past_the_gap(
        tmp_path: Path) -> None:
    scheduler = _scheduler(tmp_path, dispatch_min_gap_seconds=5, dispatch_interval_seconds=300)
    scheduler.dispatch_now()  # none yet
    assert _next_dispatch(scheduler) < timedelta(seconds=1)
    scheduler._scheduler.modify_job(DISPATCH_JOB, next_run_time=utcnow() + timedelta(hours=1))
    scheduler.dispatcher.last_started = time.monotonic() - 6
    scheduler.dispatch_now()
    assert _next_dispatch(scheduler) < timedelta(seconds=1)
    scheduler.store.close()


@pytest.mark.parametrize(("gap", "earliest", "latest"), [(5, 4, 5), (0, -1, 1)])
def test_new_results_within_the_gap_wait_for_its_end(
        tmp_path: Path, gap: float, earliest: float, latest: float) -> None:
    scheduler = _scheduler(tmp_path, dispatch_min_gap_seconds=gap,
                           dispatch_interval_seconds=300)
    assert scheduler.dispatcher.run_once() == 0  # nothing due; it started now
    scheduler.dispatch_now()
    assert timedelta(seconds=earliest) < _next_dispatch(scheduler) <= timedelta(seconds=latest)
    scheduler.store.close()


def test_a_regular_dispatch_sooner_than_the_gaps_end_is_kept(tmp_path: Path) -> None:
    scheduler = _scheduler(tmp_path, dispatch_min_gap_seconds=30, dispatch_interval_seconds=2)
    scheduler.dispatcher.run_once()
    scheduler._scheduler.modify_job(DISPATCH_JOB, next_run_time=utcnow() + timedelta(seconds=2))
    scheduler.dispatch_now()
    assert _next_dispatch(scheduler) <= timedelta(seconds=2)
    scheduler.store.close()


def test_dispatch_at_once_ignores_the_gap(tmp_path: Path) -> None:
    scheduler = _scheduler(tmp_path, dispatch_min_gap_seconds=30, dispatch_interval_seconds=300)
    scheduler.dispatcher.run_once()
    scheduler.dispatch_at_once()
    assert _next_dispatch(scheduler) < timedelta(seconds=1)
    scheduler.store.close()


@pytest.mark.parametrize(("asked", "earliest", "latest"), [
    (None, 3000, 3600), ("dispatch_now", 25, 30), ("dispatch_at_once", -1, 1)])
def test_results_stored_during_a_dispatch_are_dispatched_after_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, asked: str | None, earliest: float,
        latest: float) -> None:
    """A run asked for while one runs is not lost (APScheduler would skip it, and the
    results would wait for the next regular run): the dispatch schedules it as it ends,
    on the terms it was asked on."""
    scheduler = _scheduler(tmp_path, dispatch_min_gap_seconds=30, dispatch_interval_seconds=300)
    run_once = scheduler.dispatcher.run_once

    def storing_meanwhile() -> int:
        attempted = run_once()
        if asked is not None:
            getattr(scheduler, asked)()
            # Nothing is scheduled while the dispatch runs.
            assert _next_dispatch(scheduler) > timedelta(seconds=3000)
        return attempted

    monkeypatch.setattr(scheduler.dispatcher, "run_once", storing_meanwhile)
    scheduler._dispatch()
    assert timedelta(seconds=earliest) < _next_dispatch(scheduler) <= timedelta(seconds=latest)
    scheduler.store.close()


def test_stopping_while_a_dispatch_runs_and_results_wait_ends(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Results stored during the last dispatch, then the node stops: the dispatch ends
    without scheduling another, and the scheduler stops (APScheduler's shutdown holds
    its job store's lock while it waits for the running dispatch)."""
    scheduler = _scheduler(tmp_path, dispatch_min_gap_seconds=0.5,
                           dispatch_interval_seconds=300)
    running, release = threading.Event(), threading.Event()
    run_once = scheduler.dispatcher.run_once

    def slow() -> int:
        running.set()
        release.wait(20)
        return run_once()

    monkeypatch.setattr(scheduler.dispatcher, "run_once", slow)
    scheduler.start()
    scheduler.dispatch_now()
    assert running.wait(10)
    scheduler.dispatch_now()  # results stored while it runs
    stopping = threading.Thread(target=scheduler.stop, daemon=True)
    stopping.start()
    time.sleep(0.3)  # the shutdown is waiting for the dispatch
    release.set()
    stopping.join(20)
    assert not stopping.is_alive()
    scheduler.store.close()


@pytest.fixture
def storage_scp() -> Iterator[tuple[int, list[int]]]:
    """A Storage SCP on loopback; the number of C-STOREs of each association it took."""
    associations: list[int] = []

    def opened(event: evt.Event) -> None:
        associations.append(0)

    def stored(event: evt.Event) -> int:
        associations[-1] += 1
        return 0x0000

    ae = AE(ae_title="PACS")
    ae.add_supported_context(DigitalXRayImageStorageForPresentation)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[NO_DELAY, (evt.EVT_ACCEPTED, opened),
                                           (evt.EVT_C_STORE, stored)])
    try:
        yield port, associations
    finally:
        server.shutdown()


def _classified(store: JobStore, spool: Spool, n: int, destination: str) -> None:
    """A job classified now, its object (a DX image stands in for the SR) routed to
    ``destination``."""
    data = f"instance {n}".encode()
    job = store.record(ReceivedInstance(
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1", sop_instance_uid=f"1.2.3.{n}",
        series_instance_uid="1.2.3.100", study_instance_uid=f"1.2.3.4.{n}",
        transfer_syntax_uid="1.2.840.10008.1.2.1", calling_ae="STORESCU",
        peer_address="127.0.0.1", sha256=hashlib.sha256(data).hexdigest(),
        size_bytes=len(data)), f"in/{n}.dcm", JobState.QUEUED, "chest")
    assert job is not None
    [claimed] = store.claim("w", limit=1, lease_seconds=60)
    encoded = BytesIO()
    chest_image(rows=16, columns=16).save_as(encoded, enforce_file_format=True)
    sr = spool.write_report(claimed.id, encoded.getvalue())
    assert store.complete_batch("w", [JobResult(
        claimed.id, "normal", {"normal": 1.0}, "v1", sr,
        [Route("dicom", destination, DeliveryItem.SR)])]) == [True]


def test_results_made_within_the_gap_go_over_one_association(
        tmp_path: Path, storage_scp: tuple[int, list[int]]) -> None:
    """Three batches' results: the first goes at once; the two made while its
    dispatch's gap runs go together when it has passed, over a second association."""
    port, associations = storage_scp
    scheduler = _scheduler(tmp_path, dispatch_min_gap_seconds=3.0,
                           dispatch_interval_seconds=300)
    store, spool = scheduler.store, scheduler.dispatcher.spool
    scheduler.start()
    try:
        _classified(store, spool, 0, f"PACS@127.0.0.1:{port}")
        scheduler.dispatch_now()
        deadline = time.monotonic() + 20
        while not associations and time.monotonic() < deadline:
            threading.Event().wait(0.02)
        for n in (1, 2):  # within the gap of the dispatch that sent the first
            _classified(store, spool, n, f"PACS@127.0.0.1:{port}")
            scheduler.dispatch_now()
        while (store.delivery_counts().get(DeliveryState.DONE.value) != 3
               and time.monotonic() < deadline):
            threading.Event().wait(0.05)
        assert associations == [1, 2]
        assert store.delivery_counts() == {DeliveryState.DONE.value: 3}
    finally:
        scheduler.stop()
        store.close()
