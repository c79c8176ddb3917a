"""The dicom-node command line, run as a user would run it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from dicom_node.db import DeliveryState, JobState
from dicom_node.jobs import DeliveryOutcome, JobResult, JobStore, ReceivedInstance, Route
from dicom_node.loopback import free_port

from dicom_factory import chest_image, ct_head, save
from helpers.environment import CALLING_AE, wait_until
from helpers.processes import NodeProcess, cli, terminate


def test_echo(node: NodeProcess) -> None:
    ok = cli("echo", "127.0.0.1", str(node.port), "--calling-ae", CALLING_AE)
    assert ok.returncode == 0 and "0x0000" in ok.stdout
    refused = cli("echo", "127.0.0.1", str(node.port), "--calling-ae", "STRANGER")
    assert refused.returncode == 1 and "not established" in refused.stderr


def test_send_then_jobs_list_and_show(node: NodeProcess, tmp_path: Path) -> None:
    chest = save(chest_image(), tmp_path / "chest.dcm")
    head = save(ct_head(), tmp_path / "head.dcm")
    sent = cli("send", "127.0.0.1", str(node.port), str(chest), str(head),
               "--calling-ae", CALLING_AE)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert sent.stdout.count("0x0000") == 2

    listed = cli("jobs", "list", "--json", "--data-dir", str(node.data_dir))
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [r["state"] for r in rows] == ["ignored", "queued"]
    for key in ("id", "state", "sop_instance_uid", "study_instance_uid", "calling_ae",
                "attempts"):
        assert key in rows[0]
    assert rows[1]["calling_ae"] == CALLING_AE

    only = json.loads(cli("jobs", "list", "--json", "--state", "queued", "--data-dir",
                          str(node.data_dir)).stdout)
    assert len(only) == 1 and only[0]["state"] == "queued"

    shown = cli("jobs", "show", str(only[0]["id"]), "--data-dir", str(node.data_dir))
    assert json.loads(shown.stdout)["sr_sop_instance_uid"]
    table = cli("jobs", "list", "--data-dir", str(node.data_dir))
    assert "queued" in table.stdout and "ignored" in table.stdout
    assert cli("jobs", "show", "999", "--data-dir", str(node.data_dir)).returncode == 1


def test_send_reports_refusals(node: NodeProcess, tmp_path: Path) -> None:
    ds = chest_image()
    del ds.PixelData
    bad = save(ds, tmp_path / "bad.dcm")
    sent = cli("send", "127.0.0.1", str(node.port), str(bad), "--calling-ae", CALLING_AE)
    assert sent.returncode == 1
    assert "0xA900" in sent.stdout


def test_serve_reads_config_file_and_flags(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text('ae_title = "FROM_FILE"\naccept_any_calling_ae = true\n')
    node = NodeProcess(tmp_path / "var", extra_args=["--config", str(config)]).start()
    try:
        ok = cli("echo", "127.0.0.1", str(node.port), "--called-ae", "FROM_FILE",
                 "--calling-ae", "ANYONE")
        assert ok.returncode == 0, ok.stderr
    finally:
        assert node.stop() == 0
    assert "stopped" in node.log


def test_bad_config_is_reported_not_a_traceback(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text('ae_title = "WAY_TOO_LONG_AE_TITLE"\n')
    result = cli("serve", "--config", str(config), "--data-dir", str(tmp_path / "v"))
    assert result.returncode == 2
    assert "ae_title" in result.stderr and "Traceback" not in result.stderr


def test_serve_without_an_allowed_calling_ae_refuses_to_start(tmp_path: Path) -> None:
    # No --allow-calling-ae and no accept_any_calling_ae: a node nobody may use is a
    # configuration error, not a server that rejects every association.
    result = cli("serve", "--host", "127.0.0.1", "--port", str(free_port()),
                 "--data-dir", str(tmp_path / "var"), timeout=60)
    assert result.returncode == 2
    assert "allowed_calling_ae" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "var").exists()  # no recovery, no database: nothing touched


def test_a_second_node_on_the_same_data_dir_refuses_to_start(node: NodeProcess,
                                                             small_artifact: Path) -> None:
    """A double start (systemd plus a start by hand): the second node must touch nothing
    -- no start-up recovery, which would quarantine the first one's instances in flight,
    and no model installed by its --model -- whether it shares the data directory or
    only the spool."""
    from model import card

    assert node.proc is not None
    in_flight = node.spool / "ab" / "renamed-not-yet-committed.dcm"  # no job row yet
    in_flight.parent.mkdir(parents=True, exist_ok=True)
    in_flight.write_bytes(b"DICM")
    second = cli("serve", "--host", "127.0.0.1", "--port", str(free_port()),
                 "--data-dir", str(node.data_dir), "--allow-calling-ae", CALLING_AE,
                 "--model", str(small_artifact), timeout=120)
    assert second.returncode == 2, second.stdout + second.stderr
    assert "data directory" in second.stderr and "in use by another node" in second.stderr
    assert f"pid {node.proc.pid} " in second.stderr and "Traceback" not in second.stderr
    assert in_flight.exists()  # not quarantined
    assert card.active(node.data_dir / "models") is None  # the running node's model kept
    elsewhere = node.data_dir.parent / "elsewhere"
    third = cli("serve", "--host", "127.0.0.1", "--port", str(free_port()),
                "--data-dir", str(elsewhere), "--allow-calling-ae", CALLING_AE,
                env={"DICOM_NODE_STORAGE_DIR": str(node.spool)}, timeout=120)
    assert third.returncode == 2 and "spool directory" in third.stderr, third.stderr
    assert in_flight.exists()
    assert cli("echo", "127.0.0.1", str(node.port), "--calling-ae", CALLING_AE).returncode == 0
    # Once the first has stopped, a node starts there (a killed node leaves no lock either:
    # the kernel drops it with the process).
    assert node.stop() == 0
    again = NodeProcess(node.data_dir).start()
    try:
        assert cli("echo", "127.0.0.1", str(again.port), "--calling-ae", CALLING_AE
                   ).returncode == 0
        again.kill9()
        NodeProcess(node.data_dir).start().stop()
    finally:
        again.stop()


def _instance() -> ReceivedInstance:
    uid = generate_uid()
    return ReceivedInstance(sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1", sop_instance_uid=uid,
                            series_instance_uid=generate_uid(),
                            study_instance_uid=generate_uid(),
                            transfer_syntax_uid="1.2.840.10008.1.2.1", calling_ae=CALLING_AE,
                            peer_address="127.0.0.1", sha256=uid.ljust(64, "0")[-64:],
                            size_bytes=1)


def test_jobs_retry_requeues_dead_deliveries_and_failed_jobs(tmp_path: Path) -> None:
    data = tmp_path / "var"
    data.mkdir()
    url = f"sqlite:///{data / 'dicom-node.db'}"
    worker = "tests:1:worker"
    probabilities = {"covid": 0.2, "normal": 0.7, "pneumonia": 0.1}
    with JobStore(url, max_attempts=1) as store:
        failed, refused, delivered = (
            store.record(_instance(), f"ab/{n}.dcm", JobState.QUEUED, "body part is chest")
            for n in range(3))
        assert failed and refused and delivered
        assert len(store.claim(worker, 3, lease_seconds=300)) == 3
        assert store.fail(failed.id, worker, "preprocessing failed") is JobState.FAILED
        assert store.complete_batch(worker, [
            JobResult(job.id, "normal", probabilities, "model 1", f"sr/job-{job.id}.dcm",
                      [Route("dicom", "PACS@127.0.0.1:11112")])
            for job in (refused, delivered)]) == [True] * 2
        sent = store.deliveries([refused.id, delivered.id])
        store.record_outcomes([
            DeliveryOutcome(sent[refused.id][0].id, DeliveryState.DEAD, 0xA900, "refused"),
            DeliveryOutcome(sent[delivered.id][0].id, DeliveryState.DONE, 0x0000)])

    dead = cli("jobs", "retry", str(refused.id), "--data-dir", str(data))
    assert dead.returncode == 0, dead.stderr
    assert f"job {refused.id}" in dead.stdout and "1 deliver" in dead.stdout
    requeued = cli("jobs", "retry", str(failed.id), "--data-dir", str(data))
    assert requeued.returncode == 0, requeued.stderr
    assert f"job {failed.id}" in requeued.stdout and "job requeued" in requeued.stdout

    with JobStore(url) as store:
        job = store.get(failed.id)
        assert job is not None and job.state is JobState.QUEUED and job.attempts == 0
        (again,) = store.deliveries([refused.id])[refused.id]
        assert again.state is DeliveryState.PENDING and again.attempts == 0
        (done,) = store.deliveries([delivered.id])[delivered.id]
        assert done.state is DeliveryState.DONE  # untouched
        assert store.get(delivered.id).state is JobState.DONE  # type: ignore[union-attr]

    # Nothing to retry: a delivered job, a job already requeued, a job that does not exist.
    for job_id in (delivered.id, failed.id, 999):
        nothing = cli("jobs", "retry", str(job_id), "--data-dir", str(data))
        assert nothing.returncode == 1
        assert "error" in nothing.stderr and f"job {job_id}" in nothing.stderr
        assert nothing.stdout == ""


# Suite time (30 s): `long`; `dicom-node worker` processes classify and deliver in the
# PostgreSQL scale-out test of the suite.
@pytest.mark.long
def test_worker_classifies_the_queue_without_receiving_or_touching_the_spool(
        node: NodeProcess, tmp_path: Path, small_artifact: Path) -> None:
    """`dicom-node worker` is one more worker on the node's queue: it classifies what
    the receiving node queued, binds no port, and leaves spool files without a job row
    alone (a receiving node may have just renamed one and not yet committed its row)."""
    files = [save(chest_image(seed=i), tmp_path / f"chest{i}.dcm") for i in range(2)]
    sent = cli("send", "127.0.0.1", str(node.port), *map(str, files),
               "--calling-ae", CALLING_AE)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert node.stop() == 0  # no model there: both jobs are still queued
    in_flight = node.spool / "ab" / ("ab" + "0" * 30 + ".dcm")
    in_flight.parent.mkdir(exist_ok=True)
    in_flight.write_bytes(b"a file whose job row is not committed yet")
    installed = cli("model", "install", str(small_artifact), "--allow-unvalidated",
                    "--data-dir", str(node.data_dir))
    assert installed.returncode == 0, installed.stderr

    log = (tmp_path / "worker.log").open("wb")
    worker = subprocess.Popen([sys.executable, "-m", "dicom_node", "worker",
                               "--allow-unvalidated-models",
                               "--data-dir", str(node.data_dir)], stdout=log,
                              stderr=subprocess.STDOUT)
    log.close()
    try:
        with node.job_store() as store:
            wait_until(lambda: store.counts() == {"done": 2}, timeout=180,
                       what="the worker to classify both jobs")
    finally:
        assert terminate(worker, 60) == 0
    assert in_flight.exists()
    assert not (node.spool / ".quarantine").exists()
    assert "listening on" not in (tmp_path / "worker.log").read_text()
