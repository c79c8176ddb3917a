"""The evidence image: the map where it is high, the legend in the pixels, the
source's resolution and display, and a Secondary Capture that is valid
(pydicom strict, dciodvfy) and belongs to the source's patient and study."""

from __future__ import annotations

import logging
import subprocess
import warnings
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom import config as pydicom_config
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicom_node import evidence
from model.card import ModelCard
from model.card import TestEvidence as Evidence  # not "Test*": pytest would collect it
from model.preprocess import dicom_gray8

from dicom_factory import cr_monochrome1, dx_16bit
from helpers.environment import require_tool

UNVALIDATED = ModelCard(version="1.2.0", architecture="concatenated", input_size=300,
                        sha256="0123456789abcdef" * 4, trained=False)
VALIDATED = ModelCard(version="1.0.0", architecture="concatenated", input_size=300,
                      sha256="fedcba9876543210" * 4, trained=True,
                      test=Evidence(balanced_accuracy_95=[0.6, 0.8], images=200,
                                    data_set="synthetic chest radiographs"))
CARDS = [pytest.param(UNVALIDATED, id="unvalidated"), pytest.param(VALIDATED, id="validated")]
PROBABILITIES = {"covid": 0.12, "normal": 0.21, "pneumonia": 0.67}
MODEL_TEXT = "concatenated 1.2.0"
#: Written out here, not taken from the node, so that a changed warning fails.
WARNING = "UNVALIDATED MODEL - NOT FOR CLINICAL USE"
#: The Patient and General Study attributes the image must share with its source.
PATIENT_AND_STUDY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                     "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID",
                     "AccessionNumber", "ReferringPhysicianName")

#: Every object built here must be standard-valid.
pytestmark = pytest.mark.usefixtures("strict_pydicom")



def sources(shared_dicom: Path) -> list[Dataset]:
    # Non-square, as radiographs are: rows and columns must not be swapped anywhere.
    made = [dx_16bit(rows=600, columns=480), cr_monochrome1(rows=512, columns=560)]
    with pydicom_config.disable_value_validation():
        made += [dcmread(p, force=True) for p in sorted(shared_dicom.glob("*.dcm"))]
    return made


def hot_spot(row: int, column: int, index: int = 2) -> np.ndarray:
    """10 x 10 maps where one cell speaks for class ``index`` and nothing else does."""
    maps = np.zeros((10, 10, 3), dtype=np.float32)
    maps[row, column, index] = 3.0
    return maps


def render(source: Dataset, maps: np.ndarray | None = None, label: str = "pneumonia",
           validated: bool = False, max_side: int = 0) -> np.ndarray:
    with pydicom_config.disable_value_validation():
        return evidence.render(source, np.zeros((10, 10, 3), np.float32) if maps is None
                               else maps, label, PROBABILITIES, MODEL_TEXT, validated,
                               max_side)


def grayish(rgb: np.ndarray) -> np.ndarray:
    """Where a pixel has no colour (R = G = B)."""
    return (rgb[..., 0] == rgb[..., 1]) & (rgb[..., 1] == rgb[..., 2])


def test_legend_says_the_finding_the_model_and_the_warning() -> None:
    lines = evidence.legend_lines("covid", PROBABILITIES, MODEL_TEXT, validated=False)
    assert lines[0] == "AI finding: COVID-19"
    assert lines[1:4] == ["COVID-19\t12.0 %", "Normal\t21.0 %", "Pneumonia\t67.0 %"]
    assert lines[4:] == [f"Model: {MODEL_TEXT}", "AI RESULT - NOT FOR DIAGNOSTIC USE", WARNING]
    assert WARNING not in evidence.legend_lines("covid", PROBABILITIES, MODEL_TEXT, True)


