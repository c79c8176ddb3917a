"""A closed study result with the identifiers the RIS needs, for the HL7 and FHIR messages.

The job store keeps no patient data (only keyed hashes); the identifiers a RIS
matches on -- patient ID, accession number, order numbers -- are read from the
study's first included image, in the spool, when the study result closes, and go
only into the message files written then (:class:`Identifiers`). The messages
are built from a :class:`StudyFindings`; builders never read the database or the
spool themselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from pydicom import Dataset, dcmread


def _text(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    text = str(value).strip() if value is not None else ""
    return text or None


@dataclass(frozen=True)
class Identifiers:
    """What identifies the patient, the order and the study, as the image carries them.

    Every string is decoded with the image's Specific Character Set (pydicom), so
    it is Unicode here; each message format escapes it its own way. None: the image
    does not carry it.
    """

    study_instance_uid: str
    patient_id: str | None = None
    issuer_of_patient_id: str | None = None
    #: DICOM PN, components separated by ``^`` (family^given^middle^prefix^suffix).
    patient_name: str | None = None
    #: ``YYYYMMDD``
    patient_birth_date: str | None = None
    #: ``M``, ``F``, ``O``
    patient_sex: str | None = None
    accession_number: str | None = None
    #: Placer / Filler Order Number (Imaging Service Request), from the image or its
    #: Request Attributes Sequence.
    placer_order_number: str | None = None
    filler_order_number: str | None = None
    requested_procedure_id: str | None = None
    #: ``YYYYMMDD`` and ``HHMMSS[.ffffff]``
    study_date: str | None = None
    study_time: str | None = None

    @classmethod
    def from_dataset(cls, ds: Dataset) -> Identifiers:
        """Read them from a received image (pixel data not needed)."""
        request = ds.get("RequestAttributesSequence")
        first = request[0] if request else Dataset()

        def either(keyword: str) -> str | None:
            return _text(ds, keyword) or _text(first, keyword)

        return cls(
            study_instance_uid=str(ds.StudyInstanceUID),
            patient_id=_text(ds, "PatientID"),
            issuer_of_patient_id=_text(ds, "IssuerOfPatientID"),
            patient_name=_text(ds, "PatientName"),
            patient_birth_date=_text(ds, "PatientBirthDate"),
            patient_sex=_text(ds, "PatientSex"),
            accession_number=_text(ds, "AccessionNumber") or _text(first, "AccessionNumber"),
            placer_order_number=either("PlacerOrderNumberImagingServiceRequest"),
            filler_order_number=either("FillerOrderNumberImagingServiceRequest"),
            requested_procedure_id=either("RequestedProcedureID"),
            study_date=_text(ds, "StudyDate"),
            study_time=_text(ds, "StudyTime"),
        )

    @classmethod
    def from_file(cls, path: Path) -> Identifiers:
        """Read them from a spooled image's header."""
        return cls.from_dataset(dcmread(path, stop_before_pixels=True))


@dataclass(frozen=True)
class StudyFindings:
    """One closed version of a study's answer (:class:`dicom_node.db.StudyResult`),
    with the identifiers of its images: what the ORU^R01 and the DiagnosticReport say."""

    #: ``study_results.id`` and its version (a late image makes version 2, which
    #: replaces version 1: a corrected result).
    result_id: int
    version: int
    identifiers: Identifiers
    #: The class with the highest probability; None when no image was classified.
    label: str | None
    #: class key -> the highest probability over the study's included images
    probabilities: dict[str, float]
    #: Classes whose operating-point threshold an image reached.
    flags: list[str]
    #: True: a threshold was reached; False: none was; None: the model has no
    #: operating points, so nothing was checked.
    flagged: bool | None
    #: ``name version`` of the model
    model: str
    model_validated: bool
    #: Images left out and why (no patient data).
    problems: list[str]
    #: When the result closed (the observation time).
    closed_at: datetime
    #: True for a version that replaces an earlier one (HL7 result status C, FHIR
    #: status amended).
    corrected: bool = False
