"""Intake rules and the full-decode guard."""

from __future__ import annotations

from io import BytesIO

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from dicom_node import intake
from dicom_node.config import IntakeRules
from dicom_node.errors import (
    DatasetMismatch,
    PixelBudgetExceeded,
    PolicyRefused,
    UndecodableDataset,
)
from dicom_node.intake import Disposition

from dicom_factory import CT, SC, chest_image, ct_head, jpeg2000, nested_sequences

RULES = IntakeRules()


def test_chest_dx_is_queued() -> None:
    decision = intake.decide(chest_image(), RULES)
    assert decision.disposition is Disposition.QUEUE
    assert decision.reason == "body part is chest"


def test_ct_head_is_ignored_by_default_and_refused_when_configured() -> None:
    assert intake.decide(ct_head(), RULES).disposition is Disposition.IGNORE
    with pytest.raises(PolicyRefused):
        intake.decide(ct_head(), IntakeRules(non_chest="refuse"))


def test_dx_of_another_body_part_is_ignored() -> None:
    decision = intake.decide(chest_image(body_part="KNEE"), RULES)
    assert decision == intake.IntakeDecision(Disposition.IGNORE, "body part is not chest")


def test_description_decides_when_body_part_is_absent() -> None:
    ds = chest_image(body_part=None, StudyDescription="XR Thorax 2 views")
    assert intake.decide(ds, RULES).reason == "StudyDescription says chest"


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
