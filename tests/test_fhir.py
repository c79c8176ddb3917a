"""The FHIR R4 transaction Bundle (DiagnosticReport + Observations) and its sending."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from urllib.parse import parse_qs

import pytest
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.observation import Observation

from dicom_node.db import DeliveryState
from dicom_node.fhir import build_bundle, send_fhir
from dicom_node.findings import Identifiers, StudyFindings
from dicom_node.loopback import free_port
from model.card import UNVALIDATED_WARNING
from model.classes import CLASSES, by_key

from helpers.fhir_server import (
    ERROR_DIAGNOSTICS,
    INVALID_DIAGNOSTICS,
    LOCATION,
    FhirServer,
    Mode,
)

SNOMED = "http://snomed.info/sct"
PATIENT_SYSTEM = "urn:oid:1.2.826.0.1.3680043.2.1125.1"
ACCESSION_SYSTEM = "urn:oid:1.2.826.0.1.3680043.2.1125.2"
MESSAGE_ID = "0123456789abcdef0123"
TOKEN = "s3cret-token-value"
CLOSED = datetime(2024, 5, 1, 12, 30, 5, tzinfo=timezone(timedelta(hours=2)))
DONE, PENDING, DEAD = DeliveryState.DONE, DeliveryState.PENDING, DeliveryState.DEAD


def findings(**changes: Any) -> StudyFindings:
    base = StudyFindings(
        result_id=7, version=1,
        identifiers=Identifiers(study_instance_uid="1.2.826.0.1.3680043.2.1125.99",
                                patient_id="PAT-001", issuer_of_patient_id="HOSP",
                                patient_name="Doe^Jane", accession_number="ACC-42"),
        label="covid", probabilities={"covid": 0.83125, "normal": 0.1, "pneumonia": 0.06875},
        flags=["covid"], flagged=True, model="concatenated 1.2.0", model_validated=True,
        problems=[], closed_at=CLOSED)
    return replace(base, **changes)


def ids(**changes: Any) -> Identifiers:
    return replace(findings().identifiers, **changes)


def build(found: StudyFindings | None = None, **kwargs: Any) -> bytes:
    arguments: dict[str, Any] = {"message_id": MESSAGE_ID, "patient_system": PATIENT_SYSTEM,
                                 "accession_system": ACCESSION_SYSTEM, **kwargs}
    return build_bundle(found or findings(), **arguments)


def parse(body: bytes) -> tuple[Bundle, DiagnosticReport, list[Observation]]:
    """The Bundle read back with the models (which validates it), its report and
    Observations."""
    bundle = Bundle.model_validate_json(body)
    resources = [entry.resource for entry in bundle.entry or []]
    reports = [r for r in resources if isinstance(r, DiagnosticReport)]
    observations = [r for r in resources if isinstance(r, Observation)]
    assert len(reports) == 1 and len(reports) + len(observations) == len(resources)
    return bundle, reports[0], observations


def probability_of(observations: list[Observation], key: str) -> Observation:
    code = by_key(key).snomed_code
    found = [o for o in observations if o.valueQuantity is not None
             and o.code.coding is not None and o.code.coding[0].code == code]
    assert len(found) == 1
    return found[0]


def finding_of(observations: list[Observation]) -> Observation:
    found = [o for o in observations if o.valueCodeableConcept is not None]
    assert len(found) == 1
    return found[0]


# --- the Bundle -------------------------------------------------------------------------


def test_bundle_is_a_transaction_of_conditional_updates_with_uuid_full_urls() -> None:
    bundle, report, observations = parse(build())
    assert bundle.type == "transaction"
    assert len(observations) == len(CLASSES) + 1
    entries = bundle.entry or []
    own = {entry.fullUrl for entry in entries}
    for entry in entries:
        resource = entry.resource
        assert isinstance(resource, DiagnosticReport | Observation)
        assert entry.fullUrl is not None and entry.fullUrl.startswith("urn:uuid:")
        assert entry.request is not None and entry.request.method == "PUT"
        kind, _, search = entry.request.url.partition("?")
        assert kind == resource.get_resource_type()
        # the condition matches the resource's own identifier
        system, value = parse_qs(search)["identifier"][0].split("|")
        assert any(i.system == system and i.value == value for i in resource.identifier or [])
    assert len(own) == len(entries)
    assert {r.reference for r in report.result or []} == own - {entries[0].fullUrl}


def test_an_unvalidated_models_report_is_preliminary() -> None:
    for corrected in (False, True):
        _, report, observations = parse(build(findings(model_validated=False,
                                                        corrected=corrected)))
        assert report.status == "preliminary"
        assert {o.status for o in observations} == {"preliminary"}


def test_report_status_category_code_times() -> None:
    _, report, _ = parse(build())
    assert report.status == "final"
    assert report.category is not None and report.category[0].coding is not None
    coding = report.category[0].coding[0]
    assert (coding.system, coding.code) == ("http://terminology.hl7.org/CodeSystem/v2-0074",
                                            "RAD")
    assert report.code.coding is not None
    assert (report.code.coding[0].system, report.code.coding[0].code) == (SNOMED, "399208008")
    assert report.effectiveDateTime == CLOSED and report.issued == CLOSED
    assert report.issued is not None and report.issued.utcoffset() == timedelta(hours=2)


def test_corrected_result_is_amended_everywhere() -> None:
    _, report, observations = parse(build(findings(corrected=True, version=2)))
    assert report.status == "amended"
    assert {o.status for o in observations} == {"amended"}
    assert "version 2" in (report.conclusion or "")
    _, report, observations = parse(build())
    assert {o.status for o in observations} == {"final"}


def test_subject_is_the_patient_by_identifier_only() -> None:
    body = build()
    _, report, observations = parse(body)
    for subject in [report.subject, *(o.subject for o in observations)]:
        assert subject is not None and subject.type == "Patient"
        assert subject.reference is None and subject.display is None
        assert subject.identifier is not None
        assert (subject.identifier.system, subject.identifier.value) == (PATIENT_SYSTEM,
                                                                         "PAT-001")
    assert b"Doe" not in body and b"Jane" not in body


def test_accession_number_is_the_service_request_identifier() -> None:
    _, report, _ = parse(build())
    assert report.basedOn is not None and len(report.basedOn) == 1
    order = report.basedOn[0]
    assert order.type == "ServiceRequest" and order.identifier is not None
    assert (order.identifier.system, order.identifier.value) == (ACCESSION_SYSTEM, "ACC-42")
    assert order.identifier.type is not None and order.identifier.type.coding is not None
    acsn = order.identifier.type.coding[0]
    assert (acsn.system, acsn.code) == ("http://terminology.hl7.org/CodeSystem/v2-0203", "ACSN")


def test_study_instance_uid_is_a_report_identifier() -> None:
    _, report, _ = parse(build())
    assert any(i.system == "urn:dicom:uid" and i.value == "urn:oid:1.2.826.0.1.3680043.2.1125.99"
               for i in report.identifier or [])


def test_probability_observations_carry_each_class_code_and_value() -> None:
    _, _, observations = parse(build())
    expected = findings().probabilities
    for cls in CLASSES:
        observation = probability_of(observations, cls.key)
        assert observation.code.coding is not None
        assert observation.code.coding[0].system == SNOMED
        quantity = observation.valueQuantity
        assert quantity is not None and quantity.value is not None
        assert float(quantity.value) == pytest.approx(expected[cls.key], abs=1e-4)
        assert (quantity.unit, quantity.system, quantity.code) == (
            "1", "http://unitsofmeasure.org", "1")
        assert observation.device is not None
        assert "concatenated 1.2.0" in (observation.device.display or "")


@pytest.mark.parametrize(("flagged", "interpretation"),
                         [(True, "A"), (False, "N"), (None, None)])
def test_finding_is_the_label_code_interpreted_by_the_flag(
        flagged: bool | None, interpretation: str | None) -> None:
    _, report, observations = parse(build(findings(label="pneumonia", flagged=flagged,
                                                   flags=["pneumonia"] if flagged else [])))
    finding = finding_of(observations)
    assert finding.valueCodeableConcept is not None
    assert finding.valueCodeableConcept.coding is not None
    value = finding.valueCodeableConcept.coding[0]
    assert (value.system, value.code) == (SNOMED, "233604007")
    if interpretation is None:
        assert finding.interpretation is None
    else:
        assert finding.interpretation is not None and finding.interpretation[0].coding
        coding = finding.interpretation[0].coding[0]
        assert coding.system == ("http://terminology.hl7.org/CodeSystem/"
                                 "v3-ObservationInterpretation")
        assert coding.code == interpretation
    assert report.conclusionCode is not None and report.conclusionCode[0].coding is not None
    assert report.conclusionCode[0].coding[0].code == "233604007"


def test_conclusion_says_ai_result_model_and_problems() -> None:
    _, report, observations = parse(build(findings(problems=["image 2: another patient"])))
    conclusion = report.conclusion or ""
    assert "AI RESULT - NOT FOR DIAGNOSTIC USE" in conclusion
    assert "concatenated 1.2.0" in conclusion
    assert "image 2: another patient" in conclusion
    assert UNVALIDATED_WARNING not in conclusion
    for observation in observations:
        notes = " ".join(n.text or "" for n in observation.note or [])
        assert "AI RESULT - NOT FOR DIAGNOSTIC USE" in notes and UNVALIDATED_WARNING not in notes


def test_unvalidated_model_warning_in_conclusion_and_notes() -> None:
    _, report, observations = parse(build(findings(model_validated=False)))
    assert UNVALIDATED_WARNING in (report.conclusion or "")
    for observation in observations:
        assert UNVALIDATED_WARNING in [n.text for n in observation.note or []]


def test_non_ascii_survives_utf8() -> None:
    patient, accession, problem = "Müller-Øst-李", "ÅKE-ß-42", "Bild 2: anderer Patient — ü"
    body = build(findings(identifiers=ids(patient_id=patient, accession_number=accession),
                          problems=[problem]))
    assert patient.encode("utf-8") in body  # written as UTF-8, not \\u escapes
    _, report, _ = parse(body)
    assert report.subject is not None and report.subject.identifier is not None
    assert report.subject.identifier.value == patient
    assert report.basedOn is not None and report.basedOn[0].identifier is not None
    assert report.basedOn[0].identifier.value == accession
    assert problem in (report.conclusion or "")
    assert json.loads(body.decode("utf-8"))["resourceType"] == "Bundle"


def test_missing_patient_id_and_accession_leave_the_elements_out() -> None:
    body = build(findings(identifiers=ids(patient_id=None, accession_number=None)))
    _, report, observations = parse(body)
    assert report.subject is None and report.basedOn is None
    assert all(o.subject is None for o in observations)
    assert b'"value":""' not in body and b'"subject"' not in body


def test_missing_systems_keep_the_identifiers() -> None:
    _, report, _ = parse(build(patient_system=None, accession_system=None))
    assert report.subject is not None and report.subject.identifier is not None
    assert report.subject.identifier.system is None
    assert report.subject.identifier.value == "PAT-001"
    assert report.basedOn is not None and report.basedOn[0].identifier is not None
    assert report.basedOn[0].identifier.value == "ACC-42"


def test_no_classified_image_gives_a_report_without_a_finding() -> None:
    _, report, observations = parse(build(findings(label=None, probabilities={}, flags=[],
                                                   flagged=None)))
    assert observations == [] and report.result is None
    assert "no image was classified" in (report.conclusion or "")


def test_a_retry_sends_the_same_bytes_and_a_correction_replaces_the_same_report() -> None:
    assert build() == build()
    bundle, first, _ = parse(build())
    # A corrected version (another delivery, another message id) of the same study
    # updates the same report and Observations...
    corrected_bundle, corrected, _ = parse(build(findings(version=2, corrected=True),
                                                 message_id="fedcba9876543210fedc"))
    assert corrected.status == "amended"
    assert first.identifier is not None and corrected.identifier is not None
    assert first.identifier[0].value == corrected.identifier[0].value
    assert [e.request.url for e in bundle.entry or [] if e.request] == [
        e.request.url for e in corrected_bundle.entry or [] if e.request]
    assert bundle.identifier is not None and corrected_bundle.identifier is not None
    assert bundle.identifier.value != corrected_bundle.identifier.value
    # ...and another study gets its own.
    _, other, _ = parse(build(findings(identifiers=ids(study_instance_uid="1.2.3.999"))))
    assert other.identifier is not None
    assert other.identifier[0].value != first.identifier[0].value


@pytest.mark.parametrize(("changes", "argument"), [
    ({"closed_at": datetime(2024, 5, 1, 12, 0)}, "closed_at"),
    ({"probabilities": {"covid": 0.5, "tuberculosis": 0.5}}, "tuberculosis"),
])
def test_unbuildable_findings_raise_value_error(changes: dict[str, Any], argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        build(findings(**changes))


def test_empty_message_id_raises() -> None:
    with pytest.raises(ValueError, match="message_id"):
        build(message_id=" ")


# --- sending ----------------------------------------------------------------------------


def test_created_is_done_with_headers_and_body_as_given() -> None:
    body = build()
    with FhirServer("created") as server:
        attempt = send_fhir(server.url, body, TOKEN, timeout=5)
    assert (attempt.state, attempt.status) == (DONE, 201)
    assert LOCATION in attempt.detail
    [request] = server.received
    assert request.path == "/fhir" and request.body == body
    assert request.headers["content-type"].startswith("application/fhir+json")
    assert request.headers["accept"] == "application/fhir+json"
    assert request.headers["authorization"] == f"Bearer {TOKEN}"


def test_no_token_no_authorization_header() -> None:
    with FhirServer("created") as server:
        assert send_fhir(server.url, build(), None, timeout=5).state is DONE
    assert "authorization" not in server.received[0].headers


def test_invalid_is_dead_with_the_operation_outcome_truncated() -> None:
    with FhirServer("invalid") as server:
        attempt = send_fhir(server.url, build(), TOKEN, timeout=5)
    assert (attempt.state, attempt.status) == (DEAD, 400)
    assert attempt.detail.startswith("HTTP 400")
    assert INVALID_DIAGNOSTICS[:40] in attempt.detail
    assert len(attempt.detail) <= len("HTTP 400 Bad Request: ") + 200


def test_server_error_is_pending_with_the_operation_outcome() -> None:
    with FhirServer("error") as server:
        attempt = send_fhir(server.url, build(), TOKEN, timeout=5)
    assert (attempt.state, attempt.status) == (PENDING, 500)
    assert ERROR_DIAGNOSTICS in attempt.detail


@pytest.mark.parametrize(("status", "state"), [
    (200, DONE), (408, PENDING), (429, PENDING), (502, PENDING), (503, PENDING),
    (401, DEAD), (404, DEAD), (409, DEAD), (412, DEAD), (422, DEAD), (302, DEAD),
])
def test_http_status_classes(status: int, state: DeliveryState) -> None:
    with FhirServer(status=status) as server:
        attempt = send_fhir(server.url, build(), None, timeout=5)
    assert (attempt.state, attempt.status) == (state, status)
    assert len(server.received) == 1  # a redirect is not followed


def test_hang_is_pending_within_the_timeout() -> None:
    with FhirServer("hang") as server:
        start = time.monotonic()
        attempt = send_fhir(server.url, build(), TOKEN, timeout=1.0)
        elapsed = time.monotonic() - start
    assert attempt.state is PENDING and attempt.status is None
    assert elapsed < 1.0 + 1.5
    assert "1 s" in attempt.detail


def test_nothing_listening_is_pending() -> None:
    attempt = send_fhir(f"http://127.0.0.1:{free_port()}/fhir", build(), TOKEN, timeout=2)
    assert attempt.state is PENDING and attempt.status is None
    assert attempt.detail.startswith("cannot reach")


@pytest.mark.parametrize("url", [
    "http://ris.example.org/fhir", "http://10.0.0.5/fhir", "ftp://127.0.0.1/fhir",
    "not a url", "https:///fhir",
])
def test_plain_http_to_another_host_is_refused_unsent(url: str) -> None:
    attempt = send_fhir(url, build(), TOKEN, timeout=1)
    assert (attempt.state, attempt.status) == (DEAD, None)
    assert "https" in attempt.detail


@pytest.mark.parametrize("host", ["localhost", "[::1]", "127.0.0.1"])
def test_plain_http_to_loopback_is_allowed(host: str) -> None:
    with FhirServer("created") as server:
        attempt = send_fhir(f"http://{host}:{server.port}/fhir", build(), None, timeout=5)
    # ::1 may have no listener (the server binds 127.0.0.1): allowed means "tried".
    assert attempt.state is DONE or (host == "[::1]" and attempt.state is PENDING)


def test_neither_token_nor_patient_data_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    body = build()
    modes: list[Mode] = ["created", "invalid", "error"]
    for mode in modes:
        with FhirServer(mode) as server:
            attempt = send_fhir(server.url, body, TOKEN, timeout=5)
            assert TOKEN not in attempt.detail and "PAT-001" not in attempt.detail
    assert TOKEN not in caplog.text and "PAT-001" not in caplog.text


def test_closed_at_in_utc_is_written_with_z() -> None:
    body = build(findings(closed_at=datetime(2024, 5, 1, 10, 0, tzinfo=UTC)))
    assert b'"issued":"2024-05-01T10:00:00Z"' in body
