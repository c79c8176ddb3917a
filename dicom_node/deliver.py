"""Delivery of SRs to Storage SCPs (C-STORE SCU) with classified statuses and backoff.

Status classes (PS3.4 B.2.3): success, and warnings 0x0001/0xBxxx unless
``retry_on_warning``, mean stored; 0xA7xx (out of resources), no association,
an abort or a timeout mean try again later; every other failure (0xA9xx,
0xCxxx, a refused SOP Class) is permanent and the delivery is dead with the
reason. A retry re-sends the same SR file, so the PACS sees one object.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pynetdicom import AE, _config

from dicom_node.db import utcnow
from dicom_node.tcp import NO_DELAY, send_c_store

LOGGER = logging.getLogger(__name__)

_config.LOG_REQUEST_IDENTIFIERS = False
_config.LOG_RESPONSE_IDENTIFIERS = False
# send_c_store(path) sends the file's encoded data set as it is on disk (the
# exact bytes that were made durable), without decoding and re-encoding it;
# the association must then accept the file's own transfer syntax, which is
# the only one we propose. Only path-based sends are affected.
_config.STORE_SEND_CHUNKED_DATASET = True

_DESTINATION = re.compile(r"^(?P<ae>[\x20-\x5b\x5d-\x7e]{1,16})@(?P<host>[A-Za-z0-9.\-:\[\]]+)"
                          r":(?P<port>\d{1,5})$")


@dataclass(frozen=True)
class Destination:
    """A Storage SCP: AE title, host, port."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Destination:
        """Parse ``AET@HOST:PORT``."""
        match = _DESTINATION.match(text.strip())
        if not match or not 0 < int(match["port"]) < 65536:
            raise ValueError(f"destination {text!r} is not AET@HOST:PORT")
        return cls(match["ae"].strip(), match["host"].strip("[]"), int(match["port"]))

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


class Outcome(StrEnum):
    """What to do with a delivery after an attempt."""

    DONE = "done"
    RETRY = "retry"
    DEAD = "dead"


@dataclass(frozen=True)
class Attempt:
    """The result of one send."""

    outcome: Outcome
    status: int | None
    detail: str


def classify(status: int, retry_on_warning: bool = False) -> Outcome:
    """Map a C-STORE response status to what the delivery does next."""
    if status == 0x0000:
        return Outcome.DONE
    if status == 0x0001 or status & 0xF000 == 0xB000:
        return Outcome.RETRY if retry_on_warning else Outcome.DONE
    if status & 0xFF00 == 0xA700:
        return Outcome.RETRY
    return Outcome.DEAD


def backoff(attempts: int, base: float, multiplier: float, cap: float) -> float:
    """Seconds before the next try after ``attempts`` failed ones (>= 1)."""
    return float(min(cap, base * multiplier ** max(attempts - 1, 0)))


def next_attempt(attempts: int, base: float, multiplier: float, cap: float,
                 now: datetime | None = None) -> datetime:
    """When the next try is due."""
    return (now or utcnow()) + timedelta(seconds=backoff(attempts, base, multiplier, cap))


def send_many(destination: Destination, sr_paths: list[Path], calling_ae: str, timeout: float,
              retry_on_warning: bool = False) -> list[Attempt]:
    """C-STORE each SR file over one association; one :class:`Attempt` per file, in order.

    Never raises: a file that cannot be read is dead, a connection problem makes
    every remaining file a retry.
    """
    datasets: list[Any] = []
    contexts = set()
    for path in sr_paths:
        try:
            meta = read_file_meta_info(path)
            contexts.add((str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)))
            datasets.append(path)
        except Exception as exc:
            datasets.append(Attempt(Outcome.DEAD, None,
                                    f"SR file unreadable: {type(exc).__name__}"))
    if not contexts:
        return datasets
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    for context in contexts:
        ae.add_requested_context(*context)
    try:
        return _send_over(ae, destination, datasets, retry_on_warning)
    finally:
        ae.shutdown()


def _send_over(ae: AE, destination: Destination, datasets: list[Any],
               retry_on_warning: bool) -> list[Attempt]:
    def everyone(outcome: Outcome, detail: str) -> list[Attempt]:
        return [ds if isinstance(ds, Attempt) else Attempt(outcome, None, detail)
                for ds in datasets]

    try:
        assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title,
                             evt_handlers=[NO_DELAY])
    except Exception as exc:
        return everyone(Outcome.RETRY, f"cannot connect: {type(exc).__name__}")
    if assoc.is_rejected:
        return everyone(Outcome.RETRY, "association rejected")
    if not assoc.is_established:
        return everyone(Outcome.RETRY, "association not established (down or aborted)")
    results: list[Attempt] = []
    try:
        for ds in datasets:
            if isinstance(ds, Attempt):
                results.append(ds)
            elif not assoc.is_established:
                results.append(Attempt(Outcome.RETRY, None, "association lost"))
            else:
                results.append(_store_one(assoc, ds, retry_on_warning))
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
        return Attempt(Outcome.DEAD, None, f"destination does not accept the SR: {exc}"[:200])
    except (AttributeError, InvalidDicomError) as exc:  # file meta incomplete
        return Attempt(Outcome.DEAD, None, f"SR file unusable: {type(exc).__name__}")
    except Exception as exc:
        return Attempt(Outcome.RETRY, None, f"send failed: {type(exc).__name__}")
    if "Status" not in response:
        return Attempt(Outcome.RETRY, None, "no response: aborted or timed out")
    status = int(response.Status)
    detail = str(response.get("ErrorComment", ""))[:200]
    return Attempt(classify(status, retry_on_warning), status, detail)
