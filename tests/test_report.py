"""Every SR the node can produce is valid: pydicom strict, dciodvfy, dsrdump."""

from __future__ import annotations

import math
import subprocess
import time
from copy import deepcopy
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from io import BytesIO
from pathlib import Path
from typing import Any

import highdicom as hd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom import config as pydicom_config
from pydicom import dcmread
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.uid import UID, generate_uid
from pydicom.valuerep import DA, DS, DT, TM

from dicom_node import report
from dicom_node.report import Classification, ReportBuilder, build_sr
from model.card import ModelCard, OperatingPoint
from model.card import TestEvidence as Evidence  # not "Test*": pytest would collect it

from dicom_factory import chest_image, cr_monochrome1, dx_16bit, jpeg2000
from helpers.environment import require_tool
from helpers.sr import Result, comments, measurement_groups, read_result, tracking_uids

#: Unvalidated (no test evidence), no operating points.
CARD = ModelCard(version="1.2.0", architecture="concatenated", input_size=300,
                 sha256="0123456789abcdef" * 4, trained=False)
OPERATING_POINTS = {
    "covid": OperatingPoint(threshold=0.30, target_sensitivity=0.90, validation_images=60,
                            test_sensitivity=0.91, test_sensitivity_95=[0.85, 0.95],
                            test_specificity=0.80, test_specificity_95=[0.74, 0.86]),
    "pneumonia": OperatingPoint(threshold=0.60, target_sensitivity=0.85, validation_images=60),
}
#: Validated (test evidence whose interval lies above chance), with operating points
#: for covid and pneumonia.
VALIDATED = ModelCard(version="1.0.0", architecture="concatenated", input_size=300,
                      sha256="fedcba9876543210" * 4, trained=True,
                      test=Evidence(balanced_accuracy_95=[0.6, 0.8], images=200,
                                    data_set="synthetic chest radiographs"),
                      operating_points=OPERATING_POINTS)
CARDS = [pytest.param(CARD, id="unvalidated"), pytest.param(VALIDATED, id="validated")]
RESULT = Classification("covid", {"covid": 0.81, "normal": 0.07, "pneumonia": 0.12})
#: Below pneumonia's threshold but the most probable; covid above its own.
BELOW_ARGMAX = Classification("pneumonia", {"covid": 0.35, "normal": 0.25, "pneumonia": 0.40},
                              view="undetermined")
#: Every class as the Finding, so that an SR carrying another image's Finding or
#: probabilities (or a fixed one) is caught; with VALIDATED's thresholds they flag
#: covid, pneumonia, nothing, covid and nothing -- pneumonia with either flag, or
#: none -- and the views alternate.
RESULTS = [RESULT,
           Classification("pneumonia", {"covid": 0.1234567, "normal": 1e-7,
                                        "pneumonia": 0.8765432}, view="undetermined"),
           Classification("normal", {"covid": 0.25, "normal": 0.5, "pneumonia": 0.25}),
           BELOW_ARGMAX,
           Classification("pneumonia", {"covid": 0.25, "normal": 0.2, "pneumonia": 0.55})]
WARNING = "UNVALIDATED MODEL - NOT FOR CLINICAL USE"
VIEWS = {"frontal": "View: frontal",
         "undetermined": "View undetermined: the image carries no view information; "
                         "it was classified as if frontal."}

#: Every object built here must be standard-valid.
pytestmark = pytest.mark.usefixtures("strict_pydicom")



def sources(shared_dicom: Path) -> list[Dataset]:
    made = [dx_16bit(), cr_monochrome1(), jpeg2000()]
    with pydicom_config.disable_value_validation():
        made += [dcmread(p, force=True) for p in sorted(shared_dicom.glob("*.dcm"))]
    return made


def expected(result: Classification, card: ModelCard = CARD) -> Result:
    """What the SR must say: the predicted class, each probability as written
    (rounded to 6 decimals), the title, the classes at or above their threshold,
    the view, and the warning where the card has no test evidence."""
    points = card.operating_points
    flags = tuple(key for key in ("covid", "normal", "pneumonia")
                  if key in points and result.probabilities[key] >= points[key].threshold)
    return Result(result.label, {k: round(v, 6) for k, v in result.probabilities.items()},
                  WARNING if card.test is None else "Imaging Measurement Report", flags,
                  {key: point.threshold for key, point in points.items()},
                  bool(flags) if points else None, VIEWS[result.view], card.test is None)


