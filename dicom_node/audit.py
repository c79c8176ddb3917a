"""The audit trail: the events of DICOM PS3.15 A.5 as JSON lines, rotated, and
optionally forwarded to a syslog collector (RFC 5424).

Each line is one audit message with the structure of the DICOM Audit Message
schema (A.5.1): ``EventIdentification`` (EventID, EventActionCode, EventDateTime,
EventOutcomeIndicator, EventTypeCode), ``ActiveParticipant`` (AE titles as
``AETITLES=...``, network addresses), ``AuditSourceIdentification`` and
``ParticipantObjectIdentification`` (Study, SOP Instance and SOP Class UIDs, the
model). Unlike the schema, no message carries a Patient participant object: patient
names and IDs stay out of the trail, as out of the log (UIDs and AE titles are in).

Events: Application Activity (start and stop, 110100); association accepted or
refused, with the reason (User Authentication, 110114: Login, or its failure);
DICOM Instances Transferred, in (each acknowledged or refused C-STORE) and out
(each SR or evidence image a destination acknowledged) (110104); Security Alert
(110113) for a refused AE title or host and a failed TLS handshake (Node
Authentication, 110126), malformed input (a local code, ``99DICOMNODE``
MALFORMED) and a model installed, refused or loaded (Software Configuration,
110131). The node answers no queries, so there is no Query (110112) event.

The trail is a logger (``dicom_node.audit.trail``) that never propagates to the
node's log; :func:`open_trail` gives it its file and collector for one process.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import socket
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

LOGGER = logging.getLogger(__name__)

#: The trail itself: one JSON message per record, never in the node's log.
TRAIL = logging.getLogger("dicom_node.audit.trail")
TRAIL.propagate = False
TRAIL.setLevel(logging.INFO)
TRAIL.addHandler(logging.NullHandler())

#: Outcome indicators (A.5.1): success, minor failure, serious failure.
SUCCESS, MINOR_FAILURE, SERIOUS_FAILURE = 0, 4, 8

Code = dict[str, str]


def _dcm(code: str, meaning: str) -> Code:
    return {"csd-code": code, "codeSystemName": "DCM", "originalText": meaning}


def _local(code: str, meaning: str) -> Code:
    """A code of our own (a private coding scheme designator starts with 99)."""
    return {"csd-code": code, "codeSystemName": "99DICOMNODE", "originalText": meaning}


APPLICATION_ACTIVITY = _dcm("110100", "Application Activity")
APPLICATION_START = _dcm("110120", "Application Start")
APPLICATION_STOP = _dcm("110121", "Application Stop")
USER_AUTHENTICATION = _dcm("110114", "User Authentication")
LOGIN = _dcm("110122", "Login")
INSTANCES_TRANSFERRED = _dcm("110104", "DICOM Instances Transferred")
SECURITY_ALERT = _dcm("110113", "Security Alert")
NODE_AUTHENTICATION = _dcm("110126", "Node Authentication")
SOFTWARE_CONFIGURATION = _dcm("110131", "Software Configuration")
MALFORMED_INPUT = _local("MALFORMED", "Malformed input")
APPLICATION = _dcm("110150", "Application")
APPLICATION_LAUNCHER = _dcm("110151", "Application Launcher")
SOURCE = _dcm("110153", "Source Role ID")
DESTINATION = _dcm("110152", "Destination Role ID")
STUDY_UID = _dcm("110180", "Study Instance UID")
MODEL = _local("MODEL", "Classifier model")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


class _Source:
    """Who reports: this process (set by :func:`open_trail`)."""

    node_ae = "DICOM_NODE"
    role = "node"
    site = socket.gethostname()


def participant(ae_title: str | None = None, address: str | None = None,
                requestor: bool = False, role: Code | None = None,
                user: str | None = None) -> dict[str, Any]:
    """One ActiveParticipant: a DICOM AE or a process.

    Parameters
    ----------
    ae_title
        The AE title (as ``AETITLES=...``), if a DICOM AE.
    address
        Its IP address (NetworkAccessPointID).
    requestor
        UserIsRequestor: it started the transaction.
    role
        RoleIDCode (e.g. :data:`SOURCE`).
    user
        UserID, when not the AE title (a process, a URL).
    """
    found: dict[str, Any] = {"UserID": user or ae_title or "-", "UserIsRequestor": requestor}
    if ae_title:
        found["AlternativeUserID"] = f"AETITLES={ae_title}"
    if role is not None:
        found["RoleIDCode"] = role
    if address:
        found["NetworkAccessPointID"] = address
        found["NetworkAccessPointTypeCode"] = "2"  # an IP address
    return found


def us(requestor: bool = False, role: Code | None = None) -> dict[str, Any]:
    """This node as an ActiveParticipant (its AE title and process)."""
    return participant(_Source.node_ae, None, requestor, role,
                       user=f"{_Source.node_ae}:{os.getpid()}")


def study(study_uid: str, instances: list[tuple[str, str]] | None = None) -> dict[str, Any]:
    """A study as a ParticipantObject, with ``(sop_class_uid, sop_instance_uid)`` pairs."""
    found: dict[str, Any] = {"ParticipantObjectTypeCode": 2,
                             "ParticipantObjectTypeCodeRole": 3,
                             "ParticipantObjectIDTypeCode": STUDY_UID,
                             "ParticipantObjectID": study_uid}
    if instances:
        by_class: dict[str, list[str]] = {}
        for sop_class, sop_instance in instances:
            by_class.setdefault(sop_class, []).append(sop_instance)
        found["ParticipantObjectDescription"] = {"SOPClass": [
            {"UID": uid, "NumberOfInstances": len(found_), "Instance": found_}
            for uid, found_ in by_class.items()]}
    return found


def model_object(name: str, version: str, sha256: str, validated: bool | None
                 ) -> dict[str, Any]:
    """A classifier model as a ParticipantObject (a system object).

    Parameters
    ----------
    name, version
        The model's name and version, as its card gives them.
    sha256
        The hash of its weights, from its card (empty when not read).
    validated
        Whether its card earns 'validated' (None: not known).
    """
    return {"ParticipantObjectTypeCode": 2, "ParticipantObjectTypeCodeRole": 4,
            "ParticipantObjectIDTypeCode": MODEL,
            "ParticipantObjectID": f"{name} {version}",
            "ParticipantObjectName": name,
            "ParticipantObjectDetail": [
                {"type": "sha256", "value": sha256},
                {"type": "validation", "value": "unknown" if validated is None else
                 "validated" if validated else "UNVALIDATED"}]}


def record(event: Code, action: str, outcome: int, participants: list[dict[str, Any]],
           objects: list[dict[str, Any]] | None = None, types: list[Code] | None = None,
           description: str | None = None) -> None:
    """Write one audit message (never raises: an audit failure is logged, once a
    message, and the node goes on).

    Parameters
    ----------
    event
        EventID (e.g. :data:`INSTANCES_TRANSFERRED`).
    action
        EventActionCode: C(reate), R(ead), U(pdate), D(elete) or E(xecute).
    outcome
        :data:`SUCCESS`, :data:`MINOR_FAILURE` or :data:`SERIOUS_FAILURE`.
    participants
        ActiveParticipant entries (:func:`participant`, :func:`us`).
    objects
        ParticipantObjectIdentification entries (:func:`study`, :func:`model_object`).
    types
        EventTypeCode entries.
    description
        EventOutcomeDescription: why it failed (never patient data).
    """
    identification: dict[str, Any] = {"EventID": event, "EventActionCode": action,
                                      "EventDateTime": _now(),
                                      "EventOutcomeIndicator": outcome}
    if types:
        identification["EventTypeCode"] = types
    if description:
        identification["EventOutcomeDescription"] = description
    message: dict[str, Any] = {
        "EventIdentification": identification,
        "ActiveParticipant": participants,
        "AuditSourceIdentification": {"AuditSourceID": f"{_Source.site}/{_Source.role}",
                                      "AuditEnterpriseSiteID": _Source.site},
    }
    if objects:
        message["ParticipantObjectIdentification"] = objects
    try:
        # MSGID of the syslog header: the event's code (e.g. 110104).
        TRAIL.info(json.dumps(message, separators=(",", ":")),
                   extra={"msgid": event["csd-code"]})
    except Exception:
        LOGGER.exception("an audit message could not be written")


# --- the events --------------------------------------------------------------------


def application(started: bool) -> None:
    """Application Activity: this process started (after recovery) or stopped."""
    record(APPLICATION_ACTIVITY, "E", SUCCESS,
           [us(role=APPLICATION),
            participant(user=_user(), requestor=True, role=APPLICATION_LAUNCHER)],
           types=[APPLICATION_START if started else APPLICATION_STOP])


def association(calling_ae: str, address: str, refusal: str | None = None,
                security: bool = False) -> None:
    """An association accepted or refused, with the reason.

    Parameters
    ----------
    calling_ae
        The peer's calling AE title (empty when refused before the request).
    address
        The peer's IP address.
    refusal
        Why it was refused; None: accepted.
    security
        The refusal is about the peer's identity: a Security Alert too.
    """
    peer = participant(calling_ae, address, requestor=True)
    record(USER_AUTHENTICATION, "E", SUCCESS if refusal is None else MINOR_FAILURE,
           [peer, us()], types=[LOGIN], description=refusal)
    if refusal is not None and security:
        alert(NODE_AUTHENTICATION, refusal, calling_ae, address)


def alert(kind: Code, reason: str, calling_ae: str | None, address: str | None) -> None:
    """A Security Alert about a peer.

    Parameters
    ----------
    kind
        EventTypeCode (:data:`NODE_AUTHENTICATION`, :data:`MALFORMED_INPUT`, ...).
    reason
        EventOutcomeDescription.
    calling_ae
        The peer's AE title (None: not yet known).
    address
        The peer's IP address.
    """
    record(SECURITY_ALERT, "E", MINOR_FAILURE,
           [us(requestor=True), participant(calling_ae, address)],
           types=[kind], description=reason)


def received(calling_ae: str, address: str, study_uid: str | None, sop_class: str | None,
             sop_instance: str | None, refusal: str | None = None) -> None:
    """DICOM Instances Transferred, in: one C-STORE acknowledged or refused.

    Parameters
    ----------
    calling_ae, address
        The sender.
    study_uid
        The study (None when the data set could not be read).
    sop_class, sop_instance
        The C-STORE request's UIDs (None when not valid UIDs).
    refusal
        The status and reason of a refusal; None: acknowledged.
    """
    instances = [(sop_class or "-", sop_instance)] if sop_instance else None
    record(INSTANCES_TRANSFERRED, "C", SUCCESS if refusal is None else MINOR_FAILURE,
           [participant(calling_ae, address, requestor=True, role=SOURCE),
            us(role=DESTINATION)],
           [study(study_uid or "-", instances)], description=refusal)


def sent(kind: str, destination: str, study_uid: str, sop_class: str, sop_instance: str
         ) -> None:
    """DICOM Instances Transferred, out: a destination acknowledged one object.

    Parameters
    ----------
    kind
        ``dicom`` or ``dicomweb``.
    destination
        ``AE@host:port`` or the STOW-RS URL.
    study_uid, sop_class, sop_instance
        The object sent.
    """
    ae, _, where = destination.partition("@") if kind == "dicom" else ("", "", destination)
    record(INSTANCES_TRANSFERRED, "R", SUCCESS,
           [us(requestor=True, role=SOURCE),
            participant(ae or None, where, role=DESTINATION,
                        user=None if ae else where)],
           [study(study_uid, [(sop_class, sop_instance)])])


def model(action: str, name: str, version: str, sha256: str, validated: bool | None,
          refusal: str | None = None) -> None:
    """Software Configuration: a model installed, refused or loaded.

    Parameters
    ----------
    action
        ``installed`` (``dicom-node model install``, ``serve --model``) or ``loaded``
        (by a worker).
    name, version, sha256
        The model (version and hash empty when its card was not read).
    validated
        Whether its card earns 'validated' (None: not known).
    refusal
        Why the install was refused; None: done.
    """
    record(SECURITY_ALERT, "E" if action == "loaded" else "U",
           SUCCESS if refusal is None else MINOR_FAILURE,
           [us(), participant(user=_user(), requestor=True)],
           [model_object(name, version, sha256, validated)],
           types=[SOFTWARE_CONFIGURATION],
           description=refusal or f"model {action}")


def _user() -> str:
    try:
        import pwd

        return pwd.getpwuid(os.getuid()).pw_name
    except (ImportError, KeyError):
        return str(os.getuid())


# --- where it goes -----------------------------------------------------------------


class Trail:
    """The handlers one process gave the trail (closed by :meth:`close`)."""

    def __init__(self, handlers: list[logging.Handler]) -> None:
        self.handlers = handlers

    def close(self) -> None:
        for handler in self.handlers:
            TRAIL.removeHandler(handler)
            handler.close()
        self.handlers = []


def open_trail(folder: Path, role: str, node_ae: str, max_bytes: int, backups: int,
               syslog: str | None = None, syslog_ca: Path | None = None) -> Trail:
    """Send the trail to ``folder/<role>.jsonl`` (rotated at ``max_bytes``, keeping
    ``backups`` old files) and, given a URL, to a syslog collector.

    Parameters
    ----------
    folder
        The audit directory (created, mode 0750).
    role
        ``node``, or ``worker-<host>`` for a worker process: one file per process
        kind, since two processes rotating one file would lose lines.
    node_ae
        Our AE title, in every message.
    max_bytes, backups
        Rotation.
    syslog
        ``udp://HOST:PORT`` (RFC 5426), ``tcp://HOST:PORT`` or ``tls://HOST:PORT``
        (RFC 5425, verified against ``syslog_ca``), or None.
    syslog_ca
        PEM CA bundle of the collector's certificate (tls only).
    """
    folder.mkdir(parents=True, exist_ok=True, mode=0o750)
    _Source.node_ae, _Source.role = node_ae, role
    file_handler = logging.handlers.RotatingFileHandler(
        folder / f"{role}.jsonl", maxBytes=max_bytes, backupCount=backups, encoding="utf-8")
    handlers: list[logging.Handler] = [file_handler]
    if syslog:
        try:
            handlers.append(syslog_handler(syslog, syslog_ca))
        except OSError as exc:  # the collector is down: the file still has every message
            LOGGER.error("audit: the syslog collector %s cannot be reached (%s); the audit "
                         "trail goes to %s only", syslog, exc, folder)
    for handler in handlers:
        handler.setFormatter(logging.Formatter("%(message)s"))
        TRAIL.addHandler(handler)
    return Trail(handlers)


def syslog_handler(url: str, ca: Path | None = None) -> logging.Handler:
    """An RFC 5424 handler for ``udp://``, ``tcp://`` or ``tls://HOST:PORT`` (``tls``
    verified against ``ca``): the settings have checked both (``audit_syslog``)."""
    from rfc5424logging import Rfc5424SysLogHandler

    parts = urlsplit(url)
    tls = parts.scheme == "tls"
    return Rfc5424SysLogHandler(  # type: ignore[no-any-return]
        address=(parts.hostname, parts.port),
        socktype=socket.SOCK_DGRAM if parts.scheme == "udp" else socket.SOCK_STREAM,
        facility=10,  # authpriv: security and authorisation messages
        appname="dicom-node", utc_timestamp=True,
        tls_enable=tls, tls_ca_bundle=str(ca) if ca else None, tls_verify=tls)


_OUTCOMES = {SUCCESS: "success", MINOR_FAILURE: "minor failure",
             SERIOUS_FAILURE: "serious failure", 12: "major failure"}


def summary(message: dict[str, Any]) -> tuple[str, str, str, str, str, str]:
    """``(time, event, outcome, who, what, detail)`` of one message, for a table."""
    event = message.get("EventIdentification", {})
    name = event.get("EventID", {}).get("originalText", "?")
    types = ", ".join(t.get("originalText", "") for t in event.get("EventTypeCode", []))
    who = "; ".join(
        " ".join(filter(None, [p.get("AlternativeUserID", "").removeprefix("AETITLES=")
                               or p.get("UserID", ""), p.get("NetworkAccessPointID")]))
        for p in message.get("ActiveParticipant", []))
    objects = []
    for found in message.get("ParticipantObjectIdentification", []):
        classes = found.get("ParticipantObjectDescription", {}).get("SOPClass", [])
        count = sum(c.get("NumberOfInstances", 0) for c in classes)
        objects.append(f"{found.get('ParticipantObjectID', '')}"
                       + (f" ({count} instance(s))" if classes else ""))
    what = "; ".join(objects)
    return (event.get("EventDateTime", ""), f"{name}: {types}" if types else name,
            _OUTCOMES.get(event.get("EventOutcomeIndicator"), "?"), who, what,
            event.get("EventOutcomeDescription", ""))


def read(folder: Path) -> Iterator[dict[str, Any]]:
    """Every message in ``folder``'s trail files (rotated ones too), oldest first."""

    def age(path: Path) -> tuple[str, int]:  # a process's oldest rotated file first
        stem, _, backup = path.name.partition(".jsonl")
        return stem, -int(backup.lstrip(".") or 0)

    messages = []
    for path in sorted(folder.glob("*.jsonl*"), key=age):
        with path.open(encoding="utf-8", errors="replace") as lines:
            for line in lines:
                try:
                    messages.append(json.loads(line))
                except ValueError:
                    continue  # a line cut by a crash
    messages.sort(key=lambda m: m.get("EventIdentification", {}).get("EventDateTime", ""))
    yield from messages

