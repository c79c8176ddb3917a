"""The study result as a FHIR R4 transaction Bundle: a DiagnosticReport and its Observations.

Content (FHIR R4 4.0.1, DiagnosticReport and Observation of the Diagnostics module):

* **DiagnosticReport** -- status ``final`` (``amended`` for a corrected result,
  ``preliminary`` for an unvalidated model's,
  :attr:`~dicom_node.findings.StudyFindings.corrected`); category v2-0074 ``RAD``;
  code SCT 399208008 "Plain X-ray of chest", the procedure our SR reports (a LOINC
  "XR Chest N Views" code would claim a number of views, and a study may hold one
  frontal image or several); identifiers: the report's own (``urn:ietf:rfc:3986``,
  a ``urn:uuid`` derived from the Study Instance UID) and the Study Instance UID
  (``urn:dicom:uid``, ``urn:oid:<uid>``); subject a logical reference to the Patient
  by identifier (patient ID, ``patient_system``); basedOn a logical reference to the
  ServiceRequest by the accession number (type v2-0203 ``ACSN``,
  ``accession_system``); effectiveDateTime and issued the time the result closed;
  conclusion the text a reader must see first -- ``AI RESULT — NOT FOR DIAGNOSTIC
  USE``, :data:`model.card.UNVALIDATED_WARNING` for an unvalidated model, the
  finding, the probabilities, the model, the images left out -- and conclusionCode
  the finding's SNOMED CT code.
* **Observation per class probability** -- code the class's SNOMED CT code
  (:mod:`model.classes`), valueQuantity the probability as a UCUM ``1`` ratio.
* **Observation of the finding** -- code DCM 121071 "Finding" (as in the SR),
  valueCodeableConcept the predicted class's SNOMED CT code, interpretation v3
  ObservationInterpretation ``A`` when a threshold was reached, ``N`` when none was,
  none when the model has no operating points. Every Observation names the model
  (``device`` display) and carries the disclaimer in ``note``.

A patient ID or accession number the image does not carry leaves the element out
(never an empty identifier). Idempotence and corrections: every entry is a
conditional update (``PUT DiagnosticReport?identifier=...``: create when absent,
replace when present), and the identifiers and ``urn:uuid`` full URLs are derived
from the Study Instance UID alone. A retry after a lost response creates nothing
twice, and a corrected version of the study's result (a late image) replaces the
report and its Observations, status ``amended``, instead of standing beside them.
The Bundle's own identifier is the delivery's message id, the same on every retry.

R4 and R4B: fhir.resources 8 ships R5 (default) and R4B (4.3.0), no R4 (4.0.1).
We build with ``fhir.resources.R4B`` because R4B changed only the medication
definition, evidence and subscription resources (hl7.org/fhir/R4B/r4b-explanation.html,
diff.html). Checked element by element against fhir.resources 6.4.0, the last
release generated from R4 4.0.1: Bundle (and entry, request, response), Identifier,
Reference, CodeableConcept, Coding, Quantity, Annotation, Meta and Period have the
same elements, order, types, required elements and code values; DiagnosticReport and
Observation differ only in ``subject``, whose allowed targets R4B widened
(Organization, Procedure, Practitioner, Medication, Substance) -- we reference a
Patient, valid in both. Extension gained value types we do not use. So what is built
here is valid R4 on the wire. Constructing the models is the validation
(cardinality, data types, choice types); it does not check code values or reference
targets, which the constants here fix.
"""

from __future__ import annotations

import json
import logging
import uuid
from decimal import Decimal
from http import HTTPStatus
from typing import Any
from urllib.parse import urlencode

import requests
from fhir.resources.R4B.annotation import Annotation
from fhir.resources.R4B.bundle import Bundle, BundleEntry, BundleEntryRequest
from fhir.resources.R4B.codeableconcept import CodeableConcept
from fhir.resources.R4B.coding import Coding
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.identifier import Identifier
from fhir.resources.R4B.observation import Observation
from fhir.resources.R4B.quantity import Quantity
from fhir.resources.R4B.reference import Reference

