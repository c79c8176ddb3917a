"""The result as a DICOM Comprehensive 3D SR: TID 1500 Measurement Report, via highdicom.

Content (PS3.16 TID 1500, with TID 1001 observation context and TID 4019
algorithm identification):

* document title: CID 7021 "Imaging Measurement Report" for a validated model
  (:func:`model.card.validation_status`); for any other the local code
  99DCMNODE UNVALIDATED-IMR, whose meaning is :data:`~model.card.UNVALIDATED_WARNING`
  (the Template Identifier stays 1500: only the title differs);
* first in the root (TID 1500 is extensible), TEXT items DCM 121106 "Comment":
  for an unvalidated model the warning with the reason, then always the intended
  use -- research and decision support, not a diagnosis, to be read by a
  radiologist -- so that a viewer shows them before anything else;
* observer: a device -- this node (Device Observer UID, name, manufacturer, model);
* procedure reported: SCT 399208008 "Plain X-ray of chest";
* one measurement group (TID 1501) holding the predicted class (the most
  probable) as a qualitative evaluation, DCM 121071 "Finding" = SNOMED CT code
  of the class; when the model has operating points, the evaluation 99DCMNODE
  FLAGGED = SCT Yes/No (Yes when any class reached its threshold); and a
  Comment naming the view the image was classified as (frontal, or undetermined
  and classified as if frontal);
* one group per class whose finding type is that class and whose NUM item
  DCM 122157 "Probability" (UCUM "1") carries the network's output; when the
  model has an operating point for the class, also a NUM DCM 122411 "Threshold
  Value" (UCUM "1"), the evaluation 99DCMNODE THRESHOLD-MET = SCT Yes/No
  (probability >= threshold) and a TEXT DCM 111081 "CAD Operating Point
  Description" (TEXT, as in TID 4023) saying how the threshold was chosen and
  what it gave on the test set;
* every group names the algorithm (name, version, parameters) and references
  the source image.

The Series Description, which viewers show first, says the same in 64
characters: ``AI RESULT - NOT A DIAGNOSIS (model <version>)``, or for an
unvalidated model ``UNVALIDATED MODEL - NOT FOR CLINICAL USE - AI, NOT A DIAGNOSIS``.
The local coding scheme is declared in the Coding Scheme Identification Sequence.

The SR lives in the source study (patient and study attributes are copied from
the source by highdicom), in a series of its own, with the model also in
Contributing Equipment, as the IHE AI Results profile asks. Its SOP Instance
UID is the one minted when the job was created, so a re-sent SR is the same
object.
"""

from __future__ import annotations

import functools
import logging
import re
import struct
from copy import deepcopy
from dataclasses import dataclass
from datetime import UTC, datetime
from io import BytesIO
from typing import Literal

import highdicom as hd
from highdicom._standard_utils import (
    get_iod_module_map,
    get_module_attribute_map,
    get_sop_class_iod_map,
)
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.enum import PatientSexValues
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
    RelationshipTypeValues,
    SourceImageForMeasurementGroup,
    TextContentItem,
    TrackingIdentifier,
)
from highdicom.sr.utils import collect_evidence
from highdicom.valuerep import check_person_name
from pydicom.charset import convert_encodings, default_encoding
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset, validate_file_meta
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import (
    write_data_element,
    write_dataset,
    write_sequence_item,
)
from pydicom.sequence import Sequence
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID, DigitalXRayImageStorageForPresentation, generate_uid
from pydicom.valuerep import DA, DS, DT, TM, DSfloat

from dicom_node import __version__
from dicom_node.libraries import mark_as_written_encoding, only_item
from model.card import (
    UNVALIDATED_WARNING,
    ModelCard,
    OperatingPoint,
    Validation,
    validation_status,
)
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
COMMENT = codes.DCM.Comment
THRESHOLD = codes.DCM.ThresholdValue
OPERATING_POINT = codes.DCM.CADOperatingPointDescription
YES, NO = codes.SCT.Yes, codes.SCT.No
#: Our own codes, for what no standard concept says (PS3.16 section 8: a private
#: Coding Scheme Designator begins with "99").
LOCAL_SCHEME = "99DCMNODE"
UNVALIDATED_TITLE = CodedConcept("UNVALIDATED-IMR", LOCAL_SCHEME, UNVALIDATED_WARNING)
THRESHOLD_MET = CodedConcept("THRESHOLD-MET", LOCAL_SCHEME,
                                 "Probability at or above threshold")
FLAGGED = CodedConcept("FLAGGED", LOCAL_SCHEME,
                       "Flagged: a class probability at or above its threshold")
INTENDED_USE = ("Intended use: research and decision support. This automated result is "
                "not a diagnosis and must be read by a radiologist.")
#: The view intake found, as the SR says it.
VIEW_TEXTS = {
    "frontal": "View: frontal",
    "undetermined": "View undetermined: the image carries no view information; "
                    "it was classified as if frontal.",
}
_CLASS_BY_CODE = {c.snomed_code: c.key for c in CLASSES}
#: What the model contributed to an SR, as its Contributing Equipment item says.
CONTRIBUTION = "Automated classification of a chest radiograph (normal / pneumonia / COVID-19)"


@dataclass(frozen=True)
class Classification:
    """What the network said about one image, and the view it was classified as
    (``frontal``, or ``undetermined``: intake found no view and it was classified
    as if frontal)."""

    label: str
    probabilities: dict[str, float]
    view: str = "frontal"

    def __post_init__(self) -> None:
        if self.view not in VIEW_TEXTS:
            raise ValueError(f"view must be one of {sorted(VIEW_TEXTS)}, not {self.view!r}")


