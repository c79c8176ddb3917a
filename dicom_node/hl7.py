"""The study result as an HL7 v2.5.1 ORU^R01 message, and its delivery over MLLP.

:func:`build_oru` turns a closed :class:`~dicom_node.findings.StudyFindings`
into an ORU^R01 (HL7 v2.5.1 chapter 7, Observation Reporting) with hl7apy:
PID, ORC (RE), OBR for the AI chest radiograph analysis, one OBX per class
probability (NM, SNOMED CT), one OBX for the finding (CWE, with the abnormal
flag), the Study Instance UID and the algorithm (DICOM codes, as the IHE AI
Results profile and TID 4019 name them), and NTEs for the disclaimer, the
unvalidated-model warning and each problem. ER7, ``\\r`` between segments,
UTF-8 (MSH-18 ``UNICODE UTF-8``); every text is escaped per HL7 v2.5.1 2.7.4.

:func:`send_mllp` sends one message over one MLLP connection (HL7 v2.5.1
Appendix C, Minimal Lower Layer Protocol) and classifies the ACK (table 0008)
into a :class:`~dicom_node.deliver.Attempt`; it never raises.
"""

from __future__ import annotations

import logging
import re
import socket
import time
from collections.abc import Callable
from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal
from functools import partial
from typing import Any

import hl7  # type: ignore[import-untyped]
from hl7apy.base_datatypes import DTM, FT, ID, IS, NM, SI, ST  # type: ignore[import-untyped]
from hl7apy.consts import VALIDATION_LEVEL  # type: ignore[import-untyped]
from hl7apy.core import Component, Message  # type: ignore[import-untyped]

from dicom_node.db import DeliveryState
from dicom_node.deliver import Attempt
from dicom_node.findings import Identifiers, StudyFindings
from model.card import AI_RESULT_NOTICE, UNVALIDATED_WARNING
from model.classes import CLASSES, by_key

LOGGER = logging.getLogger(__name__)

VERSION = "2.5.1"
#: MSH-18, HL7 table 0211.
CHARACTER_SET = "UNICODE UTF-8"
ENCODING = "utf-8"

#: MLLP framing (HL7 v2.5.1 Appendix C.4.3).
START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c\r"
#: An ACK larger than this is not an ACK.
MAX_ACK_BYTES = 1 << 20
#: Longest peer text kept in an :class:`Attempt`'s detail.
MAX_DETAIL = 200

DISCLAIMER = AI_RESULT_NOTICE

#: (code, meaning, coding system); HL7 table 0396.
Code = tuple[str, str, str]
#: OBR-4: a local code for the service, with the SR's procedure (SCT) as alternate.
SERVICE: Code = ("CXR-AI", "AI analysis of chest radiograph", "L")
SERVICE_ALTERNATE: Code = ("399208008", "Plain chest X-ray", "SCT")
STUDY_INSTANCE_UID: Code = ("113014", "Study Instance UID", "DCM")
FINDING: Code = ("121071", "Finding", "DCM")
ALGORITHM_NAME: Code = ("111001", "Algorithm Name", "DCM")
ALGORITHM_VERSION: Code = ("111003", "Algorithm Version", "DCM")
#: OBX-6 of a probability: UCUM "1" (a ratio).
UNITY: Code = ("1", "", "UCUM")

#: ACK codes (table 0008): accepted; anything else listed is an error or a reject.
ACK_ACCEPTED = frozenset({"AA", "CA"})
ACK_REFUSED = frozenset({"AE", "AR", "CE", "CR"})

#: DICOM Patient's Sex -> HL7 Administrative Sex (table 0001).
_SEX = {"M": "M", "F": "F", "O": "O"}
#: DICOM PN component groups (PS3.5 6.2.1.2) -> XPN-8 Name Representation Code (table 4000).
_REPRESENTATION = ("A", "I", "P")
_MILLI = Decimal("0.001")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


# -- text: escaped the way HL7 asks -----------------------------------------------------------