from dicom_node.db import DeliveryState
from dicom_node.deliver import Attempt
from dicom_node.destination import http_phrase, url_refusal
from dicom_node.findings import StudyFindings
from model.card import AI_RESULT_NOTICE, UNVALIDATED_WARNING
from model.classes import CLASS_KEYS, CLASSES, by_key

LOGGER = logging.getLogger(__name__)

SNOMED = "http://snomed.info/sct"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
UCUM = "http://unitsofmeasure.org"
V2_0074 = "http://terminology.hl7.org/CodeSystem/v2-0074"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
V3_INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
#: RFC 3986 URIs as identifiers (here ``urn:uuid:...``), FHIR's "identifier is a URI".
URI_SYSTEM = "urn:ietf:rfc:3986"
DICOM_UID_SYSTEM = "urn:dicom:uid"
FHIR_JSON = "application/fhir+json"

#: First line of every conclusion and note: the AI output is not a diagnosis.
DISCLAIMER = AI_RESULT_NOTICE
#: Namespace of the UUIDs derived from a message id (uuid5): fixed for this node
#: software, so one message id always gives the same identifiers.
_NAMESPACE = uuid.UUID("a9b4562f-7833-41f2-b931-671407919495")
#: Longest OperationOutcome text kept in an Attempt's detail.
_DETAIL_CHARS = 200
#: Most of an answer's body read: enough for an OperationOutcome, bounded for a
#: server that answers with megabytes.
_BODY_LIMIT = 64 * 1024


# --- the Bundle -------------------------------------------------------------------------


def build_bundle(findings: StudyFindings, *, message_id: str, patient_system: str | None,
                 accession_system: str | None) -> bytes:
    """The FHIR R4 transaction Bundle of ``findings``, JSON in UTF-8.

    Parameters
    ----------
    findings
        One closed version of a study's answer; ``closed_at`` must be timezone-aware.
    message_id
        The delivery's message id, the same on every retry: the Bundle's
        identifier. The report's identifier (and those of its Observations) are
        UUIDs derived from the Study Instance UID, the same for every version.
    patient_system
        The RIS's system URI for patient IDs (Identifier.system); None leaves the
        system out, not the identifier.
    accession_system
        The system URI of the accession numbers (the order filler's); None as above.

    Raises
    ------
    ValueError
        ``message_id`` empty, ``closed_at`` naive, a class key not in
        :mod:`model.classes`, or content the models refuse (pydantic's
        ``ValidationError`` is a ``ValueError``).
    """
    _check(findings, message_id)
    report_uuid = uuid.uuid5(_NAMESPACE, f"study/{findings.identifiers.study_instance_uid}")
    # An unvalidated model's result is preliminary: no system files it as final.
    status = ("preliminary" if not findings.model_validated
              else "amended" if findings.corrected else "final")
    subject = _patient(findings, patient_system)
    notes = [Annotation(text=line) for line in _warnings(findings)]
    entries: list[tuple[uuid.UUID, DiagnosticReport | Observation]] = []
    for cls in CLASSES:
        if cls.key in findings.probabilities:
            entry_uuid = uuid.uuid5(report_uuid, f"probability/{cls.key}")
            entries.append((entry_uuid, _probability(findings, cls.key, entry_uuid, status,
                                                     subject, notes)))
    if findings.label is not None:
        entry_uuid = uuid.uuid5(report_uuid, "finding")
        entries.append((entry_uuid, _finding(findings, findings.label, entry_uuid, status,
                                             subject, notes)))
    report = _report(findings, report_uuid, status, subject, accession_system,
                     [f"urn:uuid:{u}" for u, _ in entries])
    bundle = Bundle(type="transaction", identifier=Identifier(
        system=URI_SYSTEM, value=f"urn:uuid:{uuid.uuid5(_NAMESPACE, message_id)}"), entry=[
        _entry(u, resource) for u, resource in [(report_uuid, report), *entries]])
    return bundle.model_dump_json().encode("utf-8")


