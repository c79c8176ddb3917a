"""The Storage SCP in-process, driven by a real pynetdicom SCU over loopback."""

from __future__ import annotations

import logging
import socket
import ssl
import subprocess
import threading
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian
from pynetdicom.sop_class import Verification
from sqlalchemy.exc import OperationalError

from dicom_node import intake
from dicom_node.config import Settings
from dicom_node.db import JobState
from dicom_node.errors import ConfigError, Status
from dicom_node.jobs import JobStore
from dicom_node.loopback import free_port
from dicom_node.node import Node
from dicom_node.scp import StorageSCP
from dicom_node.spool import Spool
from dicom_node.tcp import NO_DELAY

from dicom_factory import (
    chest_image,
    cr_monochrome1,
    ct_head,
    dx_16bit,
    jpeg2000,
    jpeg_ls,
    part10_bytes,
    rle,
    rle_segment_overrun,
    window_not_a_number,
)
from helpers.dimse import associate, scu, store
from helpers.environment import CALLING_AE, NODE_AE, wait_until

NodeFactory = Callable[..., Node]


def jobs(node: Node) -> list[Any]:
    return sorted(node.store.list(limit=1000), key=lambda j: j.id)


@pytest.mark.parametrize("factory", [chest_image, dx_16bit, cr_monochrome1, jpeg2000, rle,
                                     jpeg_ls], ids=lambda f: f.__name__)
def test_chest_instance_is_stored_and_queued(make_node: NodeFactory,
                                             factory: Callable[[], Dataset]) -> None:
    node = make_node()
    ds = factory()
    assert store(node, [ds]) == [Status.SUCCESS]
    (job,) = jobs(node)
    assert job.state is JobState.QUEUED
    assert job.sop_instance_uid == ds.SOPInstanceUID
    assert job.transfer_syntax_uid == ds.file_meta.TransferSyntaxUID
    assert job.calling_ae == CALLING_AE
    stored = dcmread(node.spool.path(job.spool_file))
    assert stored.SOPInstanceUID == ds.SOPInstanceUID
    assert stored.preamble == b"\x00" * 128
    assert (stored.pixel_array == ds.pixel_array).all()


def test_ct_head_is_acknowledged_and_ignored(make_node: NodeFactory) -> None:
    node = make_node()
    assert store(node, [ct_head()]) == [Status.SUCCESS]
    (job,) = jobs(node)
    assert job.state is JobState.IGNORED and job.spool_file is None
    assert list(node.spool.files()) == []


def test_non_chest_refused_when_configured(make_node: NodeFactory) -> None:
    node = make_node(intake={"non_chest": "refuse"})
    assert store(node, [ct_head()]) == [Status.POLICY_REFUSED]
    assert jobs(node) == []


def test_duplicate_acknowledged_not_queued(make_node: NodeFactory) -> None:
    node = make_node()
    ds = chest_image()
    assert store(node, [ds, ds]) == [Status.SUCCESS, Status.SUCCESS]
    assert store(node, [ds]) == [Status.SUCCESS]
    assert len(jobs(node)) == 1
    assert len(list(node.spool.files())) == 1


def test_pixel_budget(make_node: NodeFactory) -> None:
    node = make_node(max_pixels=1000)
    assert store(node, [chest_image(rows=64, columns=64)]) == [Status.PIXEL_BUDGET_EXCEEDED]
    assert jobs(node) == []


