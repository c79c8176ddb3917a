"""Delivery of result files to a DICOMweb origin server (STOW-RS, PS3.18 10.5).

One request carries every file; the answer is read per instance from the
Store Instances Response (PS3.18 10.5.3): an instance in the Referenced SOP
Sequence is stored (with or without a Warning Reason), one in the Failed SOP
Sequence failed with a Failure Reason that is a C-STORE status and is
classified as C-STORE statuses are (:func:`dicom_node.deliver.classify`:
0xA7xx try again, anything else dead). Whole-request outcomes:

========================================  =====================================
HTTP answer                               every file not listed in the response
========================================  =====================================
200 with no response data set             done
200 / 202 with a response data set        pending: the server did not say
3xx (not followed), 4xx (not 408, 429)    dead, with the code
408, 429, 5xx, no connection, timeout     pending (listed files too)
========================================  =====================================

Orthanc's DICOMweb plugin 1.7 answers 200 and leaves out an instance it could
not store (a Lua filter that fails), hence "pending" for an unlisted file.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from io import BytesIO
from pathlib import Path
from typing import Any

import requests
from dicomweb_client import DICOMwebClient
from pydicom import dcmread, dcmwrite
from pydicom.dataset import Dataset

from dicom_node.db import DeliveryState
from dicom_node.deliver import Attempt, classify
from dicom_node.destination import http_phrase, url_refusal

LOGGER = logging.getLogger(__name__)

#: HTTP answers after which the same request may succeed later (PS3.18 8.6.1.2).
_TRANSIENT_HTTP = frozenset({HTTPStatus.REQUEST_TIMEOUT, HTTPStatus.TOO_MANY_REQUESTS})
#: Failure Reason when a Failed SOP Sequence item carries none: Processing failure.
_PROCESSING_FAILURE = 0x0110


@dataclass(frozen=True)
class _Part:
    """One readable file: its data set and SOP Instance UID."""

    dataset: Dataset
    sop_instance_uid: str


def send_stow(url: str, paths: list[Path], timeout: float,
              token: str | None = None) -> list[Attempt]:
    """Store the Part 10 files in one STOW-RS request; one :class:`Attempt` per file, in order.

    Never raises: a file that cannot be read (or lacks its File Meta or SOP
    Instance UID) is dead alone and the others are still sent; a connection
    problem, a timeout, 408, 429 or 5xx make every file a retry.

    Parameters
    ----------
    url
        The DICOMweb service root (``https://pacs.example/dicom-web``); the
        request goes to ``{url}/studies``. Plain ``http`` only to a loopback host.
    paths
        Part 10 files (SRs, Secondary Captures).
    timeout
        Connect and read timeout of the request, seconds.
    token
        Bearer token for the ``Authorization`` header, if the server wants one.
    """
    refusal = url_refusal(url, "DICOMweb URL")
    if refusal is not None:
        return [Attempt(DeliveryState.DEAD, None, refusal) for _ in paths]
    parts: list[_Part | Attempt] = [_read(path) for path in paths]
    readable = [part for part in parts if isinstance(part, _Part)]
    if not readable:
        return [part for part in parts if isinstance(part, Attempt)]
    outcome = _post(url, [part.dataset for part in readable], timeout, token)
    if isinstance(outcome, Attempt):
        return [outcome if isinstance(part, _Part) else part for part in parts]
    judge = _judge(outcome)
    return [judge(part.sop_instance_uid) if isinstance(part, _Part) else part
            for part in parts]


def _read(path: Path) -> _Part | Attempt:
    """The file's data set, checked to encode as Part 10, or its dead :class:`Attempt`."""
    try:
        dataset = dcmread(path)
        if "TransferSyntaxUID" not in dataset.file_meta or "SOPInstanceUID" not in dataset:
            return Attempt(DeliveryState.DEAD, None,
                           "file unusable: no File Meta or SOP Instance UID")
        # store_instances encodes every file before it sends any: a file that
        # cannot be encoded must fail here, alone.
        dcmwrite(BytesIO(), dataset)
        return _Part(dataset, str(dataset.SOPInstanceUID))
    except Exception as exc:
        return Attempt(DeliveryState.DEAD, None, f"file unreadable: {type(exc).__name__}")


def _post(url: str, datasets: list[Dataset], timeout: float,
          token: str | None) -> requests.Response | Attempt:
    """POST the data sets; the server's final response, or the Attempt for every file."""
    responses: list[requests.Response] = []

    def keep(response: requests.Response, *args: Any, **kwargs: Any) -> None:
        responses.append(response)

    headers = {"Accept": "application/dicom+json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    session = requests.Session()
    # A redirect would turn the POST into a GET whose 200 says nothing about storage:
    # the 3xx is the answer (dead: the URL is wrong).
    session.max_redirects = 0
    try:
        client = DICOMwebClient(url=url, session=session, headers=headers, callback=keep,
                                timeout=timeout)
    except Exception as exc:
        session.close()
        return Attempt(DeliveryState.DEAD, None, f"DICOMweb URL unusable: {type(exc).__name__}")
    # No retries inside the request: when to try again is the dispatcher's business.
    client.set_http_retry_params(retry=False)
    try:
        client.store_instances(datasets)
    except requests.HTTPError:
        pass  # the response was kept: judged below
    except (requests.ConnectionError, requests.Timeout) as exc:
        return Attempt(DeliveryState.PENDING, None, f"cannot reach: {type(exc).__name__}")
    except Exception as exc:
        # dicomweb-client cannot read some answers (a 202 without Content-Type, as
        # Orthanc sends): the response, when there was one, is judged all the same.
        if not responses:
            return Attempt(DeliveryState.PENDING, None, f"send failed: {type(exc).__name__}")
    finally:
        session.close()
    if not responses:
        return Attempt(DeliveryState.PENDING, None, "no response")
    return responses[-1]


def _judge(response: requests.Response) -> Callable[[str], Attempt]:
    """How the response answers for each SOP Instance UID sent."""
    code = response.status_code
    http = f"HTTP {code} {http_phrase(code)}"
    if code in _TRANSIENT_HTTP or code >= 500:
        return lambda _: Attempt(DeliveryState.PENDING, None, http)
    listed = _listed(response.content)
    LOGGER.debug("STOW-RS answered %s, %d instance(s) listed", http,
                 len(listed) if listed else 0)
    if 200 <= code < 300:
        if listed is None and code == HTTPStatus.OK:
            unlisted = Attempt(DeliveryState.DONE, 0x0000, http)
        else:
            unlisted = Attempt(DeliveryState.PENDING, None, f"{http}: instance not in the response")
    else:
        unlisted = Attempt(DeliveryState.DEAD, None, http)
    found = listed or {}
    return lambda uid: found.get(uid, unlisted)


def _listed(body: bytes) -> dict[str, Attempt] | None:
    """The outcome of each instance the Store Instances Response lists (PS3.18
    10.5.3), by SOP Instance UID; None without a readable response data set."""
    try:
        return _outcomes(Dataset.from_json(json.loads(body)))
    except Exception:
        return None


def _outcomes(response: Dataset) -> dict[str, Attempt] | None:
    if "ReferencedSOPSequence" not in response and "FailedSOPSequence" not in response:
        return None
    listed: dict[str, Attempt] = {}
    for item in response.get("ReferencedSOPSequence", []):
        warning = item.get("WarningReason")
        detail = "stored" if warning is None else f"stored with warning 0x{int(warning):04X}"
        listed[str(item.get("ReferencedSOPInstanceUID", ""))] = Attempt(
            DeliveryState.DONE, 0x0000 if warning is None else int(warning), detail)
    for item in response.get("FailedSOPSequence", []):  # a failure wins over a listing
        reason = item.get("FailureReason")
        status = _PROCESSING_FAILURE if reason is None else int(reason)
        listed[str(item.get("ReferencedSOPInstanceUID", ""))] = Attempt(
            classify(status), status, f"failed: 0x{status:04X}")
    return listed