class _Literal:
    """Escaping of a textual value that is data, never ER7 (HL7 v2.5.1 2.7.4).

    hl7apy escapes the delimiters but leaves text that already looks like an escape
    sequence (``\\F\\``) as it is; here every escape character is escaped first, so
    any text round-trips. Control characters would end a segment: a line break in
    FT becomes ``\\.br\\``, every other one a space.
    """

    line_break: str | None = None

    @property
    def classname(self) -> str:
        return type(self).__mro__[2].__name__

    def _escape_value(self, value: str, encoding_chars: dict[str, str]) -> str:
        escape = encoding_chars["ESCAPE"]
        value = value.replace(escape, f"{escape}E{escape}")
        for char, sequence in self._get_translations(encoding_chars):  # type: ignore[attr-defined]
            value = value.replace(char, sequence)
        if self.line_break is not None:
            line_break = f"{escape}{self.line_break}{escape}"
            value = _LINE_BREAK.sub(lambda _: line_break, value)
        return _CONTROL.sub(" ", value)


class _ST(_Literal, ST):  # type: ignore[misc]
    pass


class _ID(_Literal, ID):  # type: ignore[misc]
    pass


class _IS(_Literal, IS):  # type: ignore[misc]
    pass


class _FT(_Literal, FT):  # type: ignore[misc]
    line_break = ".br"


_TEXT = {"ST": _ST, "ID": _ID, "IS": _IS, "FT": _FT}


def _put(element: Any, path: str, value: str | Any | None) -> None:
    """Set the leaf at ``path`` (``"pid_5.xpn_1.fn_1"``); a string is text to escape.

    Nothing is set for None or "", so an absent value leaves the field empty.
    """
    if value is None or value == "":
        return
    for name in path.split("."):
        element = getattr(element, name)
    if isinstance(value, str):
        text_type = _TEXT.get(element.datatype)
        if text_type is None:
            raise TypeError(f"{path}: datatype {element.datatype} is not textual")
        value = text_type(value)
    element.value = value


def _put_code(element: Any, prefix: str, code: Code, alternate: Code | None = None) -> None:
    """A CE or CWE: identifier, text, coding system (and the alternate triplet)."""
    for index, part in enumerate(code + (alternate or ("", "", "")), start=1):
        _put(element, f"{prefix}_{index}", part)


def _timestamp(moment: datetime) -> Any:
    """A DTM to the second, with the UTC offset when the time is aware."""
    offset = moment.strftime("%z") if moment.tzinfo is not None else ""
    return DTM(moment, "%Y%m%d%H%M%S", offset=offset[:5])


# -- the message ------------------------------------------------------------------------------

def result_status(findings: StudyFindings) -> str:
    """OBR-25 and OBX-11 (HL7 table 0123/0085): ``P`` (preliminary) for an unvalidated
    model's result, so that no RIS files it as final; else ``C`` for a corrected
    result (a late image), ``F`` for a final one."""
    if not findings.model_validated:
        return "P"
    return "C" if findings.corrected else "F"


def build_oru(findings: StudyFindings, control_id: str, *, sending_application: str,
              sending_facility: str, receiving_application: str, receiving_facility: str,
              message_time: datetime) -> bytes:
    """The study result as an ORU^R01 (HL7 v2.5.1 7.3.1), ER7 encoded in UTF-8.

    A missing patient ID, accession number or order number leaves its field empty;
    the receiving system decides what to do with such a result.

    Parameters
    ----------
    findings
        The closed study result with the identifiers of its images.
    control_id
        MSH-10, the same on every retry (the delivery's message id).
    sending_application, sending_facility
        MSH-3 and MSH-4: us.
    receiving_application, receiving_facility
        MSH-5 and MSH-6: the RIS.
    message_time
        MSH-7 (timezone-aware).

    Raises
    ------
    ValueError
        ``control_id`` is empty or longer than 20 characters (MSH-10), a probability
        is not in [0, 1] or names an unknown class.
    """
    if not control_id or len(control_id) > 20:
        raise ValueError(f"control_id: 1 to 20 characters, got {len(control_id)}")
    message = Message("ORU_R01", version=VERSION, validation_level=VALIDATION_LEVEL.TOLERANT)
    _msh(message.msh, control_id, sending_application, sending_facility,
         receiving_application, receiving_facility, message_time)
    result = message.add_group("ORU_R01_PATIENT_RESULT")
    _pid(result.add_group("ORU_R01_PATIENT").add_segment("PID"), findings.identifiers)
    order = result.add_group("ORU_R01_ORDER_OBSERVATION")
    _orc(order.add_segment("ORC"), findings.identifiers)
    _obr(order.add_segment("OBR"), findings)
    for set_id, comment in enumerate(_comments(findings), start=1):
        nte = order.add_segment("NTE")
        _put(nte, "nte_1", SI(set_id))
        _put(nte, "nte_3", comment)
    for set_id, fill in enumerate(_observations(findings), start=1):
        obx = order.add_group("ORU_R01_OBSERVATION").add_segment("OBX")
        _put(obx, "obx_1", SI(set_id))
        fill(obx)
        _put(obx, "obx_11", result_status(findings))
    er7: str = message.to_er7()
    return er7.encode(ENCODING)