def title(validation: Validation) -> CodedConcept | Code:
    """The document title: CID 7021 for a validated model, the warning for any other."""
    return TITLE if validation.validated else UNVALIDATED_TITLE


def reached_thresholds(card: ModelCard, probabilities: dict[str, float]) -> list[str]:
    """The classes, in class order, whose probability is at or above the threshold of
    their operating point (a class without one is never flagged)."""
    # Compared as the SR writes both values (6 decimals), so the SR never shows a
    # probability that equals its threshold beside "not reached".
    return [cls.key for cls in CLASSES
            if (point := card.operating_points.get(cls.key)) is not None
            and round(float(probabilities[cls.key]), 6) >= round(float(point.threshold), 6)]


def flags(card: ModelCard, probabilities: dict[str, float]) -> list[str] | None:
    """:func:`reached_thresholds`, or None when the model has no operating points
    (nothing was checked: neither flagged nor not)."""
    return reached_thresholds(card, probabilities) if card.operating_points else None


def series_description(card: ModelCard, validation: Validation) -> str:
    """What viewers show first (LO, 64 characters): not a diagnosis, and for an
    unvalidated model the warning before anything else."""
    if not validation.validated:
        return f"{UNVALIDATED_WARNING} - AI, NOT A DIAGNOSIS"[:64]
    head = "AI RESULT - NOT A DIAGNOSIS"
    return f"{head} (model {card.display_version[:64 - len(head) - len(' (model )')]})"


def operating_point_text(point: OperatingPoint) -> str:
    """How a threshold was chosen, and what it gave on the test set where measured."""
    text = (f"threshold {point.threshold:.3f} chosen for sensitivity >= "
            f"{point.target_sensitivity:.2f} on {point.validation_images} validation images")
    figures = [figure for figure in (
        _figure("sensitivity", point.test_sensitivity, point.test_sensitivity_95),
        _figure("specificity", point.test_specificity, point.test_specificity_95),
    ) if figure]
    if not figures:
        return f"{text}; not measured on a test set"
    return f"{text}; on the test set {', '.join(figures)}"


def _figure(name: str, value: float | None, interval: list[float] | None) -> str:
    if value is None:
        return ""
    if interval is not None and len(interval) == 2:
        return f"{name} {value:.2f} ({interval[0]:.2f}-{interval[1]:.2f})"
    return f"{name} {value:.2f}"


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


def source_header(source: Dataset) -> Dataset:
    """The source's header, fit to be copied into the SR (or the evidence image).

    Missing Type 2 attributes are added empty; an invalid Patient's Age (AS, e.g.
    "62" instead of "062Y" in the NIH files) is left out rather than guessed.
    """
    header = Dataset()
    for tag in source.keys():
        if tag.group != 0x7FE0:  # no pixel data needed for references (nor read from disk)
            header.add(source[tag])
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
        The class, the probabilities and the view.
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
    source = source_header(source)
    source_image = SourceImageForMeasurementGroup.from_source_image(source)
    validation = validation_status(card)
    reached = reached_thresholds(card, result.probabilities)
    main = [QualitativeEvaluation(name=FINDING, value=_class_concept(result.label))]
    if card.operating_points:
        main.append(QualitativeEvaluation(name=FLAGGED, value=YES if reached else NO))
    groups = [MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=generate_uid(),
                                               identifier="Chest radiograph classification"),
        algorithm_id=algorithm,
        source_images=[source_image],
        qualitative_evaluations=main,
    )]
    _contains(groups[0], _view(result))
    for cls in CLASSES:
        point = card.operating_points.get(cls.key)
        measurements = [_probability(result.probabilities[cls.key])]
        evaluations = []
        if point is not None:
            measurements.append(_threshold(point))
            evaluations.append(QualitativeEvaluation(
                name=THRESHOLD_MET, value=YES if cls.key in reached else NO))
        group = MeasurementsAndQualitativeEvaluations(
            tracking_identifier=TrackingIdentifier(uid=generate_uid(),
                                                   identifier=f"Probability {cls.display_name}"),
            finding_type=_class_concept(cls.key),
            algorithm_id=algorithm,
            source_images=[source_image],
            # The group's algorithm identification (TID 1501) covers its measurements.
            measurements=measurements,
            qualitative_evaluations=evaluations or None,
        )
        if point is not None:
            _contains(group, _text(OPERATING_POINT, operating_point_text(point)))
        groups.append(group)
    report = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=observer),
        procedure_reported=PLAIN_CHEST_XRAY,
        imaging_measurements=groups,
        title=title(validation),
    )
    root = only_item(report)
    for position, notice in enumerate(_notices(validation)):
        root.ContentSequence.insert(position, notice)
    return _document(source, report, card, validation, sop_instance_uid,
                     series_instance_uid, institution_name)


def _document(source: Dataset, content: Dataset | Sequence, card: ModelCard,
              validation: Validation, sop_instance_uid: str, series_instance_uid: str,
              institution_name: str | None) -> Comprehensive3DSR:
    """The SR document around ``content``; ``source`` is already a :func:`source_header`
    and ``validation`` is the card's."""
    equipment = model_equipment(card, CONTRIBUTION)
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
        coding_schemes=[CodingSchemeIdentificationItem(
            LOCAL_SCHEME, name="dicom-node local codes",
            responsible_organization=MANUFACTURER)],
    )
    set_model_device_uid(sr, card)
    sr.SeriesDescription = series_description(card, validation)
    return sr