def _check(findings: StudyFindings, message_id: str) -> None:
    """Refuse what the models would not catch: no message id, a naive time, unknown classes."""
    if not message_id.strip():
        raise ValueError("message_id: empty")
    if findings.closed_at.tzinfo is None:
        raise ValueError("findings.closed_at: naive datetime; FHIR instants need a zone")
    named = {*findings.probabilities, *findings.flags}
    if findings.label is not None:
        named.add(findings.label)
    unknown = sorted(named - set(CLASS_KEYS))
    if unknown:  # another model's classes: an error, not a silent gap
        raise ValueError(f"findings: unknown class keys {unknown}; expected {CLASS_KEYS}")


def _entry(entry_uuid: uuid.UUID, resource: DiagnosticReport | Observation) -> BundleEntry:
    """A conditional update: created when no resource has this identifier, else replaced."""
    url = f"urn:uuid:{entry_uuid}"
    return BundleEntry(
        fullUrl=url, resource=resource,
        request=BundleEntryRequest(
            method="PUT", url=f"{resource.get_resource_type()}?"
            + urlencode({"identifier": f"{URI_SYSTEM}|{url}"})))


def _own_identifier(entry_uuid: uuid.UUID) -> Identifier:
    return Identifier(use="official", system=URI_SYSTEM, value=f"urn:uuid:{entry_uuid}")


def _report(findings: StudyFindings, report_uuid: uuid.UUID, status: str,
            subject: Reference | None, accession_system: str | None,
            results: list[str]) -> DiagnosticReport:
    ids = findings.identifiers
    accession = ids.accession_number
    label = by_key(findings.label) if findings.label is not None else None
    return DiagnosticReport(
        identifier=[
            _own_identifier(report_uuid),
            Identifier(system=DICOM_UID_SYSTEM, value=f"urn:oid:{ids.study_instance_uid}"),
        ],
        basedOn=None if accession is None else [Reference(
            type="ServiceRequest",
            identifier=Identifier(
                type=CodeableConcept(coding=[Coding(system=V2_0203, code="ACSN",
                                                    display="Accession ID")]),
                system=accession_system, value=accession))],
        status=status,
        category=[CodeableConcept(coding=[Coding(system=V2_0074, code="RAD",
                                                 display="Radiology")])],
        # SCT, as the SR's procedure (TID 1500): one code whatever the number of views.
        code=CodeableConcept(coding=[Coding(system=SNOMED, code="399208008",
                                            display="Plain X-ray of chest")],
                             text="Chest radiograph, AI classification"),
        subject=subject,
        effectiveDateTime=findings.closed_at,
        issued=findings.closed_at,
        result=[Reference(reference=url) for url in results] or None,
        conclusion=_conclusion(findings),
        conclusionCode=None if label is None else [_snomed(label.key)],
    )


def _patient(findings: StudyFindings, patient_system: str | None) -> Reference | None:
    """The Patient by logical identifier, nothing that names the patient; None without an ID."""
    ids = findings.identifiers
    if ids.patient_id is None:
        return None
    assigner = (None if ids.issuer_of_patient_id is None
                else Reference(display=ids.issuer_of_patient_id))
    return Reference(type="Patient", identifier=Identifier(
        system=patient_system, value=ids.patient_id, assigner=assigner))


def _observation(findings: StudyFindings, entry_uuid: uuid.UUID, entry_status: str,
                 subject: Reference | None, notes: list[Annotation], **content: Any
                 ) -> Observation:
    """An Observation with what every one of ours shares: its identifier, category,
    subject, times, the model and the warnings."""
    return Observation(
        identifier=[_own_identifier(entry_uuid)],
        status=entry_status,
        category=[CodeableConcept(coding=[Coding(system=OBSERVATION_CATEGORY, code="imaging",
                                                 display="Imaging")])],
        subject=subject,
        effectiveDateTime=findings.closed_at,
        issued=findings.closed_at,
        device=Reference(display=f"AI model {findings.model}") if findings.model else None,
        note=notes or None,
        **content)


def _probability(findings: StudyFindings, key: str, entry_uuid: uuid.UUID,
                 entry_status: str, subject: Reference | None, notes: list[Annotation]
                 ) -> Observation:
    cls = by_key(key)
    return _observation(
        findings, entry_uuid, entry_status, subject, notes,
        code=CodeableConcept(coding=[Coding(system=SNOMED, code=cls.snomed_code,
                                            display=cls.snomed_meaning)],
                             text=f"{cls.display_name} probability (AI)"),
        # The network's output, a ratio (UCUM "1") as in the SR's DCM 122157 items.
        valueQuantity=Quantity(value=Decimal(str(round(findings.probabilities[key], 4))),
                               unit="1", system=UCUM, code="1"),
    )