def _msh(msh: Any, control_id: str, sending_application: str, sending_facility: str,
         receiving_application: str, receiving_facility: str, message_time: datetime) -> None:
    _put(msh, "msh_3.hd_1", sending_application)
    _put(msh, "msh_4.hd_1", sending_facility)
    _put(msh, "msh_5.hd_1", receiving_application)
    _put(msh, "msh_6.hd_1", receiving_facility)
    _put(msh, "msh_7.ts_1", _timestamp(message_time))
    _put(msh, "msh_9.msg_1", "ORU")
    _put(msh, "msh_9.msg_2", "R01")
    _put(msh, "msh_9.msg_3", "ORU_R01")
    _put(msh, "msh_10", control_id)
    _put(msh, "msh_11.pt_1", "P")
    _put(msh, "msh_18", CHARACTER_SET)


def _pid(pid: Any, ids: Identifiers) -> None:
    _put(pid, "pid_1", SI(1))
    if ids.patient_id:
        _put(pid, "pid_3.cx_1", ids.patient_id)
        _put(pid, "pid_3.cx_4.hd_1", ids.issuer_of_patient_id)
        _put(pid, "pid_3.cx_5", "PI")
    if ids.patient_name:
        _patient_name(pid, ids.patient_name)
    if ids.patient_birth_date:
        try:
            born = datetime.strptime(ids.patient_birth_date, "%Y%m%d")
        except ValueError:
            LOGGER.info("birth date not YYYYMMDD: PID-7 left empty")
        else:
            _put(pid, "pid_7.ts_1", DTM(born, "%Y%m%d"))
    _put(pid, "pid_8", _SEX.get((ids.patient_sex or "").upper(), "U" if ids.patient_sex else None))


def _patient_name(pid: Any, name: str) -> None:
    """PID-5 from a DICOM PN: one XPN per component group (alphabetic, ideographic,
    phonetic), family^given^middle^prefix^suffix reordered to XPN's
    family^given^further given^suffix^prefix."""
    groups = name.split("=")
    several = len([g for g in groups if g]) > 1
    for group, representation in zip(groups, _REPRESENTATION, strict=False):
        if not group:
            continue
        family, given, middle, prefix, suffix = (group.split("^") + [""] * 5)[:5]
        xpn = pid.add_field("pid_5")
        _put(xpn, "xpn_1.fn_1", family)
        _put(xpn, "xpn_2", given)
        _put(xpn, "xpn_3", middle)
        _put(xpn, "xpn_4", suffix)
        _put(xpn, "xpn_5", prefix)
        if several:
            _put(xpn, "xpn_8", representation)


def _orc(orc: Any, ids: Identifiers) -> None:
    _put(orc, "orc_1", "RE")
    _put(orc, "orc_2.ei_1", ids.placer_order_number)
    _put(orc, "orc_3.ei_1", ids.filler_order_number)


def _obr(obr: Any, findings: StudyFindings) -> None:
    ids = findings.identifiers
    _put(obr, "obr_1", SI(1))
    _put(obr, "obr_2.ei_1", ids.placer_order_number)
    _put(obr, "obr_3.ei_1", ids.filler_order_number)
    _put_code(obr.obr_4, "ce", SERVICE, SERVICE_ALTERNATE)
    _put(obr, "obr_7.ts_1", _timestamp(findings.closed_at))
    # IHE Radiology (Scheduled Workflow): OBR-18 Accession Number, OBR-19 Requested
    # Procedure ID.
    _put(obr, "obr_18", ids.accession_number)
    _put(obr, "obr_19", ids.requested_procedure_id)
    _put(obr, "obr_22.ts_1", _timestamp(findings.closed_at))
    _put(obr, "obr_25", result_status(findings))
    if findings.flagged:
        _put(obr, "obr_5", "S")
        _put(obr, "obr_27.tq_6", "S")


