"""DICOM/PNG -> network input: decoding, LUTs, inversion, resizing, both paths agree."""

from __future__ import annotations

import copy
import gzip
import os
from io import BytesIO
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut, pixel_array
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from model import preprocess

from dicom_factory import (
    SC,
    chest_image,
    cr_monochrome1,
    ct_head,
    dx_16bit,
    jpeg2000,
    jpeg_ls,
    jpeg_ls_offset_off_by_one,
    rle,
    save,
    window_not_a_number,
)

#: cv2.resize's INTER_LINEAR computes uint8 images in fixed point (weights quantised to
#: 1/2048), the module in float32, both with half-pixel centres: results differ by 1 gray
#: level at most (measured: 1, on 12-14 % of the pixels of noise images, up to 17 % of the
#: 17 x 17 outputs below, 0 on integer ratios). Another pixel-centre convention, or
#: truncating instead of rounding, puts the difference far above either bound.
CV2_LINEAR_MAX_DIFF = 1
CV2_LINEAR_DIFFERING_SHARE = 0.25


def _cv2_linear(image: np.ndarray, size: int) -> np.ndarray:
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_LINEAR)


def _cv2_nearest(image: np.ndarray, size: int) -> np.ndarray:
    # INTER_NEAREST_EXACT samples at pixel centres, as PIL's NEAREST (Keras' load_img)
    # does; plain INTER_NEAREST samples at top-left corners.
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_NEAREST_EXACT)


def _assert_like_cv2_linear(ours: np.ndarray, theirs: np.ndarray) -> None:
    diff = np.abs(ours.astype(np.int16) - theirs.astype(np.int16))
    assert diff.max() <= CV2_LINEAR_MAX_DIFF
    assert (diff > 0).mean() <= CV2_LINEAR_DIFFERING_SHARE


def test_bilinear_matches_half_pixel_centres() -> None:
    image = np.array([[0, 100, 200, 250]] * 2, dtype=np.uint8)
    assert preprocess.resize_gray8(image, 2)[0].tolist() == [50, 225]
    up = preprocess.resize_gray8(np.array([[0, 200], [0, 200]], dtype=np.uint8), 4)
    assert up[0].tolist() == [0, 50, 150, 200]


@pytest.mark.parametrize(("shape", "size"), [((50, 41), 17), ((50, 41), 75), ((7, 9), 300),
                                             ((300, 250), 96), ((1024, 800), 300)])
def test_bilinear_is_cv2_inter_linear(shape: tuple[int, int], size: int) -> None:
    # Noise: every pixel counts, so a shifted sampling grid cannot hide.
    image = np.random.default_rng(size).integers(0, 256, shape, dtype=np.uint8)
    _assert_like_cv2_linear(preprocess.resize_gray8(image, size), _cv2_linear(image, size))


def test_nearest_matches_keras_load_img() -> None:
    image = np.arange(16, dtype=np.uint8).reshape(4, 4) * 10
    expected = np.asarray(Image.fromarray(image).resize((2, 2), Image.Resampling.NEAREST))
    np.testing.assert_array_equal(preprocess.resize_gray8(image, 2, "nearest"), expected)
    noise = np.random.default_rng(1).integers(0, 256, (50, 41), dtype=np.uint8)
    for size in (17, 75):
        np.testing.assert_array_equal(preprocess.resize_gray8(noise, size, "nearest"),
                                      _cv2_nearest(noise, size))


def test_tensor_shape_range_and_channels() -> None:
    gray = np.linspace(0, 255, 50 * 40).reshape(50, 40).astype(np.uint8)
    x = preprocess.to_tensor(gray, 32)
    assert x.shape == (32, 32, 3) and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert (x[..., 0] == x[..., 1]).all() and (x[..., 1] == x[..., 2]).all()