#: v3 ObservationInterpretation of the finding: whether a threshold was reached.
_INTERPRETATION = {True: ("A", "Abnormal"), False: ("N", "Normal")}


def _finding(findings: StudyFindings, label: str, entry_uuid: uuid.UUID, entry_status: str,
             subject: Reference | None, notes: list[Annotation]) -> Observation:
    interpretation = None if findings.flagged is None else _INTERPRETATION[findings.flagged]
    return _observation(
        findings, entry_uuid, entry_status, subject, notes,
        code=CodeableConcept(coding=[Coding(system=DCM, code="121071", display="Finding")],
                             text="AI finding"),
        valueCodeableConcept=_snomed(label),
        interpretation=None if interpretation is None else [CodeableConcept(coding=[
            Coding(system=V3_INTERPRETATION, code=interpretation[0],
                   display=interpretation[1])])],
    )


def _snomed(key: str) -> CodeableConcept:
    cls = by_key(key)
    return CodeableConcept(coding=[Coding(system=SNOMED, code=cls.snomed_code,
                                          display=cls.snomed_meaning)],
                           text=cls.display_name)


def _warnings(findings: StudyFindings) -> list[str]:
    """What a reader must see before the result: the disclaimer, the unvalidated model."""
    lines = [f"{DISCLAIMER}: decision support to be read by a radiologist, not a diagnosis."]
    if not findings.model_validated:
        lines.append(UNVALIDATED_WARNING)
    return lines


def _conclusion(findings: StudyFindings) -> str:
    lines = _warnings(findings)
    if findings.corrected:
        lines.append(f"Corrected result (version {findings.version}): replaces the "
                     "earlier report of this study.")
    if findings.label is None:
        lines.append("Finding: none (no image was classified).")
    else:
        if findings.flagged is None:
            flag = "the model has no operating points: not flagged"
        elif findings.flagged:
            flag = "threshold reached: " + ", ".join(by_key(k).display_name
                                                     for k in findings.flags)
        else:
            flag = "no threshold reached"
        lines.append(f"Finding: {by_key(findings.label).display_name} ({flag}).")
    if findings.probabilities:
        lines.append("Probabilities: " + ", ".join(
            f"{cls.display_name} {findings.probabilities[cls.key]:.3f}"
            for cls in CLASSES if cls.key in findings.probabilities) + ".")
    if findings.model:
        lines.append(f"Model: {findings.model}.")
    if findings.problems:
        lines.append("Images left out: " + "; ".join(findings.problems) + ".")
    return "\n".join(lines)


# --- sending ----------------------------------------------------------------------------