def test_corrupt_jpeg2000_is_cannot_understand(make_node: NodeFactory) -> None:
    node = make_node()
    ds = jpeg2000(rows=64, columns=64)
    data = bytearray(ds.PixelData)
    data[len(data) // 2:len(data) // 2 + 64] = b"\xff" * 64
    data[-40:-2] = b"\x00" * 38
    ds.PixelData = bytes(data)
    assert store(node, [ds]) == [Status.CANNOT_DECODE]
    assert jobs(node) == [] and list(node.spool.files()) == []


def test_rle_that_panics_the_rust_decoder_is_cannot_understand(make_node: NodeFactory
                                                                ) -> None:
    """Found by the fuzzer: pylibjpeg-rle panics on RLE data that decodes past the image,
    and pyo3's PanicException derives from BaseException, which escaped the handler:
    the sender got no answer and its association was aborted. Now 0xC210."""
    ds = rle_segment_overrun(rows=16, columns=16)  # larger, the decoder refuses it sooner
    node = make_node()
    assert store(node, [ds]) == [Status.CANNOT_DECODE]
    assert jobs(node) == [] and list(node.spool.files()) == []
    assert store(node, [chest_image()]) == [Status.SUCCESS]  # the node goes on


def test_a_window_that_is_not_a_number_is_refused_before_acknowledging(
        make_node: NodeFactory) -> None:
    """Found by the fuzzer: the image was acknowledged, and the worker then failed it
    (preprocessing could not apply the window). Now the sender hears it: 0xA900."""
    node = make_node()
    assert store(node, [window_not_a_number()]) == [Status.DATASET_MISMATCH]
    assert jobs(node) == [] and list(node.spool.files()) == []


def test_malformed_element_refused_before_acknowledging(make_node: NodeFactory) -> None:
    node = make_node()
    raw = bytearray(part10_bytes(chest_image(rows=8, columns=8)))
    at = raw.index(bytes.fromhex("28001000") + b"US")
    raw[at + 6:at + 10] = b"\x03\x00\x01\x00"  # Rows with a 3-byte US value
    assert store(node, [dcmread(BytesIO(bytes(raw)))]) == [Status.CANNOT_DECODE]
    assert jobs(node) == []


def test_missing_pixel_data_is_a_mismatch(make_node: NodeFactory) -> None:
    node = make_node()
    ds = chest_image()
    del ds.PixelData
    assert store(node, [ds]) == [Status.DATASET_MISMATCH]


def test_disk_space_below_minimum_is_out_of_resources(make_node: NodeFactory) -> None:
    node = make_node(min_free_disk_mb=2**40)
    assert store(node, [chest_image()]) == [Status.OUT_OF_RESOURCES]
    assert jobs(node) == [] and list(node.spool.files()) == []


def test_low_disk_space_is_logged_once_an_episode(make_node: NodeFactory,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    """A PACS retrying a whole study against a full disk: one line when refusals start,
    one when an instance is stored again, not one per instance."""
    node = make_node(min_free_disk_mb=2**40)
    with caplog.at_level(logging.INFO):
        assert store(node, [chest_image(seed=i) for i in range(5)]) == [
            Status.OUT_OF_RESOURCES] * 5
        node.spool.min_free_bytes = 0  # space freed
        assert store(node, [chest_image(seed=i) for i in range(5, 7)]) == [Status.SUCCESS] * 2
        node.spool.min_free_bytes = 2**60  # and full again: a new episode
        assert store(node, [chest_image(seed=7)]) == [Status.OUT_OF_RESOURCES]
    text = caplog.text
    assert text.count("disk space low") == 2 and text.count("refusing instances") == 2
    assert text.count("disk space available again") == 1
    assert "(5 instance(s) refused meanwhile)" in text
    # (pytest also captures the audit trail, which is not the log: it has each refusal.)
    ours = [r.getMessage() for r in caplog.records if r.name.startswith("dicom_node")
            and r.name != "dicom_node.audit.trail"]
    assert sum("0xA700" in line for line in ours) == 2  # the two episodes' lines, no other


def test_database_failure_is_out_of_resources_and_leaves_no_file(
        make_node: NodeFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    node = make_node()

    def locked(*_args: object, **_kwargs: object) -> None:
        raise OperationalError("INSERT", {}, Exception("database is locked"))

    monkeypatch.setattr(node.store, "record", locked)
    assert store(node, [chest_image()]) == [Status.OUT_OF_RESOURCES]
    assert list(node.spool.files()) == []


def test_unknown_calling_ae_rejected(make_node: NodeFactory) -> None:
    node = make_node()
    ae = scu("INTRUDER")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.settings.port, ae_title=NODE_AE)
    assert assoc.is_rejected
    assoc.release()


def test_no_allowed_calling_ae_refuses_to_start(tmp_path: Path) -> None:
    # An empty allow-list means nobody: the node does not serve at all (pynetdicom
    # itself would take an empty list as "anyone").
    settings = Settings(data_dir=tmp_path / "var", port=free_port(), allowed_calling_ae=[],
                        min_free_disk_mb=0)
    with pytest.raises(ConfigError, match="allowed_calling_ae"):
        Node(settings)
    assert not settings.data_dir.exists()  # refused before anything was created
    with JobStore(f"sqlite:///{tmp_path / 'other.db'}") as jobs_, \
            pytest.raises(ConfigError, match="allowed_calling_ae"):
        StorageSCP(settings, jobs_, Spool(tmp_path / "spool"))
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", settings.port), timeout=5).close()


def test_accept_any_calling_ae(make_node: NodeFactory) -> None:
    node = make_node(allowed_calling_ae=[], accept_any_calling_ae=True)
    ae = scu("WHOEVER")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.settings.port, ae_title=NODE_AE)
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    assoc.release()


def test_wrong_called_ae_rejected(make_node: NodeFactory) -> None:
    node = make_node()
    ae = scu()
    ae.add_requested_context(Verification)
    assert ae.associate("127.0.0.1", node.settings.port, ae_title="SOMEONE_ELSE").is_rejected


def disconnected_before_any_pdu(port: int, source_host: str) -> bool:
    """Whether the node closes a connection from ``source_host`` before we send
    anything (an allowed host's connection stays open for the A-ASSOCIATE-RQ; False
    after 5 s without the close)."""
    with socket.socket() as sock:
        sock.bind((source_host, 0))
        sock.settimeout(5)
        sock.connect(("127.0.0.1", port))
        try:
            return sock.recv(1) == b""
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False


def test_peer_host_not_allowed_is_disconnected(make_node: NodeFactory) -> None:
    node = make_node(allowed_peer_hosts=["192.0.2.1"])
    assert disconnected_before_any_pdu(node.settings.port, "127.0.0.1")
    assert not associate(node.settings.port, []).is_established
    assert jobs(node) == []


def test_allowed_peer_host_stores_and_others_are_disconnected(make_node: NodeFactory) -> None:
    # 127.0.0.2 is another loopback address: the same machine, another peer host.
    node = make_node(allowed_peer_hosts=["127.0.0.1"])
    ds = chest_image()
    assert store(node, [ds]) == [Status.SUCCESS]
    assert [j.sop_instance_uid for j in jobs(node)] == [ds.SOPInstanceUID]

    assert disconnected_before_any_pdu(node.settings.port, "127.0.0.2")
    other = associate(node.settings.port, [chest_image()], source_host="127.0.0.2")
    assert not other.is_established
    assert len(jobs(node)) == 1


def test_second_association_rejected_at_max_associations(make_node: NodeFactory) -> None:
    node = make_node(max_associations=1)
    server = node.scp._server
    assert server is not None
    first = associate(node.settings.port, [])
    assert first.is_established
    try:
        second = associate(node.settings.port, [])
        assert not second.is_established
        assert second.is_rejected  # A-ASSOCIATE-RJ (transient: local limit exceeded)
        assert first.is_established and first.send_c_echo().Status == Status.SUCCESS
    finally:
        first.release()
    wait_until(lambda: not server.active_associations, timeout=30,
               what="the first association to end on the node")
    third = associate(node.settings.port, [])
    assert third.is_established
    assert third.send_c_echo().Status == Status.SUCCESS
    third.release()


def test_deflated_is_refused_at_negotiation(make_node: NodeFactory) -> None:
    node = make_node()
    ds = chest_image()
    ae = scu()
    ae.add_requested_context(ds.SOPClassUID, DeflatedExplicitVRLittleEndian)
    ae.add_requested_context(ds.SOPClassUID, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.settings.port, ae_title=NODE_AE)
    assert assoc.is_established
    accepted = {str(cx.transfer_syntax[0]) for cx in assoc.accepted_contexts}
    assoc.release()
    assert accepted == {ExplicitVRLittleEndian}


def test_no_patient_data_in_logs(make_node: NodeFactory, caplog: pytest.LogCaptureFixture
                                 ) -> None:
    node = make_node(max_pixels=10**7)
    patient = {"PatientName": "Doe^Jane^Q", "PatientID": "MRN-998877",
               "PatientBirthDate": "19510203", "StudyDate": "20260304"}
    chest = chest_image(**patient)
    bad = chest_image(**patient)
    del bad.PixelData
    head = ct_head(**patient)
    bad_name = chest_image(**{**patient, "PatientName": "Doe^" + "Jane" * 30})
    huge = chest_image(rows=4000, columns=4000, **patient)
    with caplog.at_level(logging.DEBUG):
        statuses = store(node, [chest, bad, head, bad_name, huge])
    # Each path that logs ran: queued, refused as a mismatch, ignored, queued despite
    # an over-long name, refused over the pixel budget.
    assert statuses == [Status.SUCCESS, Status.DATASET_MISMATCH, Status.SUCCESS,
                        Status.SUCCESS, Status.PIXEL_BUDGET_EXCEEDED]
    by_uid = {j.sop_instance_uid: j.state for j in jobs(node)}
    assert by_uid == {chest.SOPInstanceUID: JobState.QUEUED, head.SOPInstanceUID:
                      JobState.IGNORED, bad_name.SOPInstanceUID: JobState.QUEUED}
    text = caplog.text
    assert "queued" in text and "ignored" in text and "refused" in text  # the log was captured
    for value in ("Doe", "Jane", "MRN-998877", "19510203", "20260304"):
        assert value not in text


def test_unexpected_error_is_c211_and_the_association_goes_on(
        make_node: NodeFactory, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    # A fault nobody planned for, after the spool write has started: the catch-all
    # answers 0xC211 with a comment, logs it, and leaves nothing behind.
    node = make_node()
    real_decode = intake.decode_pixels
    faults = iter([RuntimeError("injected fault")])

    def decode_once_faulty(*args: Any, **kwargs: Any) -> Any:
        fault = next(faults, None)
        if fault is not None:
            raise fault
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(intake, "decode_pixels", decode_once_faulty)
    failing, fine = chest_image(), chest_image()
    assoc = associate(node.settings.port, [failing, fine])
    assert assoc.is_established
    try:
        with caplog.at_level(logging.WARNING, logger="dicom_node"):
            first = assoc.send_c_store(failing)
        assert first.Status == Status.INTERNAL_ERROR
        assert first.get("ErrorComment") == "internal error"
        assert any(r.name.startswith("dicom_node") and "unexpectedly" in r.getMessage()
                   for r in caplog.records)
        assert assoc.is_established
        assert assoc.send_c_store(fine).Status == Status.SUCCESS
        assert assoc.send_c_echo().Status == Status.SUCCESS
    finally:
        assoc.release()
    assert [j.sop_instance_uid for j in jobs(node)] == [fine.SOPInstanceUID]
    assert len(list(node.spool.files())) == 1


def _self_signed(tmp: Path, name: str) -> tuple[Path, Path]:
    key, cert = tmp / f"{name}.key", tmp / f"{name}.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
         "-out", str(cert), "-days", "2", "-subj", f"/CN={name}",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )
    return cert, key


def test_tls_with_client_certificate(make_node: NodeFactory, tmp_path: Path) -> None:
    server_cert, server_key = _self_signed(tmp_path, "node")
    client_cert, client_key = _self_signed(tmp_path, "pacs")
    node = make_node(tls_certificate=server_cert, tls_private_key=server_key,
                     tls_ca_certificates=client_cert)
    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(server_cert))
    client.load_cert_chain(client_cert, client_key)
    assert store(node, [chest_image()], tls=client) == [Status.SUCCESS]

    anonymous = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(server_cert))
    ae = scu()
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.settings.port, ae_title=NODE_AE,
                         tls_args=(anonymous, "127.0.0.1"))
    assert not assoc.is_established
    plain = scu()
    plain.add_requested_context(Verification)
    assert not plain.associate("127.0.0.1", node.settings.port, ae_title=NODE_AE).is_established


