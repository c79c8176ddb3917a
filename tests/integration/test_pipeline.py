"""End to end with real peers: storescu -> node -> SR -> Orthanc or a faulty storescp."""

from __future__ import annotations

import json
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest
from pydicom import dcmread

from dicom_node.db import DeliveryState, JobState
from dicom_node.loopback import free_port

from dicom_factory import chest_image, cr_monochrome1, dx_16bit, save
from helpers.environment import CALLING_AE, wait_until
from helpers.files import sop_instance_uid
from helpers.processes import FAST_DELIVERY, NodeProcess, all_delivered, cli, paused_while
from helpers.sr import read_result
from peers import Orthanc, Storescp, send_each, storescu

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FAST_RETRY = {**FAST_DELIVERY, "DICOM_NODE_DELIVERY_MAX_ATTEMPTS": "1000"}



def start_node(tmp_path: Path, artifact: Path | None, destination: str, name: str = "var"
               ) -> NodeProcess:
    """A node sending its results to ``destination``, serving ``artifact`` (None: no
    model yet)."""
    model = ["--model", str(artifact)] if artifact is not None else []
    return NodeProcess(tmp_path / name, extra_args=[
        "--allow-calling-ae", CALLING_AE, *model, "--destination", destination],
        env=FAST_RETRY).start()



def result_uids(node: NodeProcess) -> set[str]:
    """The SOP Instance UIDs minted for each of the node's jobs: its SR's and its
    evidence image's."""
    with node.job_store() as store:
        return {uid for j in store.list()
                for uid in (j.sr_sop_instance_uid, j.evidence_sop_instance_uid)}


def test_orthanc_receives_one_sr_per_image_in_the_right_study(
        tmp_path: Path, small_artifact: Path, shared_dicom: Path) -> None:
    orthanc = Orthanc(tmp_path / "orthanc")
    node = start_node(tmp_path, small_artifact,
                      f"{orthanc.ae_title}@127.0.0.1:{orthanc.dicom_port}")
    try:
        files = sorted(shared_dicom.glob("*.dcm"))
        assert all(r.all_success for r in send_each(orthanc.dicom_port, files,
                                                    called=orthanc.ae_title))
        assert all(r.all_success for r in send_each(node.port, files))
        wait_until(lambda: all_delivered(node, 3), what="3 SRs and evidence images delivered")
        stored = orthanc.instances()
        with node.job_store() as store:
            jobs = {j.sop_instance_uid: j for j in store.list()}
        images = {str(d.SOPInstanceUID): d for d in stored if d.SOPInstanceUID in jobs}
        reports = [d for d in stored if d.Modality == "SR"]
        assert len(images) == 3 and len(reports) == 3
        assert len(stored) == 9  # and an evidence image per image
        for sr in reports:
            evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
            referenced = evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
            source = images[str(referenced.ReferencedSOPInstanceUID)]
            assert sr.StudyInstanceUID == source.StudyInstanceUID
            assert evidence.StudyInstanceUID == source.StudyInstanceUID
            job = jobs[str(source.SOPInstanceUID)]
            assert sr.SOPInstanceUID == job.sr_sop_instance_uid
            said = read_result(sr)  # the Finding item and each class's Probability
            assert said.finding == job.label
            assert said.probabilities == pytest.approx(job.probabilities, abs=1e-6)
        studies = orthanc.get("/studies")
        assert len(studies) == 3  # the SRs joined the images' studies, no new study
        log = node.log  # at INFO: jobs by our ids, never the received UIDs
        assert "sr delivered to dicom" in log
        for source in images.values():
            for uid in (source.SOPInstanceUID, source.StudyInstanceUID):
                assert str(uid) not in log
    finally:
        node.stop()
        orthanc.stop()


def test_faulty_pacs_gets_exactly_one_sr_per_image(tmp_path: Path,
                                                   serving_artifact: Path) -> None:
    port = free_port()
    node = start_node(tmp_path, serving_artifact, f"PACS@127.0.0.1:{port}")
    files = [save(ds, tmp_path / f"{i}.dcm") for i, ds in
             enumerate([dx_16bit(), cr_monochrome1(), chest_image()])]
    try:
        assert storescu(node.port, files).all_success

        def attempts() -> int:
            with node.job_store() as store:
                found = store.deliveries([j.id for j in store.list()])
            return min((d.attempts for ds in found.values() for d in ds), default=0) \
                if sum(len(ds) for ds in found.values()) == 6 else 0

        # Each faulty PACS's log shows the node meeting its fault (a retry alone could be
        # an attempt made while none listened, between two of them; the probe that
        # waits for one to listen is refused too); then an attempt is recorded after it.
        for i, (faults, sign, times) in enumerate([
                (["--refuse"], "Refusing Association (forced", 2),
                (["--abort-after"], "ABORT initiated (due to command line", 1),
                (["--sleep-during", "6"], "Received Store Request", 1)]):
            faulty = Storescp(tmp_path / f"faulty{i}", port, faults, log=True)
            wait_until(lambda f=faulty, sign=sign, times=times: f.log.count(sign) >= times,
                       what=f"the node meeting {faults}")
            met = attempts()
            wait_until(lambda m=met: attempts() > m, what=f"a retry against {faults}")
            faulty.stop()
        healthy = Storescp(tmp_path / "healthy", port)
        try:
            wait_until(lambda: all_delivered(node, 3), what="all delivered")
        finally:
            healthy.stop()
        expected = result_uids(node)
        # A faulty PACS may keep what it received before aborting; the retry then
        # re-sends the same object (same SOP Instance UID), never a second one.
        received = healthy.received_uids() + [
            uid for i in range(3) for uid in Storescp.received_in(tmp_path / f"faulty{i}")]
        assert set(received) == expected
        assert "retry" in node.log
    finally:
        node.stop()


