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

import functools
import importlib
import logging
import socket
import struct
import time
from collections.abc import Callable, Sequence
from typing import Any

import pynetdicom
from highdicom import _standard_utils as highdicom_standard
from pydicom import config as pydicom_config
from pydicom.dataset import Dataset
from pynetdicom import _config as pynetdicom_config

LOGGER = logging.getLogger(__name__)

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
    memoize_iod_lookups()


#: The highdicom modules that imported its IOD look-ups by name (each one's own
#: binding is replaced, so every one is listed).
IOD_LOOKUP_USERS = ("highdicom.base", "highdicom.base_content", "highdicom.content",
                    "highdicom.image", "highdicom.sr.content", "highdicom.sr.templates")


def memoize_iod_lookups() -> None:
    """Remember highdicom's answers to "is this attribute in that IOD" (idempotent).

    Every SR highdicom builds asks its IOD tables, with a linear walk over every
    attribute of every module of the IOD, whether the SR's and its source's SOP
    classes have Content Date, Content Time and Pixel Data: about 1.5 ms of the
    7 ms an SR takes, for answers fixed by the standard's tables highdicom ships.
    ``highdicom._standard_utils`` is private, and the modules using it imported the
    functions by name, so each module's binding is replaced; a guard test fails if
    a highdicom module is left holding an original.
    """
    for name, memoize in (("is_attribute_in_iod", _memoized_attribute_lookup),
                          ("does_iod_have_pixel_data", _memoized_pixel_data_lookup)):
        current = getattr(highdicom_standard, name)
        if getattr(current, "memoized_by_dicom_node", False):
            continue
        memoized = memoize(current)
        setattr(memoized, "memoized_by_dicom_node", True)  # noqa: B010 (a function attribute)
        setattr(highdicom_standard, name, memoized)
        for module_name in IOD_LOOKUP_USERS:
            module = importlib.import_module(module_name)
            if getattr(module, name, None) is current:
                setattr(module, name, memoized)


def _memoized_attribute_lookup(lookup: Callable[..., bool]) -> Callable[..., bool]:
    """``is_attribute_in_iod(attribute, sop_class_uid, exclude_path_elements=None)``
    with its answers kept; a look-up that raises (an unknown SOP class) is not."""
    @functools.lru_cache(maxsize=4096)
    def cached(attribute: str, sop_class_uid: str, exclude: tuple[str, ...] | None) -> bool:
        return lookup(attribute, sop_class_uid, None if exclude is None else list(exclude))

    @functools.wraps(lookup)
    def memoized(attribute: str, sop_class_uid: str,
                 exclude_path_elements: Sequence[str] | None = None) -> bool:
        if isinstance(exclude_path_elements, str):  # not a list: asked as it is
            return lookup(attribute, sop_class_uid, exclude_path_elements)
        exclude = None if exclude_path_elements is None else tuple(exclude_path_elements)
        try:
            return cached(attribute, sop_class_uid, exclude)
        except TypeError:  # an unhashable argument: asked as it is
            return lookup(attribute, sop_class_uid, exclude_path_elements)

    return memoized


def _memoized_pixel_data_lookup(lookup: Callable[[str], bool]) -> Callable[[str], bool]:
    """``does_iod_have_pixel_data(sop_class_uid)`` with its answers kept."""
    cached = functools.lru_cache(maxsize=1024)(lookup)

    @functools.wraps(lookup)
    def memoized(sop_class_uid: str) -> bool:
        try:
            return cached(sop_class_uid)
        except TypeError:
            return lookup(sop_class_uid)

    return memoized


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


#: PDU types of PS3.8 9.3 (A-ASSOCIATE-RQ .. A-ABORT).
PDU_TYPES = frozenset(range(0x01, 0x08))
#: A-ABORT PDU from the service provider (source 2), reason 0 (not specified) or 1
#: (unrecognised PDU): PS3.8 9.3.8.
_ABORT = {False: b"\x07\x00\x00\x00\x00\x04\x00\x00\x02\x00",
          True: b"\x07\x00\x00\x00\x00\x04\x00\x00\x02\x01"}
#: The least a peer must send, on average over each ``seconds`` it keeps the node
#: waiting inside a read, in bytes a second: a byte every second is a stall.
MIN_BYTES_PER_SECOND = 1024
#: Larger PDUs are read in pieces of this size, as their bytes arrive, instead of into
#: one buffer of the declared size allocated up front.
_PIECE = 2**20