def send_fhir(base_url: str, body: bytes, token: str | None, timeout: float) -> Attempt:
    """POST a transaction Bundle to the FHIR server's base URL; never raises.

    ========================================  ============================================
    answer                                    attempt
    ========================================  ============================================
    2xx                                       done (status: the HTTP code)
    408, 429, 5xx, no connection, timeout     pending: try again later
    other 4xx, 3xx (redirects not followed)   dead
    ========================================  ============================================

    The detail names the HTTP code and, when the server sent an OperationOutcome, its
    issues' text (at most 200 characters); never the body otherwise, the token or
    anything of the Bundle.

    Parameters
    ----------
    base_url
        The server's base URL (``https://ris.example/fhir``); plain ``http`` only to
        a loopback host (127.0.0.1, localhost, ::1): anything else is dead unsent.
    body
        The Bundle, as :func:`build_bundle` made it.
    token
        Bearer token for the ``Authorization`` header, or None.
    timeout
        Connect timeout, and longest wait for each read of the answer, seconds.
    """
    refusal = url_refusal(base_url, "FHIR base URL")
    if refusal is not None:
        return Attempt(DeliveryState.DEAD, None, refusal)
    headers = {"Content-Type": f"{FHIR_JSON}; charset=utf-8", "Accept": FHIR_JSON}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    try:
        # No redirects: a POST redirected is a GET elsewhere, and the token would follow.
        with requests.post(base_url, data=body, headers=headers, timeout=timeout,
                           allow_redirects=False, stream=True) as response:
            answer = _read_capped(response)
            code, location = response.status_code, response.headers.get("Location")
    except requests.Timeout:
        return Attempt(DeliveryState.PENDING, None, f"no answer within {timeout:g} s")
    except requests.ConnectionError as exc:
        return Attempt(DeliveryState.PENDING, None, f"cannot reach: {_cause(exc)}")
    except (requests.exceptions.InvalidURL, requests.exceptions.InvalidSchema,
            requests.exceptions.MissingSchema, requests.exceptions.InvalidHeader) as exc:
        return Attempt(DeliveryState.DEAD, None, f"request unusable: {type(exc).__name__}")
    except requests.RequestException as exc:
        # A broken answer (chunked encoding, decoding): the next try may get a whole one.
        return Attempt(DeliveryState.PENDING, None, f"send failed: {type(exc).__name__}")
    except Exception as exc:
        LOGGER.exception("FHIR send failed unexpectedly")
        return Attempt(DeliveryState.DEAD, None, f"send failed: {type(exc).__name__}")
    LOGGER.debug("FHIR transaction answered HTTP %d", code)
    return _judge(code, answer, location)


def _judge(code: int, answer: bytes, location: str | None) -> Attempt:
    """The Attempt an HTTP answer comes to."""
    http = f"HTTP {code} {http_phrase(code)}".rstrip()
    if 200 <= code < 300:
        where = location or _first_location(answer)
        return Attempt(DeliveryState.DONE, code,
                       _truncate(f"{http}: {where}") if where else http)
    outcome = _operation_outcome(answer)
    detail = f"{http}: {outcome}" if outcome else http
    if code in (HTTPStatus.REQUEST_TIMEOUT, HTTPStatus.TOO_MANY_REQUESTS) or code >= 500:
        return Attempt(DeliveryState.PENDING, code, detail)
    if 300 <= code < 400:
        return Attempt(DeliveryState.DEAD, code,
                       f"{http}: redirect not followed; configure the server's final URL")
    return Attempt(DeliveryState.DEAD, code, detail)


def _read_capped(response: requests.Response) -> bytes:
    """At most :data:`_BODY_LIMIT` bytes of the answer."""
    data = bytearray()
    for chunk in response.iter_content(chunk_size=16 * 1024):
        data += chunk
        if len(data) >= _BODY_LIMIT:
            break
    return bytes(data[:_BODY_LIMIT])


def _operation_outcome(answer: bytes) -> str:
    """The issues of an OperationOutcome answer as one line (at most 200 characters);
    empty for anything else."""
    try:
        outcome = json.loads(answer)
        if not isinstance(outcome, dict) or outcome.get("resourceType") != "OperationOutcome":
            return ""
        texts = []
        for issue in outcome.get("issue") or []:
            details = issue.get("details") or {}
            text = issue.get("diagnostics") or details.get("text") or issue.get("code")
            if text:
                texts.append(" ".join(str(text).split()))
        return _truncate("; ".join(texts))
    except Exception:
        return ""


def _first_location(answer: bytes) -> str | None:
    """``entry[0].response.location`` of a transaction-response Bundle (the report's)."""
    try:
        location = json.loads(answer)["entry"][0]["response"]["location"]
        return str(location) if location else None
    except Exception:
        return None


def _cause(exc: BaseException) -> str:
    """The operating system's reason under a connection error, else the error's name."""
    seen: list[BaseException] = []
    todo: list[Any] = [exc]
    while todo:
        current = todo.pop()
        if not isinstance(current, BaseException) or current in seen:
            continue
        seen.append(current)
        if isinstance(current, OSError) and current.strerror:
            return current.strerror
        todo.extend([*current.args, current.__cause__, current.__context__,
                     getattr(current, "reason", None)])
    return type(exc).__name__


def _truncate(text: str) -> str:
    return text if len(text) <= _DETAIL_CHARS else text[:_DETAIL_CHARS - 1] + "…"
