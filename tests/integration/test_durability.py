"""Nothing acknowledged is lost: SIGKILL the node around acknowledgements, restart, check."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE

from conftest import CALLING_AE, NODE_AE, NodeProcess
from dicom_factory import chest_image, save
from integration.test_storescu import dataset_sha256
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
        path = node.data_dir / "spool" / str(job.spool_file)
        assert path.is_file()
        assert dataset_sha256(path) == job.sha256
        assert dcmread(path).SOPInstanceUID == uid
    assert not any((node.data_dir / "spool" / ".tmp").iterdir()), "partial files left"


def test_sigkill_right_after_acknowledging(tmp_path: Path) -> None:
    files = [save(chest_image(rows=512, columns=512, seed=i), tmp_path / f"{i}.dcm")
             for i in range(20)]
    node = NodeProcess(tmp_path / "var").start()
    try:
        run = storescu(node.port, files)
        node.kill9()
        assert run.all_success and len(run.responses) == 20
        node.start()  # same data dir, same port
        uids = {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
        check_every_acknowledged_instance(node, uids)
    finally:
        node.stop()


def test_sigkill_while_receiving(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path / "var").start()
    acknowledged: set[str] = set()
    sent_any = threading.Event()

    def sender() -> None:
        ae = AE(ae_title=CALLING_AE)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
        ae.add_requested_context(chest_image().SOPClassUID)
        assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AE)
        if not assoc.is_established:
            return
        for i in range(400):
            ds = chest_image(rows=512, columns=512, seed=i)
            try:
                rsp = assoc.send_c_store(ds)
            except Exception:
                break
            if "Status" not in rsp:
                break
            if rsp.Status == 0:
                acknowledged.add(str(ds.SOPInstanceUID))
                sent_any.set()
        assoc.release()

    thread = threading.Thread(target=sender)
    thread.start()
    try:
        assert sent_any.wait(60)
        time.sleep(1.0)  # let it run mid-stream
        node.kill9()
        thread.join(timeout=60)
        assert not thread.is_alive()
        assert 0 < len(acknowledged) < 400
        node.start()
        check_every_acknowledged_instance(node, acknowledged)
        assert "recovery:" in node.log
    finally:
        node.stop()
