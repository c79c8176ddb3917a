"""Guards on what dicom_node.libraries relies on beyond the libraries' public APIs.

Each test fails loudly when an upgrade of pynetdicom, pydicom or highdicom
renames or removes something the node reaches into, instead of letting the node
silently lose a safety setting or a race fix.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from highdicom import _standard_utils as highdicom_standard
from highdicom.sr import CodedConcept, Measurement, QualitativeEvaluation, TrackingIdentifier
from pydicom import config as pydicom_config
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid
from pynetdicom import AE, _config, evt
from pynetdicom.sop_class import Verification

from dicom_node import libraries
from dicom_node.loopback import free_port
from dicom_node.tcp import NO_DELAY


def test_every_pynetdicom_setting_exists_before_the_node_sets_it() -> None:
    """In a fresh interpreter (nothing has set them yet), pynetdicom still defines each
    global the node turns on or off."""
    names = sorted(libraries._PYNETDICOM_SETTINGS)
    code = ("import pynetdicom._config as c, sys; "
            f"sys.exit(0 if all(hasattr(c, n) for n in {names!r}) else 1)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_configure_turns_off_identifier_logging_and_reading_validation() -> None:
    libraries.configure()
    assert _config.LOG_REQUEST_IDENTIFIERS is False
    assert _config.LOG_RESPONSE_IDENTIFIERS is False
    assert _config.STORE_SEND_CHUNKED_DATASET is True
    assert pydicom_config.settings.reading_validation_mode == pydicom_config.IGNORE


def test_configure_refuses_a_pynetdicom_without_a_setting(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(libraries._PYNETDICOM_SETTINGS, "NO_SUCH_SETTING", True)
    with pytest.raises(RuntimeError, match="NO_SUCH_SETTING"):
        libraries.configure()


def test_every_highdicom_module_asks_the_memoized_iod_lookups() -> None:
    """In a fresh interpreter with every highdicom module imported, no module keeps
    its own binding of an IOD look-up once the node has configured the libraries
    (an upgrade that adds a module using them fails here, not silently slow)."""
    code = """
import importlib, pkgutil, sys
import highdicom
from highdicom import _standard_utils
names = ("is_attribute_in_iod", "does_iod_have_pixel_data")
originals = {n: getattr(_standard_utils, n) for n in names}
for info in pkgutil.walk_packages(highdicom.__path__, "highdicom."):
    importlib.import_module(info.name)
from dicom_node import libraries
libraries.configure()
left = sorted(f"{m}.{n}" for m, module in list(sys.modules.items())
              if m.startswith("highdicom") for n in names
              if getattr(module, n, None) is originals[n])
users = sorted(m for m, module in sys.modules.items() if m.startswith("highdicom.")
               and m != "highdicom._standard_utils"
               and any(hasattr(module, n) for n in names))
