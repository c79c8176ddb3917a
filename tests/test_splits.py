"""Folds and phases: the authors' files, patient disjointness, reproducibility."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from training.sources import Record
from training.splits import (
    PhaseComposition,
    check_paper_fold,
    make_folds,
    patient_folds,
    phase_balanced,
    phase_quota,
    write_folds,
)

from dicom_factory import SHARED
from helpers.environment import missing

PAPER_SPLITS = SHARED / "reference" / "paper-splits"


@pytest.mark.parametrize("fold", [1, 2, 3, 4, 5])
def test_authors_phases_have_the_papers_composition(fold: int) -> None:
    if not PAPER_SPLITS.is_dir():
        missing("../shared/reference/paper-splits is absent (a fresh clone)")
    phases = check_paper_fold(PAPER_SPLITS / f"fold{fold}")
    covid = 150 if fold == 3 else 149
    assert phases == [PhaseComposition(covid, 34, 200, 250)] * 8
    assert all(p.covid + p.common_pneumonia + p.unique_pneumonia + p.normal
               == covid + 484 for p in phases)


def test_a_broken_phase_file_is_named(tmp_path: Path) -> None:
    if not PAPER_SPLITS.is_dir():
        missing("../shared/reference/paper-splits is absent (a fresh clone)")
    fold = tmp_path / "fold1"
    fold.mkdir()
    for p in range(1, 9):
        text = (PAPER_SPLITS / "fold1" / f"train{p}.csv").read_text()
        if p == 2:  # reuse phase 1's normal images
            first = (PAPER_SPLITS / "fold1" / "train1.csv").read_text().splitlines()
            text = "\n".join([*text.splitlines(), *[r for r in first if r.endswith(",normal")]])
        (fold / f"train{p}.csv").write_text(text + "\n")
    with pytest.raises(ValueError, match=r"train2\.csv"):
        check_paper_fold(fold)


def synthetic(patients: dict[str, int], images_per_patient: int = 2) -> list[Record]:
    records = []
    for label, count in patients.items():
        source = "cxr-dataset" if label == "covid" else "hospital"
        for i in range(count):
            for j in range(images_per_patient):
                records.append(Record(Path(f"/data/{label}{i}-{j}.png"), label,
                                      f"{label}-p{i}", source))
    # the first source also has some pneumonia (the paper's "common" images)
    records += [Record(Path(f"/data/cp{i}.png"), "pneumonia", f"cp{i}", "cxr-dataset")
                for i in range(6)]
    return records


RECORDS = synthetic({"covid": 30, "pneumonia": 120, "normal": 140})


def keys(records: list[Record]) -> set[tuple[str, str]]:
    return {(r.source, r.patient_id) for r in records}


def test_patient_folds_never_split_a_patient_and_spread_classes() -> None:
    folds = patient_folds(RECORDS, 5, seed=1)
    assert sorted(r.path for f in folds for r in f) == sorted(r.path for r in RECORDS)
    for a in range(5):
        for b in range(a + 1, 5):
            assert not keys(folds[a]) & keys(folds[b])
    covid = [Counter(r.label for r in f)["covid"] for f in folds]
    assert max(covid) - min(covid) <= 2


def test_every_fold_gets_each_class_even_when_it_is_rare() -> None:
    # Five COVID-19 patients (two images each) for five folds: one per fold, or a fold
    # would test no COVID-19 at all.
    rare = synthetic({"covid": 5, "pneumonia": 40, "normal": 40})
    for seed in range(3):
        folds = patient_folds(rare, 5, seed=seed)
        assert [Counter(r.label for r in f)["covid"] for f in folds] == [2] * 5
        assert all(Counter(r.label for r in f)["normal"] > 0 for f in folds)


def test_patient_folds_are_reproducible_for_a_seed() -> None:
    def paths(seed: int) -> list[list[Path]]:
        return [[r.path for r in fold] for fold in patient_folds(RECORDS, 5, seed=seed)]

    assert paths(4) == paths(4)
    assert paths(4) != paths(5)
    with pytest.raises(ValueError, match="at least 2"):
        patient_folds(RECORDS, 1, seed=0)
    with pytest.raises(ValueError, match="patients"):
        patient_folds(RECORDS[:6], 5, seed=0)  # three patients


def test_phase_quota_leaves_images_for_the_clean_validation() -> None:
    # 240 pneumonia images outside the common source, 280 normal; a fold trains on 4/5,
    # the phases share 80 % of that: 153 and 179 images, over 8 phases.
    assert phase_quota(RECORDS, "pneumonia", folds=5, phases=8, paper=200) == 19
    assert phase_quota(RECORDS, "normal", folds=5, phases=8, paper=250) == 22
    # The first COVID-19 source's pneumonia is in every phase anyway: not counted.
    common = [Record(Path(f"/data/more-cp{i}.png"), "pneumonia", f"more-cp{i}", "cxr-dataset")
              for i in range(500)]
    assert phase_quota(RECORDS + common, "pneumonia", 5, 8, 200) == 19
    assert phase_quota(RECORDS, "normal", folds=2, phases=1, paper=100) == 100  # the paper's
    assert phase_quota(RECORDS[:4], "normal", folds=5, phases=8, paper=250) == 1  # at least 1
    # What the quotas are for: every fold's phases fit, and the clean validation set
    # still finds normal and pneumonia patients the phases did not use.
    for fold in make_folds(RECORDS, folds=5, phases=8, unique_pneumonia=19, unique_normal=22,
                           validation_per_class=10, seed=0):
        assert all(len(phase) == len(fold.phases[0]) for phase in fold.phases)
        labels = Counter(r.label for r in fold.validation)
        assert labels["normal"] >= 10 and labels["pneumonia"] >= 10


def test_phases_repeat_covid_and_common_and_share_nothing_else() -> None:
    pool = [r for r in RECORDS]
    # Patients have two images here, so quotas are even (whole patients only).
    phases, unused = phase_balanced(pool, phases=4, unique_pneumonia=20, unique_normal=24)
    covid = {r.path for r in pool if r.label == "covid"}
    common = {r.path for r in pool if r.label == "pneumonia" and r.source == "cxr-dataset"}
    seen: set[Path] = set()
    for phase in phases:
        paths = {r.path for r in phase}
        assert covid | common <= paths
        unique = paths - covid - common
        assert len(unique) == 44 and not unique & seen
        seen |= unique
    assert len(unused) == len(pool) - len(covid) - len(common) - 4 * 44


def test_not_enough_images_for_the_phases_is_explained() -> None:
    with pytest.raises(ValueError, match="phases need"):
        phase_balanced(RECORDS, phases=8, unique_pneumonia=200, unique_normal=250)


@pytest.mark.parametrize("protocol", ["clean", "paper"])
def test_folds_are_patient_disjoint(protocol: str) -> None:
    folds = make_folds(RECORDS, folds=3, phases=2, unique_pneumonia=20, unique_normal=25,
                       validation_per_class=10, protocol=protocol, seed=3)  # type: ignore[arg-type]
    for fold in folds:
        train = keys([r for phase in fold.phases for r in phase])
        test = keys(fold.test)
        assert not train & test
        if protocol == "clean":
            assert not keys(fold.validation) & test
            assert not keys(fold.validation) & train
            assert Counter(r.label for r in fold.validation)["covid"] > 0
        else:
            assert keys(fold.validation) <= test
        everything = {r.path for r in fold.test} | {r.path for r in fold.validation} \
            | {r.path for p in fold.phases for r in p}
        assert everything == {r.path for r in RECORDS}


def test_same_seed_same_files_other_seed_other_files(tmp_path: Path) -> None:
    def files(seed: int, out: Path) -> dict[str, str]:
        write_folds(out, make_folds(RECORDS, folds=3, phases=2, unique_pneumonia=20,
                                    unique_normal=25, seed=seed))
        return {str(p.relative_to(out)): p.read_text() for p in sorted(out.rglob("*.csv"))}

    first, again, other = files(7, tmp_path / "a"), files(7, tmp_path / "b"), \
        files(8, tmp_path / "c")
    assert first == again
    assert first != other
    assert "fold1/train1.csv" in first and "fold3/test.csv" in first
    assert first["fold1/train1.csv"].splitlines()[0] == "filename,class,patient_id,source"


def test_prepare_command_writes_folds_and_checks_the_papers(tmp_path: Path,
                                                            shared_cxr: Path) -> None:
    import subprocess
    import sys

    out = tmp_path / "splits"
    result = subprocess.run(
        [sys.executable, "-m", "dicom_node", "prepare", "--source", f"csv:{shared_cxr}/labels.csv",
         "--folds", "3", "--phases", "2", "--unique-pneumonia", "10", "--unique-normal", "12",
         "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (out / "fold3" / "train2.csv").is_file() and (out / "fold1" / "test.csv").is_file()
    if PAPER_SPLITS.is_dir():
        checked = subprocess.run(
            [sys.executable, "-m", "dicom_node", "prepare", "--out", str(tmp_path / "x"),
             "--check-paper", str(PAPER_SPLITS)], capture_output=True, text=True, timeout=120)
        assert checked.returncode == 0, checked.stderr
        assert "fold3: 8 phases, COVID-19/common pneumonia/unique pneumonia/normal = " \
               "[(150, 34, 200, 250)]" in checked.stdout


def test_authors_fold_imported_as_in_their_notebook(tmp_path: Path) -> None:
    if not PAPER_SPLITS.is_dir():
        missing("../shared/reference/paper-splits is absent (a fresh clone)")
    from training.splits import import_paper_fold

    fold = import_paper_fold(PAPER_SPLITS, 1, tmp_path / "All")
    assert len(fold.phases) == 8 and all(len(p) == 633 for p in fold.phases)
    trained = {r.path for p in fold.phases for r in p}
    assert not trained & {r.path for r in fold.test}
    # Table 1 of the paper: 3783 training images (149 + 1634 + 2000), 11302 tested.
    assert len(trained) == 3783 and len(fold.test) == 11302
    counts = Counter(r.label for r in fold.validation)
    assert counts["normal"] == 300 and counts["pneumonia"] == 300
    assert counts["covid"] == Counter(r.label for r in fold.test)["covid"]
    assert all(r.path.parent == tmp_path / "All" for r in fold.test)
    with pytest.raises(ValueError, match="patient ids"):
        import_paper_fold(PAPER_SPLITS, 1, tmp_path, protocol="clean")
