"""Synthetic DICOM instances for protocol tests (made on the fly, never committed)."""

from __future__ import annotations

import struct
from io import BytesIO
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

CR = UID("1.2.840.10008.5.1.4.1.1.1")
DX_PRESENTATION = UID("1.2.840.10008.5.1.4.1.1.1.1")
DX_PROCESSING = UID("1.2.840.10008.5.1.4.1.1.1.1.1")
SC = UID("1.2.840.10008.5.1.4.1.1.7")
CT = UID("1.2.840.10008.5.1.4.1.1.2")

SHARED = Path(__file__).resolve().parents[2] / "shared"
SHARED_DICOM = SHARED / "data" / "dicom"
SHARED_CXR = SHARED / "data" / "cxr-dev"


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
    **attributes: object,
) -> Dataset:
    """A single-frame grayscale radiograph data set with a File Meta group."""
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
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
    ds.PatientOrientation = ["P", "F"]
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
        ds.compress(transfer_syntax)
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


def save(ds: Dataset, path: Path) -> Path:
    """Write ``ds`` as a Part 10 file."""
    ds.save_as(path, enforce_file_format=True)
    return path