def test_orientation_is_kept() -> None:
    ds = chest_image(rows=60, columns=40, window=None, bits_stored=8)
    gray = preprocess.dicom_gray8(ds)
    assert gray.shape == (60, 40)
    assert gray[:, -5:].mean() > gray[:, :5].mean()  # brighter to the right, as generated
    assert gray[-5:].mean() > gray[:5].mean()  # and towards the bottom


def test_window_is_applied_then_scaled_to_8_bits() -> None:
    ds = dx_16bit(rows=64, columns=64)
    windowed = apply_voi_lut(ds.pixel_array, ds, index=0).astype(np.float64)
    expected = np.clip(np.rint(windowed / (2**14 - 1) * 255), 0, 255)
    np.testing.assert_array_equal(preprocess.dicom_gray8(ds), expected.astype(np.uint8))


def test_monochrome1_is_inverted() -> None:
    mono1 = cr_monochrome1(rows=64, columns=64)
    mono2 = cr_monochrome1(rows=64, columns=64)
    mono2.PhotometricInterpretation = "MONOCHROME2"
    np.testing.assert_array_equal(preprocess.dicom_gray8(mono1),
                                  255 - preprocess.dicom_gray8(mono2))


def test_missing_window_falls_back_to_min_max() -> None:
    ds = chest_image(rows=32, columns=32, bits_stored=12, window=None)
    gray = preprocess.dicom_gray8(ds)
    assert gray.min() == 0 and gray.max() == 255


@pytest.mark.parametrize("codec", [jpeg2000, rle, jpeg_ls], ids=lambda f: f.__name__)
def test_lossless_codecs_give_the_uncompressed_result(codec: object) -> None:
    compressed = codec(rows=64, columns=48, seed=5)  # type: ignore[operator]
    native = chest_image(rows=64, columns=48, seed=5)
    np.testing.assert_array_equal(preprocess.dicom_gray8(compressed),
                                  preprocess.dicom_gray8(native))


def _signed_ct_with_garbage_high_bits() -> Dataset:
    """12 bits stored in 16, signed, with junk in the unused high bits and a rescale."""
    ds = ct_head(seed=3)
    ds.PixelRepresentation = 1
    stored = (np.random.default_rng(3).integers(-2048, 2048, (128, 128))).astype(np.int16)
    junk = np.random.default_rng(4).integers(0, 16, (128, 128)).astype(np.uint16) << 12
    ds.PixelData = ((stored.view(np.uint16) & 0x0FFF) | junk).tobytes()
    return ds


def _voi_lut_sequence() -> Dataset:
    ds = dx_16bit(rows=48, columns=40, seed=6)
    del ds.WindowCenter, ds.WindowWidth, ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 12]
    item.LUTData = (np.sqrt(np.arange(4096) / 4095) * 4095).astype(np.uint16).tolist()
    ds.VOILUTSequence = Sequence([item])
    return ds


def _voi_lut_and_window() -> Dataset:
    ds = _voi_lut_sequence()
    ds.WindowCenter, ds.WindowWidth = 2000.0, 4000.0  # pydicom applies the LUT (preferred)
    return ds


def _sigmoid_window() -> Dataset:
    ds = dx_16bit(rows=48, columns=40, seed=7)
    ds.VOILUTFunction = "SIGMOID"
    return ds


def _rescaled_window() -> Dataset:
    ds = dx_16bit(rows=50, columns=41, seed=8)
    ds.RescaleIntercept = -1000  # a window in the rescaled units: its output range moves too
    return ds


def _signed_without_window() -> Dataset:
    """12 bits stored in 16, signed and properly sign-extended, a rescale, no window."""
    ds = _drop_window(ct_head(seed=9))
    ds.PixelRepresentation = 1
    # Narrower than the 12 bits allow: a range taken from the bit depth would show.
    stored = np.random.default_rng(9).integers(-700, 1300, (128, 128)).astype(np.int16)
    ds.PixelData = stored.tobytes()
    return ds


def _signed_16_bits_without_window() -> Dataset:
    ds = _signed_without_window()
    ds.BitsStored, ds.HighBit = 16, 15
    stored = np.random.default_rng(10).integers(-9000, 21000, (128, 128)).astype(np.int16)
    ds.PixelData = stored.tobytes()
    return ds


