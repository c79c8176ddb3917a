"""Delivery of result files (SRs, evidence images) to Storage SCPs (C-STORE SCU), with
classified statuses; :class:`Attempt`, what one send of any kind came to.

Status classes (PS3.4 B.2.3, as pynetdicom categorises them): success, and
warnings unless ``retry_on_warning``, mean stored; 0xA7xx (out of resources),
no association, an abort or a timeout mean try again later; every other
failure (0xA9xx, 0xCxxx, a refused SOP Class) is permanent and the delivery is
dead with the reason. When to try again is the dispatcher's business
(:mod:`dicom_node.scheduler`); a retry re-sends the same SR file, so the PACS
sees one object.

A destination with :class:`~dicom_node.destination.ClientTls` is reached over TLS
only: a context that cannot be built, a certificate that does not verify or a
peer that does not speak TLS all mean try again later, never a send in clear text.
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pynetdicom import AE
from pynetdicom.status import STATUS_SUCCESS, STATUS_WARNING, code_to_category

from dicom_node.db import DeliveryState
from dicom_node.destination import ClientTls, Destination
from dicom_node.tcp import NO_DELAY, send_c_store

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class Attempt:
    """What one send came to: ``DONE``, ``PENDING`` (try again later) or ``DEAD``,
    with the peer's status when there was one."""

    state: DeliveryState
    status: int | None
    detail: str


def classify(status: int, retry_on_warning: bool = False) -> DeliveryState:
    """Map a C-STORE response status to what the delivery does next."""
    category = code_to_category(status)
    if category == STATUS_SUCCESS:
        return DeliveryState.DONE
    if category == STATUS_WARNING:
        return DeliveryState.PENDING if retry_on_warning else DeliveryState.DONE
    # pynetdicom calls every 0xAxxx a failure; Out of Resources is the transient one.
    if status & 0xFF00 == 0xA700:
        return DeliveryState.PENDING
    return DeliveryState.DEAD


def send_many(destination: Destination, sr_paths: list[Path], calling_ae: str, timeout: float,
              retry_on_warning: bool = False, tls: ClientTls | None = None) -> list[Attempt]:
    """C-STORE each SR file over one association; one :class:`Attempt` per file, in order.

    Never raises: a file that cannot be read is dead, a connection problem makes
    every remaining file a retry.

    Parameters
    ----------
    destination
        The Storage SCP.
    sr_paths
        Part 10 files, sent as stored (see :func:`dicom_node.libraries.configure`).
    calling_ae
        Our AE title as SCU.
    timeout
        Connection, ACSE, DIMSE and network timeout, seconds.
    retry_on_warning
        Treat a warning status as "try again" instead of stored.
    tls
        Reach the destination over TLS (None: plain TCP).
    """
    unreadable: dict[int, Attempt] = {}
    contexts = set()
    for index, path in enumerate(sr_paths):
        try:
            meta = read_file_meta_info(path)
            contexts.add((str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)))
        except Exception as exc:
            unreadable[index] = Attempt(DeliveryState.DEAD, None,
                                        f"file unreadable: {type(exc).__name__}")
    if not contexts:
        return [unreadable[index] for index in range(len(sr_paths))]
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    for context in contexts:
        ae.add_requested_context(*context)
    try:
        return _send_over(ae, destination, sr_paths, unreadable, retry_on_warning, tls)
    finally:
        ae.shutdown()


def _send_over(ae: AE, destination: Destination, sr_paths: list[Path],
               unreadable: dict[int, Attempt], retry_on_warning: bool,
               tls: ClientTls | None) -> list[Attempt]:
    def everyone(detail: str) -> list[Attempt]:
        retry = Attempt(DeliveryState.PENDING, None, detail)
        return [unreadable.get(index, retry) for index in range(len(sr_paths))]

    tls_args: tuple[ssl.SSLContext, str] | None = None
    if tls is not None:
        try:
            tls_args = (tls.context(), tls.server_name or destination.host)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            return everyone(f"TLS not set up: {type(exc).__name__}: {exc}"[:200])
    try:
        assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title,
                             evt_handlers=[NO_DELAY], tls_args=tls_args)
    except Exception as exc:
        return everyone(f"cannot connect: {type(exc).__name__}")
    if assoc.is_rejected:
        return everyone("association rejected")
    if not assoc.is_established:
        # pynetdicom logs why a handshake failed (an untrusted certificate, a peer
        # without TLS) and reports it as it reports a peer that is down.
        return everyone("association not established (down or aborted"
                        + (", or the TLS handshake failed)" if tls_args else ")"))
    results: list[Attempt] = []
    try:
        for index, path in enumerate(sr_paths):
            if index in unreadable:
                results.append(unreadable[index])
            elif not assoc.is_established:
                results.append(Attempt(DeliveryState.PENDING, None, "association lost"))
            else:
                results.append(_store_one(assoc, path, retry_on_warning))
    finally:
        if assoc.is_established:
            assoc.release()
        elif not assoc.is_aborted:
            assoc.abort()
    return results


def _store_one(assoc: Any, path: Path, retry_on_warning: bool) -> Attempt:
    try:
        response = send_c_store(assoc, path)
    except ValueError as exc:  # no accepted presentation context for this SR
        return Attempt(DeliveryState.DEAD, None,
                       f"destination does not accept the object: {exc}"[:200])
    except (AttributeError, InvalidDicomError) as exc:  # file meta incomplete
        return Attempt(DeliveryState.DEAD, None, f"file unusable: {type(exc).__name__}")
    except Exception as exc:
        return Attempt(DeliveryState.PENDING, None, f"send failed: {type(exc).__name__}")
    if "Status" not in response:
        return Attempt(DeliveryState.PENDING, None, "no response: aborted or timed out")
    status = int(response.Status)
    detail = str(response.get("ErrorComment", ""))[:200]
    return Attempt(classify(status, retry_on_warning), status, detail)
