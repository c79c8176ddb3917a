"""Facts about files on disk: DICOM files, and the logs of the processes tests run."""

from __future__ import annotations

import hashlib
from pathlib import Path

from pydicom import dcmread


def dataset_sha256(path: Path) -> str:
    """sha256 of the data set part of a Part 10 file (what the job row records)."""
    meta = dcmread(path, stop_before_pixels=True).file_meta
    offset = 128 + 4 + 12 + int(meta.FileMetaInformationGroupLength)
    return hashlib.sha256(path.read_bytes()[offset:]).hexdigest()


def sop_instance_uid(path: Path) -> str:
    """The SOP Instance UID of a DICOM file (with or without a File Meta group)."""
    return str(dcmread(path, stop_before_pixels=True, force=True).SOPInstanceUID)


def log_so_far(path: Path) -> str:
    """What a running process has written to its log file ``path`` so far ("" before
    it has made the file)."""
    return path.read_text(errors="replace") if path.exists() else ""