def _unsigned_junk_high_bits_without_window() -> Dataset:
    ds = chest_image(rows=50, columns=41, window=None, seed=11)
    pixels = np.frombuffer(ds.PixelData, np.uint16)
    junk = np.random.default_rng(11).integers(0, 16, pixels.shape).astype(np.uint16) << 12
    ds.PixelData = ((pixels & 0x0FFF) | junk).tobytes()
    return ds


def _negative_slope_without_window() -> Dataset:
    ds = chest_image(rows=50, columns=41, window=None, seed=12)
    ds.RescaleSlope, ds.RescaleIntercept = -0.5, 300
    return ds


def _modality_lut_without_window() -> Dataset:
    """A Modality LUT that is not monotonic: its extremes are not the stored extremes'."""
    ds = chest_image(rows=50, columns=41, window=None, seed=13)
    del ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.LUTData = (np.abs(np.sin(np.arange(4096) / 300)) * 60000).astype(np.uint16).tolist()
    item.ModalityLUTType = "US"
    ds.ModalityLUTSequence = Sequence([item])
    return ds


_CASES = {
    "window": lambda: dx_16bit(rows=50, columns=41),
    "window, rescale intercept": _rescaled_window,
    "monochrome1": lambda: cr_monochrome1(rows=50, columns=41),
    "no window (min-max)": lambda: chest_image(rows=50, columns=41, window=None),
    "8 bit": lambda: chest_image(rows=50, columns=41, bits_stored=8, window=None),
    "signed, junk high bits": _signed_ct_with_garbage_high_bits,
    "signed, no window": lambda: _drop_window(_signed_ct_with_garbage_high_bits()),
    "signed, sign-extended, no window": _signed_without_window,
    "signed, 16 bits, no window": _signed_16_bits_without_window,
    "unsigned, junk high bits, no window": _unsigned_junk_high_bits_without_window,
    "negative rescale slope, no window": _negative_slope_without_window,
    "modality LUT sequence, no window": _modality_lut_without_window,
    "VOI LUT sequence": _voi_lut_sequence,
    "VOI LUT and window": _voi_lut_and_window,
    "sigmoid window": _sigmoid_window,
    "JPEG-LS": lambda: jpeg_ls(rows=50, columns=41),
}


def _drop_window(ds: Dataset) -> Dataset:
    del ds.WindowCenter, ds.WindowWidth
    return ds


