"""Every destination kind with a real peer: storescu -> node -> the SR and the evidence
image to Orthanc by C-STORE and by STOW-RS, the study's ORU^R01 to an MLLP receiver
(python-hl7), its FHIR Bundle to an HTTP server; refusals and NAKs of one kind hold
back no other delivery."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fhir.resources.R4B.bundle import Bundle
from pydicom import Dataset, dcmread
from pydicom.uid import SecondaryCaptureImageStorage

from dicom_node.db import Delivery, DeliveryItem, DeliveryState, JobState
from dicom_node.loopback import free_port
from model.classes import by_key

from dicom_factory import chest_image, save
from helpers.environment import wait_until
from helpers.fhir_server import FhirServer
from helpers.mllp import MllpReceiver, Mode
from helpers.processes import FAST_DELIVERY, NodeProcess, cli, node_with_destinations
from peers import Orthanc, Storescp, send_each

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FAST = {**FAST_DELIVERY, "DICOM_NODE_STUDY_QUIET_SECONDS": "1"}


def start(tmp_path: Path, artifact: Path, destinations: list[dict[str, Any]],
          **env: str) -> NodeProcess:
    return node_with_destinations(tmp_path, artifact, destinations, {**FAST, **env})


def deliveries(node: NodeProcess) -> list[Delivery]:
    """Every delivery of the node, of jobs and of study results."""
    with node.job_store() as store:
        jobs = store.list()
        found = store.deliveries([j.id for j in jobs])
    unique = {d.id: d for ds in found.values() for d in ds}
    return [unique[i] for i in sorted(unique)]


def settled(node: NodeProcess, images: int, expected: int) -> bool:
    with node.job_store() as store:
        jobs = store.list()
    every = deliveries(node)
    return (len(jobs) == images and all(j.state is JobState.DONE for j in jobs)
            and len(every) == expected
            and all(d.state is not DeliveryState.PENDING for d in every))


def test_results_reach_pacs_by_cstore_and_stow_and_the_worklist_by_hl7_and_fhir(
        tmp_path: Path, serving_artifact: Path, shared_dicom: Path) -> None:
    pacs = Orthanc(tmp_path / "pacs")
    web = Orthanc(tmp_path / "web", dicomweb=True)
    with MllpReceiver(Mode.ACCEPT) as ris, FhirServer("created") as fhir:
        node = start(tmp_path, serving_artifact, [
            {"address": f"{pacs.ae_title}@127.0.0.1:{pacs.dicom_port}"},
            {"kind": "dicomweb", "url": web.stow_url},
            {"kind": "hl7", "address": f"127.0.0.1:{ris.port}", "receiving_application": "RIS"},
            {"kind": "fhir", "url": fhir.url, "token": "t0ken",
             "patient_system": "urn:oid:1.2.3"}])
        try:
            files = sorted(shared_dicom.glob("*.dcm"))
            sources = {str(d.SOPInstanceUID): d for d in
                       (dcmread(f, stop_before_pixels=True, force=True) for f in files)}
            assert all(r.all_success for r in send_each(pacs.dicom_port, files,
                                                        called=pacs.ae_title))
            assert all(r.all_success for r in send_each(node.port, files))
            # 3 images x (SR + evidence) x 2 PACS, and one ORU and one Bundle per study.
            wait_until(lambda: settled(node, 3, 3 * 4 + 3 * 2), timeout=240,
                       what="every delivery final")
            with node.job_store() as store:
                jobs = {j.sop_instance_uid: j for j in store.list()}
            every = deliveries(node)
            image_objects = [d for d in every if d.job_id is not None]
            assert all(d.state is DeliveryState.DONE for d in image_objects)
            _check_pacs(pacs.instances(), sources, jobs)
            _check_pacs(web.instances(), sources, jobs)
            _check_messages(every, ris, fhir, sources)
            shown = json.loads(cli("jobs", "show", str(next(iter(jobs.values())).id),
                                   "--data-dir", str(node.data_dir)).stdout)
            assert {(d["kind"], d["item"]) for d in shown["deliveries"]} == {
                ("dicom", "sr"), ("dicom", "evidence"), ("dicomweb", "sr"),
                ("dicomweb", "evidence"), ("hl7", "oru"), ("fhir", "fhir")}
            log = node.log
            assert "t0ken" not in log
            for source in sources.values():
                for value in (source.get("PatientID"), source.get("AccessionNumber"),
                              source.SOPInstanceUID):
                    assert not value or str(value) not in log
        finally:
            node.stop()
            pacs.stop()
            web.stop()


def _check_pacs(stored: list[Dataset], sources: dict[str, Dataset], jobs: dict[str, Any]
                ) -> None:
    """Each image has its SR and its evidence image, in its study, referencing it."""
    evidence = [d for d in stored if d.SOPClassUID == SecondaryCaptureImageStorage
                and d.SOPInstanceUID not in sources]
    reports = [d for d in stored if d.Modality == "SR"]
    assert len(evidence) == 3 and len(reports) == 3
    for image in evidence:
        referenced = str(image.SourceImageSequence[0].ReferencedSOPInstanceUID)
        source, job = sources[referenced], jobs[referenced]
        assert image.StudyInstanceUID == source.StudyInstanceUID
        assert image.SeriesInstanceUID != source.SeriesInstanceUID
        assert image.PatientID == source.get("PatientID", "")
        assert image.SOPInstanceUID == job.evidence_sop_instance_uid
        # The legend names the class the SR names.
        assert by_key(job.label).display_name in str(image.SeriesDescription)
        assert image.BurnedInAnnotation == "YES"


def _check_messages(every: list[Delivery], ris: MllpReceiver, fhir: FhirServer,
                    sources: dict[str, Dataset]) -> None:
    """One ORU and one Bundle per study with a Patient ID, the identifiers the image
    carries; the study without one gets neither, and says why."""
    messages = [d for d in every if d.study_result_id is not None]
    with_id = {str(s.StudyInstanceUID): s for s in sources.values() if s.get("PatientID")}
    dead = [d for d in messages if d.state is DeliveryState.DEAD]
    assert len(dead) == 2 * (len(sources) - len(with_id))
    assert all("no Patient ID" in (d.last_error or "") for d in dead)
    done = [d for d in messages if d.state is DeliveryState.DONE]
    assert {d.item for d in done} == {DeliveryItem.ORU, DeliveryItem.FHIR}
    assert len(ris.messages) == len(with_id) == len(fhir.received)
    for message in ris.messages:
        study = str(message.segment("OBX")[5])  # the first OBX: the Study Instance UID
        source = with_id[study]
        assert str(message.segment("PID")[3][0][0]) == source.PatientID
        assert str(message.segment("OBR")[18]) == str(source.get("AccessionNumber") or "")
        assert str(message.segment("MSH")[10]) in {d.message_id for d in done}
        assert str(message.segment("OBR")[25]) == "P"  # an unvalidated model: preliminary
    for request in fhir.received:
        assert request.headers["authorization"] == "Bearer t0ken"
        bundle = Bundle.model_validate_json(request.body)
        report = bundle.entry[0].resource
        assert report.subject.identifier.value in {s.PatientID for s in with_id.values()}


SR_ONLY = """
[[TransferSyntaxes]]
[Uncompressed]
TransferSyntax1 = LittleEndianExplicit
TransferSyntax2 = LittleEndianImplicit