def check(path: Path, source: Dataset, result: Classification, sr_uid: str,
          series_uid: str, card: ModelCard = CARD) -> None:
    with pydicom_config.strict_reading():
        sr = dcmread(path)
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert sr.SOPInstanceUID == sr_uid and sr.SeriesInstanceUID == series_uid
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    assert sr.SeriesInstanceUID != source.SeriesInstanceUID
    model = [item for item in sr.ContributingEquipmentSequence
             if item.get("DeviceUID") == card.device_uid]
    assert len(model) == 1  # the model's item carries its Device UID, and only that item
    assert model[0].Manufacturer == card.manufacturer
    assert model[0].PurposeOfReferenceCodeSequence[0].CodeMeaning == "Processing Equipment"
    referenced = sr.CurrentRequestedProcedureEvidenceSequence[0] \
        .ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert referenced.ReferencedSOPInstanceUID == source.SOPInstanceUID
    said = read_result(sr)
    assert said == expected(result, card)
    # The local coding scheme is declared (PS3.3 C.12.1.1.2.1).
    assert [item.CodingSchemeDesignator
            for item in sr.CodingSchemeIdentificationSequence] == ["99DCMNODE"]
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"

    dciodvfy = subprocess.run([require_tool("dciodvfy"), str(path)], capture_output=True,
                              text=True, timeout=60)
    errors = [line for line in dciodvfy.stderr.splitlines() if line.startswith("Error")]
    assert errors == [], dciodvfy.stderr
    dsrdump = subprocess.run([require_tool("dsrdump"), str(path)], capture_output=True,
                             text=True, timeout=60)
    assert dsrdump.returncode == 0 and f'(,,"{said.title}")' in dsrdump.stdout
    assert "W:" not in dsrdump.stderr and "E:" not in dsrdump.stderr, dsrdump.stderr
    # highdicom reads it back as a TID 1500 report, whatever its title.
    back = hd.sr.srread(path)
    assert isinstance(back.content, hd.sr.MeasurementReport)
    assert back.content[0].name.meaning == said.title
    assert len(back.content.get_image_measurement_groups()) == 4


@pytest.mark.parametrize("card", CARDS)
def test_every_sr_is_valid(card: ModelCard, tmp_path: Path, shared_dicom: Path) -> None:
    builder = ReportBuilder(card)
    for i, source in enumerate(sources(shared_dicom)):
        # Each image gets another result than the one before: the builder's kept
        # tree holds the first image's items, which must never show through.
        result = RESULTS[i % len(RESULTS)]
        for how, build in (("highdicom", lambda *a: build_sr(*a, card.device_uid)),
                           ("builder", lambda src, r, _c, *uids: builder.build(src, r, *uids))):
            sr_uid, series_uid = generate_uid(), generate_uid()
            with pydicom_config.disable_value_validation():
                sr = build(source, result, card, sr_uid, series_uid)
            path = tmp_path / f"sr{i}-{how}.dcm"
            sr.save_as(path, enforce_file_format=True)
            check(path, source, result, sr_uid, series_uid, card)
        # The bytes the node writes, twice a source: the second from the template of
        # the document (made from the first).
        for turn in range(2):
            sr_uid, series_uid = generate_uid(), generate_uid()
            with pydicom_config.disable_value_validation():
                encoded = builder.encode(source, result, sr_uid, series_uid)
            path = tmp_path / f"sr{i}-encoded{turn}.dcm"
            path.write_bytes(encoded)
            check(path, source, result, sr_uid, series_uid, card)


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
    again = _reread(sr)
    for keyword in ("InstanceCreationDate", "InstanceCreationTime", "ContentDate",
                    "ContentTime"):
        again.pop(keyword, None)
    for item in again.ContributingEquipmentSequence:
        item.pop("ContributionDateTime", None)
    for element in again.iterall():
        if element.keyword == "UID" and element.VR == "UI":
            element.value = "1.2.3"  # tracking UIDs (the only UIDREF items)
    return again.to_json_dict()