def _reference_gray8(ds: Dataset) -> np.ndarray:
    """PS3.3 C.11 with pydicom's own transforms, not the module's code: pydicom's decoded
    pixels (unused bits cleared, sign extended), its Modality LUT, then its VOI LUT
    (preferred, as pydicom does) or first window, mapped from that transform's output range
    onto 0..255; without either, 8-bit data as they are and wider data min-max;
    MONOCHROME1 inverted; rounded."""
    values = apply_modality_lut(pixel_array(ds, index=0), ds)
    if "VOILUTSequence" in ds:
        out = apply_voi_lut(values, ds, index=0).astype(np.float64)
        low, high = 0.0, 2.0 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1
    elif "WindowCenter" in ds:
        out = apply_voi_lut(values, ds, index=0).astype(np.float64)
        # The window's output range: where pydicom sends -inf and +inf.
        low, high = apply_voi_lut(np.array([-np.inf, np.inf]), ds, index=0)
    elif ds.BitsStored <= 8 and ds.PixelRepresentation == 0 and "RescaleSlope" not in ds:
        out, low, high = values.astype(np.float64), 0.0, 255.0
    else:
        out = values.astype(np.float64)
        low, high = out.min(), out.max()
    gray = (out - low) / (high - low) * 255
    if ds.PhotometricInterpretation == "MONOCHROME1":
        gray = 255 - gray
    return np.clip(np.rint(gray), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("case", list(_CASES))
def test_display_pipeline_matches_pydicom_and_cv2(case: str) -> None:
    ds = _CASES[case]()
    expected = _reference_gray8(_CASES[case]())
    gray = preprocess.dicom_gray8(ds)
    # Same formula in float64 on both sides: identical (measured), no tolerance needed.
    np.testing.assert_array_equal(gray, expected)
    for size in (17, 32, 75):
        tensor = preprocess.dicom_tensor(ds, size)
        # dicom_tensor looks up only the pixels it interpolates: exactly to_tensor's result.
        np.testing.assert_array_equal(tensor, preprocess.to_tensor(gray, size))
        assert (tensor[..., 0] == tensor[..., 2]).all()
        _assert_like_cv2_linear(np.rint(tensor[..., 0] * 255), _cv2_linear(expected, size))
        nearest = preprocess.dicom_tensor(ds, size, "nearest")
        np.testing.assert_array_equal(np.rint(nearest[..., 0] * 255),
                                      _cv2_nearest(expected, size))


@pytest.mark.parametrize("case", ["no window (min-max)", "signed, sign-extended, no window",
                                  "signed, 16 bits, no window",
                                  "negative rescale slope, no window"])
def test_a_source_without_a_window_is_not_counted_pixel_by_pixel(
        case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the rescale is monotonic and the pixels hold their stored values, the
    range a source is stretched over comes from their least and greatest values: no
    count of every pixel's bit pattern (30 ms for a 2048 x 2048 frame)."""
    ds = _CASES[case]()

    def counted(*args: object, **kwargs: object) -> None:
        raise AssertionError("every pixel's bit pattern was counted")

    monkeypatch.setattr(np, "bincount", counted)
    np.testing.assert_array_equal(preprocess.dicom_gray8(ds), _reference_gray8(_CASES[case]()))


def test_only_the_first_frame_is_used() -> None:
    ds = chest_image(rows=20, columns=16, bits_stored=8, window=None)
    single = preprocess.dicom_gray8(ds)
    first = np.asarray(pixel_array(ds), dtype=np.uint8)
    ds.PixelData = first.tobytes() + (255 - first).tobytes()
    ds.NumberOfFrames = 2
    np.testing.assert_array_equal(preprocess.dicom_gray8(ds), single)


def _wrap_png_as_dicom(png: Path, out: Path) -> Path:
    pixels = np.asarray(Image.open(png).convert("L"))
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = SC, generate_uid()
    ds.Modality = "CR"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = pixels.tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SC
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return save(ds, out)


def test_png_and_dicom_paths_agree(shared_cxr: Path, tmp_path: Path) -> None:
    for png in sorted(shared_cxr.glob("*.png"))[:3]:
        dcm = _wrap_png_as_dicom(png, tmp_path / f"{png.stem}.dcm")
        np.testing.assert_array_equal(preprocess.load(png, 300), preprocess.load(dcm, 300))


def test_16bit_dicom_and_its_8bit_png_agree(tmp_path: Path) -> None:
    ds = dx_16bit(rows=128, columns=100)
    png = tmp_path / "windowed.png"
    Image.fromarray(preprocess.dicom_gray8(ds)).save(png)
    dcm = save(ds, tmp_path / "dx.dcm")
    np.testing.assert_array_equal(preprocess.load(png, 96), preprocess.load(dcm, 96))


def test_real_dicoms(shared_dicom: Path) -> None:
    for path in sorted(shared_dicom.glob("*.dcm")):
        x = preprocess.load(path, 300)
        assert x.shape == (300, 300, 3) and x.dtype == np.float32
        assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0 and float(x.std()) > 0.05


def test_real_monochrome1_without_header_is_inverted(shared_dicom: Path) -> None:
    path = shared_dicom / "cxr_cr_mono1_10bit_no_meta.dcm"
    raw = dcmread(path, force=True)
    assert raw.PhotometricInterpretation == "MONOCHROME1"
    gray = preprocess.read_gray8(path)
    assert gray.shape == (raw.Rows, raw.Columns)
    # The lungs (dense low attenuation, high raw values in MONOCHROME1) must come out dark:
    # the displayed image anti-correlates with the stored values.
    raw.file_meta = FileMetaDataset()
    raw.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    stored = raw.pixel_array.astype(np.float64).ravel()
    assert np.corrcoef(stored, gray.astype(np.float64).ravel())[0, 1] < -0.5


def test_real_jpeg_baseline_decodes(shared_dicom: Path) -> None:
    gray = preprocess.read_gray8(shared_dicom / "cxr_cr_sc_jpeg_baseline_mono2.dcm")
    assert gray.shape == (1024, 1024) and gray.std() > 20


def test_not_an_image_is_reported(tmp_path: Path) -> None:
    bogus = tmp_path / "notes.txt"
    bogus.write_text("hello")
    with pytest.raises(preprocess.PreprocessError):
        preprocess.load(bogus, 96)


def test_display_attributes_that_cannot_be_applied_are_a_preprocess_error() -> None:
    """Found by the fuzzer: a Window Center that is not a number raised TypeError from
    pydicom's windowing; the worker must get PreprocessError with the reason."""
    with pytest.raises(preprocess.PreprocessError, match="display attributes"):
        preprocess.dicom_tensor(window_not_a_number(), 32)


def test_a_single_frame_is_decoded_as_intake_decoded_it() -> None:
    """Found by the fuzzer: a JPEG-LS offset table that pydicom's whole-data path ignores
    (intake, before acknowledging) and its per-frame path follows and refuses; the
    worker now decodes a single frame the same way."""
    tensor = preprocess.dicom_tensor(jpeg_ls_offset_off_by_one(), 32)
    assert tensor.shape == (32, 32, 3) and 0 <= tensor.min() <= tensor.max() <= 1


@pytest.fixture
def defer_small(monkeypatch: pytest.MonkeyPatch) -> None:
    """read_source leaves these small images' pixel data on disk, as a radiograph's."""
    monkeypatch.setattr(preprocess, "DEFER_BYTES", 64)


def _read_from_disk_variants() -> dict[str, Dataset]:
    signed = _signed_ct_with_garbage_high_bits()
    three_frames = chest_image(rows=30, columns=21, bits_stored=10, seed=9)
    frames = np.random.default_rng(9).integers(0, 1024, (3, 30, 21)).astype(np.uint16)
    three_frames.PixelData, three_frames.NumberOfFrames = frames.tobytes(), 3
    odd_8bit = chest_image(rows=31, columns=17, bits_stored=8, window=None)  # padded
    implicit = chest_image(rows=40, columns=33, transfer_syntax=ImplicitVRLittleEndian)
    cases = {case: make() for case, make in _CASES.items()}
    for ds in cases.values():
        for lut in ("VOILUTSequence", "ModalityLUTSequence"):
            if lut in ds:  # a list of values is written as US, not OW
                ds[lut].value[0]["LUTData"].VR = "US"
    return {**cases, "three frames": three_frames, "8 bit, odd length": odd_8bit,
            "signed": signed, "implicit VR": implicit}


@pytest.mark.parametrize("case", list(_read_from_disk_variants()))
def test_a_source_read_with_its_pixels_on_disk_gives_the_same_input(
        case: str, tmp_path: Path, defer_small: None) -> None:
    """read_source leaves the pixel data on disk; the network input, the displayed
    image and the first frame's stored values are those of the file read whole."""
    path = save(_read_from_disk_variants()[case], tmp_path / "source.dcm")
    whole = dcmread(path)
    frame = 0 if int(whole.get("NumberOfFrames", 1)) > 1 else None
    for size in (17, 64):
        deferred = preprocess.read_source(path)
        assert deferred.get_item(0x7FE00010, keep_deferred=True).value is None
        np.testing.assert_array_equal(preprocess.dicom_tensor(deferred, size),
                                      preprocess.dicom_tensor(dcmread(path), size))
    np.testing.assert_array_equal(preprocess.dicom_gray8(preprocess.read_source(path)),
                                  preprocess.dicom_gray8(whole))
    native = preprocess._native_frame(preprocess.read_source(path))
    if whole.file_meta.TransferSyntaxUID.is_compressed:
        assert native is None  # decoded by pydicom
    else:  # read by the node itself: exactly pydicom's view of the stored values
        expected = pixel_array(dcmread(path), index=frame, view_only=True,
                               correct_unused_bits=False)
        assert native is not None and native.dtype == expected.dtype
        np.testing.assert_array_equal(native, expected)
        np.testing.assert_array_equal(preprocess._native_frame(whole), expected)


def _short_pixel_data(ds: Dataset) -> Dataset:
    ds.PixelData = ds.PixelData[:-2]
    return ds


def _no_photometric(ds: Dataset) -> Dataset:
    del ds.PhotometricInterpretation
    return ds


def _zero_frames(ds: Dataset) -> Dataset:
    ds.NumberOfFrames = 0
    return ds


def _rows_of_three_bytes(ds: Dataset) -> bytes:
    """The file with a Rows value of 3 bytes, which pydicom cannot convert."""
    encoded = BytesIO()
    ds.save_as(encoded, enforce_file_format=True)
    rows = b"\x28\x00\x10\x00US\x02\x00\x20\x00"
    assert encoded.getvalue().count(rows) == 1
    return encoded.getvalue().replace(rows, b"\x28\x00\x10\x00US\x03\x00\x20\x00\x00")


@pytest.mark.parametrize(("spoil", "refused"), [(_short_pixel_data, True),
                                               (_no_photometric, True),
                                               (_rows_of_three_bytes, True),
                                               (_zero_frames, False)],
                         ids=["short pixel data", "no photometric", "rows of 3 bytes",
                              "zero frames"])
def test_what_the_node_does_not_read_itself_pydicom_decodes_or_refuses(
        spoil: object, refused: bool, tmp_path: Path, defer_small: None) -> None:
    """Anything unusual goes to pydicom, from disk and in memory: it refuses it, or
    (0 frames: one, it warns) decodes it."""
    path = tmp_path / "source.dcm"
    sound = preprocess.dicom_tensor(chest_image(rows=32, columns=32), 16)
    spoilt = spoil(chest_image(rows=32, columns=32))  # type: ignore[operator]
    if isinstance(spoilt, bytes):
        path.write_bytes(spoilt)
    else:
        spoilt.save_as(path)
    for ds in (preprocess.read_source(path, force=True), dcmread(path, force=True)):
        assert preprocess._native_frame(ds) is None
        if refused:
            with pytest.raises(preprocess.PreprocessError):
                preprocess.dicom_tensor(ds, 16)
        else:
            with pytest.warns(UserWarning, match="Number of Frames"):
                np.testing.assert_array_equal(preprocess.dicom_tensor(ds, 16), sound)


def test_a_source_cut_short_on_disk_after_it_was_read_is_refused(
        tmp_path: Path, defer_small: None) -> None:
    path = save(chest_image(rows=64, columns=64), tmp_path / "source.dcm")
    ds = preprocess.read_source(path)
    data = path.read_bytes()
    path.write_bytes(data[:-1000])
    # A later time, as a kernel with coarse time stamps may not give within its tick.
    os.utime(path, (ds.timestamp + 10, ds.timestamp + 10))
    assert preprocess._native_frame(ds) is None
    with pytest.warns(UserWarning, match="modification time"), \
            pytest.raises(preprocess.PreprocessError):
        preprocess.dicom_tensor(ds, 16)


def test_the_sr_header_of_a_source_leaves_its_pixels_on_disk(
        tmp_path: Path, defer_small: None) -> None:
    from dicom_node.report import source_header

    ds = preprocess.read_source(save(chest_image(rows=64, columns=64),
                                     tmp_path / "source.dcm"))
    header = source_header(ds)
    assert "PixelData" not in header and header.PatientID == "SYN-0001"
    assert ds.get_item(0x7FE00010, keep_deferred=True).value is None


def test_a_source_rewritten_on_disk_after_it_was_read_is_read_as_pydicom_reads_it(
        tmp_path: Path, defer_small: None) -> None:
    """The file changed under a read source (same length, other pixels): pydicom reads
    it, saying so, as it reads any element it left on disk -- the node does not read it
    as though nothing had happened."""
    first = chest_image(rows=64, columns=64)
    path = save(first, tmp_path / "source.dcm")
    length = path.stat().st_size
    before = preprocess.dicom_tensor(dcmread(path), 16)
    ds = preprocess.read_source(path)
    # The same header, byte for byte, so the pixels lie where pydicom left them: a new
    # image's own UIDs (generate_uid) may be two bytes longer or shorter.
    other = copy.deepcopy(first)
    other.PixelData = (4095 - first.pixel_array).astype(np.uint16).tobytes()  # inverted
    save(other, path)
    assert path.stat().st_size == length
    os.utime(path, (ds.timestamp + 10, ds.timestamp + 10))
    assert preprocess._native_frame(ds) is None
    with pytest.warns(UserWarning, match="modification time"):
        rewritten = preprocess.dicom_tensor(ds, 16)
    np.testing.assert_array_equal(rewritten, preprocess.dicom_tensor(dcmread(path), 16))
    assert not np.array_equal(rewritten, before)


def test_a_source_read_through_a_decompressing_file_is_left_to_pydicom(
        tmp_path: Path, defer_small: None) -> None:
    noisy = chest_image(rows=64, columns=64, bits_stored=16)
    # Pixels that do not compress: the .gz file is as long as the range read from it.
    noisy.PixelData = np.random.default_rng(0).integers(0, 2**16, (64, 64), np.uint16).tobytes()
    noisy.DataSetTrailingPadding = np.random.default_rng(1).bytes(2048)
    path = save(noisy, tmp_path / "source.dcm")
    packed = tmp_path / "source.dcm.gz"
    packed.write_bytes(gzip.compress(path.read_bytes()))
    with gzip.open(packed) as file:
        ds = dcmread(file, defer_size=preprocess.DEFER_BYTES)
        assert ds.get_item(0x7FE00010, keep_deferred=True).value is None
        assert preprocess._native_frame(ds) is None  # its offsets are not the .gz file's
        np.testing.assert_array_equal(preprocess.dicom_tensor(ds, 16),
                                      preprocess.dicom_tensor(dcmread(path), 16))


def test_a_frame_left_on_disk_is_mapped_read_only_and_outlives_its_file(
        tmp_path: Path, defer_small: None) -> None:
    """The first frame of a source read from disk is mapped, not copied: read-only, and
    still the same values once retention has deleted the file."""
    path = save(chest_image(rows=64, columns=48, seed=3), tmp_path / "source.dcm")
    expected = pixel_array(dcmread(path), view_only=True, correct_unused_bits=False)
    native = preprocess._native_frame(preprocess.read_source(path))
    assert native is not None and not native.flags.writeable
    path.unlink()
    np.testing.assert_array_equal(native, expected)


def test_a_source_cut_short_with_its_time_put_back_is_not_mapped_past_its_end(
        tmp_path: Path, defer_small: None) -> None:
    """Cut short, its modification time as it was: the node does not map beyond the
    file's end (reading there would kill the process); pydicom reads it and refuses."""
    path = save(chest_image(rows=64, columns=64), tmp_path / "source.dcm")
    ds = preprocess.read_source(path)
    path.write_bytes(path.read_bytes()[:-1000])
    os.utime(path, (ds.timestamp, ds.timestamp))
    assert preprocess._native_frame(ds) is None
    with pytest.raises(preprocess.PreprocessError):
        preprocess.dicom_tensor(ds, 16)