def _equipment_model_name(card: ModelCard) -> str:
    return f"{card.name} {card.architecture}"[:64]


def contribution_time() -> str:
    """When the model contributed, as its Contributing Equipment item says (UTC, to the
    second)."""
    return datetime.now(UTC).strftime("%Y%m%d%H%M%S")


def model_equipment(card: ModelCard, description: str, when: str | None = None
                    ) -> hd.ContributingEquipment:
    """The model as Contributing Equipment (processing equipment, IHE AI Results), as
    every object the node makes names it; ``description`` says what it contributed,
    ``when`` when (:func:`contribution_time`, now unless given)."""
    return hd.ContributingEquipment(
        manufacturer=card.manufacturer[:64],
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=_equipment_model_name(card),
        software_versions=[card.display_version[:64], f"{NODE_NAME} {__version__}"],
        contribution_datetime=when or contribution_time(),
        contribution_description=description[:64],
    )


def set_model_device_uid(made: Dataset, card: ModelCard) -> None:
    """Give the model's Contributing Equipment item in ``made`` (an SR or the evidence
    image) the model's own Device UID (a new one per model version; IHE AIR), which
    highdicom has no argument for. The item is found by what it says, as it is not the
    first when highdicom lists the source's acquisition equipment."""
    processing = codes.DCM.ProcessingEquipment.value
    item: Dataset = next(item for item in made.ContributingEquipmentSequence
                if item.PurposeOfReferenceCodeSequence[0].CodeValue == processing
                and item.get("Manufacturer") == card.manufacturer[:64]
                and item.get("ManufacturerModelName") == _equipment_model_name(card))
    item.DeviceUID = card.device_uid


