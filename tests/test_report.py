"""Every SR the node can produce is valid: pydicom strict, dciodvfy, dsrdump."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from pydicom import config as pydicom_config
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicom_node.report import Classification, ReportBuilder, build_sr
from model.card import ModelCard

from dicom_factory import chest_image, cr_monochrome1, dx_16bit, jpeg2000
from helpers.environment import require_tool
from helpers.sr import Result, read_result, tracking_uids

CARD = ModelCard(version="1.2.0", architecture="concatenated", input_size=300,
                 sha256="0123456789abcdef" * 4, trained=False)
RESULT = Classification("covid", {"covid": 0.81, "normal": 0.07, "pneumonia": 0.12})
#: One result per class, so that an SR carrying another image's Finding or
#: probabilities (or a fixed one) is caught.
RESULTS = [RESULT,
           Classification("pneumonia", {"covid": 0.1234567, "normal": 1e-7,
                                        "pneumonia": 0.8765432}),
           Classification("normal", {"covid": 0.25, "normal": 0.5, "pneumonia": 0.25})]


@pytest.fixture(autouse=True)
def strict_pydicom() -> Iterator[None]:
    """Every object built here must be standard-valid (as highdicom's own tests do)."""
    reading = pydicom_config.settings.reading_validation_mode
    writing = pydicom_config.settings.writing_validation_mode
    pydicom_config.settings.reading_validation_mode = pydicom_config.RAISE
    pydicom_config.settings.writing_validation_mode = pydicom_config.RAISE
    try:
        yield
    finally:
        pydicom_config.settings.reading_validation_mode = reading
        pydicom_config.settings.writing_validation_mode = writing


def sources(shared_dicom: Path) -> list[Dataset]:
    made = [dx_16bit(), cr_monochrome1(), jpeg2000()]
    with pydicom_config.disable_value_validation():
        made += [dcmread(p, force=True) for p in sorted(shared_dicom.glob("*.dcm"))]
    return made


def expected(result: Classification) -> Result:
    """What the SR must say: the predicted class, and each probability as written
    (rounded to 6 decimals)."""
    return Result(result.label, {k: round(v, 6) for k, v in result.probabilities.items()})


def check(path: Path, source: Dataset, result: Classification, sr_uid: str,
          series_uid: str) -> None:
    with pydicom_config.strict_reading():
        sr = dcmread(path)
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert sr.SOPInstanceUID == sr_uid and sr.SeriesInstanceUID == series_uid
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    assert sr.SeriesInstanceUID != source.SeriesInstanceUID
    model = [item for item in sr.ContributingEquipmentSequence
             if item.get("DeviceUID") == CARD.device_uid]
    assert len(model) == 1  # the model's item carries its Device UID, and only that item
    assert model[0].Manufacturer == CARD.manufacturer
    assert model[0].PurposeOfReferenceCodeSequence[0].CodeMeaning == "Processing Equipment"
    referenced = sr.CurrentRequestedProcedureEvidenceSequence[0] \
        .ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert referenced.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert read_result(sr) == expected(result)

    dciodvfy = subprocess.run([require_tool("dciodvfy"), str(path)], capture_output=True,
                              text=True, timeout=60)
    errors = [line for line in dciodvfy.stderr.splitlines() if line.startswith("Error")]
    assert errors == [], dciodvfy.stderr
    dsrdump = subprocess.run([require_tool("dsrdump"), str(path)], capture_output=True,
                             text=True, timeout=60)
    assert dsrdump.returncode == 0 and "Imaging Measurement Report" in dsrdump.stdout
    assert "W:" not in dsrdump.stderr and "E:" not in dsrdump.stderr, dsrdump.stderr


def test_every_sr_is_valid(tmp_path: Path, shared_dicom: Path) -> None:
    builder = ReportBuilder(CARD)
    for i, source in enumerate(sources(shared_dicom)):
        # Each image gets another result than the one before: the builder's kept
        # tree holds the first image's items, which must never show through.
        result = RESULTS[i % len(RESULTS)]
        for how, build in (("highdicom", lambda *a: build_sr(*a, CARD.device_uid)),
                           ("builder", lambda src, r, _c, *uids: builder.build(src, r, *uids))):
            sr_uid, series_uid = generate_uid(), generate_uid()
            with pydicom_config.disable_value_validation():
                sr = build(source, result, CARD, sr_uid, series_uid)
            path = tmp_path / f"sr{i}-{how}.dcm"
            sr.save_as(path, enforce_file_format=True)
            check(path, source, result, sr_uid, series_uid)


def _latin1_patient() -> Dataset:
    source = cr_monochrome1()
    source.SpecificCharacterSet = "ISO_IR 100"
    source.PatientName = "Müller^Zoë"
    source.PatientAge, source.PatientWeight = "062Y", 71.5
    source.InstitutionName, source.StationName = "Hôpital", "XR-2"
    return source


def _bare_source() -> Dataset:
    """A data set with no patient or equipment attributes at all."""
    source = dx_16bit()
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                    "AccessionNumber", "StudyID", "StudyDate", "StudyTime", "Manufacturer"):
        delattr(source, keyword)
    return source