def _comments(findings: StudyFindings) -> list[str]:
    comments = [DISCLAIMER]
    if not findings.model_validated:
        comments.append(UNVALIDATED_WARNING)
    comments.extend(findings.problems)
    return comments


def _observations(findings: StudyFindings) -> list[Callable[[Any], None]]:
    """One filler per OBX, in order: the study, the finding, the probabilities, the model."""
    fillers: list[Callable[[Any], None]] = [
        partial(_obx_text, code=STUDY_INSTANCE_UID, text=findings.identifiers.study_instance_uid)]
    if findings.label is not None:
        finding = by_key(findings.label)
        fillers.append(partial(_obx_finding, code=(finding.snomed_code, finding.snomed_meaning,
                                                   "SCT"),
                               flag={True: "A", False: "N", None: None}[findings.flagged]))
    unknown = set(findings.probabilities) - {c.key for c in CLASSES}
    if unknown:
        raise ValueError(f"probabilities: unknown classes {sorted(unknown)}")
    for cls in CLASSES:
        if cls.key not in findings.probabilities:
            continue
        probability = findings.probabilities[cls.key]
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"probabilities[{cls.key!r}]: {probability} not in [0, 1]")
        fillers.append(partial(_obx_probability, code=(cls.snomed_code, cls.snomed_meaning, "SCT"),
                               probability=probability,
                               flag="A" if cls.key in findings.flags else None))
    name, _, version = findings.model.rpartition(" ")
    if not name:
        name, version = version, ""
    fillers.append(partial(_obx_text, code=ALGORITHM_NAME, text=name))
    if version:
        fillers.append(partial(_obx_text, code=ALGORITHM_VERSION, text=version))
    return fillers


def _value_type(obx: Any, value_type: str) -> None:
    """OBX-2, and OBX-5's (base) datatype with it (hl7apy does not derive one from the
    other)."""
    _put(obx, "obx_2", value_type)
    obx.obx_5.datatype = value_type


def _obx_text(obx: Any, code: Code, text: str) -> None:
    _value_type(obx, "ST")
    _put_code(obx.obx_3, "ce", code)
    _put(obx, "obx_5", text)


def _obx_finding(obx: Any, code: Code, flag: str | None) -> None:
    _put(obx, "obx_2", "CWE")
    _put_code(obx.obx_3, "ce", FINDING)
    # hl7apy writes nothing for a varies field retyped to CWE: its components are
    # written as the parser makes them, VARIES_1, VARIES_2, ...
    value = obx.add_field("OBX_5")
    for index, part in enumerate(code, start=1):
        component = Component(f"VARIES_{index}", datatype="ST", version=VERSION)
        component.value = _ST(part)
        value.add(component)
    _put(obx, "obx_8", flag)


def _obx_probability(obx: Any, code: Code, probability: float, flag: str | None) -> None:
    _value_type(obx, "NM")
    _put_code(obx.obx_3, "ce", code)
    # Rounded from the shortest decimal form, half up: 0.0375 -> 0.038.
    _put(obx, "obx_5", NM(Decimal(str(float(probability))).quantize(_MILLI, ROUND_HALF_UP)))
    _put_code(obx.obx_6, "ce", UNITY)
    _put(obx, "obx_8", flag)


# -- MLLP -------------------------------------------------------------------------------------

class _NoAck(Exception):
    """The exchange ended without an ACK; the message says why (no patient data)."""


