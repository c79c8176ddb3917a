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
from typing import Literal

import highdicom as hd
from highdicom.sr import (
    AlgorithmIdentification,
    CodedConcept,
    Comprehensive3DSR,
    ContainerContentItem,
    ContentSequence,
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
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence
from pydicom.sr.codedict import codes
from pydicom.uid import DigitalXRayImageStorageForPresentation, generate_uid

from dicom_node import __version__
from dicom_node.libraries import mark_as_written_encoding, only_item
from model.card import ModelCard
from model.classes import CLASSES, by_key

LOGGER = logging.getLogger(__name__)

MANUFACTURER = "dicom-node project"
NODE_NAME = "dicom-node"
PLAIN_CHEST_XRAY = CodedConcept("399208008", "SCT", "Plain X-ray of chest")
TITLE = codes.cid7021.ImagingMeasurementReport
FINDING = codes.DCM.Finding
PROBABILITY = codes.DCM.Probability
IMAGING_MEASUREMENTS = codes.DCM.ImagingMeasurements
TRACKING_UID = codes.DCM.TrackingUniqueIdentifier
_CLASS_BY_CODE = {c.snomed_code: c.key for c in CLASSES}


@dataclass(frozen=True)
class Classification:
    """What the network said about one image."""

    label: str
    probabilities: dict[str, float]


def _class_concept(key: str) -> CodedConcept:
    found = by_key(key)
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
    """The SR for one classified image, built by highdicom from scratch.

    Parameters
    ----------
    source
        The classified image (its header is copied; pixel data is not needed).
    result
        The class and the probabilities.
    card
        The model's card: algorithm identification and Contributing Equipment.
    sop_instance_uid, series_instance_uid
        The SR's identity, minted when the job was created.
    device_uid
        Device Observer UID of the observer (this node).
    institution_name
        Optional Institution Name of the SR.

    Raises
    ------
    ValueError
        highdicom finds the content or the source invalid.
    """
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
            name=FINDING, value=_class_concept(result.label))],
    )]
    for cls in CLASSES:
        groups.append(MeasurementsAndQualitativeEvaluations(
            tracking_identifier=TrackingIdentifier(uid=generate_uid(),
                                                   identifier=f"Probability {cls.display_name}"),
            finding_type=_class_concept(cls.key),
            algorithm_id=algorithm,
            source_images=[source_image],
            # The group's algorithm identification (TID 1501) covers its measurement.
            measurements=[_probability(result.probabilities[cls.key])],
        ))
    report = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=observer),
        procedure_reported=PLAIN_CHEST_XRAY,
        imaging_measurements=groups,
        title=TITLE,
    )
    return _document(source, report, card, sop_instance_uid, series_instance_uid,
                     institution_name)