print(left, users)
sys.exit(1 if left or users != sorted(libraries.IOD_LOOKUP_USERS) else 0)
"""
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("sop_class", ["1.2.840.10008.5.1.4.1.1.1.1",  # DX
                                       "1.2.840.10008.5.1.4.1.1.7",  # SC
                                       "1.2.840.10008.5.1.4.1.1.88.34",  # Comprehensive 3D SR
                                       "1.2.840.10008.5.1.4.1.1.2.1"])  # Enhanced CT
def test_the_memoized_iod_lookups_answer_as_highdicoms_own(sop_class: str) -> None:
    libraries.configure()
    lookup = highdicom_standard.is_attribute_in_iod
    pixel_data = highdicom_standard.does_iod_have_pixel_data
    assert lookup is not lookup.__wrapped__  # type: ignore[attr-defined]
    for attribute in ("ContentDate", "ContentTime", "PixelData", "NumberOfFrames",
                      "ContentSequence", "IconImageSequence"):
        for exclude in (None, ["IconImageSequence"], ("ReferencedImageSequence",)):
            for _ in range(2):  # asked, then remembered
                assert lookup(attribute, sop_class, exclude) \
                    == lookup.__wrapped__(attribute, sop_class, exclude)  # type: ignore
    for _ in range(2):
        assert pixel_data(sop_class) == pixel_data.__wrapped__(sop_class)  # type: ignore
    for exclude_text in ("IconImageSequence", "Icon"):  # a string: as highdicom reads it
        assert lookup("PixelData", sop_class, exclude_text) \
            == lookup.__wrapped__("PixelData", sop_class, exclude_text)  # type: ignore
    for _ in range(2):  # an unknown SOP class is refused each time, not remembered
        with pytest.raises(KeyError):
            lookup("PixelData", "1.2.3.4")


@pytest.fixture
def verification_scp() -> Iterator[int]:
    ae = AE(ae_title="ECHOSCP")
    ae.add_supported_context(Verification)
    port = free_port()
    ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[NO_DELAY])
    try:
        yield port
    finally:
        ae.shutdown()


def test_an_association_exposes_its_reactor_pause(verification_scp: int) -> None:
    """tcp.send_c_store waits on ``Association._is_paused`` after each request."""
    ae = AE(ae_title="ECHOSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", verification_scp, ae_title="ECHOSCP",
                         evt_handlers=[NO_DELAY])
    try:
        assert assoc.is_established
        paused: list[bool] = []

        def while_waiting(event: Any) -> None:
            # The reactor is paused while a DIMSE response is awaited.
            paused.append(libraries.reactor_paused(event.assoc))

        assoc.bind(evt.EVT_DIMSE_SENT, while_waiting)
        assert assoc.send_c_echo().Status == 0x0000
        assert paused == [True]
    finally:
        assoc.release()


def test_reactor_paused_fails_loudly_without_the_attribute() -> None:
    with pytest.raises(AttributeError):
        libraries.reactor_paused(object())


@pytest.mark.parametrize(("template", "value_type"), [
    (lambda: TrackingIdentifier(uid=generate_uid()), "UIDREF"),
    (lambda: QualitativeEvaluation(name=codes.DCM.Finding,
                                   value=CodedConcept("17621005", "SCT", "Normal")), "CODE"),
    (lambda: Measurement(name=codes.DCM.Probability, value=0.5, unit=codes.UCUM.NoUnits),
     "NUM"),
])
def test_the_sr_builders_templates_hold_one_item(template: Any, value_type: str) -> None:
    """ReportBuilder swaps per-image items into a kept content tree, one item each."""
    assert libraries.only_item(template()).ValueType == value_type


def test_only_item_refuses_a_template_of_several_items() -> None:
    with pytest.raises(RuntimeError, match="2 content items"):
        libraries.only_item(TrackingIdentifier(uid=generate_uid(), identifier="two items"))


@pytest.mark.parametrize("charset", [None, "ISO_IR 100", "ISO_IR 192"])
@pytest.mark.filterwarnings("ignore:'Dataset.is_:DeprecationWarning")  # as highdicom sets them
def test_a_marked_dataset_is_written_as_it_is(charset: str | None) -> None:
    """ReportBuilder marks each SR as already encoded, so writing skips the walk that
    corrects ambiguous VRs; pydicom only skips it when the character set matches."""
    ds = Dataset()
    if charset:
        ds.SpecificCharacterSet = charset
    ds.PatientName = "Doe^Jane"
    ds.is_implicit_VR, ds.is_little_endian = False, True  # as highdicom builds
    assert not ds.is_original_encoding
    libraries.mark_as_written_encoding(ds)
    assert ds.is_original_encoding


def test_pynetdicom_reads_a_pdu_as_its_header_then_its_body() -> None:
    """bound_pdu_reads relies on the DUL reading each PDU with exactly two calls of its
    socket's recv: six bytes, then the length the header declared."""
    import inspect

    from pynetdicom.dul import DULServiceProvider

    source = inspect.getsource(DULServiceProvider._read_pdu_data)
    assert source.count("self.socket.recv(") == 2
    assert "self.socket.recv(6)" in source and "self.socket.recv(pdu_length)" in source


class _Transport:
    """What bound_pdu_reads needs of an AssociationSocket: its socket and recv."""

    recv: Any  # set by bound_pdu_reads

    def __init__(self, sock: Any) -> None:
        self.socket = sock


