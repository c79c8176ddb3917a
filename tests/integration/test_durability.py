"""Nothing acknowledged is lost: SIGKILL the node around acknowledgements, restart, check."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE

from dicom_factory import chest_image, save
from helpers.environment import CALLING_AE, NODE_AE
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


def test_sigkill_while_receiving(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path / "var").start()
    total, kill_after = 400, 20
    acknowledged: set[str] = set()
    enough = threading.Event()  # set once kill_after stores were acknowledged
    ended = threading.Event()  # set when the sender stops, for whatever reason

    def sender() -> None:
        try:
            ae = AE(ae_title=CALLING_AE)
            ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
            ae.add_requested_context(chest_image().SOPClassUID)
            assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AE)
            if not assoc.is_established:
                return
            for i in range(total):
                ds = chest_image(rows=512, columns=512, seed=i)
                try:
                    rsp = assoc.send_c_store(ds)
                except Exception:
                    break
                if "Status" not in rsp:
                    break
                if rsp.Status == 0:
                    acknowledged.add(str(ds.SOPInstanceUID))
                    if len(acknowledged) >= kill_after:
                        enough.set()
            assoc.release()
        finally:
            ended.set()

    thread = threading.Thread(target=sender)
    thread.start()
    try:
        # Killed mid-stream: once the sender counted kill_after acknowledgements, with
        # the association still sending (it ends only when the node is gone).
        assert enough.wait(120), f"only {len(acknowledged)} acknowledged"
        assert not ended.is_set(), "the sender finished before the kill"
        node.kill9()
        thread.join(timeout=60)
        assert not thread.is_alive()
        assert kill_after <= len(acknowledged) < total
        node.start()
        check_every_acknowledged_instance(node, acknowledged)
        assert "recovery:" in node.log
    finally:
        node.stop()
        thread.join(timeout=60)
