"""The result as a DICOM Comprehensive 3D SR: TID 1500 Measurement Report, via highdicom.

Content (PS3.16 TID 1500, with TID 1001 observation context and TID 4019
algorithm identification):

* observer: a device -- this node (Device Observer UID, name, manufacturer, model);
* procedure reported: SCT 399208008 "Plain X-ray of chest";
* one measurement group (TID 1501) holding the predicted class as a qualitative
  evaluation, DCM 121071 "Finding" = SNOMED CT code of the class;
* one group per class whose finding type is that class and whose NUM item
  DCM 122157 "Probability" (UCUM "1") carries the network's output;
* every group names the algorithm (name, version, parameters) and references
  the source image.

The SR lives in the source study (patient and study attributes are copied from
the source by highdicom), in a series of its own, with the model also in
Contributing Equipment, as the IHE AI Results profile asks. Its SOP Instance
UID is the one minted when the job was created, so a re-sent SR is the same
object.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from io import BytesIO
from pathlib import Path

import highdicom as hd
from highdicom.sr import (
    AlgorithmIdentification,
    CodedConcept,
    Comprehensive3DSR,
    DeviceObserverIdentifyingAttributes,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    QualitativeEvaluation,
    SourceImageForMeasurementGroup,
    TrackingIdentifier,
)
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from dicom_node import __version__
from model.card import ModelCard
from model.classes import CLASSES

LOGGER = logging.getLogger(__name__)

MANUFACTURER = "dicom-node project"
NODE_NAME = "dicom-node"
PLAIN_CHEST_XRAY = CodedConcept("399208008", "SCT", "Plain X-ray of chest")


@dataclass(frozen=True)
class Classification:
    """What the network said about one image."""

    label: str
    probabilities: dict[str, float]


def _class_concept(key: str) -> CodedConcept:
    found = next(c for c in CLASSES if c.key == key)
    return CodedConcept(found.snomed_code, "SCT", found.display_name)


def _algorithm(card: ModelCard) -> AlgorithmIdentification:
    parameters = [f"architecture={card.architecture}", f"input_size={card.input_size}",
                  f"interpolation={card.interpolation}", f"weights_sha256={card.sha256[:16]}"]
    return AlgorithmIdentification(name=card.name, version=card.display_version[:64],
                                   parameters=parameters)


#: Type 2 attributes of the Patient and General Study modules that the SR copies;
#: a source without them (e.g. a bare data set) gets them empty, as Type 2 allows.
_TYPE2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate",
                 "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber")
_AGE = re.compile(r"^\d{3}[DWMY]$")


def _evidence(source: Dataset) -> Dataset:
    """The source's header, fit to be copied into the SR.

    Missing Type 2 attributes are added empty; an invalid Patient's Age (AS, e.g.
    "62" instead of "062Y" in the NIH files) is left out rather than guessed.
    """
    header = Dataset()
    for element in source:
        if element.tag.group != 0x7FE0:  # no pixel data needed for references
            header.add(element)
    header.file_meta = getattr(source, "file_meta", FileMetaDataset())
    for keyword in _TYPE2_COPIED:
        if keyword not in header:
            setattr(header, keyword, "")
    age = header.get("PatientAge")
    if age is not None and not _AGE.match(str(age)):
        del header.PatientAge
    return header


def build_sr(
    source: Dataset,
    result: Classification,
    card: ModelCard,
    sop_instance_uid: str,
    series_instance_uid: str,
    device_uid: str,
    institution_name: str | None = None,
) -> Comprehensive3DSR:
    """The SR for one classified image (raises ValueError if highdicom finds it invalid)."""
    observer = ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=device_uid, name=NODE_NAME, manufacturer_name=MANUFACTURER,
            model_name=f"{NODE_NAME} {__version__}",
        ),
    )
    algorithm = _algorithm(card)
    source = _evidence(source)
    source_image = SourceImageForMeasurementGroup.from_source_image(source)
    groups = [MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=generate_uid(),
                                               identifier="Chest radiograph classification"),
        algorithm_id=algorithm,
        source_images=[source_image],
        qualitative_evaluations=[QualitativeEvaluation(
            name=codes.DCM.Finding, value=_class_concept(result.label))],
    )]
    for cls in CLASSES:
        groups.append(MeasurementsAndQualitativeEvaluations(
            tracking_identifier=TrackingIdentifier(uid=generate_uid(),
                                                   identifier=f"Probability {cls.display_name}"),
            finding_type=_class_concept(cls.key),
            algorithm_id=algorithm,
            source_images=[source_image],
            # The group's algorithm identification (TID 1501) covers its measurement.
            measurements=[Measurement(
                name=codes.DCM.Probability,
                value=round(float(result.probabilities[cls.key]), 6),
                unit=codes.UCUM.NoUnits,
            )],
        ))
    report = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=observer),
        procedure_reported=PLAIN_CHEST_XRAY,
        imaging_measurements=groups,
        title=codes.cid7021.ImagingMeasurementReport,
    )
    equipment = hd.ContributingEquipment(
        manufacturer=card.manufacturer[:64],
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=f"{card.name} {card.architecture}"[:64],
        software_versions=[card.display_version[:64], f"{NODE_NAME} {__version__}"],
        contribution_datetime=datetime.now(UTC).strftime("%Y%m%d%H%M%S"),
        contribution_description=("Automated classification of a chest radiograph "
                                  "(normal / pneumonia / COVID-19)")[:64],
    )
    sr = Comprehensive3DSR(
        evidence=[source],
        content=report,
        series_instance_uid=series_instance_uid,
        series_number=9901,
        sop_instance_uid=sop_instance_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        institution_name=institution_name,
        is_complete=True,
        is_final=False,
        is_verified=False,
        contributing_equipment=[equipment],
    )
    # The model's own Device UID (a new one per model version) identifies it in the
    # Contributing Equipment item (IHE AIR); highdicom has no argument for it.
    sr.ContributingEquipmentSequence[0].DeviceUID = card.device_uid
    sr.SeriesDescription = f"AI chest classification ({card.display_version})"[:64]
    return sr


def warm_up(card: ModelCard) -> None:
    """Build and encode one SR for a made-up source, so that highdicom reads its tables
    of the standard (about 0.7 s, once per process) before the first real image."""
    source = Dataset()
    source.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray for Presentation
    source.SOPInstanceUID, source.StudyInstanceUID, source.SeriesInstanceUID = (
        generate_uid(), generate_uid(), generate_uid())
    source.Modality = "DX"
    source.Rows = source.Columns = source.SamplesPerPixel = 1
    source.BitsAllocated = source.BitsStored = 8
    source.HighBit, source.PixelRepresentation = 7, 0
    source.PhotometricInterpretation = "MONOCHROME2"
    result = Classification(CLASSES[0].key, {c.key: 1.0 / len(CLASSES) for c in CLASSES})
    sr = build_sr(source, result, card, generate_uid(), generate_uid(), card.device_uid)
    sr.save_as(BytesIO(), enforce_file_format=True)


def write_sr(sr: Dataset, path: Path) -> None:
    """Write the SR as a Part 10 file (the caller makes it durable)."""
    sr.save_as(path, enforce_file_format=True)
