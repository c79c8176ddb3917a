"""The worker end to end in-process: queue -> batch -> SR -> delivery to a real SCP."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, AllStoragePresentationContexts, evt

from dicom_node import worker as worker_module
from dicom_node.config import Settings
from dicom_node.db import DeliveryState, JobState
from dicom_node.jobs import JobStore
from dicom_node.loopback import free_port
from dicom_node.node import Node
from dicom_node.spool import Spool
from dicom_node.worker import Worker
from model import card

from dicom_factory import chest_image, cr_monochrome1, dx_16bit
from helpers.dimse import store
from helpers.environment import wait_until

pytestmark = pytest.mark.slow


class FakePACS:
    """A pynetdicom Storage SCP that keeps what it receives and answers ``status``."""

    def __init__(self) -> None:
        self.port = free_port()
        self.received: list[Dataset] = []
        self.status = 0x0000
        ae = AE(ae_title="PACS")
        ae.supported_contexts = AllStoragePresentationContexts
        self._server = ae.start_server(("127.0.0.1", self.port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, self._store)])
        self._ae = ae

    def _store(self, event: Any) -> int:
        if self.status == 0:
            ds = event.dataset
            ds.file_meta = event.file_meta
            self.received.append(ds)
        return self.status

    def stop(self) -> None:
        self._ae.shutdown()



def _serving(worker: Worker) -> str:
    """The version of the model the worker now serves (loading it if it changed)."""
    loaded = worker.models.current()
    assert loaded is not None
    return loaded.engine.card.version


def sr_only(pacs: FakePACS) -> dict[str, object]:
    """The fake PACS as a destination of SRs only (the evidence images are still made:
    see the first test)."""
    return {"address": f"PACS@127.0.0.1:{pacs.port}", "objects": ["sr"]}


@pytest.fixture
def pacs() -> Iterator[FakePACS]:
    peer = FakePACS()
    yield peer
    peer.stop()


@pytest.fixture
def node(tmp_path: Path, pacs: FakePACS) -> Iterator[Node]:
    settings = Settings(data_dir=tmp_path / "var", allow_unvalidated_models=True, port=free_port(),
                        allowed_calling_ae=["STORESCU"], min_free_disk_mb=0,
                        destinations=[sr_only(pacs)], max_attempts=2,
                        batch_size=4, max_batch_delay_ms=300, retry_base_seconds=0.5,
                        retry_max_seconds=1, delivery_timeout=5, dispatch_interval_seconds=0.3)
    running = Node(settings)
    running.start()
    yield running
    running.stop()


def test_jobs_wait_for_a_model_then_flow_to_the_pacs(node: Node, pacs: FakePACS,
                                                     serving_artifact: Path) -> None:
    sources = [dx_16bit(), cr_monochrome1(), chest_image()]
    assert store(node, sources) == [0, 0, 0]
    # Two more idle passes: the second began after the jobs were queued and found no model.
    passes = node.worker.idle_passes
    wait_until(lambda: node.worker.idle_passes >= passes + 2, timeout=30)
    assert node.store.counts() == {"queued": 3}  # no model: nothing runs, nothing is lost

    card.install(serving_artifact, node.settings.model_dir, allow_unvalidated=True)
    wait_until(lambda: len(pacs.received) == 3)
    wait_until(lambda: node.store.delivery_counts() == {"done": 3})
    jobs = node.store.list()
    assert {j.state for j in jobs} == {JobState.DONE}
    by_source = {j.sop_instance_uid: j for j in jobs}
    for sr in pacs.received:
        evidence = sr.CurrentRequestedProcedureEvidenceSequence[0] \
            .ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        job = by_source[evidence]
        assert sr.SOPInstanceUID == job.sr_sop_instance_uid
        assert sr.StudyInstanceUID == job.study_instance_uid
        assert job.label in ("covid", "normal", "pneumonia")
        assert sum(job.probabilities.values()) == pytest.approx(1.0, abs=1e-4)
        # Beside the SR, the evidence image of the same forward pass, in the study.
        assert job.evidence_file is not None
        image = dcmread(node.spool.path(job.evidence_file))
        assert image.SOPInstanceUID == job.evidence_sop_instance_uid
        assert image.StudyInstanceUID == job.study_instance_uid
        assert image.SourceImageSequence[0].ReferencedSOPInstanceUID == job.sop_instance_uid
    assert node.worker.last_timings is not None


def test_poison_input_fails_and_the_queue_drains(node: Node, pacs: FakePACS,
                                                 serving_artifact: Path) -> None:
    good, bad = chest_image(), chest_image()
    assert store(node, [good, bad]) == [0, 0]
    poisoned = next(j for j in node.store.list() if j.sop_instance_uid == bad.SOPInstanceUID)
    node.spool.path(poisoned.spool_file).write_bytes(b"\0" * 300)  # disk corruption
    card.install(serving_artifact, node.settings.model_dir, allow_unvalidated=True)
    wait_until(lambda: node.store.counts().get("failed") == 1
               and node.store.counts().get("done") == 1)
    failed = node.store.get(poisoned.id)
    assert failed is not None and failed.attempts == 2
    assert "preprocessing failed" in (failed.last_error or "")
    wait_until(lambda: len(pacs.received) == 1)


def test_permanent_refusal_is_dead_then_retry_on_request(node: Node, pacs: FakePACS,
                                                         serving_artifact: Path) -> None:
    pacs.status = 0xA900
    card.install(serving_artifact, node.settings.model_dir, allow_unvalidated=True)
    assert store(node, [chest_image()]) == [0]
    wait_until(lambda: node.store.delivery_counts() == {"dead": 1})
    (job,) = node.store.list()
    (delivery,) = node.store.deliveries([job.id])[job.id]
    assert delivery.state is DeliveryState.DEAD and delivery.last_status == 0xA900
    assert delivery.attempts == 1
    pacs.status = 0x0000
    assert node.store.retry_dead_deliveries(job.id) == 1
    wait_until(lambda: len(pacs.received) == 1)


def test_out_of_resources_is_retried_with_the_same_sr(node: Node, pacs: FakePACS,
                                                      serving_artifact: Path) -> None:
    pacs.status = 0xA700
    card.install(serving_artifact, node.settings.model_dir, allow_unvalidated=True)
    assert store(node, [chest_image()]) == [0]
    wait_until(lambda: any(d.attempts >= 2 for ds in node.store.deliveries(
        [j.id for j in node.store.list()]).values() for d in ds))
    pacs.status = 0x0000
    wait_until(lambda: len(pacs.received) == 1)
    (job,) = node.store.list()
    assert pacs.received[0].SOPInstanceUID == job.sr_sop_instance_uid


def _slow_network(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """Each forward pass (with the maps or without) takes ``seconds`` more."""
    import time

    from model import engine

    for name in ("predict", "predict_with_maps"):
        fast = getattr(engine.Engine, name)

        def slow(self: engine.Engine, images: Any, _fast: Any = fast) -> Any:
            time.sleep(seconds)
            return _fast(self, images)

        monkeypatch.setattr(engine.Engine, name, slow)


def test_stopping_mid_queue_leaves_no_job_claimed(tmp_path: Path, pacs: FakePACS,
                                                  serving_artifact: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The batch decoded ahead of time is finished on stop, not left under a lease."""
    # A forward pass of 0.2 s: the small network could otherwise finish the queue while
    # the node stops (its receive path first, up to half a second).
    _slow_network(monkeypatch, 0.2)
    settings = Settings(data_dir=tmp_path / "var", allow_unvalidated_models=True, port=free_port(),
                        allowed_calling_ae=["STORESCU"], min_free_disk_mb=0,
                        destinations=[sr_only(pacs)], batch_size=2,
                        max_batch_delay_ms=0, dispatch_interval_seconds=0.3)
    running = Node(settings)
    running.start()
    try:
        assert store(running, [chest_image(seed=i) for i in range(40)]) == [0] * 40
        card.install(serving_artifact, settings.model_dir, allow_unvalidated=True)
        wait_until(lambda: running.store.counts().get("done", 0) >= 2, interval=0.01)
    finally:
        running.stop()
    with JobStore(settings.database_url) as after:  # as the node left it: nothing recovered
        jobs = after.list()
        done = [j.id for j in jobs if j.state is JobState.DONE]
        deliveries = after.deliveries(done)
    assert len(jobs) == 40
    assert any(j.state is JobState.QUEUED for j in jobs)  # stopped mid-queue indeed
    assert {j.state for j in jobs} <= {JobState.QUEUED, JobState.DONE}
    assert all(j.lease_owner is None for j in jobs if j.state is JobState.QUEUED)
    assert all(len(d) == 1 for d in deliveries.values())


