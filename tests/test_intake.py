"""Intake rules (body part, then view) and the full-decode guard."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import pytest
from pydantic import ValidationError
from pydicom import config as pydicom_config
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from dicom_node import intake
from dicom_node.config import IntakeRules, Settings
from dicom_node.errors import (
    DatasetMismatch,
    PixelBudgetExceeded,
    PolicyRefused,
    UndecodableDataset,
)
from dicom_node.intake import Disposition, View

from dicom_factory import (
    CT,
    SC,
    SHARED_DICOM_FILES,
    chest_image,
    ct_head,
    jpeg2000,
    nested_sequences,
)

RULES = IntakeRules()


def test_chest_dx_is_queued() -> None:
    decision = intake.decide(chest_image(), RULES)
    assert decision.disposition is Disposition.QUEUE
    assert decision.reason == "body part is chest; view is frontal (View Position PA)"
    assert decision.view is View.FRONTAL


def test_ct_head_is_ignored_by_default_and_refused_when_configured() -> None:
    assert intake.decide(ct_head(), RULES).disposition is Disposition.IGNORE
    with pytest.raises(PolicyRefused):
        intake.decide(ct_head(), IntakeRules(non_chest="refuse"))


def test_dx_of_another_body_part_is_ignored() -> None:
    decision = intake.decide(chest_image(body_part="KNEE"), RULES)
    assert decision == intake.IntakeDecision(Disposition.IGNORE, "body part is not chest")


def test_description_decides_when_body_part_is_absent() -> None:
    ds = chest_image(body_part=None, StudyDescription="XR Thorax 2 views")
    assert intake.decide(ds, RULES).reason == (
        "StudyDescription says chest; view is frontal (View Position PA)")


def test_anatomic_region_code_counts_as_body_part() -> None:
    ds = chest_image(body_part=None)
    region = Dataset()
    region.CodeValue = "51185008"
    region.CodingSchemeDesignator = "SCT"
    region.CodeMeaning = "Thorax"
    ds.AnatomicRegionSequence = Sequence([region])
    assert intake.decide(ds, RULES).disposition is Disposition.QUEUE


@pytest.mark.parametrize(("policy", "expected"), [("accept", Disposition.QUEUE),
                                                  ("ignore", Disposition.IGNORE)])
def test_undetermined_policy(policy: str, expected: Disposition) -> None:
    ds = chest_image(body_part=None, sop_class=SC, StudyDescription="No Finding")
    assert intake.decide(ds, IntakeRules(undetermined=policy)).disposition is expected


def test_undetermined_refused() -> None:
    with pytest.raises(PolicyRefused):
        intake.decide(chest_image(body_part=None), IntakeRules(undetermined="refuse"))


def test_modality_outside_rules_is_not_chest() -> None:
    ds = chest_image(sop_class=SC, modality="OT")
    assert intake.decide(ds, RULES).reason == "modality OT not accepted"


def test_rules_are_data() -> None:
    rules = IntakeRules(sop_classes=[*RULES.sop_classes, str(CT)], modalities=["CT"],
                        chest_body_parts=["HEAD"])
    assert intake.decide(ct_head(), rules).disposition is Disposition.QUEUE


# --- the view ----------------------------------------------------------------------


def _chest(**attributes: object) -> Dataset:
    """A chest DX that says nothing of its view but what ``attributes`` say (chest_image
    sets View Position PA and Patient Orientation P\\F; both go)."""
    ds = chest_image(rows=8, columns=8)
    del ds.ViewPosition, ds.PatientOrientation
    with pydicom_config.disable_value_validation():  # "pa " is a real, non-conformant CS
        for keyword, value in attributes.items():
            setattr(ds, keyword, value)
    return ds


def _coded(code: Code) -> Sequence:
    item = Dataset()
    item.CodeValue = code.value
    item.CodingSchemeDesignator = code.scheme_designator
    item.CodeMeaning = code.meaning
    return Sequence([item])


def _view(ds: Dataset, rules: IntakeRules = RULES) -> tuple[Disposition, View | None]:
    decision = intake.decide(ds, rules)
    return decision.disposition, decision.view


QUEUED_FRONTAL = (Disposition.QUEUE, View.FRONTAL)
QUEUED_UNDETERMINED = (Disposition.QUEUE, View.UNDETERMINED)


@pytest.mark.parametrize(("position", "expected"), [
    ("PA", QUEUED_FRONTAL),
    ("AP", QUEUED_FRONTAL),
    ("pa ", QUEUED_FRONTAL),
    ("LL", (Disposition.IGNORE, View.LATERAL)),
    ("RL", (Disposition.IGNORE, View.LATERAL)),
    ("LATERAL", (Disposition.IGNORE, View.LATERAL)),
    ("LLD", (Disposition.IGNORE, View.DECUBITUS)),
    ("RLO", (Disposition.IGNORE, View.OBLIQUE)),
    ("", QUEUED_UNDETERMINED),
    ("XYZ", QUEUED_UNDETERMINED),
])
def test_view_position_decides_the_view(position: str, expected: tuple[Disposition, View]
                                        ) -> None:
    assert _view(_chest(ViewPosition=position)) == expected


def test_view_position_reasons_quote_the_term() -> None:
    assert intake.decide(_chest(ViewPosition="pa "), RULES).reason == (
        "body part is chest; view is frontal (View Position PA)")
    assert intake.decide(_chest(ViewPosition="LL"), RULES).reason == (
        "view is lateral (View Position LL)")


def test_absent_view_is_undetermined_and_accepted() -> None:
    decision = intake.decide(_chest(), RULES)
    assert (decision.disposition, decision.view) == QUEUED_UNDETERMINED
    assert decision.reason == "body part is chest; view undetermined; accepted"


@pytest.mark.parametrize(("code", "expected"), [
    (codes.cid4010.PosteroAnterior, QUEUED_FRONTAL),
    (codes.cid4010.AnteroPosterior, QUEUED_FRONTAL),
    (codes.cid4010.LateralProjection, (Disposition.IGNORE, View.LATERAL)),
    (codes.cid4010.LeftLateral, (Disposition.IGNORE, View.LATERAL)),
    (codes.cid4010.RightAnteriorOblique, (Disposition.IGNORE, View.OBLIQUE)),
    (codes.cid4010.AxialProjection, (Disposition.IGNORE, View.OTHER)),
    # Legacy SRT values: R-10206 and R-102CD in pydicom's SNOMED mapping; R-10214, the
    # older postero-anterior, as dcm4che and PixelMed write it.
    (Code("R-10206", "SRT", "antero-posterior"), QUEUED_FRONTAL),
    (Code("R-10214", "SRT", "postero-anterior"), QUEUED_FRONTAL),
    (Code("R-102CD", "SRT", "lateral"), (Disposition.IGNORE, View.LATERAL)),
    (Code("R-10236", "SRT", "left lateral"), (Disposition.IGNORE, View.LATERAL)),
    (Code("12345", "99LOCAL", "local view"), QUEUED_UNDETERMINED),
])
def test_view_code_sequence_decides_the_view(code: Code, expected: tuple[Disposition, View]
                                             ) -> None:
    assert _view(_chest(ViewCodeSequence=_coded(code))) == expected


@pytest.mark.parametrize(("orientation", "expected"), [
    (["L", "F"], QUEUED_FRONTAL),
    (["R", "H"], QUEUED_FRONTAL),
    (["P", "F"], (Disposition.IGNORE, View.LATERAL)),
    (["A", "F"], (Disposition.IGNORE, View.LATERAL)),
    (["LP", "F"], (Disposition.IGNORE, View.OBLIQUE)),
    ("L", QUEUED_UNDETERMINED),  # one value: malformed, no evidence
    (["L", "F", "A"], QUEUED_UNDETERMINED),
    (["L", "X"], QUEUED_UNDETERMINED),
    (["", "F"], QUEUED_UNDETERMINED),
])
def test_patient_orientation_decides_the_view(orientation: object,
                                              expected: tuple[Disposition, View]) -> None:
    assert _view(_chest(PatientOrientation=orientation)) == expected


@pytest.mark.parametrize(("attribute", "text", "expected"), [
    ("SeriesDescription", "CHEST PA", QUEUED_FRONTAL),
    ("ProtocolName", "CHEST_AP", QUEUED_FRONTAL),
    ("ProtocolName", "THORAX LAT", (Disposition.IGNORE, View.LATERAL)),
    ("StudyDescription", "CXR LATERAL", (Disposition.IGNORE, View.LATERAL)),
    ("SeriesDescription", "Torax lat.", (Disposition.IGNORE, View.LATERAL)),
    ("SeriesDescription", "CHEST LAT DECUB", (Disposition.IGNORE, View.DECUBITUS)),
    ("StudyDescription", "CHEST PAIN", QUEUED_UNDETERMINED),
    ("StudyDescription", "SPAIN APPLE", QUEUED_UNDETERMINED),
    # A two-view study's description names both views: it says nothing of one image.
    ("StudyDescription", "CHEST PA AND LAT", QUEUED_UNDETERMINED),
    ("StudyDescription", "CXR PA/LATERAL", QUEUED_UNDETERMINED),
])
def test_description_words_decide_the_view(attribute: str, text: str,
                                           expected: tuple[Disposition, View]) -> None:
    assert _view(_chest(**{attribute: text})) == expected


def test_series_description_speaks_before_the_study_description() -> None:
    lateral = _chest(StudyDescription="CHEST PA AND LAT", SeriesDescription="LATERAL")
    assert _view(lateral) == (Disposition.IGNORE, View.LATERAL)
    frontal = _chest(StudyDescription="CHEST LAT", ProtocolName="CHEST PA")
    assert _view(frontal) == QUEUED_FRONTAL


def test_strongest_source_decides() -> None:
    # The code says frontal; orientation and description say lateral.
    ds = _chest(ViewCodeSequence=_coded(codes.cid4010.PosteroAnterior),
                PatientOrientation=["P", "F"], SeriesDescription="LATERAL")
    assert _view(ds) == QUEUED_FRONTAL
    # No code; View Position beats orientation (chest_image's own PA with P\F).
    assert _view(chest_image(rows=8, columns=8)) == QUEUED_FRONTAL
    # Orientation beats the description.
    ds = _chest(PatientOrientation=["A", "F"], SeriesDescription="CHEST PA")
    assert _view(ds) == (Disposition.IGNORE, View.LATERAL)


@pytest.mark.parametrize(("position", "code", "reason"), [
    ("PA", codes.cid4010.LateralProjection,
     "view conflict: View Position PA, View Code Sequence lateral"),
    ("LL", codes.cid4010.PosteroAnterior,
     "view conflict: View Position LL, View Code Sequence frontal"),
])
def test_view_position_and_code_in_conflict_are_not_frontal(position: str, code: Code,
                                                            reason: str) -> None:
    ds = _chest(ViewPosition=position, ViewCodeSequence=_coded(code))
    decision = intake.decide(ds, RULES)
    assert decision.disposition is Disposition.IGNORE
    assert decision.view is View.LATERAL
    assert decision.reason == reason
    with pytest.raises(PolicyRefused, match="view conflict"):
        intake.decide(ds, IntakeRules(non_frontal="refuse"))


def test_non_frontal_refused_when_configured() -> None:
    with pytest.raises(PolicyRefused, match=r"not a frontal view: .*View Position LL"):
        intake.decide(_chest(ViewPosition="LL"), IntakeRules(non_frontal="refuse"))


@pytest.mark.parametrize(("policy", "expected"), [
    ("accept", QUEUED_UNDETERMINED),
    ("ignore", (Disposition.IGNORE, View.UNDETERMINED)),
])
def test_undetermined_view_policy(policy: str, expected: tuple[Disposition, View]) -> None:
    assert _view(_chest(), IntakeRules(undetermined_view=policy)) == expected


def test_undetermined_view_refused() -> None:
    with pytest.raises(PolicyRefused, match="view undetermined"):
        intake.decide(_chest(), IntakeRules(undetermined_view="refuse"))


@pytest.mark.parametrize("text", ["CHEST PA ZEBRAFISH", "ZEBRAFISH LAT", "ZEBRAFISH"])
def test_reason_never_quotes_a_description(text: str) -> None:
    for attribute in ("SeriesDescription", "StudyDescription"):
        reason = intake.decide(_chest(**{attribute: text}), RULES).reason
        assert "ZEBRAFISH" not in reason.upper()
        assert attribute in reason or "undetermined" in reason


def test_view_is_judged_only_for_chest_images() -> None:
    decision = intake.decide(chest_image(body_part="KNEE", ViewPosition="LL"), RULES)
    assert decision == intake.IntakeDecision(Disposition.IGNORE, "body part is not chest")
    assert decision.view is None
    assert intake.decide(ct_head(), RULES).view is None


def test_a_term_cannot_be_frontal_and_not() -> None:
    with pytest.raises(ValidationError, match="non_frontal_view_positions"):
        IntakeRules(frontal_view_positions=["PA", "ll"])


def test_view_policy_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DICOM_NODE_INTAKE__UNDETERMINED_VIEW", "ignore")
    assert Settings().intake.undetermined_view == "ignore"


# The sample files with the default rules. The two real CR files say View Position PA.
# The real NIH Secondary Capture of a DX has a bare header (no View Position, View Code
# Sequence, Patient Orientation or view words; StudyDescription "No Finding"): its view
# is undetermined and, by default, accepted. The synthetic stand-ins of a fresh clone
# (make_dicom_samples) carry the same view information.
@pytest.mark.parametrize(("name", "real_view"), [
    (SHARED_DICOM_FILES[0], View.FRONTAL),
    (SHARED_DICOM_FILES[1], View.FRONTAL),
    (SHARED_DICOM_FILES[2], View.UNDETERMINED),
])
def test_sample_files_are_queued_with_their_view(shared_dicom: Path, name: str,
                                                 real_view: View) -> None:
    ds = dcmread(shared_dicom / name, force=True, stop_before_pixels=True)
    decision = intake.decide(ds, Settings().intake)
    assert decision.disposition is Disposition.QUEUE
    assert decision.view is real_view  # the synthetic stand-ins carry the same view data


def test_pixel_budget_checked_before_decoding() -> None:
    ds = chest_image(rows=64, columns=64)
    ds.NumberOfFrames = 1000  # declared, with the pixel data of one frame
    with pytest.raises(PixelBudgetExceeded):
        intake.decode_pixels(ds, max_pixels=1_000_000)


def test_short_native_pixel_data_is_a_mismatch() -> None:
    ds = chest_image(rows=64, columns=64)
    ds.PixelData = ds.PixelData[:100]
    with pytest.raises(DatasetMismatch, match="length"):
        intake.decode_pixels(ds, max_pixels=1_000_000)


@pytest.mark.parametrize("keyword", ["PhotometricInterpretation", "SamplesPerPixel"])
def test_image_attributes_needed_to_read_the_pixels_missing_is_undecodable(
        keyword: str) -> None:
    ds = chest_image(rows=64, columns=64)
    delattr(ds, keyword)
    with pytest.raises(UndecodableDataset):  # 0xC210, never the 0xC211 catch-all
        intake.decode_pixels(ds, max_pixels=1_000_000)


def test_missing_pixel_data_is_a_mismatch() -> None:
    ds = chest_image()
    del ds.PixelData
    with pytest.raises(DatasetMismatch):
        intake.decode_pixels(ds, max_pixels=10**8)


def test_corrupt_jpeg2000_fragment_is_undecodable() -> None:
    ds = jpeg2000(rows=64, columns=64)
    data = bytearray(ds.PixelData)
    middle = len(data) // 2
    data[middle:middle + 64] = b"\xff" * 64
    data[-40:-2] = b"\x00" * 38
    ds.PixelData = bytes(data)
    with pytest.raises(UndecodableDataset):
        intake.decode_pixels(ds, max_pixels=10**8)


def test_deep_nesting_is_undecodable() -> None:
    received = dcmread(BytesIO(nested_sequences(40)))
    with pytest.raises(UndecodableDataset, match="nested deeper"):
        intake.decode_elements(received)


def test_malformed_element_found_before_acknowledging() -> None:
    ds = chest_image(rows=8, columns=8)
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    raw = bytearray(buffer.getvalue())
    # Rows (0028,0010) US with a 3-byte value: reads fine, fails when accessed.
    tag = bytes.fromhex("28001000") + b"US"
    at = raw.index(tag)
    raw[at + 6:at + 10] = b"\x03\x00\x01\x00"
    received = dcmread(BytesIO(bytes(raw)))
    with pytest.raises(UndecodableDataset, match="malformed element"):
        intake.decode_elements(received)


@pytest.mark.parametrize("value", ["../../x", "1.2.3/4", "", "1." + "2" * 70, None,
                                   "1..2", "1.02", "1.2.", ".1.2"])
def test_invalid_uids_refused(value: str | None) -> None:
    with pytest.raises(DatasetMismatch):
        intake.check_uid(value, "SOPInstanceUID")


@pytest.mark.parametrize(("width", "function", "refused"), [
    (0.5, None, True), (0, "LINEAR_EXACT", True), (0.5, "LINEAR_EXACT", False), (1, None, False)])
def test_a_window_width_below_its_minimum_is_refused(width: float, function: str | None,
                                                     refused: bool) -> None:
    """Found in review: pydicom's windowing refuses it, so the worker would have failed an
    acknowledged image (PS3.3 C.11.2.1.2: at least 1; above 0 for LINEAR_EXACT)."""
    ds = chest_image(rows=16, columns=16)
    ds.WindowWidth = width
    if function:
        ds.VOILUTFunction = function
    if refused:
        with pytest.raises(DatasetMismatch, match="Window Width"):
            intake.decode_pixels(ds, 10**6)
    else:
        intake.decode_pixels(ds, 10**6)