class ReportBuilder:
    """:func:`build_sr`'s SRs for one model, assembled at a fraction of the CPU.

    highdicom's cost grows with the content tree it copies, converts and walks,
    and pydicom's with the elements it writes; most of our tree -- title,
    intended use and warning, observer, procedure, algorithm identification,
    thresholds and operating points, the groups' structure -- is the same for
    every image of a model. So highdicom builds the whole SR for the first
    image, and its content tree is kept as bytes (Explicit VR Little Endian,
    every item and sequence of undefined length, so that any item may change
    length without touching its parents; its texts, the model's name and version
    among them, in the SR's character set, which is the source's: once per
    character set seen), cut where the items that differ
    between images go. For each later image highdicom builds the document
    around a content tree holding only the source image reference -- patient,
    study, evidence and equipment copied from the source by highdicom exactly
    as before -- and the Content Sequence becomes the kept bytes with this
    image's items in their places: the source image reference highdicom just
    made; tracking UIDs and probabilities written by pydicom into a kept copy of
    their item, cut at the value; the finding, Flagged, each class's threshold
    met and the view, which take a few values each, built by highdicom the
    first time a value is needed and then kept as bytes too. The Content
    Sequence is written as those bytes and parsed only if read. Tests check the
    result equals :func:`build_sr`'s element for element, apart from the fresh
    tracking UIDs and creation times, and that DCMTK's ``dciodvfy`` and
    ``dsrdump`` take it.

    What the node writes comes from :meth:`encode`, which keeps the document
    around the tree as a template too (per source SOP Class and character set):
    highdicom's checks of the source's values, its evidence and equipment
    functions and the source's own copied elements are all that is made for a
    later image.
    """

    def __init__(self, card: ModelCard, institution_name: str | None = None) -> None:
        self.card = card
        #: What :func:`model.card.validation_status` says of the card (the SRs say it too).
        self.validation: Validation = validation_status(card)
        self.institution_name = institution_name
        #: The kept content tree, a stand-in item in place of each per-image item.
        self._marked: Sequence | None = None
        #: Per character set of the SRs (the source's): the marked tree's encoded items
        #: cut at the stand-ins -- the bytes before each slot, and after the last.
        self._cut: dict[tuple[str, ...], tuple[list[bytes], bytes]] = {}
        self._slots: list[_Slot] = []
        self._variants: dict[tuple[object, ...], bytes] = {}
        #: Per source SOP Class and character set: the document's template.
        self._documents: dict[tuple[str, tuple[str, ...]], _Document] = {}
        #: The model's Contributing Equipment item, encoded, and the second and character
        #: set it was made for.
        self._model_item: tuple[tuple[str, tuple[str, ...]], bytes] | None = None
        #: highdicom's own item, per character set, cut at its time.
        self._highdicom_items: dict[tuple[str, ...], _HighdicomItem] = {}
        #: The root :meth:`build` gives highdicom for a later image, and :meth:`encode`
        #: highdicom's evidence collection (it holds no reference).
        self._root = ContainerContentItem(name=title(self.validation), template_id="1500")
        self._root.ContentSequence = ContentSequence([])

    def build(self, source: Dataset, result: Classification, sop_instance_uid: str,
              series_instance_uid: str) -> Comprehensive3DSR:
        """The SR for one classified image, equal to :func:`build_sr`'s.

        Parameters
        ----------
        source
            The classified image.
        result
            The class, the probabilities and the view.
        sop_instance_uid, series_instance_uid
            The SR's identity, minted when the job was created.

        Raises
        ------
        ValueError, TypeError
            highdicom finds the content or the source invalid (a Patient's Name of
            more than one value: TypeError).
        """
        if self._marked is None:
            sr = build_sr(source, result, self.card, sop_instance_uid, series_instance_uid,
                          self.card.device_uid, self.institution_name)
            self._keep(sr)
            return sr
        evidence = source_header(source)
        # The document around an empty root (highdicom copies the root and walks it for
        # references; the evidence it lists comes from ``evidence``): its Content
        # Sequence is replaced below.
        sr = _document(evidence, self._root, self.card, self.validation, sop_instance_uid,
                       series_instance_uid, self.institution_name)
        # The tree's texts (the model's name and version among them) in the SR's own
        # character set, which is the source's.
        encodings = tuple(convert_encodings(sr.get("SpecificCharacterSet")))
        # highdicom's image reference, for this source.
        image = _item_bytes(SourceImageForMeasurementGroup.from_source_image(evidence),
                            encodings)
        content = self._content(image, result, encodings)
        # The content tree as its bytes: a defined-length sequence of items of
        # undefined length, written as it is and parsed only if read.
        sr[_CONTENT_SEQUENCE] = RawDataElement(_CONTENT_SEQUENCE, "SQ", len(content), content,
                                               0, False, True)
        # Mark the document as already Explicit VR Little Endian (as highdicom made
        # it), so that writing it does not walk it to correct ambiguous VRs.
        mark_as_written_encoding(sr)
        return sr

    def encode(self, source: Dataset, result: Classification, sop_instance_uid: str,
               series_instance_uid: str) -> bytes:
        """The SR for one classified image as the bytes of its Part 10 file: :meth:`build`'s
        SR as pydicom writes it (``save_as`` with ``enforce_file_format``).

        For the first source of each SOP Class and character set, it is exactly that,
        and the document is kept as a template: each of its top-level elements
        encoded, except those made for each SR -- the attributes highdicom copies
        from the source (the root attributes of the source IOD's Patient and Study
        modules, per highdicom's tables, and those its SOP class sets from the source
        itself), the SR's UIDs, creation and content dates and times, the evidence,
        the Contributing Equipment (the source's acquisition equipment, the model,
        highdicom) and the content tree. For a later source those are made as
        highdicom makes them -- its own functions for the evidence and the equipment,
        the source's own elements for what it copies, after the checks highdicom's
        SOP class makes of the values it is given -- encoded, and placed among the
        template's in tag order. Tests check the result equals :meth:`build`'s, and
        :func:`build_sr`'s, apart from tracking UIDs and creation times. Parameters
        and exceptions: :meth:`build`'s.
        """
        header = source_header(source)
        charset = header.get("SpecificCharacterSet")
        key = (str(header.SOPClassUID), (charset,) if isinstance(charset, str)
               else tuple(charset or ()))
        if not sop_instance_uid:  # as writing the file meta refuses it
            raise ValueError("an SR needs its SOP Instance UID")
        document = self._documents.get(key)
        if document is None:  # (kept only once build() has kept the content tree)
            sr = self.build(source, result, sop_instance_uid, series_instance_uid)
            encoded = _written(sr)
            self._documents[key] = _Document.of(sr, key[0])
            return encoded
        _check_as_highdicom(header)
        encodings = document.encodings
        image = _item_bytes(SourceImageForMeasurementGroup.from_source_image(header),
                            encodings)
        content = self._content(image, result, encodings)
        now = datetime.now()  # local time, as highdicom's
        day, time = DA(now.date()), TM(now.time())
        same_study, other_studies = collect_evidence(
            [header], self._root, study_instance_uid=str(header.StudyInstanceUID))
        made = [(_SOP_INSTANCE_UID, "UI", sop_instance_uid),
                (_SERIES_INSTANCE_UID, "UI", series_instance_uid),
                (_INSTANCE_CREATION_DATE, "DA", day), (_INSTANCE_CREATION_TIME, "TM", time),
                (_CONTENT_DATE, "DA", day), (_CONTENT_TIME, "TM", time)]
        if same_study:
            made.append((_EVIDENCE, "SQ", Sequence(same_study)))
        if other_studies:
            made.append((_OTHER_EVIDENCE, "SQ", Sequence(other_studies)))
        elements = [*document.constant,
                    *((tag, _element(tag, vr, value, encodings)) for tag, vr, value in made),
                    *((tag, _encoded(header[tag], encodings))
                      for tag in document.copied if tag in header),
                    (_EQUIPMENT, self._equipment(header, encodings)),
                    (_CONTENT_SEQUENCE, _sequence_header(_CONTENT_SEQUENCE, len(content))
                     + content)]
        elements.sort(key=lambda element: element[0])
        # The file meta as pydicom writes it: its group length, then its elements, this
        # SR's SOP Instance UID among them.
        meta = b"".join((document.meta_before,
                         _element(_MEDIA_STORAGE_SOP_INSTANCE_UID, "UI", sop_instance_uid),
                         document.meta_after))
        return b"".join((_PREAMBLE, _GROUP_LENGTH.pack(2, 0, b"UL", 4, len(meta)), meta,
                         *(element for _, element in elements)))

    def _equipment(self, header: Dataset, encodings: tuple[str, ...]) -> bytes:
        """The SR's Contributing Equipment Sequence, encoded, its items as :func:`_document`
        has highdicom make them: the source's acquisition equipment (when highdicom
        can say it), the model with its Device UID, highdicom. The model's item is
        kept for the second it names; highdicom's, whose time is to the microsecond,
        is kept cut at its time."""
        items = []
        try:
            acquisition = hd.ContributingEquipment.for_image_acquisition(header)
        except Exception:  # as highdicom: the source's equipment left out
            acquisition = None
        if acquisition is not None:
            items.append(_encoded_item(acquisition, encodings))
        made_for = (contribution_time(), encodings)
        if self._model_item is None or self._model_item[0] != made_for:
            item = model_equipment(self.card, CONTRIBUTION, made_for[0])
            item.DeviceUID = self.card.device_uid
            self._model_item = (made_for, _encoded_item(item, encodings))
        items.append(self._model_item[1])
        cut = self._highdicom_items.get(encodings)
        if cut is None:
            cut = self._highdicom_items[encodings] = _HighdicomItem.of(encodings)
        items.append(cut.now())
        body = b"".join(items)
        return _sequence_header(_EQUIPMENT, len(body)) + body

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
        self.encode(source, result, generate_uid(), generate_uid())

    def _keep(self, sr: Dataset) -> None:
        """Keep the content tree of ``sr`` as bytes cut at its per-image items, and a
        template of each per-image item that holds a value (tracking UID,
        probability) cut at that value."""
        tree = _plain(sr.ContentSequence)
        measurements = next(i for i, item in enumerate(tree)
                            if _concept(item) == _code(IMAGING_MEASUREMENTS))
        groups = tree[measurements].ContentSequence
        slots: list[_Slot] = []
        for g, group in enumerate(groups):
            items = group.ContentSequence
            concepts = [_concept(item) for item in items]
            finding = items[concepts.index(_code(FINDING))]
            key = _CLASS_BY_CODE.get(str(finding.ConceptCodeSequence[0].CodeValue))
            main = _code(PROBABILITY) not in concepts  # the group of the result
            for i, (item, concept) in enumerate(zip(items, concepts, strict=True)):
                kind = _slot_kind(item, concept, main)
                if kind is None:
                    continue
                slots.append(_Slot(g, i, kind, "" if main or key is None else key,
                                   _value_template(kind, item)))
                items[i] = _marker(len(slots) - 1)
        self._slots, self._marked = slots, tree

    def _cut_tree(self, encodings: tuple[str, ...]) -> tuple[list[bytes], bytes]:
        """The marked tree encoded in ``encodings``, cut at its stand-ins (kept)."""
        cut = self._cut.get(encodings)
        if cut is not None:
            return cut
        assert self._marked is not None
        encoded = b"".join(_item_bytes(item, encodings) for item in self._marked)
        chunks: list[bytes] = []
        for number in range(len(self._slots)):
            marker = _item_bytes(_marker(number), encodings)
            before, found, encoded = encoded.partition(marker)
            if not found or marker in encoded:
                raise RuntimeError("the SR's kept content tree could not be cut at its items")
            chunks.append(before)
        cut = self._cut[encodings] = chunks, encoded
        return cut

    def _content(self, image: bytes, result: Classification, encodings: tuple[str, ...]
                 ) -> bytes:
        """The kept content tree's bytes with this image's items in their places;
        ``image`` is this source's image reference item, encoded."""
        chunks, tail = self._cut_tree(encodings)
        reached = reached_thresholds(self.card, result.probabilities)
        parts: list[bytes] = []
        for chunk, slot in zip(chunks, self._slots, strict=True):
            parts.append(chunk)
            parts.append(self._item(slot, image, result, reached, encodings))
        parts.append(tail)
        return b"".join(parts)

    def _item(self, slot: _Slot, image: bytes, result: Classification, reached: list[str],
              encodings: tuple[str, ...]) -> bytes:
        """This image's item for ``slot``, encoded. The source image reference is
        highdicom's for this source; a tracking UID or probability goes into the
        slot's kept template as pydicom encodes it; an item that takes one of a few
        values (finding, flags, view) is built by highdicom the first time it is
        needed and kept encoded."""
        if slot.kind == "image":
            return image
        if slot.template is not None and slot.kind == "uid":
            return slot.template.fill(_element(_UID, "UI", generate_uid()))
        if slot.template is not None and slot.kind == "probability":
            value = _rounded(result.probabilities[slot.key])
            return slot.template.fill(_element(_FLOATING_POINT_VALUE, "FD", value),
                                      _element(_NUMERIC_VALUE, "DS", DS(value, auto_format=True)))
        # Everything such an item depends on (more than each kind needs: a few more
        # variants, never a wrong one).
        key = (slot.kind, slot.key, result.label, result.view, slot.key in reached,
               bool(reached), encodings)
        encoded = self._variants.get(key)
        if encoded is None:
            encoded = self._variants[key] = _item_bytes(_slot_item(slot, result, reached),
                                                        encodings)
        return encoded