def test_a_new_model_is_picked_up_and_the_old_one_freed(
        tmp_path: Path, serving_artifact: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The loaded model is exempted from garbage collection (gc.freeze) while it
    serves; a model installed later replaces it, and the old one -- a Keras model
    is full of reference cycles -- is then collected."""
    from model import engine, network

    # What the engine serves: the loaded model, or (evidence images on, the default)
    # the model with the features output built from it.
    loaded: list[weakref.ref[Any]] = []
    served = engine.Engine._served

    def recording(self: engine.Engine, model: Any) -> Any:
        serving = served(self, model)
        loaded.append(weakref.ref(serving))
        return serving

    monkeypatch.setattr(engine.Engine, "_served", recording)
    other = tmp_path / "other"
    card.save_artifact(network.build("xception", 96, seed=8), other,
                       {"version": "0.0.2", "architecture": "xception", "input_size": 96,
                        "trained": False})
    settings = Settings(data_dir=tmp_path / "var", allow_unvalidated_models=True,
                        min_free_disk_mb=0)
    with JobStore(settings.database_url) as jobs:
        worker = Worker(settings, jobs, Spool(settings.storage_dir))
        try:
            card.install(serving_artifact, settings.model_dir, allow_unvalidated=True)
            assert _serving(worker) == "0.0.1"
            assert gc.get_freeze_count() > 0
            card.install(other, settings.model_dir, allow_unvalidated=True)
            assert _serving(worker) == "0.0.2"
            gc.collect()
            assert len(loaded) == 2 and loaded[0]() is None and loaded[1]() is not None
        finally:
            gc.unfreeze()


def test_a_received_image_wakes_the_idle_worker(tmp_path: Path, pacs: FakePACS,
                                                serving_artifact: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The receive path wakes the worker: with the idle poll far longer than the wait
    below, the image is classified and its SR delivered all the same."""
    monkeypatch.setattr(worker_module, "IDLE_POLL_SECONDS", 300.0)
    settings = Settings(data_dir=tmp_path / "var", allow_unvalidated_models=True, port=free_port(),
                        allowed_calling_ae=["STORESCU"], min_free_disk_mb=0,
                        destinations=[sr_only(pacs)],
                        dispatch_interval_seconds=300)
    card.install(serving_artifact, settings.model_dir, allow_unvalidated=True)
    running = Node(settings)
    running.start()
    try:
        wait_until(running.worker.models.ready.is_set, timeout=120)
        # The step that loaded the model found no job: the worker went idle after it.
        wait_until(lambda: running.worker.idle_passes >= 1, timeout=30)
        assert store(running, [chest_image()]) == [0]
        wait_until(lambda: len(pacs.received) == 1, timeout=30)
    finally:
        running.stop()


def test_the_last_results_go_at_once_when_the_worker_runs_out_of_work(
        tmp_path: Path, pacs: FakePACS, serving_artifact: Path) -> None:
    """Results wait for the dispatch gap only while more are coming: once the queue is
    empty the worker has them sent, a minute's gap and a regular dispatch every five
    minutes notwithstanding."""
    settings = Settings(data_dir=tmp_path / "var", allow_unvalidated_models=True, port=free_port(),
                        allowed_calling_ae=["STORESCU"], min_free_disk_mb=0,
                        destinations=[sr_only(pacs)], batch_size=1, max_batch_delay_ms=0,
                        dispatch_interval_seconds=300, dispatch_min_gap_seconds=60)
    running = Node(settings)
    running.start()  # its first dispatch (nothing due) starts the gap now
    try:
        assert store(running, [chest_image(seed=i) for i in range(3)]) == [0] * 3
        card.install(serving_artifact, settings.model_dir, allow_unvalidated=True)
        wait_until(lambda: len(pacs.received) == 3, timeout=40)
    finally:
        running.stop()


def _queue(settings: Settings, artifact: Path, count: int) -> None:
    """Queue ``count`` chest images (a node with no model receives them), then install
    ``artifact`` for the workers a test starts."""
    receiving = Node(settings)
    receiving.start()
    try:
        assert store(receiving, [chest_image(seed=i) for i in range(count)]) == [0] * count
    finally:
        receiving.stop()
    card.install(artifact, settings.model_dir, allow_unvalidated=True)


def _run_queue(settings: Settings, artifact: Path, count: int, workers: int
               ) -> tuple[list[Any], list[Worker], list[int]]:
    """Queue ``count`` chest images (a node with no model receives them), then run
    ``workers`` workers on them with expired leases reaped every 0.1 s, until every job
    is done; the jobs, the workers, and how many leases were reaped."""
    import threading

    _queue(settings, artifact, count)
    reaped: list[int] = []
    stop = threading.Event()
    with JobStore(settings.database_url) as jobs:

        def reap() -> None:
            while not stop.wait(0.1):
                reaped.append(sum(jobs.reap_expired_leases()))

        spool = Spool(settings.storage_dir)
        running = [Worker(settings, jobs, spool) for _ in range(workers)]
        reaper = threading.Thread(target=reap, daemon=True)
        reaper.start()
        for worker in running:
            worker.start()
        try:
            wait_until(lambda: jobs.counts() == {"done": count}, timeout=120)
        finally:
            for worker in running:
                worker.stop()
            for worker in running:
                worker.join(timeout=60)
            stop.set()
            reaper.join()
        return sorted(jobs.list(), key=lambda j: j.id), running, reaped


def _lease_settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "var", allow_unvalidated_models=True,
                    port=free_port(), allowed_calling_ae=["STORESCU"], min_free_disk_mb=0,
                    lease_seconds=2.0, batch_size=2, max_batch_delay_ms=0)


