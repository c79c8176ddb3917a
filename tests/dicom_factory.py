"""Synthetic DICOM instances and chest images for the tests (made on the fly, never
committed), and where the shared real data lives.

The shared data (``../shared``: real chest DICOMs, the cxr-dev PNG set, the
authors' splits) is absent from a fresh clone. ``DICOM_NODE_SHARED_DATA`` points
the tests at another copy of that folder -- or at a path that does not exist,
to run the suite on the synthetic stand-ins below (:func:`make_dicom_samples`,
:func:`make_cxr_dev`), as a fresh clone does.
"""

from __future__ import annotations

import csv
import os
import struct
from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom import config as pydicom_config
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from model.classes import CLASS_KEYS

CR = UID("1.2.840.10008.5.1.4.1.1.1")
DX_PRESENTATION = UID("1.2.840.10008.5.1.4.1.1.1.1")
DX_PROCESSING = UID("1.2.840.10008.5.1.4.1.1.1.1.1")
SC = UID("1.2.840.10008.5.1.4.1.1.7")
CT = UID("1.2.840.10008.5.1.4.1.1.2")

#: The shared folder (``../shared`` next to the checkout, or $DICOM_NODE_SHARED_DATA).
SHARED = Path(os.environ.get("DICOM_NODE_SHARED_DATA")
              or Path(__file__).resolve().parents[2] / "shared")
SHARED_DICOM = SHARED / "data" / "dicom"
SHARED_CXR = SHARED / "data" / "cxr-dev"
#: The real DICOM files the tests name, each with what makes it worth testing.
SHARED_DICOM_FILES = (
    "cxr_cr_mono1_10bit_no_meta.dcm",  # CR, MONOCHROME1, 10 of 16 bits, no File Meta group
    "cxr_cr_sc_jpeg_baseline_mono2.dcm",  # SC of a CR, JPEG Baseline, 1024 x 1024
    "cxr_dx_sc_implicit_le_mono2.dcm",  # SC of a DX, Implicit VR, no body part
)
#: The cxr-dev set: PNGs listed in labels.csv, 50 per class.
SHARED_CXR_FILES = ("labels.csv",)
CXR_DEV_COLUMNS = ("filename", "label", "source_repo", "source_path", "patient_id", "license")