def test_image_is_the_source_as_displayed_at_its_own_resolution(shared_dicom: Path) -> None:
    for source in sources(shared_dicom):
        rgb = render(source)  # no evidence anywhere: no overlay
        with pydicom_config.disable_value_validation():
            gray = dicom_gray8(source)  # MONOCHROME1 inverted, windowed
        assert rgb.shape == (source.Rows, source.Columns, 3) and rgb.dtype == np.uint8
        # Below the legend (in the top left corner), the radiograph untouched, as the
        # network saw it.
        below = slice(source.Rows // 2, None)
        assert grayish(rgb)[below].all()
        np.testing.assert_array_equal(rgb[below, :, 0], gray[below])


@pytest.mark.parametrize(("rows", "columns", "max_side", "expected"), [
    (2500, 2048, 1024, (1024, 839)), (2048, 2500, 1024, (839, 1024)),
    (440, 440, 1024, (440, 440)), (1024, 1024, 1024, (1024, 1024)),
    (2048, 2048, 0, (2048, 2048)),
    # Long and narrow: the shorter side stays at 512 (or its own), for the legend.
    (7000, 2000, 1024, (1792, 512)), (4000, 300, 1024, (4000, 300))])
def test_a_larger_source_is_shown_reduced_with_its_aspect(
        rows: int, columns: int, max_side: int, expected: tuple[int, int]) -> None:
    assert evidence.evidence_size(rows, columns, max_side) == expected


def test_the_legend_fits_across_a_long_narrow_source_reduced() -> None:
    source = dx_16bit(rows=3000, columns=700)  # a stitched spine or leg
    rgb = render(source, max_side=1024)
    assert rgb.shape == (2194, 512, 3)
    with pydicom_config.disable_value_validation():
        gray = np.asarray(Image.fromarray(dicom_gray8(source), mode="L").resize(
            (512, 2194), Image.Resampling.BOX))
    # The legend's box ends before the right edge: that column is the radiograph's.
    np.testing.assert_array_equal(rgb[:, -1, 0], gray[:, -1])
    assert not (rgb[:200, :, 0] == gray[:200]).all()  # while the legend is there


def test_the_reduced_radiograph_averages_what_each_pixel_covers() -> None:
    # An anti-scatter grid's fine lines (here every other column, black and white):
    # reduced by averaging they are an even gray; taken a pixel here and there
    # (nearest neighbour, or bilinear between two) they would alias into coarse
    # stripes that are not in the image.
    source = dx_16bit(rows=1250, columns=2500)
    del source.WindowCenter, source.WindowWidth, source.RescaleSlope, source.RescaleIntercept
    grid = np.zeros((1250, 2500), np.uint16)
    grid[:, ::2] = 4095
    source.PixelData = grid.tobytes()
    rgb = render(source, max_side=1024)
    assert rgb.shape == (512, 1024, 3)
    below = rgb[300:, :, 0].astype(np.int16)  # under the legend
    assert abs(float(below.mean()) - 127.5) < 2 and int(below.std()) <= 30
    # The same image at its own size, reduced exactly by two: the mean of each 2 x 2.
    gray = np.asarray(Image.fromarray(dicom_gray8(source), mode="L"), dtype=np.float64)
    halved = render(source, max_side=1250)
    blocks = gray.reshape(625, 2, 1250, 2).mean(axis=(1, 3))
    assert np.abs(halved[300:, :, 0] - blocks[300:]).max() <= 1


def test_legend_is_burned_in_and_changes_with_what_it_says(shared_dicom: Path) -> None:
    source = sources(shared_dicom)[-1]
    base = render(source, label="pneumonia", validated=True)
    with pydicom_config.disable_value_validation():
        gray = dicom_gray8(source)
    rows, columns = gray.shape
    legend = base[..., 0] != gray
    assert legend.any()
    ys, xs = np.nonzero(legend)
    assert ys.max() < rows // 2 and xs.max() < columns * 3 // 4  # a box in the corner
    # Text, bright on the darkened box, on every line of the legend.
    box = base[:ys.max() + 1, :xs.max() + 1]
    text_rows = np.nonzero((box.min(axis=2) > 200).any(axis=1))[0]
    assert len(np.unique(text_rows // evidence.font_size(rows, columns))) >= 7
    # Another finding, the warning: other pixels, in the corner only.
    warned = render(source, label="pneumonia", validated=False)
    for other in (render(source, label="covid", validated=True), warned):
        changed = (other != base).any(axis=2)
        assert changed.any()
        assert not changed[rows // 2:].any() and not changed[:, columns * 3 // 4:].any()
    # The warning in red (the colour bar has red too: only new red counts).
    red = (warned[..., 0] > 200) & (warned[..., 1] < 130) & (warned[..., 2] < 130)
    red_before = (base[..., 0] > 200) & (base[..., 1] < 130) & (base[..., 2] < 130)
    assert (red & ~red_before).sum() > 50


def test_overlay_is_where_the_predicted_class_has_its_evidence(shared_dicom: Path) -> None:
    source = sources(shared_dicom)[-1]
    rows, columns = source.Rows, source.Columns
    # Lower right of the middle; rows and columns apart, so that a swap shows.
    rgb = render(source, hot_spot(7, 5, index=2), label="pneumonia")
    coloured = ~grayish(rgb)
    block = (slice(rows * 7 // 10, rows * 8 // 10), slice(columns * 5 // 10, columns * 6 // 10))
    assert coloured[block].all()
    assert not coloured[rows // 2:, :columns * 3 // 10].any()
    assert not coloured[rows // 2:rows * 6 // 10].any()
    assert not coloured[rows // 2:, columns * 8 // 10:].any()
    # The spot speaks for pneumonia: drawn for covid it is evidence against, not for.
    assert not (~grayish(render(source, hot_spot(7, 5, index=2), label="covid"))
                )[rows // 2:].any()


def test_png_is_the_image() -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    with Image.open(BytesIO(evidence.png(rgb))) as image:
        np.testing.assert_array_equal(np.asarray(image), rgb)


def check(path: Path, source: Dataset, card: ModelCard, uid: str, series_uid: str,
          size: tuple[int, int] | None = None) -> None:
    """``size``: the image's rows and columns when reduced (else the source's)."""
    with pydicom_config.strict_reading():
        sc = dcmread(path)
    assert sc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image
    assert sc.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert sc.SOPInstanceUID == uid and sc.SeriesInstanceUID == series_uid
    assert sc.SeriesInstanceUID != source.SeriesInstanceUID
    for keyword in PATIENT_AND_STUDY:
        assert sc.get(keyword, "") == source.get(keyword, ""), keyword
    (reference,) = sc.SourceImageSequence
    assert reference.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert reference.ReferencedSOPClassUID == source.SOPClassUID
    assert (sc.Rows, sc.Columns) == (size or (source.Rows, source.Columns))
    assert (sc.DerivationDescription == evidence.DERIVATION) is (size is None)
    for keyword in ("PixelSpacing", "ImagerPixelSpacing", "NominalScannedPixelSpacing",
                    "PixelAspectRatio"):  # no pixel grid to be wrong when reduced
        assert keyword not in sc, keyword
    assert sc.PatientOrientation == source.get("PatientOrientation", "")
    assert sc.SamplesPerPixel == 3 and sc.PhotometricInterpretation == "RGB"
    assert sc.ConversionType == "WSD" and sc.BurnedInAnnotation == "YES"
    assert sc.SeriesNumber == 9902
    assert sc.get("BodyPartExamined") == source.get("BodyPartExamined")
    assert sc.SeriesDescription.startswith("AI evidence: Pneumonia")
    assert ("UNVALIDATED" in sc.SeriesDescription) is (card.test is None)
    model = [item for item in sc.ContributingEquipmentSequence
             if item.get("DeviceUID") == card.device_uid]
    assert len(model) == 1
    assert model[0].Manufacturer == card.manufacturer
    assert model[0].PurposeOfReferenceCodeSequence[0].CodeMeaning == "Processing Equipment"
    dciodvfy = subprocess.run([require_tool("dciodvfy"), str(path)], capture_output=True,
                              text=True, timeout=60)
    errors = [line for line in dciodvfy.stderr.splitlines() if line.startswith("Error")]
    assert errors == [], dciodvfy.stderr


@pytest.mark.parametrize("card", CARDS)
def test_every_evidence_image_is_valid_and_in_the_source_study(
        card: ModelCard, shared_dicom: Path, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    for i, source in enumerate(sources(shared_dicom)):
        rgb = render(source, hot_spot(6, 7), validated=card.test is not None)
        uid, series_uid = generate_uid(), generate_uid()
        with pydicom_config.disable_value_validation(), \
                warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sc = evidence.build_evidence(source, rgb, "pneumonia", card, uid, series_uid,
                                         institution_name="General")
        np.testing.assert_array_equal(sc.pixel_array, rgb)
        path = tmp_path / f"evidence{i}.dcm"
        sc.save_as(path, enforce_file_format=True)
        check(path, source, card, uid, series_uid)
        # No patient data in logs, nor in warnings (which a service may log).
        said = caplog.text + "".join(str(warning.message) for warning in caught)
        for keyword in ("PatientName", "PatientID"):
            value = str(source.get(keyword, ""))
            assert not value or value not in said, keyword


@pytest.mark.parametrize("card", CARDS)
def test_a_reduced_evidence_image_is_valid_and_says_it_was_reduced(
        card: ModelCard, tmp_path: Path) -> None:
    source = dx_16bit(rows=1300, columns=1100)
    source.ImagerPixelSpacing = source.PixelSpacing = [0.139, 0.139]
    source.PatientOrientation = ["P", "F"]
    rgb = render(source, hot_spot(6, 7), validated=card.test is not None, max_side=1024)
    assert rgb.shape == (1024, 866, 3)
    uid, series_uid = generate_uid(), generate_uid()
    with pydicom_config.disable_value_validation():
        sc = evidence.build_evidence(source, rgb, "pneumonia", card, uid, series_uid)
    path = tmp_path / "evidence.dcm"
    sc.save_as(path, enforce_file_format=True)
    check(path, source, card, uid, series_uid, size=(1024, 866))
    assert dcmread(path).DerivationDescription.endswith(
        "; reduced from 1300 x 1100 to 1024 x 866")


def test_lossy_source_gives_a_lossy_image(shared_dicom: Path) -> None:
    with pydicom_config.disable_value_validation():
        jpeg = dcmread(shared_dicom / "cxr_cr_sc_jpeg_baseline_mono2.dcm", force=True)
        rgb = render(jpeg)
        sc = evidence.build_evidence(jpeg, rgb, "normal", VALIDATED, generate_uid(),
                                     generate_uid())
        plain = evidence.build_evidence(dx_16bit(), render(dx_16bit()), "normal", VALIDATED,
                                        generate_uid(), generate_uid())
    assert sc.LossyImageCompression == "01"
    assert plain.get("LossyImageCompression", "00") == "00"


def test_warm_up_builds_and_encodes_one_image() -> None:
    evidence.warm_up(UNVALIDATED)  # a made-up source: no shared data, nothing raised


def test_the_evidence_image_has_the_srs_patient_and_study_attributes() -> None:
    """A PACS files the SR and the evidence image under one patient and study: the
    issuers, other IDs, age, study description... go into both."""
    from pydicom.sequence import Sequence

    from dicom_node.report import Classification, build_sr

    other = Dataset()
    other.PatientID, other.IssuerOfPatientID = "OLD-7", "OTHER-HOSP"
    source = dx_16bit(IssuerOfPatientID="HOSP", PatientAge="045Y", PatientWeight="70",
                      StudyDescription="CHEST PA", OtherPatientIDsSequence=Sequence([other]))
    with pydicom_config.disable_value_validation():
        sc = evidence.build_evidence(source, render(source), "normal", VALIDATED,
                                     generate_uid(), generate_uid())
        sr = build_sr(source, Classification("normal", {"covid": 0.1, "normal": 0.8,
                                                        "pneumonia": 0.1}), VALIDATED,
                      generate_uid(), generate_uid(), generate_uid())
    for keyword in ("IssuerOfPatientID", "PatientAge", "PatientWeight", "StudyDescription",
                    "OtherPatientIDsSequence", *PATIENT_AND_STUDY):
        assert keyword in sr and keyword in sc, keyword
        assert sc[keyword].value == sr[keyword].value, keyword