@pytest.fixture(params=[1, 2], ids=["one lane", "two lanes"])
def lanes(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    """The engine's lanes: 1 (Keras), or 2 as OpenVINO on a CPU has, where the worker
    puts the next batch into the network before the last one is done."""
    from model import engine

    count: int = request.param
    load = engine.Engine.__init__

    def with_lanes(self: engine.Engine, *args: Any, **kwargs: Any) -> None:
        load(self, *args, **kwargs)
        self.lanes = count

    monkeypatch.setattr(engine.Engine, "__init__", with_lanes)
    return count


def test_a_batch_slower_than_its_lease_is_classified_once(
        tmp_path: Path, serving_artifact: Path, monkeypatch: pytest.MonkeyPatch,
        lanes: int) -> None:
    """Two workers on one job store, a lease of 2 s, and a network that takes 2.5 s a
    batch (a slow GPU, a paused VM) while expired leases are reaped every 0.1 s: each
    worker renews the leases of the batches it holds (in the network, claimed ahead,
    being written), so no job is reclaimed by the other and classified twice."""
    _slow_network(monkeypatch, 2.5)
    reports: list[int] = []
    write_report = Spool.write_report

    def counted(self: Spool, job_id: int, data: bytes) -> str:
        reports.append(job_id)
        return write_report(self, job_id, data)

    monkeypatch.setattr(Spool, "write_report", counted)
    settings = _lease_settings(tmp_path)
    done, workers, reaped = _run_queue(settings, serving_artifact, 6, 2)
    assert sorted(reports) == [j.id for j in done]  # one SR each, none built twice
    assert [j.attempts for j in done] == [1] * 6
    assert sum(reaped) == 0
    # The batches were slower than their lease.
    assert any(w.last_timings is not None and w.last_timings.inference > settings.lease_seconds
               for w in workers)


def test_a_batch_that_fails_is_not_renewed_but_retried(
        tmp_path: Path, serving_artifact: Path, monkeypatch: pytest.MonkeyPatch,
        lanes: int) -> None:
    """The first forward pass fails (a GPU error): that batch's leases are no longer
    renewed, so they expire, the jobs are reaped and classified again; the others once
    (with two lanes the second batch is already in the network when the first fails)."""
    from model import engine

    failures = [RuntimeError("CUDA error: an illegal memory access was encountered")]
    for name in ("predict", "predict_with_maps"):
        working = getattr(engine.Engine, name)

        def failing_once(self: engine.Engine, images: Any, _working: Any = working) -> Any:
            if failures:
                raise failures.pop()
            return _working(self, images)

        monkeypatch.setattr(engine.Engine, name, failing_once)
    done, _, reaped = _run_queue(_lease_settings(tmp_path), serving_artifact, 4, 1)
    assert sum(reaped) == 2  # the failed batch's two jobs, once their leases ran out
    assert sorted(j.attempts for j in done) == [1, 1, 2, 2]


def test_a_slow_result_writer_holds_the_network_back_only_past_its_bound(
        tmp_path: Path, serving_artifact: Path, monkeypatch: pytest.MonkeyPatch,
        lanes: int) -> None:
    """While the result writer is stuck on a batch (a slow disk), the network goes on:
    a lane done with its batch takes the next one at once, until WRITER_BEHIND batches
    wait for the writer; then the worker waits, so results held in memory are bounded.
    Once the writer is freed every job is stored."""
    import threading
    import time

    from dicom_node.results import ResultWriter
    from model import engine

    passes: list[int] = []
    for name in ("predict", "predict_with_maps"):
        counted_pass = getattr(engine.Engine, name)

        def counting(self: engine.Engine, images: Any, _run: Any = counted_pass) -> Any:
            passes.append(len(images))
            return _run(self, images)

        monkeypatch.setattr(engine.Engine, name, counting)
    stuck, released = threading.Event(), threading.Event()
    write_batch = ResultWriter.write_batch

    def slow_disk(self: ResultWriter, *args: Any, **kwargs: Any) -> None:
        if not stuck.is_set():
            stuck.set()
            assert released.wait(60)
        write_batch(self, *args, **kwargs)

    monkeypatch.setattr(ResultWriter, "write_batch", slow_disk)
    settings = Settings(data_dir=tmp_path / "var", allow_unvalidated_models=True,
                        port=free_port(), allowed_calling_ae=["STORESCU"], min_free_disk_mb=0,
                        batch_size=1, max_batch_delay_ms=0)
    _queue(settings, serving_artifact, 8)
    with JobStore(settings.database_url) as jobs:
        worker = Worker(settings, jobs, Spool(settings.storage_dir))
        worker.start()
        try:
            # The writer stuck on the first batch, the next waiting for it: the loop
            # waits too. Whether the last batch in a lane went in first depends on
            # which of the loop and that lane came first: a pass or none.
            behind = worker_module.WRITER_BEHIND
            wait_until(lambda: len(worker._finishing) >= behind, timeout=60)
            time.sleep(1.5)  # time for a batch past the bound, were there one
            assert stuck.is_set() and len(worker._finishing) == behind
            assert behind + lanes - 1 <= len(passes) <= behind + lanes
            released.set()
            wait_until(lambda: jobs.counts() == {"done": 8}, timeout=120)
        finally:
            released.set()
            worker.stop()
            worker.join(timeout=60)
    assert sum(passes) == 8