def test_bounded_reads_pass_pdus_within_bounds_and_refuse_the_rest(
        caplog: pytest.LogCaptureFixture) -> None:
    import logging
    import socket
    import struct

    abort = b"\x07\x00\x00\x00\x00\x04\x00\x00\x02\x00"
    with caplog.at_level(logging.WARNING, logger="dicom_node.libraries"):
        ours, peer = socket.socketpair()
        with ours, peer:
            transport = _Transport(ours)
            libraries.bound_pdu_reads(transport, limit=1000, seconds=2)
            body = bytes(range(256)) * 3
            peer.sendall(struct.pack(">BBL", 4, 0, len(body)) + body
                         + struct.pack(">BBL", 5, 0, 0))  # a P-DATA-TF, an A-RELEASE-RQ
            assert bytes(transport.recv(6)) == struct.pack(">BBL", 4, 0, len(body))
            assert bytes(transport.recv(len(body))) == body
            assert bytes(transport.recv(6)) == struct.pack(">BBL", 5, 0, 0)
            assert bytes(transport.recv(0)) == b""
            peer.sendall(struct.pack(">BBL", 4, 0, 1001))
            assert bytes(transport.recv(6)) == b""  # short: pynetdicom closes (Evt17)
            assert peer.recv(10) == abort and peer.recv(1) == b""  # an A-ABORT, then shut
        ours, peer = socket.socketpair()
        with ours, peer:
            transport = _Transport(ours)
            libraries.bound_pdu_reads(transport, limit=1000, seconds=0.5)
            peer.sendall(struct.pack(">BBL", 4, 0, 10) + b"abc")  # then nothing more
            transport.recv(6)
            assert bytes(transport.recv(10)) == b"abc"  # short, after 0.5 s
            assert peer.recv(10) == abort
    assert [r.getMessage().split(": ", 1)[1] for r in caplog.records] == [
        "a PDU of 1001 bytes declared, over the limit of 1000",
        "a PDU took longer than 0 s"]


def test_bounded_reads_end_quietly_when_the_node_closes_the_socket() -> None:
    """The node stopping closes an association's socket while its reactor reads: the
    read returns short, as for a peer that closed (pynetdicom then ends the association
    quietly), instead of raising, which pynetdicom logs with a traceback."""
    import socket
    import struct

    ours, peer = socket.socketpair()
    with peer:
        transport = _Transport(ours)
        libraries.bound_pdu_reads(transport, limit=1000, seconds=2)
        peer.sendall(struct.pack(">BBL", 4, 0, 10) + b"abc")
        assert bytes(transport.recv(6)) == struct.pack(">BBL", 4, 0, 10)
        ours.close()
        assert bytes(transport.recv(10)) == b""


class _ClosedAfterTheRead:
    """A socket that another thread closes right after a read fills: the read's own
    descriptor still looks open to it, and restoring the timeout meets EBADF (seen in
    a fresh-clone CI run of the SIGTERM durability test)."""

    def __init__(self, data: bytes) -> None:
        self.data, self.closed = data, False

    def gettimeout(self) -> float | None:
        return None

    def settimeout(self, _: float | None) -> None:
        if self.closed:
            raise OSError(9, "Bad file descriptor")

    def fileno(self) -> int:
        return 5  # as the reading thread last saw it

    def recv_into(self, view: memoryview, count: int) -> int:
        taken, self.data = self.data[:count], self.data[count:]
        view[:len(taken)] = taken
        self.closed = not self.data
        return len(taken)


def test_bounded_reads_end_quietly_when_the_socket_closes_as_a_read_ends() -> None:
    import struct

    header = struct.pack(">BBL", 4, 0, 10)
    transport = _Transport(_ClosedAfterTheRead(header + b"0123456789"))
    libraries.bound_pdu_reads(transport, limit=1000, seconds=2)
    assert bytes(transport.recv(6)) == header
    assert bytes(transport.recv(10)) == b"0123456789"


def test_bounded_reads_drop_a_peer_trickling_small_pdus() -> None:
    """Each PDU arrives within the deadline, but a few bytes a second: after ``seconds``
    spent waiting in reads at under MIN_BYTES_PER_SECOND, the peer is dropped."""
    import socket
    import struct
    import threading
    import time

    ours, peer = socket.socketpair()
    stop = threading.Event()

    def trickle() -> None:
        pdu = struct.pack(">BBL", 4, 0, 2) + b"xy"  # 8 bytes, 0.4 s each
        try:
            while not stop.is_set():
                for byte in pdu:
                    peer.sendall(bytes([byte]))
                    time.sleep(0.05)
        except OSError:
            pass

    with ours, peer:
        transport = _Transport(ours)
        libraries.bound_pdu_reads(transport, limit=1000, seconds=0.6)
        sender = threading.Thread(target=trickle, daemon=True)
        sender.start()
        reads = []
        try:
            for _ in range(20):
                data = bytes(transport.recv(6))
                reads.append(data)
                if len(data) != 6:
                    break
                reads.append(bytes(transport.recv(2)))
        finally:
            stop.set()
        assert reads[0] == struct.pack(">BBL", 4, 0, 2) and reads[1] == b"xy"  # served...
        assert len(reads[-1]) < 6 or len(reads[-1]) < 2  # ...then cut short
        assert len(reads) < 10  # within about two PDUs, not twenty