def _comparable(sr: Dataset) -> dict[str, Any]:
    """``sr`` as encoded and read back, without what differs on every build anyway:
    creation dates and times, and the random tracking UIDs."""
    encoded = BytesIO()
    sr.save_as(encoded, enforce_file_format=True)
    again = dcmread(BytesIO(encoded.getvalue()))
    for keyword in ("InstanceCreationDate", "InstanceCreationTime", "ContentDate",
                    "ContentTime"):
        again.pop(keyword, None)
    for item in again.ContributingEquipmentSequence:
        item.pop("ContributionDateTime", None)
    for element in again.iterall():
        if element.keyword == "UID" and element.VR == "UI":
            element.value = "1.2.3"  # tracking UIDs (the only UIDREF items)
    return again.to_json_dict()


@pytest.mark.parametrize("result", RESULTS[:2])
def test_builder_gives_what_highdicom_gives(result: Classification, shared_dicom: Path
                                            ) -> None:
    builder = ReportBuilder(CARD, institution_name="General")
    made = [dx_16bit(), cr_monochrome1(), jpeg2000(), _latin1_patient(), _bare_source()]
    with pydicom_config.disable_value_validation():
        made += [dcmread(p, force=True) for p in sorted(shared_dicom.glob("*.dcm"))]
    with pydicom_config.disable_value_validation():
        first = builder.build(chest_image(), RESULTS[2], generate_uid(), generate_uid())
        seen = set(tracking_uids(first))  # the kept tree's: none may come back
        assert len(seen) == 4
        for source in made:
            uids = generate_uid(), generate_uid()
            fast = builder.build(source, result, *uids)
            reference = build_sr(source, result, CARD, *uids, CARD.device_uid, "General")
            assert _comparable(fast) == _comparable(reference)
            assert read_result(fast) == expected(result)
            # Fresh tracking UIDs for every group of every SR (TID 1501: a group's
            # UID identifies that measurement, in that SR).
            fresh = tracking_uids(fast)
            assert len(set(fresh)) == len(fresh) == 4
            assert not seen & set(fresh), "a tracking UID was reused"
            seen |= set(fresh)


def test_invalid_patient_age_is_left_out() -> None:
    source = dx_16bit()
    with pydicom_config.disable_value_validation():
        source.PatientAge = "62"
        sr = build_sr(source, RESULT, CARD, generate_uid(), generate_uid(), generate_uid())
    assert "PatientAge" not in sr
    source.PatientAge = "062Y"
    assert build_sr(source, RESULT, CARD, generate_uid(), generate_uid(),
                    generate_uid()).PatientAge == "062Y"