# Suite time (50-85 s): `long`; the suite kills the receive path at each of its steps
# (test_durability) and a worker with jobs and deliveries held (PostgreSQL scale-out).
@pytest.mark.long
def test_sigkill_during_jobs_and_pending_deliveries(tmp_path: Path,
                                                    serving_artifact: Path) -> None:
    port = free_port()
    # No model yet: every image is queued before the first batch, so that the node is
    # certainly caught with jobs in hand (it keeps up with storescu otherwise).
    node = start_node(tmp_path, None, f"PACS@127.0.0.1:{port}")
    files = [save(chest_image(seed=i, rows=400, columns=400), tmp_path / f"{i}.dcm")
             for i in range(8)]
    try:
        assert storescu(node.port, files).all_success

        def some(state: JobState) -> bool:
            # A plain reader: the job store's transactions take the write lock, which
            # the node may hold while it is paused.
            with closing(sqlite3.connect(node.data_dir / "dicom-node.db", timeout=5)) as db:
                return bool(db.execute("SELECT count(*) FROM jobs WHERE state = ?",
                                       (state.value,)).fetchone()[0])

        installed = cli("model", "install", str(serving_artifact), "--allow-unvalidated",
                        "--data-dir", str(node.data_dir))
        assert installed.returncode == 0, installed.stderr
        proc = node.proc
        assert proc is not None
        wait_until(lambda: paused_while(proc, lambda: some(JobState.RUNNING)), interval=0.02,
                   what="the node with a batch in hand")
        node.kill9()  # mid-batch: the PACS is down, so deliveries pend
        node.start()
        wait_until(lambda: not some(JobState.QUEUED) and not some(JobState.RUNNING),
                   what="all jobs done after restart")
        node.kill9()  # now with deliveries pending (the PACS is still down)
        pacs = Storescp(tmp_path / "pacs", port)
        try:
            node.start()
            wait_until(lambda: all_delivered(node, 8), what="all delivered after restart")
        finally:
            pacs.stop()
        expected = result_uids(node)
        assert len(expected) == 16
        assert set(pacs.received_uids()) == expected
    finally:
        node.stop()


def test_sr_returns_to_the_calling_ae(tmp_path: Path, serving_artifact: Path) -> None:
    # The sender runs its own Storage SCP (DCMTK storescp, AE title = its calling AE)
    # on the port calling_ae_ports gives for it; no destination is configured.
    port = free_port()
    sender = Storescp(tmp_path / "sender", port, ae_title=CALLING_AE)
    node = NodeProcess(tmp_path / "var", extra_args=[
        "--allow-calling-ae", CALLING_AE, "--allow-calling-ae", "NO_PORT_SCU",
        "--model", str(serving_artifact)], env={
        **FAST_RETRY, "DICOM_NODE_RETURN_TO_CALLING_AE": "true",
        "DICOM_NODE_CALLING_AE_PORTS": json.dumps({CALLING_AE: port})}).start()
    mine = save(chest_image(), tmp_path / "mine.dcm")
    theirs = save(cr_monochrome1(), tmp_path / "theirs.dcm")
    try:
        assert storescu(node.port, [mine]).all_success
        assert storescu(node.port, [theirs], calling="NO_PORT_SCU").all_success

        def finished() -> bool:
            with node.job_store() as store:
                jobs = store.list()
                deliveries = store.deliveries([j.id for j in jobs])
            return (len(jobs) == 2 and all(j.state is JobState.DONE for j in jobs)
                    and all(d.state is DeliveryState.DONE for ds in deliveries.values()
                            for d in ds))

        wait_until(finished, what="both jobs done and their deliveries made")
        with node.job_store() as store:
            jobs = {j.sop_instance_uid: j for j in store.list()}
            deliveries = store.deliveries([j.id for j in jobs.values()])
        job = jobs[sop_instance_uid(mine)]
        assert [(d.destination, d.item.value) for d in deliveries[job.id]] == [
            (f"{CALLING_AE}@127.0.0.1:{port}", "sr"),
            (f"{CALLING_AE}@127.0.0.1:{port}", "evidence")]
        # An AE with no port in calling_ae_ports gets nothing back (and no delivery).
        assert deliveries[jobs[sop_instance_uid(theirs)].id] == []

        back = {str(d.SOPInstanceUID): d for d in
                (dcmread(p) for p in sorted(sender.folder.iterdir()))}
        assert set(back) == {job.sr_sop_instance_uid, job.evidence_sop_instance_uid}
        received = back[job.sr_sop_instance_uid]
        assert received.SOPInstanceUID == job.sr_sop_instance_uid
        assert received.StudyInstanceUID == job.study_instance_uid
        referenced = received.CurrentRequestedProcedureEvidenceSequence[0] \
            .ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
        assert referenced.ReferencedSOPInstanceUID == job.sop_instance_uid
        said = read_result(received)
        assert said.finding == job.label
        assert said.probabilities == pytest.approx(job.probabilities, abs=1e-6)
    finally:
        node.stop()
        sender.stop()