def _gradient(rows: int, columns: int, bits: int, seed: int = 0) -> np.ndarray:
    """A smooth image with a little noise, so codecs have real work to do."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:rows, 0:columns]
    top = 2**bits - 1
    base = (x / max(columns - 1, 1) * 0.6 + y / max(rows - 1, 1) * 0.3) * top
    noise = rng.integers(0, max(top // 64, 1), size=(rows, columns))
    return np.clip(base + noise, 0, top)


def chest_image(
    sop_class: UID = DX_PRESENTATION,
    rows: int = 256,
    columns: int = 200,
    bits_stored: int = 12,
    photometric: str = "MONOCHROME2",
    modality: str = "DX",
    body_part: str | None = "CHEST",
    transfer_syntax: UID = ExplicitVRLittleEndian,
    window: tuple[float, float] | None = (2048.0, 4096.0),
    seed: int = 0,
    uids_from: str | None = None,
    **attributes: object,
) -> Dataset:
    """A single-frame grayscale radiograph data set with a File Meta group; new UIDs,
    or the same ones on every run made from ``uids_from`` (for inputs whose bytes must
    not change between runs: a new UID's length varies)."""
    ds = Dataset()
    ds.SOPClassUID = sop_class
    for keyword in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        setattr(ds, keyword, generate_uid() if uids_from is None
                else generate_uid(entropy_srcs=[uids_from, keyword]))
    ds.PatientName = "Test^Synthetic"
    ds.PatientID = "SYN-0001"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyDate = "20260101"
    ds.StudyTime = "120000"
    ds.AccessionNumber = "A0001"
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Modality = modality
    ds.Manufacturer = "dicom-node tests"
    if body_part is not None:
        ds.BodyPartExamined = body_part
    ds.ViewPosition = "PA"
    ds.ImageLaterality = "U"
    ds.PatientOrientation = ["L", "F"]  # a PA view as displayed: rows toward the left
    ds.Rows = rows
    ds.Columns = columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    bits_allocated = 8 if bits_stored <= 8 else 16
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    if sop_class in (DX_PRESENTATION, DX_PROCESSING):
        ds.PresentationIntentType = (
            "FOR PRESENTATION" if sop_class == DX_PRESENTATION else "FOR PROCESSING"
        )
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.RescaleIntercept = 0
        ds.RescaleSlope = 1
        ds.RescaleType = "US"
    if window is not None:
        ds.WindowCenter = window[0]
        ds.WindowWidth = window[1]
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    dtype = np.uint8 if bits_allocated == 8 else np.uint16
    pixels = _gradient(rows, columns, bits_stored, seed).astype(dtype)
    ds.PixelData = pixels.tobytes()

    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    if transfer_syntax == ImplicitVRLittleEndian:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    elif transfer_syntax != ExplicitVRLittleEndian:
        ds.compress(transfer_syntax, generate_instance_uid=uids_from is None)
    return ds


def dx_16bit(**kw: object) -> Dataset:
    """A 16-bit allocated, 14-bit stored DX For Presentation with a VOI window."""
    return chest_image(bits_stored=14, window=(8000.0, 16000.0), **kw)  # type: ignore[arg-type]


def cr_monochrome1(**kw: object) -> Dataset:
    """A 10-bit CR, MONOCHROME1 (inverted), like the classic Fuji sample."""
    return chest_image(sop_class=CR, modality="CR", bits_stored=10, photometric="MONOCHROME1",
                       window=(550.0, 1024.0), **kw)  # type: ignore[arg-type]


def jpeg2000(**kw: object) -> Dataset:
    return chest_image(transfer_syntax=JPEG2000Lossless, **kw)  # type: ignore[arg-type]


def rle(**kw: object) -> Dataset:
    return chest_image(transfer_syntax=RLELossless, **kw)  # type: ignore[arg-type]


def jpeg_ls(**kw: object) -> Dataset:
    return chest_image(transfer_syntax=JPEGLSLossless, **kw)  # type: ignore[arg-type]


def ct_head(**kw: object) -> Dataset:
    """A CT head slice: a valid image that is not a chest radiograph."""
    ds = chest_image(sop_class=CT, modality="CT", body_part="HEAD", rows=128, columns=128,
                     window=(40.0, 80.0), **kw)  # type: ignore[arg-type]
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    return ds


def part10_bytes(ds: Dataset) -> bytes:
    """``ds`` encoded as a Part 10 file."""
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def nested_sequences(depth: int) -> bytes:
    """A small chest image whose data set holds sequences nested ``depth`` deep.

    Built at the byte level (undefined-length items), as an attacker would.
    """
    raw = part10_bytes(chest_image(rows=8, columns=8))
    open_sq = struct.pack("<HH", 0x0008, 0x1140) + b"SQ\0\0" + b"\xff" * 4
    item = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    closing = struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    at = raw.index(struct.pack("<HH", 0x0008, 0x0016) + b"UI")
    return raw[:at] + (open_sq + item) * depth + closing * depth + raw[at:]


def window_not_a_number(**kw: object) -> Dataset:
    """A chest image whose Window Center reads ``2O48`` (a letter O): as a file with that
    byte slip arrives, and as pydicom reads it (a string, validation off). Found by the
    fuzzer."""
    raw = bytearray(part10_bytes(chest_image(**kw)))
    at = raw.index(struct.pack("<HH", 0x0028, 0x1050) + b"DS")
    length = struct.unpack("<H", raw[at + 6:at + 8])[0]
    raw[at + 8:at + 8 + length] = b"2O48".ljust(length)
    return dcmread(BytesIO(bytes(raw)))


def rle_segment_overrun(**kw: object) -> Dataset:
    """A 16-bit RLE chest image whose first segment decodes to 128 bytes more than the
    image holds: at 16 x 16, pylibjpeg-rle panics (pyo3's PanicException, a
    BaseException); larger, it refuses it with a RuntimeError. Found by the fuzzer."""
    ds = rle(**kw)
    pixels = int(ds.Rows) * int(ds.Columns)
    runs, left = b"", pixels + 128
    while left > 0:  # replicate runs of at most 128 bytes (PS3.5 G.3.1)
        count = min(128, left)
        runs += bytes([257 - count]) + b"\x01"
        left -= count
    second = bytes([257 - 128, 0]) * 2
    header = struct.pack("<16I", 2, 64, 64 + len(runs), *([0] * 13))
    ds.PixelData = encapsulate([header + runs + second])
    return ds


def jpeg_ls_offset_off_by_one(**kw: object) -> Dataset:
    """A JPEG-LS chest image whose Basic Offset Table puts its frame one byte into the
    first fragment: pydicom decodes it as the whole pixel data and refuses it frame by
    frame. Found by the fuzzer."""
    ds = jpeg_ls(**kw)
    data = ds.PixelData  # item tag and length (8 bytes), then the table's one offset
    ds.PixelData = data[:8] + struct.pack("<I", 1) + data[12:]
    return ds


def transfer_syntax_not_a_syntax(**kw: object) -> bytes:
    """A chest image file whose File Meta names a UID that is no transfer syntax, as
    bytes (pydicom refuses to write one). The SCP never sees such a data set: its data
    sets carry the syntax it negotiated. Found by the fuzzer."""
    raw = bytearray(part10_bytes(chest_image(**kw)))
    at = raw.index(struct.pack("<HH", 0x0002, 0x0010) + b"UI")
    length = struct.unpack("<H", raw[at + 6:at + 8])[0]
    raw[at + 8:at + 8 + length] = b"1.2.3.4".ljust(length, b"\0")
    return bytes(raw)


def fuzz_seeds() -> dict[str, bytes]:
    """Valid files for the receive-path fuzzer to start from (tests/fuzz/receive.py):
    a chest image in each transfer syntax the node takes, the same bytes on every run."""
    return {f"seed-{make.__name__}.dcm": part10_bytes(make(uids_from=make.__name__))
            for make in (chest_image, dx_16bit, cr_monochrome1, jpeg2000, jpeg_ls, rle)}


def fuzz_regressions() -> dict[str, bytes]:
    """Every input the fuzzer found that crashed the receive path, made again here
    (small, from synthetic images) rather than kept as files; the fuzzer replays them
    before it mutates anything."""
    makers = (rle_segment_overrun, jpeg_ls_offset_off_by_one, window_not_a_number)
    found = {f"{make.__name__}.dcm": part10_bytes(make(rows=16, columns=16,
                                                        uids_from=make.__name__))
             for make in makers}
    found["transfer_syntax_not_a_syntax.dcm"] = transfer_syntax_not_a_syntax(
        rows=16, columns=16, uids_from="transfer_syntax_not_a_syntax")
    return found


def save(ds: Dataset, path: Path) -> Path:
    """Write ``ds`` as a Part 10 file."""
    ds.save_as(path, enforce_file_format=True)
    return path


# --- synthetic stand-ins for the shared data ---------------------------------------


def thorax(rows: int, columns: int, label: str = "normal", seed: int = 0) -> np.ndarray:
    """A chest-radiograph-like picture in [0, 1] (1 = dense): bright body and spine,
    dark lungs, and opacities by class -- none for normal, patchy in one lower lung
    for pneumonia, hazy in both lung peripheries for COVID-19."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:rows, 0:columns]
    v, u = y / max(rows - 1, 1), x / max(columns - 1, 1)
    body = np.clip(1.0 - ((u - 0.5) / 0.48) ** 2, 0, 1) ** 0.5
    image = 0.25 + 0.55 * body
    lungs = np.zeros_like(image)
    for centre in (0.3, 0.7):
        inside = ((u - centre) / 0.16) ** 2 + ((v - 0.5) / 0.32) ** 2
        lungs = np.maximum(lungs, np.clip(1.0 - inside, 0, 1) ** 0.4)
    image -= 0.5 * lungs
    image += 0.35 * np.exp(-((u - 0.5) / 0.04) ** 2)  # spine and mediastinum
    if label == "pneumonia":
        side = 0.3 if seed % 2 else 0.7
        patch = np.exp(-(((u - side) / 0.08) ** 2 + ((v - 0.68) / 0.1) ** 2))
        image += 0.35 * patch * lungs
    elif label == "covid":
        periphery = np.exp(-(((np.abs(u - 0.5) - 0.27) / 0.07) ** 2))
        image += 0.25 * periphery * lungs
    image += rng.normal(0, 0.02, image.shape)
    return np.clip(image, 0, 1)


def make_dicom_samples(folder: Path) -> Path:
    """Stand-ins for ``shared/data/dicom``: the same three file names, each with the
    property the tests rely on (encoding, photometric, header gaps), synthetic pixels."""
    folder.mkdir(parents=True, exist_ok=True)

    # A native CR, MONOCHROME1 (dense = low values), 10 bits stored in 16, window
    # 550/1024, written as a bare data set: no preamble, no File Meta group.
    mono1 = cr_monochrome1(rows=440, columns=440, PatientName="Anonymized",
                           ViewPosition="PA")
    mono1.PixelData = ((1.0 - thorax(440, 440, "normal", 1)) * 1023).astype(np.uint16).tobytes()
    del mono1.file_meta
    mono1.save_as(folder / SHARED_DICOM_FILES[0], implicit_vr=True, little_endian=True)

    # An 8-bit Secondary Capture of a CR, JPEG Baseline, with an invalid Patient's
    # Age ("62", not "062Y") as in the NIH re-encodings.
    jpeg = _secondary_capture("CR", thorax(1024, 1024, "pneumonia", 2), seed=2)
    jpeg.SpecificCharacterSet = "ISO_IR 100"
    jpeg.BodyPartExamined, jpeg.ViewPosition = "CHEST", "PA"
    with pydicom_config.disable_value_validation():
        jpeg.PatientAge = "62"
    buffer = BytesIO()
    pixels = np.frombuffer(jpeg.PixelData, np.uint8).reshape(1024, 1024)
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    jpeg.PixelData = encapsulate([buffer.getvalue()])
    jpeg["PixelData"].VR = "OB"
    jpeg.LossyImageCompression, jpeg.LossyImageCompressionMethod = "01", "ISO_10918_1"
    jpeg.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    with pydicom_config.disable_value_validation():
        jpeg.save_as(folder / SHARED_DICOM_FILES[1], enforce_file_format=True)

    # An 8-bit Secondary Capture of a DX, Implicit VR Little Endian, with a bare
    # header: no body part (the description decides), no view (undetermined), no study
    # date or ID.
    implicit = _secondary_capture("DX", thorax(1024, 1024, "normal", 3), seed=3)
    del implicit.StudyDate, implicit.StudyID, implicit.ViewPosition
    del implicit.PatientOrientation
    implicit.StudyDescription = "No Finding"
    with pydicom_config.disable_value_validation():
        implicit.PatientAge = "81"
    implicit.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    with pydicom_config.disable_value_validation():
        implicit.save_as(folder / SHARED_DICOM_FILES[2], enforce_file_format=True)
    return folder


def _secondary_capture(modality: str, image: np.ndarray, seed: int) -> Dataset:
    """An 8-bit MONOCHROME2 Secondary Capture of ``image`` (values in [0, 1]), with no
    body part and no window."""
    rows, columns = image.shape
    ds = chest_image(sop_class=SC, rows=rows, columns=columns, bits_stored=8,
                     modality=modality, body_part=None, window=None, seed=seed)
    ds.PixelData = (image * 255).astype(np.uint8).tobytes()
    return ds


#: Sources of the synthetic cxr-dev set, as in the real one: most COVID-19 images
#: from COVID collections, most normal and pneumonia images from one archive.
_CXR_SOURCES = {
    "covid": [("synthetic/covid-collection", 42), ("synthetic/clinic-a", 3),
              ("synthetic/figures", 5)],
    "pneumonia": [("synthetic/hospital-archive", 43), ("synthetic/covid-collection", 6),
                  ("synthetic/figures", 1)],
    "normal": [("synthetic/hospital-archive", 43), ("synthetic/clinic-a", 3),
               ("synthetic/covid-collection", 3), ("synthetic/figures", 1)],
}


def chest_png(path: Path, label: str, seed: int, size: tuple[int, int] = (256, 224)) -> Path:
    """An 8-bit grayscale PNG of a synthetic chest radiograph of class ``label``."""
    Image.fromarray((thorax(*size, label, seed) * 255).astype(np.uint8)).save(path)
    return path


def make_cxr_dev(folder: Path, per_class: int = 50) -> Path:
    """A stand-in for ``shared/data/cxr-dev``: shuffled ``cxr-s-NNNN.png`` files and a
    ``labels.csv`` with the real set's columns; ``per_class`` images of each class (50
    in the real set), from several sources, at most two per patient."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for label in CLASS_KEYS:
        sources = [name for name, count in _CXR_SOURCES[label] for _ in range(count)]
        for i in range(per_class):
            rows.append({"label": label, "source_repo": sources[i % len(sources)],
                         "patient_id": f"syn-{label}-{i // 2:03d}", "seed": len(rows)})
    order = np.random.default_rng(0).permutation(len(rows))
    with (folder / "labels.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CXR_DEV_COLUMNS)
        writer.writeheader()
        for n, index in enumerate(order, start=1):
            row = rows[index]
            name = f"cxr-s-{n:04d}.png"
            chest_png(folder / name, row["label"], row["seed"])
            writer.writerow({"filename": name, "label": row["label"],
                             "source_repo": row["source_repo"],
                             "source_path": f"images/{row['seed']:04d}.png",
                             "patient_id": row["patient_id"], "license": "synthetic"})
    return folder


def make_cxr_folders(folder: Path, per_class: int = 10) -> Path:
    """A folder per class (``covid/``, ``normal/``, ``pneumonia/``) of synthetic chest
    PNGs, the layout ``training.sources.folder_per_class`` reads."""
    for label in CLASS_KEYS:
        (folder / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            chest_png(folder / label / f"{label}-{i:03d}.png", label, 1000 + 100 * i)
    return folder
