"""Where the node depends on more than a library's public API, in one place.

Two kinds of thing live here and nowhere else:

* **Library-global settings**, set once by :func:`configure` when the node (or
  one of its network commands) starts: they change how pynetdicom and pydicom
  behave for the whole process, so no module sets them at import time.
* **Reaches into private internals** -- attributes or layouts a library does not
  promise to keep. Each has a guard test in ``tests/test_libraries.py`` that
  fails loudly when an upgrade renames or removes what it relies on.
"""

from __future__ import annotations

import struct
import time
from typing import Any

import pynetdicom
from pydicom import config as pydicom_config
from pydicom.dataset import Dataset
from pynetdicom import _config as pynetdicom_config

_PYNETDICOM_SETTINGS = {
    "LOG_REQUEST_IDENTIFIERS": False,
    "LOG_RESPONSE_IDENTIFIERS": False,
    "STORE_SEND_CHUNKED_DATASET": True,
}


def configure() -> None:
    """Set the library-global settings the node relies on (idempotent).

    * pynetdicom logs the identifiers of C-STORE/C-FIND requests and responses
      (patient name, ID, dates) unless told not to: never, in a hospital log.
    * pynetdicom's C-STORE of a *path* sends the file's encoded data set as it
      is on disk (the exact bytes made durable) instead of decoding and
      re-encoding it; the association must accept the file's own transfer
      syntax, the only one delivery proposes.
    * pydicom's value validation warns about received values that break their
      VR's rules, and its messages can quote the value (patient data). The node
      checks what it relies on itself (UIDs, image attributes), so reading does
      not validate.
    """
    for name, value in _PYNETDICOM_SETTINGS.items():
        # Setting a name pynetdicom no longer has would silently do nothing.
        if not hasattr(pynetdicom_config, name):
            raise RuntimeError(f"pynetdicom {pynetdicom.__version__} has no _config.{name}; "
                               "check dicom_node/libraries.py before upgrading")
        setattr(pynetdicom_config, name, value)
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE


def reactor_paused(assoc: Any) -> bool:
    """Whether the association's reactor thread is still paused after a request.

    ``Association.send_c_store`` pauses the reactor so that it cannot take the
    response off the queue, and releases it once the response is in; pynetdicom
    3.0 has no public way to see that state (``Association._is_paused``).
    """
    return bool(assoc._is_paused)


def mark_as_written_encoding(ds: Dataset) -> None:
    """Mark ``ds`` as already in the encoding it will be written in (Explicit VR Little
    Endian, its own Specific Character Set), so that writing it does not walk it to
    correct ambiguous VRs -- which would decode every element kept as raw bytes.

    ``Dataset.set_original_encoding`` is public, but the character set it must be
    given to match is only exposed as ``Dataset._character_set``; anything else
    leaves :attr:`Dataset.is_original_encoding` false and writing slow.
    """
    ds.set_original_encoding(False, True, ds._character_set)


def only_item(template: Any) -> Dataset:
    """The single content item of a highdicom template built with one item.

    highdicom templates (``TrackingIdentifier`` with a UID alone,
    ``QualitativeEvaluation``, ``Measurement`` without qualifiers) are
    sequences of content items; their layout is not part of highdicom's API, so
    the one-item shape is checked rather than assumed.
    """
    items = list(template)
    if len(items) != 1:
        raise RuntimeError(f"highdicom {type(template).__name__} now holds {len(items)} "
                           "content items where one was expected; check the SR builder")
    item: Dataset = items[0]
    return item


class PduRefused(OSError):
    """A peer's PDU is longer than the node takes, or arrives too slowly: the
    connection is closed (an OSError, so that pynetdicom closes the transport)."""


#: PDU types of PS3.8 9.3 (A-ASSOCIATE-RQ .. A-ABORT).
PDU_TYPES = frozenset(range(0x01, 0x08))
#: A-ABORT PDU from the service provider (source 2), reason 0 (not specified) or 1
#: (unrecognised PDU): PS3.8 9.3.8.
_ABORT = {False: b"\x07\x00\x00\x00\x00\x04\x00\x00\x02\x00",
          True: b"\x07\x00\x00\x00\x00\x04\x00\x00\x02\x01"}


def bound_pdu_reads(transport: Any, limit: int, seconds: float) -> None:
    """Make ``transport`` (an accepted association's ``AssociationSocket``) drop a peer
    that sends what is not a DICOM PDU, or declares a PDU of more than ``limit``
    bytes, or takes longer than ``seconds`` to send one, without reading it.

    pynetdicom 3.0's ``DULServiceProvider._read_pdu_data`` reads each PDU as
    ``socket.recv(6)`` (type and length) and then ``socket.recv(length)``, and
    ``AssociationSocket.recv`` grows a buffer 4 KiB at a time for as long as the
    peer keeps sending: nothing caps the declared length (up to 4 GiB); its
    timeouts are per read and between PDUs, so a peer trickling a byte a second
    holds the association and its thread for ever; and bytes that are not a PDU
    (an HTTP request, a TLS handshake) are answered with an A-ABORT per six bytes
    and the connection is then left open. Both reads come here instead: a header
    whose type is not a PDU's, or whose length is over ``limit``, is answered
    with an A-ABORT and raises :class:`PduRefused` (pynetdicom then closes the
    transport, Evt17) before anything more is read; so does a PDU not complete
    within ``seconds`` of its first read. A PDU within bounds is read into one
    buffer of its size. ``tests/test_libraries.py`` guards the read pattern.
    """
    sock = transport.socket
    header = True  # the reads alternate: a header, then the PDU it declared

    def refuse(reason: str, unrecognised: bool) -> PduRefused:
        try:
            sock.sendall(_ABORT[unrecognised])
        except OSError:
            pass
        return PduRefused(reason)

    def read(nr_bytes: int) -> bytearray:
        buffer = bytearray(nr_bytes)
        view = memoryview(buffer)
        got = 0
        deadline = time.monotonic() + seconds
        previous = sock.gettimeout()
        try:
            while got < nr_bytes:
                remaining = deadline - time.monotonic()
                try:
                    if remaining <= 0:
                        raise TimeoutError
                    sock.settimeout(remaining if previous is None else min(remaining, previous))
                    count = sock.recv_into(view[got:], min(nr_bytes - got, 2**20))
                except TimeoutError:
                    raise refuse(f"the peer sent {got} of {nr_bytes} bytes in {seconds:.0f} s",
                                 False) from None
                if not count:  # connection closed: what was read, as pynetdicom returns it
                    return buffer[:got]
                got += count
        finally:
            view.release()
            sock.settimeout(previous)
        return buffer

    def recv(nr_bytes: int) -> bytearray:
        nonlocal header
        if not header:
            header = True
            return read(nr_bytes)
        data = read(nr_bytes)
        if len(data) == 6:
            pdu_type, _, length = struct.unpack(">BBL", data)
            if pdu_type not in PDU_TYPES:
                raise refuse(f"the peer sent bytes that are not a DICOM PDU (type "
                             f"0x{pdu_type:02X})", True)
            if length > limit:
                raise refuse(f"the peer declared a PDU of {length} bytes, over the node's "
                             f"limit of {limit}", False)
            header = False
        return data

    transport.recv = recv