def _document(source: Dataset, content: Dataset | Sequence, card: ModelCard, sop_instance_uid: str,
              series_instance_uid: str, institution_name: str | None) -> Comprehensive3DSR:
    """The SR document around ``content``; ``source`` is already :func:`_evidence`'d."""
    equipment = hd.ContributingEquipment(
        manufacturer=card.manufacturer[:64],
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=_equipment_model_name(card),
        software_versions=[card.display_version[:64], f"{NODE_NAME} {__version__}"],
        contribution_datetime=datetime.now(UTC).strftime("%Y%m%d%H%M%S"),
        contribution_description=("Automated classification of a chest radiograph "
                                  "(normal / pneumonia / COVID-19)")[:64],
    )
    sr = Comprehensive3DSR(
        evidence=[source],
        content=content,
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
    # The model's own Device UID (a new one per model version) identifies it in its
    # Contributing Equipment item (IHE AIR); highdicom has no argument for it. That
    # item is not the first when highdicom lists the source's acquisition equipment.
    _model_equipment(sr, card).DeviceUID = card.device_uid
    sr.SeriesDescription = f"AI chest classification ({card.display_version})"[:64]
    return sr


def _equipment_model_name(card: ModelCard) -> str:
    return f"{card.name} {card.architecture}"[:64]


def _model_equipment(sr: Dataset, card: ModelCard) -> Dataset:
    """The Contributing Equipment item that stands for the model."""
    processing = codes.DCM.ProcessingEquipment.value
    item: Dataset = next(item for item in sr.ContributingEquipmentSequence
                if item.PurposeOfReferenceCodeSequence[0].CodeValue == processing
                and item.get("Manufacturer") == card.manufacturer[:64]
                and item.get("ManufacturerModelName") == _equipment_model_name(card))
    return item


class ReportBuilder:
    """:func:`build_sr`'s SRs for one model, assembled at a fraction of the CPU.

    highdicom's cost grows with the content tree it copies, converts and walks,
    and most of our tree -- observer, procedure, algorithm identification, the
    groups' structure -- is the same for every image of a model. So highdicom
    builds the whole SR for the first image, and its content tree, encoded, is
    kept. For each later image highdicom builds the document around a content
    tree holding only the source image reference -- patient, study, evidence
    and equipment copied from the source by highdicom exactly as before -- and
    the kept tree takes its place, re-read lazily (untouched items are written
    back as their bytes), with the items that differ between images built anew
    by highdicom: tracking UIDs, source image references, the finding and the
    probabilities. Tests check the result equals :func:`build_sr`'s element for
    element, apart from the fresh tracking UIDs and creation times.
    """

    def __init__(self, card: ModelCard, institution_name: str | None = None) -> None:
        self.card = card
        self.institution_name = institution_name
        self._tree: bytes | None = None
        self._measurements = 0
        self._slots: list[_Slot] = []

    def build(self, source: Dataset, result: Classification, sop_instance_uid: str,
              series_instance_uid: str) -> Comprehensive3DSR:
        """The SR for one classified image, equal to :func:`build_sr`'s.

        Parameters
        ----------
        source
            The classified image.
        result
            The class and the probabilities.
        sop_instance_uid, series_instance_uid
            The SR's identity, minted when the job was created.

        Raises
        ------
        ValueError
            highdicom finds the content or the source invalid.
        """
        if self._tree is None:
            sr = build_sr(source, result, self.card, sop_instance_uid, series_instance_uid,
                          self.card.device_uid, self.institution_name)
            self._keep(sr)
            return sr
        evidence = _evidence(source)
        root = ContainerContentItem(name=TITLE, template_id="1500")
        root.ContentSequence = ContentSequence(
            [SourceImageForMeasurementGroup.from_source_image(evidence)])
        sr = _document(evidence, root, self.card, sop_instance_uid, series_instance_uid,
                       self.institution_name)
        sr.ContentSequence = self._content(evidence, result)
        # Mark the document as already Explicit VR Little Endian (as highdicom made
        # it), so that writing it does not walk the kept tree to correct ambiguous
        # VRs -- which would turn every untouched item back into elements. Every
        # item built for this image is still checked as pydicom always does.
        mark_as_written_encoding(sr)
        return sr

    def warm_up(self) -> None:
        """Build and encode one SR for a made-up source: highdicom reads its tables of
        the standard (about 0.5 s, once per process) and the content tree is kept,
        before the first real image."""
        source = Dataset()
        source.SOPClassUID = DigitalXRayImageStorageForPresentation
        source.SOPInstanceUID, source.StudyInstanceUID, source.SeriesInstanceUID = (
            generate_uid(), generate_uid(), generate_uid())
        source.Modality = "DX"
        source.Rows = source.Columns = source.SamplesPerPixel = 1
        source.BitsAllocated = source.BitsStored = 8
        source.HighBit, source.PixelRepresentation = 7, 0
        source.PhotometricInterpretation = "MONOCHROME2"
        result = Classification(CLASSES[0].key, {c.key: 1.0 / len(CLASSES) for c in CLASSES})
        sr = self.build(source, result, generate_uid(), generate_uid())
        sr.save_as(BytesIO(), enforce_file_format=True)

    def _keep(self, sr: Dataset) -> None:
        """Keep the content tree of ``sr`` as bytes, and where its per-image items are."""
        holder = Dataset()
        holder.ContentSequence = sr.ContentSequence
        encoded = DicomBytesIO()
        encoded.is_little_endian, encoded.is_implicit_VR = True, False
        write_dataset(encoded, holder)
        measurements = next(i for i, item in enumerate(sr.ContentSequence)
                            if _concept(item) == IMAGING_MEASUREMENTS.value)
        slots: list[_Slot] = []
        for g, group in enumerate(sr.ContentSequence[measurements].ContentSequence):
            items = group.ContentSequence
            concepts = [_concept(item) for item in items]
            finding = items[concepts.index(FINDING.value)]
            key = _CLASS_BY_CODE.get(str(finding.ConceptCodeSequence[0].CodeValue))
            for i, (item, concept) in enumerate(zip(items, concepts, strict=True)):
                if concept == TRACKING_UID.value:
                    slots.append(_Slot(g, i, "uid"))
                elif item.ValueType == "IMAGE":
                    slots.append(_Slot(g, i, "image"))
                elif concept == PROBABILITY.value and key is not None:
                    slots.append(_Slot(g, i, "probability", key))
                elif concept == FINDING.value and PROBABILITY.value not in concepts:
                    slots.append(_Slot(g, i, "finding"))
        self._measurements, self._slots = measurements, slots
        self._tree = encoded.getvalue()

    def _content(self, evidence: Dataset, result: Classification) -> Sequence:
        """The kept content tree with this image's items in their places."""
        assert self._tree is not None
        tree = read_dataset(BytesIO(self._tree), is_implicit_VR=False, is_little_endian=True)
        groups = tree.ContentSequence[self._measurements].ContentSequence
        for slot in self._slots:
            item: Dataset
            if slot.kind == "uid":
                item = only_item(TrackingIdentifier(uid=generate_uid()))  # the UIDREF item
            elif slot.kind == "image":
                item = SourceImageForMeasurementGroup.from_source_image(evidence)
            elif slot.kind == "probability":
                item = only_item(_probability(result.probabilities[slot.key]))
            else:
                item = only_item(QualitativeEvaluation(name=FINDING,
                                                       value=_class_concept(result.label)))
            groups[slot.group].ContentSequence[slot.index] = item
        content: Sequence = tree.ContentSequence
        return content


@dataclass(frozen=True)
class _Slot:
    """A content item that differs between images: group, position, kind (and for a
    probability, its class)."""

    group: int
    index: int
    kind: Literal["uid", "image", "probability", "finding"]
    key: str = ""


def _concept(item: Dataset) -> str | None:
    names = item.get("ConceptNameCodeSequence")
    return str(names[0].CodeValue) if names else None


def _probability(value: float) -> Measurement:
    return Measurement(name=PROBABILITY, value=round(float(value), 6), unit=codes.UCUM.NoUnits)
