"""The Storage SCP in-process, driven by a real pynetdicom SCU over loopback."""

from __future__ import annotations

import logging
import socket
import ssl
import subprocess
from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from sqlalchemy.exc import OperationalError

from dicom_node.config import Settings
from dicom_node.db import JobState
from dicom_node.errors import Status
from dicom_node.node import Node
from dicom_node.tcp import NO_DELAY

from conftest import CALLING_AE, NODE_AE, free_port
from dicom_factory import (
    chest_image,
    cr_monochrome1,
    ct_head,
    dx_16bit,
    jpeg2000,
    jpeg_ls,
    part10_bytes,
    rle,
)

NodeFactory = Callable[..., Node]


@pytest.fixture
def make_node(tmp_path: Path) -> Iterator[NodeFactory]:
    started: list[Node] = []

    def factory(**overrides: Any) -> Node:
        values: dict[str, Any] = {
            "data_dir": tmp_path / "var",
            "port": free_port(),
            "allowed_calling_ae": [CALLING_AE],
            "min_free_disk_mb": 0,
        }
        values.update(overrides)
        node = Node(Settings(**values))
        node.start()
        started.append(node)
        return node

    yield factory
    for node in started:
        node.stop()


def scu(calling: str = CALLING_AE) -> AE:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    return ae


def store(node: Node, datasets: list[Dataset], calling: str = CALLING_AE,
          tls: ssl.SSLContext | None = None) -> list[int]:
    """C-STORE each data set in its own transfer syntax; return the statuses."""
    ae = scu(calling)
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", node.settings.port, ae_title=NODE_AE,
                         tls_args=(tls, "127.0.0.1") if tls else None)
    assert assoc.is_established, "association rejected"
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


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


def test_default_denies_every_calling_ae(make_node: NodeFactory) -> None:
    node = make_node(allowed_calling_ae=[])
    for calling in (CALLING_AE, "ANY"):
        ae = scu(calling)
        ae.add_requested_context(Verification)
        assert ae.associate("127.0.0.1", node.settings.port, ae_title=NODE_AE).is_rejected


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


def test_peer_host_not_allowed_is_disconnected(make_node: NodeFactory) -> None:
    node = make_node(allowed_peer_hosts=["192.0.2.1"])
    ae = scu()
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.settings.port, ae_title=NODE_AE)
    assert not assoc.is_established


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
    bad = chest_image(**patient)
    del bad.PixelData
    bad_name = chest_image(**{**patient, "PatientName": "Doe^" + "Jane" * 30})
    with caplog.at_level(logging.DEBUG):
        store(node, [chest_image(**patient), bad, ct_head(**patient), bad_name,
                     chest_image(rows=4000, columns=4000, **patient)])
    text = caplog.text
    for value in ("Doe", "Jane", "MRN-998877", "19510203", "20260304"):
        assert value not in text


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
