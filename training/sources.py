"""Readers that turn public dataset layouts into labelled records.

Every reader yields :class:`Record` (image path, class key, patient id, source).
Label mappings are data, not code, so a site can edit them:

* ``covid_chestxray`` -- the covid-chestxray-dataset layout (``metadata.csv`` with
  ``finding``, ``view``, ``modality``, ``patientid``, ``filename``; images in
  ``images/``), with the paper's mapping and views, and ready for the newer
  hierarchical findings such as ``Pneumonia/Viral/COVID-19``;
* ``rsna`` -- the RSNA Pneumonia Detection Challenge (``stage_2_detailed_class_info.csv``,
  ``stage_2_train_labels.csv``, ``stage_2_train_images/*.dcm``);
* ``folder_per_class`` -- ``ROOT/<label>/<image>``;
* ``csv_list`` -- a CSV with ``filename``, ``label`` and optionally ``patient_id``.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from model.classes import CLASS_KEYS, index_of

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".bmp", ".tif", ".tiff")

#: The paper's mapping of covid-chestxray-dataset findings (section 2.2).
PAPER_FINDINGS: dict[str, str] = {
    "COVID-19": "covid",
    "COVID-19, ARDS": "covid",
    "Pneumocystis": "pneumonia",
    "SARS": "pneumonia",
    "Streptococcus": "pneumonia",
}
#: The paper's views (frontal radiographs).
PAPER_VIEWS: tuple[str, ...] = ("PA", "AP", "AP Supine", "AP semi erect")


@dataclass(frozen=True)
class Record:
    """One labelled image."""

    path: Path
    label: str
    patient_id: str
    source: str

    def __post_init__(self) -> None:
        if self.label not in CLASS_KEYS:
            raise ValueError(f"label {self.label!r} is not one of {CLASS_KEYS}")

    @property
    def patient(self) -> tuple[str, str]:
        """The patient, the unit of independence of folds and intervals: ``(source,
        patient_id)`` -- two collections may both have a patient "1"."""
        return (self.source, self.patient_id)


def map_finding(finding: str, mapping: Mapping[str, str]) -> str | None:
    """The class of a finding, or None when the mapping does not cover it.

    A hierarchical finding (``Pneumonia/Viral/COVID-19``) is looked up whole,
    then by its components from the most specific (``COVID-19``) up.
    """
    text = finding.strip()
    if text in mapping:
        return mapping[text]
    parts = [p.strip() for p in text.split("/") if p.strip()]
    for depth in range(len(parts), 0, -1):
        for candidate in ("/".join(parts[:depth]), parts[depth - 1]):
            if candidate in mapping:
                return mapping[candidate]
    return None


def covid_chestxray(
    root: Path,
    findings: Mapping[str, str] = PAPER_FINDINGS,
    views: Sequence[str] = PAPER_VIEWS,
    modality: str = "X-ray",
    source: str = "covid-chestxray-dataset",
) -> Iterator[Record]:
    """Records of the covid-chestxray-dataset (``ROOT/metadata.csv``, ``ROOT/images/``).

    Parameters
    ----------
    root
        The dataset's folder.
    findings
        Finding text -> class key; findings not listed are left out.
    views
        Views kept (the paper's: frontal ones).
    modality
        The ``modality`` column's value kept.
    source
        The name recorded as each record's source.
    """
    allowed_views = {v.lower() for v in views}
    with (root / "metadata.csv").open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row.get("modality", "").strip() != modality:
                continue
            if row.get("view", "").strip().lower() not in allowed_views:
                continue
            label = map_finding(row.get("finding", ""), findings)
            if label is None:
                continue
            folder = row.get("folder", "images").strip() or "images"
            yield Record(root / folder / row["filename"].strip(), label,
                         row.get("patientid", "").strip() or row["filename"], source)


def rsna(root: Path, source: str = "rsna-pneumonia") -> Iterator[Record]:
    """RSNA challenge records: ``Normal`` -> normal, ``Target`` 1 -> pneumonia.

    "No Lung Opacity / Not Normal" images are neither and are left out, as in the paper.
    """
    normal: set[str] = set()
    with (root / "stage_2_detailed_class_info.csv").open(newline="") as f:
        for row in csv.DictReader(f):
            if row["class"].strip() == "Normal":
                normal.add(row["patientId"].strip())
    pneumonia: set[str] = set()
    with (root / "stage_2_train_labels.csv").open(newline="") as f:
        for row in csv.DictReader(f):
            if row["Target"].strip() == "1":
                pneumonia.add(row["patientId"].strip())
    images = root / "stage_2_train_images"
    for patient in sorted(normal | pneumonia):
        label = "pneumonia" if patient in pneumonia else "normal"
        yield Record(images / f"{patient}.dcm", label, patient, source)


def folder_per_class(root: Path, source: str | None = None) -> Iterator[Record]:
    """``ROOT/<label>/<image>``; the label folder may use any usual spelling."""
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        label = CLASS_KEYS[index_of(folder.name)]
        for image in sorted(folder.iterdir()):
            if image.suffix.lower() in IMAGE_SUFFIXES:
                yield Record(image, label, image.stem, source or root.name)


def csv_list(path: Path, source: str | None = None) -> Iterator[Record]:
    """A CSV list: ``filename`` (relative to the CSV), ``label``, optional ``patient_id``
    and ``source``. Also reads the authors' ``filename,class`` files."""
    with path.open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            label = CLASS_KEYS[index_of(row.get("label") or row["class"])]
            filename = row["filename"].strip()
            yield Record(path.parent / filename, label,
                         (row.get("patient_id") or "").strip() or Path(filename).stem,
                         (row.get("source") or row.get("source_repo") or "").strip()
                         or source or path.stem)


def read(path: Path) -> list[Record]:
    """Records from a CSV list or a folder per class (what ``--data PATH`` accepts)."""
    if path.is_file():
        return list(csv_list(path))
    if (path / "labels.csv").is_file():
        return list(csv_list(path / "labels.csv"))
    return list(folder_per_class(path))
