"""Nothing acknowledged is lost: SIGKILL the node around acknowledgements, restart, check."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from dicom_node import faults

from dicom_factory import chest_image, save
from helpers.dimse import associate
from helpers.files import dataset_sha256, sop_instance_uid
from helpers.processes import NodeProcess
from peers import storescu

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def check_every_acknowledged_instance(node: NodeProcess, acknowledged: set[str]) -> None:
    with node.job_store() as store:
        jobs = store.list(limit=10_000)
    uids = [j.sop_instance_uid for j in jobs]
    assert len(uids) == len(set(uids)), "an instance has more than one job"
    by_uid = {j.sop_instance_uid: j for j in jobs}
    missing = acknowledged - by_uid.keys()
    assert not missing, f"{len(missing)} acknowledged instance(s) lost"
    for uid in acknowledged:
        job = by_uid[uid]
        path = node.spool / str(job.spool_file)
        assert path.is_file()
        assert dataset_sha256(path) == job.sha256
        assert dcmread(path).SOPInstanceUID == uid
    assert not any((node.spool / ".tmp").iterdir()), "partial files left"


def test_sigkill_right_after_acknowledging(tmp_path: Path) -> None:
    files = [save(chest_image(rows=512, columns=512, seed=i), tmp_path / f"{i}.dcm")
             for i in range(20)]
    node = NodeProcess(tmp_path / "var").start()
    try:
        run = storescu(node.port, files)
        node.kill9()
        assert run.all_success and len(run.responses) == 20
        node.start()  # same data dir, same port
        uids = {sop_instance_uid(f) for f in files}
        check_every_acknowledged_instance(node, uids)
    finally:
        node.stop()


class StreamingSender:
    """Sends ``total`` 512x512 chest images on one association in a thread, counting
    the acknowledged ones; ``enough`` is set after ``stop_after`` acknowledgements,
    ``ended`` when it stops for whatever reason (the node gone, or all sent)."""

    def __init__(self, node: NodeProcess, total: int, stop_after: int) -> None:
        self.node, self.total, self.stop_after = node, total, stop_after
        self.acknowledged: set[str] = set()
        self.sent: list[str] = []
        self.enough = threading.Event()
        self.ended = threading.Event()
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self) -> None:
        try:
            assoc = associate(self.node.port, [chest_image()])
            if not assoc.is_established:
                return
            for i in range(self.total):
                ds = chest_image(rows=512, columns=512, seed=i)
                self.sent.append(str(ds.SOPInstanceUID))
                try:
                    rsp = assoc.send_c_store(ds)
                except Exception:
                    break
                if "Status" not in rsp:
                    break
                if rsp.Status == 0:
                    self.acknowledged.add(str(ds.SOPInstanceUID))
                    if len(self.acknowledged) >= self.stop_after:
                        self.enough.set()
            assoc.release()
        finally:
            self.ended.set()

    def join(self) -> None:
        self.thread.join(timeout=60)
        assert not self.thread.is_alive()


def test_sigkill_while_receiving(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path / "var").start()
    total, kill_after = 400, 20
    sender = StreamingSender(node, total, kill_after)
    try:
        # Killed mid-stream: once the sender counted kill_after acknowledgements, with
        # the association still sending (it ends only when the node is gone).
        assert sender.enough.wait(120), f"only {len(sender.acknowledged)} acknowledged"
        assert not sender.ended.is_set(), "the sender finished before the kill"
        node.kill9()
        sender.join()
        assert kill_after <= len(sender.acknowledged) < total
        node.start()
        check_every_acknowledged_instance(node, sender.acknowledged)
        assert "recovery:" in node.log
    finally:
        node.stop()
        sender.thread.join(timeout=60)


def test_sigterm_while_receiving_stops_cleanly_and_loses_nothing(tmp_path: Path) -> None:
    """SIGTERM with an association sending: the node stops within its grace time (exit
    0, "stopped" logged), the sender gets answers or a closed association, never a
    hang; after a restart every acknowledged instance is there, and at most the one in
    flight was queued without the sender seeing its acknowledgement."""
    node = NodeProcess(tmp_path / "var").start()
    sender = StreamingSender(node, 400, 10)
    try:
        assert sender.enough.wait(120), f"only {len(sender.acknowledged)} acknowledged"
        assert not sender.ended.is_set(), "the sender finished before the signal"
        assert node.stop() == 0  # SIGTERM, then SIGKILL only after 15 s
        assert sender.ended.wait(30)
        sender.join()
        assert "stopped" in node.log and "Traceback" not in node.log
        node.start()
        check_every_acknowledged_instance(node, sender.acknowledged)
        with node.job_store() as store:
            queued = {j.sop_instance_uid for j in store.list(limit=1000)}
        assert sender.acknowledged <= queued
        unacknowledged = queued - sender.acknowledged
        assert len(unacknowledged) <= 1 and unacknowledged <= set(sender.sent[-1:])
    finally:
        node.stop()
        sender.thread.join(timeout=60)


@pytest.mark.parametrize("step", faults.STEPS)
def test_killed_at_each_receive_step_loses_nothing_and_queues_nothing_half_received(
        tmp_path: Path, step: str) -> None:
    """The node SIGKILLs itself (``DICOM_NODE_TEST_KILL_AT``) at ``step`` of the 5th of
    10 instances sent on one association. After a restart, every instance the sender
    saw acknowledged is on disk with its hash and exactly one job; the instance in
    flight is queued only if its job row was committed (then whole), and sending it
    again is acknowledged without a second job."""
    kill_at = 5
    node = NodeProcess(tmp_path / "var", env={faults.ENV: f"{step}:{kill_at}"}).start()
    datasets = [chest_image(rows=256, columns=256, seed=i) for i in range(10)]
    acknowledged: set[str] = set()
    try:
        assoc = associate(node.port, datasets[:1])
        assert assoc.is_established
        for ds in datasets:
            try:
                rsp = assoc.send_c_store(ds)
            except Exception:
                break
            if "Status" not in rsp or rsp.Status != 0:
                break
            acknowledged.add(str(ds.SOPInstanceUID))
        assoc.abort()
        assert node.proc is not None
        assert node.proc.wait(timeout=30) == -signal.SIGKILL  # killed itself, at the step
        in_flight = str(datasets[kill_at - 1].SOPInstanceUID)
        if step == "responded":  # written to the socket before the kill: the sender has it
            assert len(acknowledged) == kill_at and in_flight in acknowledged
        else:
            assert len(acknowledged) == kill_at - 1 and in_flight not in acknowledged
        node.env.pop(faults.ENV)
        node.start()
        check_every_acknowledged_instance(node, acknowledged)
        with node.job_store() as store:
            queued = {j.sop_instance_uid for j in store.list(limit=100)}
        committed = step in ("committed", "responded")
        assert queued == acknowledged | ({in_flight} if committed else set())
        assert "recovery:" in node.log
        if step in ("renamed",):  # renamed, never committed: moved aside, not queued
            assert any((node.spool / ".quarantine").iterdir())
        assert storescu_statuses(node, datasets[kill_at - 1]) == [0]
        with node.job_store() as store:
            again = [j.sop_instance_uid for j in store.list(limit=100)]
        assert again.count(in_flight) == 1
    finally:
        node.stop()


def storescu_statuses(node: NodeProcess, ds: Dataset) -> list[int]:
    """Send ``ds`` once more, as a sender retrying after a failure."""
    assoc = associate(node.port, [ds])
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(ds).Status)]
    finally:
        assoc.release()