@pytest.mark.parametrize("card", CARDS)
def test_builder_gives_what_highdicom_gives(card: ModelCard, shared_dicom: Path) -> None:
    builder = ReportBuilder(card, institution_name="General")
    made = [dx_16bit(), cr_monochrome1(), jpeg2000(), _latin1_patient(), _bare_source()]
    with pydicom_config.disable_value_validation():
        made += [dcmread(p, force=True) for p in sorted(shared_dicom.glob("*.dcm"))]
    # The kept tree is the first SR's: a normal, unflagged, frontal result; the
    # later ones differ from it and from each other in finding, flags and view, each
    # with both views (the builder keeps the items that take a few values).
    kept = Classification("normal", {"covid": 0.05, "normal": 0.9, "pneumonia": 0.05})
    other_view = {"frontal": "undetermined", "undetermined": "frontal"}
    varied = RESULTS + [replace(result, view=other_view[result.view]) for result in RESULTS]
    with pydicom_config.disable_value_validation():
        first = builder.build(chest_image(), kept, generate_uid(), generate_uid())
        assert read_result(first) == expected(kept, card)
        seen = set(tracking_uids(first))  # the kept tree's: none may come back
        assert len(seen) == 4
        for i, result in enumerate(varied):
            source = made[i % len(made)]
            uids = generate_uid(), generate_uid()
            fast = builder.build(source, result, *uids)
            reference = build_sr(source, result, card, *uids, card.device_uid, "General")
            assert _comparable(fast) == _comparable(reference)
            assert read_result(fast) == expected(result, card)
            # Fresh tracking UIDs for every group of every SR (TID 1501: a group's
            # UID identifies that measurement, in that SR).
            fresh = tracking_uids(fast)
            assert len(set(fresh)) == len(fresh) == 4
            assert not seen & set(fresh), "a tracking UID was reused"
            seen |= set(fresh)


def _utf8_patient() -> Dataset:
    source = dx_16bit()
    source.SpecificCharacterSet = "ISO_IR 192"
    source.PatientName = "Łukasiewicz^Zoë"
    return source


def _other_patient(source: Dataset) -> Dataset:
    """``source`` as another patient's image in another study: every value the SR
    copies from its source differs, and a few attributes more are there."""
    other = deepcopy(source)
    charset = source.get("SpecificCharacterSet")
    other.PatientName = "Ôtré^Zoë" if charset in ("ISO_IR 100", "ISO_IR 192") else "Other^Patient"
    other.PatientID = "P-2"
    other.PatientBirthDate, other.PatientSex = "19700101", "F"
    other.StudyInstanceUID, other.SeriesInstanceUID = generate_uid(), generate_uid()
    other.SOPInstanceUID = generate_uid()
    other.AccessionNumber, other.StudyID = "A-2", "S-2"
    other.StudyDate, other.StudyTime = "20240229", "235959"
    other.ReferringPhysicianName = "Referrer^Other"
    other.PatientAge, other.PatientWeight, other.StudyDescription = "051Y", 62.0, "CHEST PA"
    other.Manufacturer, other.ManufacturerModelName = "Other X-ray Co", "XR 9"
    return other