[[PresentationContexts]]
[SROnly]
PresentationContext1 = Comprehensive3DSRStorage\\Uncompressed

[[Profiles]]
[SROnly]
PresentationContexts = SROnly
"""


def test_a_refused_evidence_image_a_nak_and_a_bad_request_hold_back_nothing_else(
        tmp_path: Path, serving_artifact: Path) -> None:
    (tmp_path / "sr-only.cfg").write_text(SR_ONLY)
    (tmp_path / "in").mkdir()
    sr_only = Storescp(tmp_path / "pacs", free_port(),
                       faults=["-xf", str(tmp_path / "sr-only.cfg"), "SROnly"])
    image = save(chest_image(SpecificCharacterSet="ISO_IR 192", PatientName="Müller^Zoë",
                             PatientID="PAT-ü1", AccessionNumber="", ViewPosition="PA"),
                 tmp_path / "in" / "a.dcm")
    with MllpReceiver(Mode.ERROR, error_text="Unknown order") as ris, \
            FhirServer("invalid") as fhir:
        node = start(tmp_path, serving_artifact, [
            {"address": f"PACS@127.0.0.1:{sr_only.port}"},
            {"kind": "hl7", "address": f"127.0.0.1:{ris.port}"},
            {"kind": "fhir", "url": fhir.url}], DICOM_NODE_DELIVERY_MAX_ATTEMPTS="1000")
        try:
            assert all(r.all_success for r in send_each(node.port, [image]))

            def nak_retried() -> bool:
                oru = [d for d in deliveries(node) if d.item is DeliveryItem.ORU]
                return bool(oru) and oru[0].attempts >= 2

            wait_until(nak_retried, timeout=180, what="the ORU retried after AE")
            ris.mode = Mode.ACCEPT  # the RIS recovers: the same message goes through
            wait_until(lambda: settled(node, 1, 4), timeout=60, what="every delivery final")
            by_item = {d.item: d for d in deliveries(node)}
            assert by_item[DeliveryItem.SR].state is DeliveryState.DONE
            refused = by_item[DeliveryItem.EVIDENCE]
            assert refused.state is DeliveryState.DEAD
            assert "does not accept" in (refused.last_error or "")
            oru = by_item[DeliveryItem.ORU]
            assert oru.state is DeliveryState.DONE and oru.attempts >= 3
            assert {str(m.segment("MSH")[10]) for m in ris.messages} == {oru.message_id}
            assert str(ris.messages[-1].segment("PID")[5]) == "Müller^Zoë"
            bundle = by_item[DeliveryItem.FHIR]
            assert bundle.state is DeliveryState.DEAD and bundle.attempts == 1
            assert bundle.last_error and "400" in bundle.last_error
        finally:
            node.stop()
            sr_only.stop()