#: Set by highdicom's SOP class from the source whatever the source's IOD (then
#: overwritten by the source's own element where its Patient and Study modules have it).
_SET_FROM_SOURCE = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex",
                    "StudyInstanceUID", "AccessionNumber", "StudyID", "StudyDate",
                    "StudyTime", "ReferringPhysicianName")
_SOP_INSTANCE_UID = Tag("SOPInstanceUID")
_SERIES_INSTANCE_UID = Tag("SeriesInstanceUID")
_INSTANCE_CREATION_DATE = Tag("InstanceCreationDate")
_INSTANCE_CREATION_TIME = Tag("InstanceCreationTime")
_CONTENT_DATE = Tag("ContentDate")
_CONTENT_TIME = Tag("ContentTime")
_EQUIPMENT = Tag("ContributingEquipmentSequence")
_GROUP_LENGTH_TAG = Tag("FileMetaInformationGroupLength")
_MEDIA_STORAGE_SOP_INSTANCE_UID = Tag("MediaStorageSOPInstanceUID")
#: A Part 10 file's preamble and prefix, as pydicom writes them.
_PREAMBLE = b"\0" * 128 + b"DICM"
#: (0002,0000) File Meta Information Group Length, but its value.
_GROUP_LENGTH = struct.Struct("<HH2sHL")
_EVIDENCE = Tag("CurrentRequestedProcedureEvidenceSequence")
_OTHER_EVIDENCE = Tag("PertinentOtherEvidenceSequence")