def send_mllp(host: str, port: int, message: bytes, timeout: float) -> Attempt:
    """Send one ER7 message over one MLLP connection and classify the ACK.

    AA or CA: done. AE, AR, CE, CR: try again later, with the peer's text. An ACK
    for another control ID, no connection, a connection closed without an ACK, no
    ACK within ``timeout`` seconds (for connecting and for the whole exchange) or a
    reply that is not an ACK: try again later. Never raises.

    Parameters
    ----------
    host, port
        The RIS's MLLP listener.
    message
        The ORU as built (:func:`build_oru`), without MLLP framing.
    timeout
        Seconds for connecting and for the whole exchange.
    """
    try:
        control_id = _control_id(message)
        attempt = classify_ack(_exchange(host, port, message, timeout), control_id)
    except _NoAck as exc:
        attempt = Attempt(DeliveryState.PENDING, None, str(exc))
    except Exception as exc:  # never raise into the dispatcher
        attempt = Attempt(DeliveryState.PENDING, None, f"MLLP error: {type(exc).__name__}")
    # The detail may quote the peer's error text, which may name the patient: not logged.
    LOGGER.info("MLLP %s:%d: %s", host, port, attempt.state.value)
    return attempt


def _exchange(host: str, port: int, message: bytes, timeout: float) -> bytes:
    """Frame and send ``message``, return the reply's payload (framing removed)."""
    deadline = time.monotonic() + timeout
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except TimeoutError:
        raise _NoAck(f"cannot connect: no answer within {timeout:g} s") from None
    except OSError as exc:
        raise _NoAck(f"cannot connect: {type(exc).__name__}") from None
    with sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buffer = bytearray()
        try:
            sock.sendall(START_BLOCK + message + END_BLOCK)
            while END_BLOCK not in buffer:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                sock.settimeout(remaining)
                chunk = sock.recv(65536)
                if not chunk:
                    raise _NoAck("connection closed without an ACK")
                buffer += chunk
                if len(buffer) > MAX_ACK_BYTES:
                    raise _NoAck(f"reply larger than {MAX_ACK_BYTES} bytes")
        except TimeoutError:
            raise _NoAck(f"no ACK within {timeout:g} s") from None
        except OSError as exc:
            raise _NoAck(f"connection lost: {type(exc).__name__}") from None
    start = buffer.find(START_BLOCK)
    if start < 0:
        raise _NoAck("reply is not MLLP framed")
    return bytes(buffer[start + 1:buffer.find(END_BLOCK, start)])


def _control_id(message: bytes) -> str:
    """MSH-10 of our own message."""
    return str(hl7.parse(message.decode(ENCODING)).segment("MSH")(10))


def classify_ack(reply: bytes, control_id: str) -> Attempt:
    """What an ACK (MLLP payload) to the message ``control_id`` means for the delivery."""
    text = _LINE_BREAK.sub("\r", reply.decode(ENCODING, errors="replace")).strip("\r")
    try:
        ack = hl7.parse(text)
        msa = ack.segment("MSA")
        code, acked = _field(msa, 1), _field(msa, 2)
    except Exception:
        return Attempt(DeliveryState.PENDING, None, "reply is not an HL7 ACK")
    if acked != control_id:
        return Attempt(DeliveryState.PENDING, None, "ACK for another message")
    if code in ACK_ACCEPTED:
        return Attempt(DeliveryState.DONE, None, f"ACK {code}")
    if code in ACK_REFUSED:
        reason = _error_text(ack, msa)[:MAX_DETAIL]
        return Attempt(DeliveryState.PENDING, None, f"ACK {code}: {reason}" if reason
                       else f"ACK {code}")
    return Attempt(DeliveryState.PENDING, None, "ACK with an unknown code")


def _field(segment: Any, index: int) -> str:
    try:
        return str(segment(index))
    except (IndexError, KeyError):
        return ""


def _error_text(ack: Any, msa: Any) -> str:
    """MSA-3, else the ERR segments' texts (ERR-8 user message, ERR-3 error code text,
    ERR-1 of HL7 2.4 and before), unescaped."""
    texts = [_field(msa, 3)]
    for err in (s for s in ack if str(s(0)) == "ERR"):
        texts.append(_field(err, 8) or _component(err, 3, 2) or _component(err, 1, 5))
    return "; ".join(ack.unescape(t) for t in texts if t)


def _component(segment: Any, field: int, component: int) -> str:
    try:
        return str(segment(field)(1)(component))
    except (IndexError, KeyError, TypeError):
        return ""