def test_a_silent_tls_peer_blocks_nobody(make_node: NodeFactory, tmp_path: Path) -> None:
    """Found in review: pynetdicom runs the TLS handshake on the thread that accepts every
    connection, without a timeout, so one peer that connected and said nothing stopped
    the node accepting anyone. Now each handshake runs in its connection's thread,
    bounded by acse_timeout."""
    server_cert, server_key = _self_signed(tmp_path, "node")
    client_cert, client_key = _self_signed(tmp_path, "pacs")
    node = make_node(tls_certificate=server_cert, tls_private_key=server_key,
                     tls_ca_certificates=client_cert, acse_timeout=2.0)
    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(server_cert))
    client.load_cert_chain(client_cert, client_key)
    with socket.create_connection(("127.0.0.1", node.settings.port), timeout=10) as silent:
        assert store(node, [chest_image()], tls=client) == [Status.SUCCESS]
        silent.settimeout(10)
        assert silent.recv(1) == b""  # closed by the node after its handshake timeout


def test_both_ends_of_an_association_send_without_delay(make_node: NodeFactory) -> None:
    # Nagle's algorithm plus the peer's delayed ACK cost ~40 ms per DIMSE exchange.
    node = make_node()
    ae = scu()
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.settings.port, ae_title=NODE_AE,
                         evt_handlers=[NO_DELAY])
    assert assoc.is_established
    try:
        server = node.scp._server
        assert server is not None
        (accepted,) = server.active_associations
        for end in (assoc, accepted):
            sock = end.dul.socket.socket
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        assoc.release()


def test_stop_aborts_open_associations_and_frees_the_port(tmp_path: Path) -> None:
    """The server is made with AE.make_server and run by the node: its stop must end
    accepting, abort what is open (not wait for the peer to time out), and give the
    port back."""
    settings = Settings(data_dir=tmp_path / "var", port=free_port(),
                        allowed_calling_ae=[CALLING_AE], min_free_disk_mb=0)
    node = Node(settings)
    node.start()
    peer = scu()
    peer.acse_timeout = peer.dimse_timeout = peer.network_timeout = 120  # a patient peer
    peer.add_requested_context(Verification)
    assoc = peer.associate("127.0.0.1", settings.port, ae_title=NODE_AE)
    assert assoc.is_established
    stopping = threading.Thread(target=node.stop)
    stopping.start()
    stopping.join(timeout=30)
    assert not stopping.is_alive(), "stop waited for the open association"
    wait_until(lambda: not assoc.is_established, timeout=10, what="the association to end")
    assert assoc.is_aborted
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", settings.port), timeout=5).close()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as again:
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.1", settings.port))  # the port is free for a restart