@functools.cache
def _copied_tags(sop_class_uid: str) -> tuple[BaseTag, ...]:
    """The attributes highdicom's SR takes from a source of this SOP Class, in tag order:
    the root attributes of the Patient and Study modules of the source's IOD, as
    ``SOPClass.copy_patient_and_study_information`` walks highdicom's tables, and
    those its SOP class sets from the source itself.

    Raises
    ------
    KeyError
        An SOP Class highdicom does not know (highdicom's SR cannot be made either).
    """
    iod = get_sop_class_iod_map()[sop_class_uid]
    attributes = get_module_attribute_map()
    keywords = [str(item["keyword"]) for module in get_iod_module_map()[iod]
                if module["ie"] in ("Patient", "Study")
                for item in attributes[module["key"]] if len(item["path"]) == 0]
    tags = {tag for keyword in (*keywords, *_SET_FROM_SOURCE)
            if (tag := tag_for_keyword(keyword)) is not None}
    return tuple(Tag(tag) for tag in sorted(tags))


#: The SR's top-level elements made for each SR, besides those copied from the source.
_MADE_FOR_EACH = frozenset({_SOP_INSTANCE_UID, _SERIES_INSTANCE_UID, _INSTANCE_CREATION_DATE,
                            _INSTANCE_CREATION_TIME, _CONTENT_DATE, _CONTENT_TIME, _EQUIPMENT,
                            _EVIDENCE, _OTHER_EVIDENCE, Tag("ContentSequence")})


@dataclass(frozen=True)
class _Document:
    """An SR document kept as a template (:meth:`ReportBuilder.encode`)."""

    #: Its top-level elements that are the same in every SR, encoded, with their tags.
    constant: tuple[tuple[BaseTag, bytes], ...]
    #: What highdicom copies from a source of this SOP Class.
    copied: tuple[BaseTag, ...]
    #: Its file meta information as pydicom writes it, but its group length: the
    #: elements before the Media Storage SOP Instance UID, and those after it, encoded.
    meta_before: bytes
    meta_after: bytes
    #: Python codecs of its Specific Character Set.
    encodings: tuple[str, ...]

    @classmethod
    def of(cls, sr: Dataset, source_sop_class_uid: str) -> _Document:
        """The template of ``sr``, an SR made by :meth:`ReportBuilder.build` from a source
        of this SOP Class and then written (its file meta as written)."""
        copied = _copied_tags(source_sop_class_uid)
        made = _MADE_FOR_EACH.union(copied)
        encodings = tuple(convert_encodings(sr.get("SpecificCharacterSet")))
        constant = tuple((element.tag, _encoded(element, encodings))
                         for element in sr if element.tag not in made)
        written = FileMetaDataset(sr.file_meta)
        validate_file_meta(written, enforce_standard=True)  # as writing the file does
        meta = [element for element in written
                if element.tag not in (_GROUP_LENGTH_TAG, _MEDIA_STORAGE_SOP_INSTANCE_UID)]
        before, after = (b"".join(_encoded(element, (default_encoding,)) for element in meta
                                  if (element.tag < _MEDIA_STORAGE_SOP_INSTANCE_UID) == first)
                         for first in (True, False))
        return cls(constant, copied, before, after, encodings)


def _written(sr: Dataset) -> bytes:
    """``sr`` as the node writes an SR file."""
    encoded = BytesIO()
    sr.save_as(encoded, enforce_file_format=True)
    return encoded.getvalue()


def _check_as_highdicom(header: Dataset) -> None:
    """Raise where highdicom's SOP class raises for the values it is given from the
    source (``highdicom.base.SOPClass``): a Patient's Name that is not one name (it
    lets a merely doubtful one pass), a Patient's Sex that is not M, F or O, a date
    or time pydicom cannot read."""
    name = header.PatientName
    if name is not None:
        try:
            check_person_name(name)
        except ValueError:  # as highdicom: only logged (by highdicom, and not here)
            pass
    sex = header.PatientSex
    if sex is not None and sex != "":
        PatientSexValues(sex)
    DA(header.PatientBirthDate)
    if header.StudyDate is not None:
        DA(header.StudyDate)
    if header.StudyTime is not None:
        TM(header.StudyTime)


def _encoded(element: DataElement, encodings: tuple[str, ...]) -> bytes:
    """One element as pydicom writes it in an SR: Explicit VR Little Endian, texts in
    ``encodings``."""
    encoded = _explicit_little_endian()
    write_data_element(encoded, element, list(encodings))
    return encoded.getvalue()


def _encoded_item(item: Dataset, encodings: tuple[str, ...]) -> bytes:
    """``item`` as pydicom writes a sequence item (of defined length unless marked
    otherwise; Explicit VR Little Endian, texts in ``encodings``)."""
    encoded = _explicit_little_endian()
    write_sequence_item(encoded, item, list(encodings))
    return encoded.getvalue()


_CONTRIBUTION_DATETIME = Tag("ContributionDateTime")
_ITEM_TAG = struct.pack("<HH", 0xFFFE, 0xE000)


