"""The synthetic stand-ins for the shared data are what the tests take them for.

A fresh clone runs the data tests on them (conftest's ``shared_dicom`` and
``shared_cxr``), so they must have the properties those tests rely on -- the
ones the real files have.
"""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import ImplicitVRLittleEndian, JPEGBaseline8Bit

from model import preprocess
from training.sources import folder_per_class, read

from dicom_factory import (
    CR,
    CXR_DEV_COLUMNS,
    SC,
    SHARED_CXR,
    SHARED_DICOM,
    SHARED_DICOM_FILES,
    make_cxr_dev,
    make_cxr_folders,
    make_dicom_samples,
)

#: What each shared DICOM file is (shared/data/dicom/README.md): SOP Class,
#: Modality, photometric, bits allocated/stored, rows x columns, transfer syntax
#: (None: no File Meta group at all).
KINDS = {
    "cxr_cr_mono1_10bit_no_meta.dcm": (CR, "CR", "MONOCHROME1", 16, 10, 440, 440, None),
    "cxr_cr_sc_jpeg_baseline_mono2.dcm": (SC, "CR", "MONOCHROME2", 8, 8, 1024, 1024,
                                          JPEGBaseline8Bit),
    "cxr_dx_sc_implicit_le_mono2.dcm": (SC, "DX", "MONOCHROME2", 8, 8, 1024, 1024,
                                        ImplicitVRLittleEndian),
}


def kind(path: Path) -> tuple[object, ...]:
    ds = dcmread(path, force=True, stop_before_pixels=True)
    meta = ds.get("file_meta")
    syntax = meta.get("TransferSyntaxUID") if meta else None
    return (ds.SOPClassUID, ds.Modality, ds.PhotometricInterpretation, ds.BitsAllocated,
            ds.BitsStored, ds.Rows, ds.Columns, syntax)


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dicom_samples(tmp_path_factory.mktemp("samples"))


def test_dicom_samples_are_the_shared_kinds(samples: Path) -> None:
    assert sorted(p.name for p in samples.iterdir()) == sorted(SHARED_DICOM_FILES)
    for name, expected in KINDS.items():
        assert kind(samples / name) == expected, name
        if (SHARED_DICOM / name).is_file():
            assert kind(SHARED_DICOM / name) == expected, f"shared {name}"
    bare = (samples / SHARED_DICOM_FILES[0]).read_bytes()
    assert bare[128:132] != b"DICM" and bare[:2] == b"\x08\x00"  # starts with a (0008,xxxx)
    no_body_part = dcmread(samples / SHARED_DICOM_FILES[2])
    assert "BodyPartExamined" not in no_body_part and "StudyDate" not in no_body_part
    assert dcmread(samples / SHARED_DICOM_FILES[1]).PatientAge == "62"  # not a valid AS


def test_dicom_samples_decode_to_chest_like_pictures(samples: Path) -> None:
    for name in SHARED_DICOM_FILES:
        gray = preprocess.read_gray8(samples / name).astype(np.float64)
        rows, columns = gray.shape
        lungs = gray[rows // 3:2 * rows // 3, columns // 5:2 * columns // 5].mean()
        spine = gray[rows // 3:2 * rows // 3, columns // 2 - 4:columns // 2 + 4].mean()
        assert spine - lungs > 40, name  # displayed: dark lungs beside a bright spine


def test_cxr_dev_stand_in_reads_like_the_shared_set(tmp_path: Path) -> None:
    folder = make_cxr_dev(tmp_path / "cxr-dev")
    with (folder / "labels.csv").open(newline="") as f:
        header = tuple(next(csv.reader(f)))
    assert header == CXR_DEV_COLUMNS
    if (SHARED_CXR / "labels.csv").is_file():
        with (SHARED_CXR / "labels.csv").open(newline="") as f:
            assert tuple(next(csv.reader(f))) == header
    records = read(folder)
    assert Counter(r.label for r in records) == {"covid": 50, "normal": 50, "pneumonia": 50}
    assert len({r.source for r in records}) >= 3
    assert max(Counter(r.patient_id for r in records).values()) <= 2
    assert all(r.path.is_file() and r.path.suffix == ".png" for r in records)
    assert preprocess.load(records[0].path, 96).shape == (96, 96, 3)


def test_folder_per_class_stand_in(tmp_path: Path) -> None:
    folder = make_cxr_folders(tmp_path / "by-class", per_class=3)
    records = list(folder_per_class(folder))
    assert Counter(r.label for r in records) == {"covid": 3, "normal": 3, "pneumonia": 3}
    assert all(r.path.parent.name == r.label for r in records)
