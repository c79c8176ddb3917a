"""Delivery: status classes, destinations, sending SR files as stored."""

from __future__ import annotations

import subprocess
import sys
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.uid import ComprehensiveSRStorage, ExplicitVRLittleEndian
from pynetdicom import AE, evt

from dicom_node.db import DeliveryState
from dicom_node.deliver import classify, send_many
from dicom_node.destination import Destination
from dicom_node.libraries import configure
from dicom_node.loopback import free_port
from dicom_node.scheduler import backoff

from dicom_factory import chest_image, save
from peers import Storescp

DONE, RETRY, DEAD = DeliveryState.DONE, DeliveryState.PENDING, DeliveryState.DEAD


@pytest.mark.parametrize(("status", "state"), [
    (0x0000, DONE), (0x0001, DONE), (0xB000, DONE), (0xB006, DONE), (0xB007, DONE),
    (0xA700, RETRY), (0xA7FF, RETRY),
    (0xA900, DEAD), (0xC000, DEAD), (0xC211, DEAD), (0x0122, DEAD), (0x0110, DEAD),
    (0xFF00, DEAD), (0xFE00, DEAD), (0x1234, DEAD),  # pending, cancel, unknown: not a store
])
def test_status_classes(status: int, state: DeliveryState) -> None:
    assert classify(status) is state


def test_warning_retried_only_when_configured() -> None:
    assert classify(0xB000, retry_on_warning=True) is RETRY


def test_destination_parsing() -> None:
    d = Destination.parse("ORTHANC@127.0.0.1:4242")
    assert (d.ae_title, d.host, d.port) == ("ORTHANC", "127.0.0.1", 4242)
    assert str(d) == "ORTHANC@127.0.0.1:4242"
    assert Destination.parse("PACS@[::1]:104").host == "::1"
    for bad in ("ORTHANC", "A@h", "TOO_LONG_AE_TITLE_X@h:1", "A@h:0", "A@h:70000", "A@h:x"):
        with pytest.raises(ValueError):
            Destination.parse(bad)


def sr_file(path: Path) -> Path:
    """A file with SR identity for the sender (any data set will do)."""
    sr = chest_image()
    sr.SOPClassUID = sr.file_meta.MediaStorageSOPClassUID = ComprehensiveSRStorage
    del sr.PixelData
    return save(sr, path)


def test_send_many_sends_the_stored_bytes_and_reports_each_file(tmp_path: Path) -> None:
    """Over a real pynetdicom SCP: the data set arrives byte for byte as stored on disk
    (sent without decoding); an unreadable file is dead, the rest still go."""
    configure()  # the node's library settings: path sends go as stored
    received: list[bytes] = []

    def on_store(event: Any) -> int:
        received.append(bytes(event.encoded_dataset(include_meta=False)))
        return 0

    ae = AE(ae_title="PACS")
    ae.add_supported_context(ComprehensiveSRStorage, ExplicitVRLittleEndian)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        good = sr_file(tmp_path / "good.dcm")
        sr = dcmread(good)
        bad = tmp_path / "bad.dcm"
        bad.write_bytes(b"not dicom at all")
        attempts = send_many(Destination("PACS", "127.0.0.1", port), [bad, good],
                             "DICOM_NODE", timeout=10)
    finally:
        server.shutdown()
    assert [a.state for a in attempts] == [DEAD, DONE]
    assert "unreadable" in attempts[0].detail
    stored = good.read_bytes()
    assert len(received) == 1 and stored.endswith(received[0])
    assert dcmread(BytesIO(received[0]), force=True).SOPInstanceUID == sr.SOPInstanceUID


@pytest.mark.slow
def test_back_to_back_stores_each_get_their_response_while_the_cores_are_busy(
        tmp_path: Path) -> None:
    """With TCP_NODELAY a response is back before pynetdicom's reactor thread has woken
    from the previous request; without waiting for it, about 2 % of these sends lost
    their response to the reactor and waited out the timeout."""
    paths = [sr_file(tmp_path / f"sr{i}.dcm") for i in range(8)]
    pacs = Storescp(tmp_path / "pacs", free_port())
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(4)]
    try:
        outcomes = [a.state for _ in range(100)
                    for a in send_many(Destination("PACS", "127.0.0.1", pacs.port), paths,
                                       "DICOM_NODE", timeout=2)]
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
        pacs.stop()
    assert outcomes.count(DONE) == len(outcomes) == 800
    assert sorted(set(pacs.received_uids())) == sorted(
        str(dcmread(p).SOPInstanceUID) for p in paths)


def test_backoff_is_exponential_with_a_cap() -> None:
    assert [backoff(n, 10, 2, 60) for n in range(1, 6)] == [10, 20, 40, 60, 60]