@dataclass(frozen=True)
class _HighdicomItem:
    """highdicom's Contributing Equipment item (``for_highdicom``), encoded once and cut
    at its Contribution DateTime, which is to the microsecond."""

    before: bytes
    after: bytes
    encodings: tuple[str, ...]

    @classmethod
    def of(cls, encodings: tuple[str, ...]) -> _HighdicomItem:
        item = hd.ContributingEquipment.for_highdicom(purpose_of_reference=None)
        body = _encoded_item(item, encodings)[8:]
        time = _encoded(item[_CONTRIBUTION_DATETIME], encodings)
        before, found, after = body.partition(time)
        if not found or time in after:
            raise RuntimeError("highdicom's equipment item could not be cut at its time")
        return cls(before, after, encodings)

    def now(self) -> bytes:
        """The item as highdicom makes it now."""
        time = _element(_CONTRIBUTION_DATETIME, "DT", DT(datetime.now()), self.encodings)
        body = self.before + time + self.after
        return _ITEM_TAG + struct.pack("<L", len(body)) + body


def _sequence_header(tag: BaseTag, length: int) -> bytes:
    """A sequence element's tag, VR and length (Explicit VR Little Endian)."""
    return struct.pack("<HH2sHL", tag.group, tag.element, b"SQ", 0, length)


_SlotKind = Literal["uid", "image", "probability", "finding", "flagged", "view", "threshold_met"]
_FEW_VALUES: frozenset[_SlotKind] = frozenset({"finding", "flagged", "view", "threshold_met"})


_CONTENT_SEQUENCE = Tag("ContentSequence")
_UID = Tag("UID")
_NUMERIC_VALUE = Tag("NumericValue")
_FLOATING_POINT_VALUE = Tag("FloatingPointValue")
#: Values no real item holds, put where a template's per-image values go.
_MARKER_UID = "2.25.9999999999999999999999999999999999"
_MARKER_NUMBER = 987654.321


def _explicit_little_endian() -> DicomBytesIO:
    """A buffer to write Explicit VR Little Endian into (the SR's encoding)."""
    encoded = DicomBytesIO()
    encoded.is_little_endian, encoded.is_implicit_VR = True, False
    return encoded


def _plain(content: Sequence) -> Sequence:
    """A copy of highdicom's ``content`` as plain pydicom items, which take any item.
    The copy goes through UTF-8, which holds every character (the default
    character set would turn what Latin-1 lacks into "?")."""
    holder = Dataset()
    holder.SpecificCharacterSet = "ISO_IR 192"
    holder.ContentSequence = content
    encoded = _explicit_little_endian()
    write_dataset(encoded, holder)
    plain: Sequence = read_dataset(BytesIO(encoded.getvalue()), is_implicit_VR=False,
                                   is_little_endian=True).ContentSequence
    return plain


def _undefined_lengths(ds: Dataset) -> Dataset:
    """Mark every item and sequence in ``ds`` (a content item) as of undefined length,
    so that the bytes of any part can change length without changing its parents'."""
    ds.is_undefined_length_sequence_item = True
    for element in ds:
        if element.VR == "SQ":
            element.is_undefined_length = True
            for item in element.value:
                _undefined_lengths(item)
    return ds


def _item_bytes(item: Dataset, encodings: tuple[str, ...] = (default_encoding,)) -> bytes:
    """``item`` as a sequence item of undefined length, Explicit VR Little Endian (the
    SR's encoding), its texts in ``encodings`` (Python codecs, as pydicom converts the
    SR's Specific Character Set)."""
    return _encoded_item(_undefined_lengths(item), encodings)


def _element(tag: BaseTag, vr: str, value: object,
             encodings: tuple[str, ...] = (default_encoding,)) -> bytes:
    """One element as pydicom writes it, Explicit VR Little Endian.

    The values made for each SR -- UIDs, dates and times, probabilities -- are
    encoded here as pydicom's writers encode them (a text as it is, padded to even
    length; a double as its 8 bytes), without building pydicom's element and
    buffers: a tenth of the time, some 18 times an SR. Anything else (and any
    doubt: another type, a text that is not ASCII) goes through pydicom. Tests
    compare both for each kind of value.
    """
    if vr == "FD" and type(value) is float:
        return _SHORT_HEADER.pack(tag.group, tag.element, b"FD", 8) + _DOUBLE.pack(value)
    types, padding = _TEXTS.get(vr, ((), b""))
    if type(value) in types:
        # A UID is its own text; a date, time or number written as its original string.
        text = str(value) if vr == "UI" else getattr(value, "original_string", None)
        # (pydicom strips a UID of whitespace, each value of it: one with none to
        # strip, and one value, is written as it is)
        if (type(text) is str and text.isascii() and len(text) < 0xFFFF
                and (vr != "UI" or ("\\" not in text and text == text.strip()))):
            raw = text.encode("ascii")
            if len(raw) % 2:
                raw += padding
            return _SHORT_HEADER.pack(tag.group, tag.element, vr.encode("ascii"),
                                      len(raw)) + raw
    return _encoded(DataElement(tag, vr, value), encodings)


#: An element's tag, VR and 2-byte length (Explicit VR Little Endian, a short VR).
_SHORT_HEADER = struct.Struct("<HH2sH")
_DOUBLE = struct.Struct("<d")
#: The texts :func:`_element` encodes itself, by VR: the types of value it takes, and
#: the padding pydicom gives them.
_TEXTS: dict[str, tuple[tuple[type, ...], bytes]] = {
    "UI": ((str, UID), b"\0"), "DA": ((DA,), b" "), "TM": ((TM,), b" "),
    "DT": ((DT,), b" "), "DS": ((DSfloat,), b" ")}


