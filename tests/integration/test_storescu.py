"""DCMTK storescu sends real chest DICOMs and synthetic ones to a running node."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread

from dicom_node.db import JobState

from dicom_factory import (
    chest_image,
    cr_monochrome1,
    ct_head,
    dx_16bit,
    jpeg2000,
    jpeg_ls,
    rle,
    save,
)
from helpers.files import dataset_sha256
from helpers.processes import NodeProcess
from peers import send_each, storescu

pytestmark = pytest.mark.integration



def synthetic(tmp_path: Path) -> dict[str, Path]:
    made = {
        "dx16": dx_16bit(rows=1024, columns=800),
        "mono1": cr_monochrome1(),
        "j2k": jpeg2000(),
        "rle": rle(),
        "jls": jpeg_ls(),
        "ct": ct_head(),
    }
    return {name: save(ds, tmp_path / f"{name}.dcm") for name, ds in made.items()}


def test_real_chest_dicoms(node: NodeProcess, shared_dicom: Path) -> None:
    files = sorted(shared_dicom.glob("*.dcm"))
    assert len(files) == 3
    runs = send_each(node.port, files)
    assert all(run.all_success for run in runs), [r.output for r in runs]
    with node.job_store() as store:
        jobs = store.list()
    assert len(jobs) == 3
    assert {j.state for j in jobs} == {JobState.QUEUED}
    expected = {str(dcmread(f, force=True).SOPInstanceUID) for f in files}
    assert {j.sop_instance_uid for j in jobs} == expected
    for job in jobs:
        path = node.data_dir / "spool" / str(job.spool_file)
        assert dataset_sha256(path) == job.sha256
        assert dcmread(path).file_meta.TransferSyntaxUID == job.transfer_syntax_uid


def test_synthetic_syntaxes_ct_ignored_and_duplicates(node: NodeProcess, tmp_path: Path
                                                      ) -> None:
    files = synthetic(tmp_path)
    runs = send_each(node.port, list(files.values()))
    assert all(run.all_success for run in runs), [r.output for r in runs]
    with node.job_store() as store:
        by_uid = {j.sop_instance_uid: j for j in store.list()}
    assert len(by_uid) == 6
    for name, path in files.items():
        job = by_uid[str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)]
        if name == "ct":
            assert job.state is JobState.IGNORED and job.spool_file is None
        else:
            assert job.state is JobState.QUEUED
            assert (node.data_dir / "spool" / str(job.spool_file)).is_file()
    again = storescu(node.port, [files["dx16"], files["mono1"], files["ct"]])
    assert again.all_success and len(again.responses) == 3
    assert len(store.list()) == 6
    assert store.counts() == {"queued": 5, "ignored": 1}


def test_unknown_calling_ae_rejected(node: NodeProcess, tmp_path: Path) -> None:
    path = save(chest_image(), tmp_path / "a.dcm")
    run = storescu(node.port, [path], calling="NOT_ALLOWED")
    assert run.returncode != 0
    assert "Calling AE Title Not Recognized" in run.output
    with node.job_store() as store:
        assert store.list() == []


def test_uid_that_looks_like_a_path_never_becomes_one(node: NodeProcess, tmp_path: Path
                                                      ) -> None:
    ds = chest_image()
    ds.SOPInstanceUID = "../../x"
    ds.file_meta.MediaStorageSOPInstanceUID = "../../x"
    path = tmp_path / "evil.dcm"
    ds.save_as(path, enforce_file_format=False)
    run = storescu(node.port, [path])
    assert run.responses == ["Error: DataSetDoesNotMatchSOPClass"]
    with node.job_store() as store:
        assert store.list() == []
    created = [p for p in node.data_dir.parent.rglob("*") if p.name == "x"]
    assert created == []
    assert not (node.data_dir / "x").exists() and not Path("x").exists()
