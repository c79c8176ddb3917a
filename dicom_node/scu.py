"""Verification and Storage SCU for admins: ``dicom-node echo`` and ``dicom-node send``."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_node.db import DeliveryState
from dicom_node.deliver import classify
from dicom_node.tcp import NO_DELAY, send_c_store

LOGGER = logging.getLogger(__name__)


#: The most presentation contexts an association may propose (PS3.8 9.3.2.2).
_MAX_CONTEXTS = 128


@dataclass(frozen=True)
class SendResult:
    """The outcome of one file: its DIMSE status, or None when it was not sent."""

    path: Path
    status: int | None
    detail: str

    @property
    def ok(self) -> bool:
        """Stored: what delivery counts as stored (a success or warning status)."""
        return self.status is not None and classify(self.status) is DeliveryState.DONE


def _ae(calling_ae: str, timeout: float) -> AE:
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    return ae


def echo(host: str, port: int, called_ae: str, calling_ae: str, timeout: float = 30.0) -> int:
    """Send C-ECHO; return its status.

    Parameters
    ----------
    host, port, called_ae
        The peer: address, port, AE title.
    calling_ae
        Our AE title.
    timeout
        Seconds, for every ACSE, DIMSE and network wait.

    Raises
    ------
    ConnectionError
        The peer did not accept an association.
    """
    ae = _ae(calling_ae, timeout)
    ae.add_requested_context(Verification)
    assoc = ae.associate(host, port, ae_title=called_ae, evt_handlers=[NO_DELAY])
    if not assoc.is_established:
        raise ConnectionError(f"association with {called_ae}@{host}:{port} not established")
    try:
        status = assoc.send_c_echo()
        return int(status.Status) if "Status" in status else -1
    finally:
        assoc.release()


def read_for_sending(path: Path) -> Dataset:
    """Read a file to send; a bare data set without File Meta is taken as Implicit VR LE."""
    ds = dcmread(path, force=True)
    meta = getattr(ds, "file_meta", None)
    if meta is None or "TransferSyntaxUID" not in meta:
        ds.file_meta = meta if isinstance(meta, FileMetaDataset) else FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    return ds


def send(
    host: str,
    port: int,
    files: Iterable[Path],
    called_ae: str,
    calling_ae: str,
    timeout: float = 30.0,
) -> list[SendResult]:
    """C-STORE each file over one association; one result per file, in order.

    Parameters
    ----------
    host, port
        The peer.
    files
        DICOM files; one without File Meta is sent as Implicit VR Little Endian.
    called_ae, calling_ae
        The peer's AE title and ours.
    timeout
        ACSE, DIMSE and network timeout, seconds.

    Raises
    ------
    ConnectionError
        No association was established.
    ValueError
        The files need more than 128 presentation contexts.
    """
    datasets: list[tuple[Path, Dataset | None, str]] = []
    ds: Dataset | None
    contexts: set[tuple[str, str]] = set()
    for path in files:
        try:
            ds = read_for_sending(path)
        except Exception as exc:
            datasets.append((path, None, f"cannot read: {type(exc).__name__}"))
            continue
        transfer_syntax = UID(ds.file_meta.TransferSyntaxUID)
        contexts.add((str(ds.SOPClassUID), str(transfer_syntax)))
        if not transfer_syntax.is_compressed:
            contexts.add((str(ds.SOPClassUID), str(ExplicitVRLittleEndian)))
        datasets.append((path, ds, ""))

    results: list[SendResult] = []
    if not contexts:
        return [SendResult(p, None, why) for p, _, why in datasets]
    if len(contexts) > _MAX_CONTEXTS:
        raise ValueError(f"{len(contexts)} presentation contexts needed, at most 128 allowed")
    ae = _ae(calling_ae, timeout)
    for sop_class, syntax in sorted(contexts):
        ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate(host, port, ae_title=called_ae, evt_handlers=[NO_DELAY])
    if not assoc.is_established:
        raise ConnectionError(f"association with {called_ae}@{host}:{port} not established")
    try:
        for path, ds, why in datasets:
            if ds is None:
                results.append(SendResult(path, None, why))
                continue
            try:
                rsp = send_c_store(assoc, ds)
            except Exception as exc:
                results.append(SendResult(path, None, f"not sent: {exc}"))
                continue
            if "Status" not in rsp:
                results.append(SendResult(path, None, "no response (association lost?)"))
                continue
            results.append(SendResult(path, int(rsp.Status), str(rsp.get("ErrorComment", ""))))
    finally:
        if assoc.is_established:
            assoc.release()
    return results