def _marker(number: int) -> Dataset:
    """A stand-in item, found and cut out of the encoded tree."""
    marker = Dataset()
    marker.UID = f"{_MARKER_UID}.{number}"
    return marker


def _rounded(value: float) -> float:
    return round(float(value), 6)


@dataclass(frozen=True)
class _Template:
    """An encoded item cut where its per-image element values go."""

    chunks: tuple[bytes, ...]

    def fill(self, *elements: bytes) -> bytes:
        """The item with ``elements`` (encoded) in its places, in order."""
        parts = [self.chunks[0]]
        for element, chunk in zip(elements, self.chunks[1:], strict=True):
            parts += [element, chunk]
        return b"".join(parts)


def _value_template(kind: _SlotKind, item: Dataset) -> _Template | None:
    """For an item whose value differs between images (a tracking UID, a probability),
    the item encoded and cut at that value; else None."""
    if kind not in ("uid", "probability"):
        return None
    item = deepcopy(item)
    if kind == "uid":
        item.UID = _MARKER_UID
        cuts = [_element(_UID, "UI", _MARKER_UID)]
    else:
        value = only_item(item.MeasuredValueSequence)
        value.NumericValue = DS(_MARKER_NUMBER, auto_format=True)
        value.FloatingPointValue = _MARKER_NUMBER
        # In the order of their tags, as written.
        cuts = [_element(_FLOATING_POINT_VALUE, "FD", _MARKER_NUMBER),
                _element(_NUMERIC_VALUE, "DS", DS(_MARKER_NUMBER, auto_format=True))]
    rest, chunks = _item_bytes(item), []
    for cut in cuts:
        before, found, rest = rest.partition(cut)
        if not found or cut in rest:
            raise RuntimeError(f"the SR's {kind} item could not be cut at its value")
        chunks.append(before)
    return _Template((*chunks, rest))


def _slot_kind(item: Dataset, concept: tuple[str, str] | None, main: bool) -> _SlotKind | None:
    """What a measurement group's item holds if it differs between images, else None."""
    if concept == _code(TRACKING_UID):
        return "uid"
    if item.ValueType == "IMAGE":
        return "image"
    if main:
        kinds: dict[tuple[str, str], _SlotKind] = {
            _code(FINDING): "finding", _code(FLAGGED): "flagged", _code(COMMENT): "view"}
    else:
        kinds = {_code(PROBABILITY): "probability", _code(THRESHOLD_MET): "threshold_met"}
    return kinds.get(concept) if concept is not None else None


def _slot_item(slot: _Slot, result: Classification, reached: list[str]) -> Dataset:
    """This image's content item for a ``slot`` that takes one of a few values, built
    by highdicom as :func:`build_sr` builds it."""
    if slot.kind == "finding":
        return only_item(QualitativeEvaluation(name=FINDING, value=_class_concept(result.label)))
    if slot.kind == "flagged":
        return only_item(QualitativeEvaluation(name=FLAGGED, value=YES if reached else NO))
    if slot.kind == "threshold_met":
        return only_item(QualitativeEvaluation(name=THRESHOLD_MET,
                                               value=YES if slot.key in reached else NO))
    return _view(result)


@dataclass(frozen=True)
class _Slot:
    """A content item that differs between images: group, position, kind (and for a
    class's probability or threshold met, the class)."""

    group: int
    index: int
    kind: _SlotKind
    key: str = ""
    #: For a tracking UID or a probability: the item cut at its value.
    template: _Template | None = None


def _code(code: Code | CodedConcept) -> tuple[str, str]:
    return str(code.value), str(code.scheme_designator)


def _concept(item: Dataset) -> tuple[str, str] | None:
    names = item.get("ConceptNameCodeSequence")
    return (str(names[0].CodeValue), str(names[0].CodingSchemeDesignator)) if names else None


def _probability(value: float) -> Measurement:
    return Measurement(name=PROBABILITY, value=_rounded(value), unit=codes.UCUM.NoUnits)


def _threshold(point: OperatingPoint) -> Measurement:
    return Measurement(name=THRESHOLD, value=round(float(point.threshold), 6),
                       unit=codes.UCUM.NoUnits)


def _text(name: Code | CodedConcept, value: str) -> TextContentItem:
    return TextContentItem(name=name, value=value,
                           relationship_type=RelationshipTypeValues.CONTAINS)


def _view(result: Classification) -> TextContentItem:
    return _text(COMMENT, VIEW_TEXTS[result.view])


def _notices(validation: Validation) -> list[TextContentItem]:
    """The root's first items: an unvalidated model's warning with the reason, then
    the intended use."""
    notices = [] if validation.validated else [
        _text(COMMENT, f"{UNVALIDATED_WARNING}: {validation.reason}.")]
    return [*notices, _text(COMMENT, INTENDED_USE)]


def _contains(group: MeasurementsAndQualitativeEvaluations, item: TextContentItem) -> None:
    """Add a TEXT item to a measurement group, after its evaluations and before its
    source image (TID 1501 is extensible; highdicom 0.28 builds qualitative
    evaluations as CODE items only)."""
    items = only_item(group).ContentSequence
    images = [i for i, existing in enumerate(items) if existing.ValueType == "IMAGE"]
    items.insert(images[0] if images else len(items), item)