@pytest.mark.parametrize("card", CARDS)
def test_encoded_srs_are_what_highdicom_gives(card: ModelCard, shared_dicom: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """What the node writes (:meth:`ReportBuilder.encode`) equals highdicom's SR for
    every source, whether the document came from highdicom (the first source of a
    SOP Class and character set) or from its template (every later one: highdicom
    is not asked, as the second round checks)."""
    builder = ReportBuilder(card, institution_name="General")
    builder.warm_up()  # as the node: the DX template made from a made-up source
    made = [dx_16bit(), cr_monochrome1(), jpeg2000(), _latin1_patient(), _bare_source(),
            _utf8_patient()]
    with pydicom_config.disable_value_validation():
        made += [dcmread(p, force=True) for p in sorted(shared_dicom.glob("*.dcm"))]
    rounds = [made, [_other_patient(source) for source in made]]
    for turn, of_turn in enumerate(rounds):
        cases = [(source, RESULTS[(i + turn) % len(RESULTS)], (generate_uid(), generate_uid()))
                 for i, source in enumerate(of_turn)]
        with pydicom_config.disable_value_validation(), monkeypatch.context() as clock:
            if turn == 1:  # another second: the model's kept equipment item is not reused
                clock.setattr(report, "contribution_time", lambda: "20300101000000")
            started = time.monotonic()
            references = [build_sr(source, result, card, *uids, card.device_uid, "General")
                          for source, result, uids in cases]
            with monkeypatch.context() as patched:
                if turn == 1:
                    patched.setattr(report, "_document", _never)
                written = [builder.encode(source, result, *uids)
                           for source, result, uids in cases]
        # Made within this much of each other, whatever the cores were doing; to the
        # second, as the times are written, that is up to a second more.
        within = timedelta(seconds=time.monotonic() - started + 1)
        for (source, result, _), reference, encoded in zip(cases, references, written,
                                                           strict=True):
            fast = dcmread(BytesIO(encoded))
            # Each element once, in order, as pydicom writes what it read of them.
            again = BytesIO()
            fast.save_as(again, enforce_file_format=True)
            assert again.getvalue() == encoded
            assert _comparable(fast) == _comparable(reference)
            assert fast.file_meta == _reread(reference).file_meta
            assert read_result(fast) == expected(result, card)
            assert fast.PatientName == source.get("PatientName", "")
            # Each equipment item says when it contributed: now, as highdicom's does
            # (the template's kept items have their times made for each SR).
            for mine, theirs in zip(fast.ContributingEquipmentSequence,
                                    reference.ContributingEquipmentSequence, strict=True):
                if "ContributionDateTime" in theirs:
                    gap = abs(_when(mine.ContributionDateTime)
                              - _when(theirs.ContributionDateTime))
                    assert gap < within, (mine.ContributionDateTime, gap, within)


#: UIDs as pydicom takes them (components without leading zeros, at most 64 characters).
_UID_TEXT = st.lists(st.integers(0, 10**15), min_size=1, max_size=4).map(
    lambda parts: ".".join(map(str, parts)))
#: Texts a UI element could be given that pydicom changes (strips) or refuses.
_ODD_TEXT = st.text(alphabet=" \t\\\0\u00e9.1", max_size=8)
_OFFSET = st.integers(-720, 840).map(lambda minutes: timezone(timedelta(minutes=minutes)))


@settings(max_examples=300, deadline=None)
@given(uid=_UID_TEXT, odd=_ODD_TEXT,
       moment=st.datetimes(min_value=datetime(1900, 1, 1)), offset=_OFFSET,
       number=st.floats(allow_nan=True, allow_infinity=True),
       probability=st.floats(min_value=0.0, max_value=1.0))
def test_each_srs_own_values_are_encoded_as_pydicom_writes_them(
        uid: str, odd: str, moment: datetime, offset: timezone, number: float,
        probability: float) -> None:
    """The values made for each SR (UIDs, dates and times, probabilities) are encoded
    by ``report`` itself, without pydicom's element (the first cases: pydicom's
    ``DataElement`` is not reached), as the bytes pydicom writes for them, whatever
    the value; anything else -- a UID with whitespace pydicom strips, a text beyond
    ASCII, an integer where a double goes -- as pydicom writes it."""
    tag = report.Tag("UID")
    rounded = report._rounded(probability)
    own = [("UI", uid), ("UI", UID(uid)), ("UI", ""), ("DA", DA(moment.date())),
           ("DA", DA(moment.strftime("%Y%m%d"))), ("TM", TM(moment.time())),
           ("TM", TM(moment.strftime("%H%M%S"))), ("DT", DT(moment)),
           ("DT", DT(moment.replace(tzinfo=offset))), ("FD", number), ("FD", rounded),
           ("DS", DS(rounded, auto_format=True))]
    if math.isfinite(number):
        own.append(("DS", DS(number, auto_format=True)))
    others = [("UI", odd), ("UI", f"{uid} "), ("UI", f"{uid} \\{uid}"), ("FD", 3),
              ("DA", "20240229"), ("UI", "1." + "2" * 0xFFFF)]

    def not_reached(*args: Any) -> None:
        raise AssertionError("pydicom's element was built")

    with pydicom_config.disable_value_validation():
        for vr, value in [*own, *others]:
            expected = report._encoded(DataElement(tag, vr, value), ("iso8859",))
            with pytest.MonkeyPatch.context() as patched:
                if (vr, value) in own:
                    patched.setattr(report, "DataElement", not_reached)
                assert report._element(tag, vr, value) == expected, (vr, value)


def test_an_sr_without_its_sop_instance_uid_is_refused() -> None:
    """An SR is never written without its SOP Instance UID, from the template as from
    highdicom (whose file meta refuses it)."""
    builder = ReportBuilder(CARD)
    builder.warm_up()
    for uid in ("", None):
        with pytest.raises(ValueError, match="SOP Instance UID"):
            builder.encode(dx_16bit(), RESULT, uid, generate_uid())  # type: ignore[arg-type]


def test_highdicoms_equipment_item_says_when_each_sr_was_made() -> None:
    """highdicom's own Contributing Equipment item names the microsecond each SR was
    made, also from the template."""
    builder = ReportBuilder(CARD)
    builder.warm_up()
    times = []
    for _ in range(2):
        encoded = builder.encode(dx_16bit(), RESULT, generate_uid(), generate_uid())
        item = dcmread(BytesIO(encoded)).ContributingEquipmentSequence[-1]
        assert item.ManufacturerModelName == "highdicom"
        times.append(datetime.strptime(str(item.ContributionDateTime), "%Y%m%d%H%M%S.%f"))
        time.sleep(0.02)
    assert timedelta(0) < times[1] - times[0] < timedelta(seconds=2)
    assert abs(datetime.now() - times[1]) < timedelta(seconds=2)


def _when(value: object) -> datetime:
    return datetime.strptime(str(value)[:14], "%Y%m%d%H%M%S")


def _never(*_: object) -> None:
    raise AssertionError("highdicom was asked for a document the template has")


def _reread(sr: Dataset) -> Dataset:
    """``sr`` as the node writes it, read back."""
    encoded = BytesIO()
    sr.save_as(encoded, enforce_file_format=True)
    return dcmread(BytesIO(encoded.getvalue()))


@pytest.mark.parametrize(("keyword", "value"), [
    ("PatientSex", "X"), ("PatientBirthDate", "notadate"), ("StudyDate", "2024-01-01"),
    ("StudyTime", "25:00"), ("PatientName", ["A^B", "C^D"])])
def test_a_source_highdicom_refuses_is_refused_from_the_template_too(
        keyword: str, value: object, monkeypatch: pytest.MonkeyPatch) -> None:
    """A value highdicom's SR does not take fails the SR whether or not the document
    comes from the template (the job is failed with the reason, not sent)."""
    builder = ReportBuilder(CARD)
    builder.warm_up()  # the DX template, as the node makes it
    wrong = dx_16bit()
    with pydicom_config.disable_value_validation():
        # As received: the node reads without validating values.
        wrong.add(DataElement(keyword, dictionary_VR(keyword), value,
                              validation_mode=pydicom_config.IGNORE))
        with pytest.raises((ValueError, TypeError)):
            build_sr(wrong, RESULT, CARD, generate_uid(), generate_uid(), CARD.device_uid)
        monkeypatch.setattr(report, "_document", _never)  # from the template only
        with pytest.raises((ValueError, TypeError)):
            builder.encode(wrong, RESULT, generate_uid(), generate_uid())
        builder.encode(dx_16bit(), RESULT, generate_uid(), generate_uid())  # the others go


def _build(result: Classification, card: ModelCard) -> Dataset:
    sr: Dataset = build_sr(dx_16bit(), result, card, generate_uid(), generate_uid(),
                           card.device_uid)
    return sr


def test_unvalidated_model_says_so_in_title_series_and_first_item() -> None:
    sr = _build(RESULT, CARD)
    (title,) = sr.ConceptNameCodeSequence
    assert (title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning) == (
        "UNVALIDATED-IMR", "99DCMNODE", WARNING)
    assert sr.SeriesDescription.startswith(WARNING) and len(sr.SeriesDescription) <= 64
    assert "NOT A DIAGNOSIS" in sr.SeriesDescription
    first, intended_use = comments(sr)[:2]
    assert sr.ContentSequence[0].TextValue == first
    assert first == f"{WARNING}: the card carries no test results."  # the reason given
    assert intended_use.startswith("Intended use: research and decision support.")
    assert "not a diagnosis" in intended_use and "radiologist" in intended_use
    assert read_result(sr).warning
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"


def test_validated_model_has_the_standard_title_and_still_its_intended_use() -> None:
    sr = _build(RESULT, VALIDATED)
    (title,) = sr.ConceptNameCodeSequence
    assert (title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning) == (
        "126000", "DCM", "Imaging Measurement Report")
    assert sr.SeriesDescription == "AI RESULT - NOT A DIAGNOSIS (model 1.0.0)"
    (intended_use,) = comments(sr)
    assert sr.ContentSequence[0].TextValue == intended_use
    assert "not a diagnosis and must be read by a radiologist" in intended_use
    assert "UNVALIDATED" not in str(sr.to_json_dict())
    assert not read_result(sr).warning


@pytest.mark.parametrize("card", CARDS)
def test_series_description_fits_a_long_version(card: ModelCard) -> None:
    long = card.model_copy(update={"version": "1.0.0+" + "build" * 20})
    description = _build(RESULT, long).SeriesDescription  # LO checked on assignment
    assert len(description) <= 64
    assert description.startswith(WARNING if card.test is None else "AI RESULT - NOT A DIAGNOSIS")
    assert "NOT A DIAGNOSIS" in description


def test_thresholds_flag_classes_while_the_finding_stays_the_most_probable() -> None:
    said = read_result(_build(BELOW_ARGMAX, VALIDATED))
    assert said.finding == "pneumonia"  # the argmax, though below its threshold
    assert said.flags == ("covid",)  # 0.35 >= 0.30; pneumonia 0.40 < 0.60
    assert said.flagged is True
    assert said.thresholds == {"covid": 0.30, "pneumonia": 0.60}
    unflagged = read_result(_build(RESULTS[2], VALIDATED))  # 0.25 and 0.25: neither
    assert unflagged.flags == () and unflagged.flagged is False


def test_threshold_met_at_exactly_the_threshold() -> None:
    result = Classification("normal", {"covid": 0.30, "normal": 0.40, "pneumonia": 0.30})
    assert read_result(_build(result, VALIDATED)).flags == ("covid",)


def test_operating_point_is_described_in_its_class_group() -> None:
    groups = {_group_class(group): group for group in measurement_groups(
        _build(BELOW_ARGMAX, VALIDATED))[1:]}
    texts = {key: [str(item.TextValue) for item in group.ContentSequence
                   if item.ValueType == "TEXT"
                   and item.ConceptNameCodeSequence[0].CodeValue == "111081"]
             for key, group in groups.items()}
    assert texts["covid"] == [
        "threshold 0.300 chosen for sensitivity >= 0.90 on 60 validation images; "
        "on the test set sensitivity 0.91 (0.85-0.95), specificity 0.80 (0.74-0.86)"]
    assert texts["pneumonia"] == [
        "threshold 0.600 chosen for sensitivity >= 0.85 on 60 validation images; "
        "not measured on a test set"]
    assert texts["normal"] == []


def _group_class(group: Dataset) -> str:
    """The class of a probability group, by its finding type's code."""
    codes = {"840539006": "covid", "17621005": "normal", "233604007": "pneumonia"}
    return next(codes[str(item.ConceptCodeSequence[0].CodeValue)]
                for item in group.ContentSequence
                if item.ValueType == "CODE"
                and item.ConceptNameCodeSequence[0].CodeValue == "121071")


def test_a_card_without_operating_points_neither_thresholds_nor_flags() -> None:
    sr = _build(BELOW_ARGMAX, CARD)
    said = read_result(sr)
    assert said.flags == () and said.thresholds == {} and said.flagged is None
    concepts = {item.ConceptNameCodeSequence[0].CodeValue
                for group in measurement_groups(sr) for item in group.ContentSequence}
    assert not concepts & {"122411", "THRESHOLD-MET", "FLAGGED", "111081"}


@pytest.mark.parametrize("view", ["frontal", "undetermined"])
def test_sr_names_the_view(view: str) -> None:
    result = Classification("covid", RESULT.probabilities, view=view)
    assert read_result(_build(result, CARD)).view == VIEWS[view]


def test_classification_refuses_an_unknown_view() -> None:
    with pytest.raises(ValueError, match="view"):
        Classification("covid", RESULT.probabilities, view="lateral")


def test_invalid_patient_age_is_left_out() -> None:
    source = dx_16bit()
    with pydicom_config.disable_value_validation():
        source.PatientAge = "62"
        sr = build_sr(source, RESULT, CARD, generate_uid(), generate_uid(), generate_uid())
    assert "PatientAge" not in sr
    source.PatientAge = "062Y"
    assert build_sr(source, RESULT, CARD, generate_uid(), generate_uid(),
                    generate_uid()).PatientAge == "062Y"


def test_a_model_named_beyond_ascii_keeps_each_sources_character_set() -> None:
    """The kept content tree's texts include the model's name and version: encoded in
    one character set and copied as bytes, a name beyond ASCII would be mis-encoded in
    an SR of another (here UTF-8 after Latin-1, and back). The builder encodes the tree
    in each SR's own character set, the source's, as highdicom's SR is written."""
    card = CARD.model_copy(update={"name": "modèle-płuc-модель", "version": "1.2.0-é"})
    builder = ReportBuilder(card)
    with pydicom_config.disable_value_validation():
        builder.build(_latin1_patient(), RESULT, generate_uid(), generate_uid())
        for source in (_utf8_patient(), _latin1_patient(), _utf8_patient()):
            uids = generate_uid(), generate_uid()
            fast = builder.build(source, RESULT, *uids)
            reference = build_sr(source, RESULT, card, *uids, card.device_uid)
            assert _comparable(fast) == _comparable(reference)
