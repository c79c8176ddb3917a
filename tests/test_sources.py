"""Dataset readers and the editable label mappings."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from training.sources import (
    PAPER_FINDINGS,
    covid_chestxray,
    csv_list,
    folder_per_class,
    map_finding,
    read,
    rsna,
)


def test_findings_flat_and_hierarchical() -> None:
    mapping = {**PAPER_FINDINGS, "Pneumonia/Bacterial": "pneumonia"}
    assert map_finding("COVID-19, ARDS", mapping) == "covid"
    assert map_finding("Pneumonia/Viral/COVID-19", mapping) == "covid"
    assert map_finding("Pneumonia/Bacterial/Streptococcus", mapping) == "pneumonia"
    assert map_finding("Pneumonia/Bacterial/Klebsiella", mapping) == "pneumonia"
    assert map_finding("Pneumonia/Lipoid", mapping) is None
    assert map_finding("Tuberculosis", mapping) is None


def test_covid_chestxray_layout(tmp_path: Path) -> None:
    (tmp_path / "metadata.csv").write_text(
        "patientid,finding,view,modality,filename,folder\n"
        "1,COVID-19,PA,X-ray,a.png,images\n"
        "1,COVID-19,L,X-ray,b.png,images\n"          # lateral: not a paper view
        "2,Pneumonia/Viral/COVID-19,AP Supine,X-ray,c.png,images\n"
        "3,SARS,AP,X-ray,d.png,images\n"
        "4,COVID-19,,CT,e.png,images\n"              # CT: left out
        "5,Legionella,PA,X-ray,f.png,images\n"       # not in the paper's mapping
    )
    records = list(covid_chestxray(tmp_path))
    assert [(r.path.name, r.label, r.patient_id) for r in records] == [
        ("a.png", "covid", "1"), ("c.png", "covid", "2"), ("d.png", "pneumonia", "3")]
    wider = list(covid_chestxray(tmp_path, findings={**PAPER_FINDINGS,
                                                     "Legionella": "pneumonia"}))
    assert len(wider) == 4


def test_rsna_layout(tmp_path: Path) -> None:
    (tmp_path / "stage_2_detailed_class_info.csv").write_text(
        "patientId,class\nn1,Normal\np1,Lung Opacity\np1,Lung Opacity\no1,"
        "No Lung Opacity / Not Normal\n")
    (tmp_path / "stage_2_train_labels.csv").write_text(
        "patientId,x,y,width,height,Target\nn1,,,,,0\np1,1,2,3,4,1\np1,5,6,7,8,1\no1,,,,,0\n")
    records = list(rsna(tmp_path))
    assert [(r.patient_id, r.label, r.path.name) for r in records] == [
        ("n1", "normal", "n1.dcm"), ("p1", "pneumonia", "p1.dcm")]


def test_folder_per_class(tmp_path: Path) -> None:
    for folder, name in (("COVID-19", "x.png"), ("Normal", "y.jpg"), ("pneumonia", "z.dcm")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / name).write_bytes(b"")
    (tmp_path / "Normal" / "notes.txt").write_text("ignored")
    assert sorted((r.label, r.path.name) for r in folder_per_class(tmp_path)) == [
        ("covid", "x.png"), ("normal", "y.jpg"), ("pneumonia", "z.dcm")]


def test_csv_list_reads_the_shared_dev_set(shared_cxr: Path) -> None:
    records = list(csv_list(shared_cxr / "labels.csv"))
    assert Counter(r.label for r in records) == {"covid": 50, "normal": 50, "pneumonia": 50}
    assert all(r.path.is_file() for r in records)
    assert len({r.source for r in records}) >= 3
    assert read(shared_cxr) == records