def bound_pdu_reads(transport: Any, limit: int, seconds: float,
                    on_refused: Callable[[str, str], None] | None = None) -> None:
    """Make ``transport`` (an accepted association's ``AssociationSocket``) drop a peer
    that sends what is not a DICOM PDU, declares a PDU of more than ``limit`` bytes,
    takes longer than ``seconds`` to send one, or keeps the node waiting while
    sending less than :data:`MIN_BYTES_PER_SECOND`, without reading any more of it.

    pynetdicom 3.0's ``DULServiceProvider._read_pdu_data`` reads each PDU as
    ``socket.recv(6)`` (type and length) and then ``socket.recv(length)``, and
    ``AssociationSocket.recv`` grows a buffer 4 KiB at a time for as long as the
    peer keeps sending: nothing caps the declared length (up to 4 GiB); its
    timeouts are per read and between PDUs, so a peer trickling a byte a second
    holds the association and its thread for ever; and bytes that are not a PDU
    (an HTTP request, a TLS handshake) are answered with an A-ABORT per six bytes
    and the connection is then left open. Both reads come here instead. A refused
    peer gets one A-ABORT, the connection is shut down, one warning is logged (not
    pynetdicom's error and traceback per refusal), and the read returns short, so
    pynetdicom closes the transport (Evt17). ``tests/test_libraries.py`` guards the
    read pattern.

    Parameters
    ----------
    transport
        The accepted association's ``AssociationSocket``.
    limit
        The largest PDU, in bytes, a peer may declare.
    seconds
        How long one PDU may take to arrive (and the window of the rate check).
    on_refused
        Told ``(peer address, reason)`` of each refusal (the audit trail's Security
        Alert).
    """
    sock = transport.socket
    header = True  # the reads alternate: a header, then the PDU it declared
    deadline = 0.0  # of the PDU being read: header and body together
    waited, received = 0.0, 0  # time inside reads and bytes, since the last rate check

    def refuse(reason: str, unrecognised: bool, partial: bytearray) -> bytearray:
        LOGGER.warning("connection from %s closed: %s", _peer(sock), reason)
        if on_refused is not None:
            on_refused(_peer(sock), reason)
        try:
            sock.sendall(_ABORT[unrecognised])
        except OSError:
            pass
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        return partial

    def read(nr_bytes: int) -> bytearray:
        nonlocal waited, received
        pieces: list[bytearray] = []
        got = 0
        previous = sock.gettimeout()
        try:
            while got < nr_bytes:
                want = min(nr_bytes - got, _PIECE)
                piece = bytearray(want)
                view = memoryview(piece)
                filled = 0
                while filled < want:
                    started = time.monotonic()
                    remaining = deadline - started
                    try:
                        if remaining <= 0:
                            raise TimeoutError
                        sock.settimeout(remaining if previous is None
                                        else min(remaining, previous))
                        count = sock.recv_into(view[filled:], want - filled)
                    except TimeoutError:
                        view.release()
                        return refuse(f"a PDU took longer than {seconds:.0f} s",
                                      False, _joined(pieces, piece, filled))
                    except OSError:
                        if sock.fileno() != -1:
                            raise
                        # Closed under the read (the node stopping): what was read, as
                        # for a connection closed by the peer, not an error.
                        view.release()
                        return _joined(pieces, piece, filled)
                    finally:
                        waited += time.monotonic() - started
                    if not count:  # closed: what was read, as pynetdicom returns it
                        view.release()
                        return _joined(pieces, piece, filled)
                    filled += count
                    received += count
                    if waited >= seconds:
                        rate = received / waited
                        waited, received = 0.0, 0
                        if rate < MIN_BYTES_PER_SECOND:
                            view.release()
                            return refuse(f"sending {rate:.0f} bytes a second", False,
                                          _joined(pieces, piece, filled))
                view.release()
                pieces.append(piece)
                got += want
        finally:
            try:
                sock.settimeout(previous)
            except OSError:  # closed under the read (the node stopping): nothing to restore
                pass
        return pieces[0] if len(pieces) == 1 else bytearray(b"".join(pieces))

    def recv(nr_bytes: int) -> bytearray:
        nonlocal header, deadline
        if not header:
            header = True
            return read(nr_bytes)
        deadline = time.monotonic() + seconds
        data = read(nr_bytes)
        if len(data) == 6:
            pdu_type, _, length = struct.unpack(">BBL", data)
            if pdu_type not in PDU_TYPES:
                return refuse(f"bytes that are not a DICOM PDU (type 0x{pdu_type:02X})",
                              True, bytearray())
            if length > limit:
                return refuse(f"a PDU of {length} bytes declared, over the limit of {limit}",
                              False, bytearray())
            header = False
        return data

    transport.recv = recv


def _joined(pieces: list[bytearray], last: bytearray, filled: int) -> bytearray:
    return bytearray(b"".join([*pieces, last[:filled]]))


def _peer(sock: Any) -> str:
    """The peer's address (an IP address: never patient data), for the log."""
    try:
        name = sock.getpeername()
    except OSError:
        return "a peer"
    return str(name[0]) if isinstance(name, tuple) and name else "a peer"
