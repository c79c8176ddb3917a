"""Clinical safety over real DCMTK sends into a running node: frontal views only, only
validated models reach a PACS (or every object says otherwise), operating points in
the SR, one result per study, and a late image that supersedes it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicom_node.db import DeliveryState, JobState
from dicom_node.loopback import free_port
from model import card as model_card

from dicom_factory import chest_image, save
from helpers.environment import CALLING_AE, wait_until
from helpers.processes import NodeProcess, cli
from helpers.sr import read_result
from peers import Storescp, storescu

pytestmark = [pytest.mark.integration, pytest.mark.slow]

QUICK = {
    "DICOM_NODE_RETRY_BASE_SECONDS": "0.5", "DICOM_NODE_RETRY_MAX_SECONDS": "1",
    "DICOM_NODE_DISPATCH_INTERVAL_SECONDS": "0.3", "DICOM_NODE_MAX_BATCH_DELAY_MS": "50",
    "DICOM_NODE_STUDY_QUIET_SECONDS": "2",
}
#: The stand-in model's outputs are near 1/3 each: a covid threshold of 0 is always
#: reached, a pneumonia threshold of 1 never.
THRESHOLDS = {"covid": 0.0, "pneumonia": 1.0}


def validated_copy(artifact: Path, out: Path) -> Path:
    """``artifact`` with test evidence signed by a person and operating points, as
    ``model import --metrics`` records them for an external model."""
    import shutil

    shutil.copytree(artifact, out)
    card = model_card.read_card(out)
    card.version = "2.0.0"
    card.test = model_card.TestEvidence(
        data_set="site acceptance set (tests)", images=400, evaluated_by="import",
        signed_by="A. Physicist", balanced_accuracy=0.81, balanced_accuracy_95=[0.76, 0.85])
    card.operating_points = {
        key: model_card.OperatingPoint(threshold=t, target_sensitivity=0.9,
                                       validation_images=120, test_sensitivity=0.91,
                                       test_sensitivity_95=[0.85, 0.96],
                                       test_specificity=0.7, test_specificity_95=[0.64, 0.76])
        for key, t in THRESHOLDS.items()}
    model_card.write_card(out, card)
    assert model_card.validation_status(card).validated
    return out


def node_with(tmp_path: Path, artifact: Path | None, pacs_port: int, allow: bool,
              name: str = "var") -> NodeProcess:
    args = ["--allow-calling-ae", CALLING_AE, "--destination", f"PACS@127.0.0.1:{pacs_port}"]
    if artifact is not None:
        args += ["--model", str(artifact)]
    return NodeProcess(tmp_path / name, extra_args=args, env=QUICK, allow_unvalidated=allow)


def delivered(node: NodeProcess, count: int) -> bool:
    """``count`` images classified, each with its SR and evidence image delivered."""
    with node.job_store() as store:
        jobs = [j for j in store.list() if j.state is not JobState.IGNORED]
        deliveries = store.deliveries([j.id for j in jobs])
    return (len(jobs) == count and all(j.state is JobState.DONE for j in jobs)
            and all(d.state is DeliveryState.DONE for ds in deliveries.values() for d in ds)
            and sum(len(ds) for ds in deliveries.values()) == 2 * count)


def studies(node: NodeProcess) -> list[dict[str, object]]:
    shown = cli("studies", "list", "--json", "--data-dir", str(node.data_dir))
    assert shown.returncode == 0, shown.stderr
    found: list[dict[str, object]] = json.loads(shown.stdout)
    return found


def received(folder: Path, evidence: bool = False) -> list[Dataset]:
    """The SRs the PACS received (or, ``evidence``, the evidence images: it receives
    nothing else here)."""
    every = [dcmread(p) for p in sorted(folder.iterdir()) if p.is_file()]
    return [d for d in every if (d.Modality == "SR") != evidence]


def test_a_lateral_image_is_ignored_with_its_reason(tmp_path: Path,
                                                    serving_artifact: Path) -> None:
    pacs = Storescp(tmp_path / "pacs", free_port())
    node = node_with(tmp_path, serving_artifact, pacs.port, allow=True).start()
    study = generate_uid()
    frontal = save(chest_image(StudyInstanceUID=study, ViewPosition="PA"), tmp_path / "pa.dcm")
    lateral = save(chest_image(StudyInstanceUID=study, ViewPosition="LL", seed=1),
                   tmp_path / "ll.dcm")
    try:
        assert storescu(node.port, [frontal, lateral]).all_success
        wait_until(lambda: delivered(node, 1), what="the frontal image's SR delivered")
        with node.job_store() as store:
            jobs = {j.sop_instance_uid: j for j in store.list()}
        ignored = jobs[str(dcmread(lateral).SOPInstanceUID)]
        assert ignored.state is JobState.IGNORED and ignored.spool_file is None
        assert "lateral" in ignored.intake_reason
        queued = jobs[str(dcmread(frontal).SOPInstanceUID)]
        assert queued.state is JobState.DONE and queued.view == "frontal"
        [sr] = received(pacs.folder)  # one SR: the lateral image got none
        assert read_result(sr).finding == queued.label
    finally:
        node.stop()
        pacs.stop()


def test_an_unvalidated_model_does_not_start_a_node_unless_allowed(
        tmp_path: Path, serving_artifact: Path) -> None:
    given = node_with(tmp_path, serving_artifact, free_port(), allow=False, name="given")
    with pytest.raises(RuntimeError, match="exited with 2"):
        given.start()  # serve --model refuses to install it
    assert "not validated" in given.log and "allow" in given.log

    installed = node_with(tmp_path, None, free_port(), allow=False, name="installed")
    forced = cli("model", "install", str(serving_artifact), "--allow-unvalidated",
                 "--data-dir", str(installed.data_dir))
    assert forced.returncode == 0, forced.stderr
    with pytest.raises(RuntimeError, match="exited with 2"):
        installed.start()  # the active model, installed by force, is refused at start-up
    assert "the active model" in installed.log and "the card carries no test results" in \
        installed.log


def test_an_unvalidated_model_installed_later_delivers_nothing(
        tmp_path: Path, serving_artifact: Path) -> None:
    pacs = Storescp(tmp_path / "pacs", free_port())
    node = node_with(tmp_path, None, pacs.port, allow=False).start()
    image = save(chest_image(), tmp_path / "pa.dcm")
    try:
        assert storescu(node.port, [image]).all_success
        forced = cli("model", "install", str(serving_artifact), "--allow-unvalidated",
                     "--data-dir", str(node.data_dir))
        assert forced.returncode == 0, forced.stderr
        wait_until(lambda: "will not serve" in node.log, what="the worker's refusal")
        with node.job_store() as store:
            [job] = store.list()
        assert job.state is JobState.QUEUED  # waits for a validated model; nothing lost
        assert list(pacs.folder.iterdir()) == []
    finally:
        node.stop()
        pacs.stop()


def test_an_allowed_unvalidated_model_says_so_in_every_object(
        tmp_path: Path, serving_artifact: Path) -> None:
    pacs = Storescp(tmp_path / "pacs", free_port())
    node = node_with(tmp_path, serving_artifact, pacs.port, allow=True).start()
    files = [save(chest_image(seed=i), tmp_path / f"{i}.dcm") for i in range(2)]
    try:
        assert storescu(node.port, files).all_success
        wait_until(lambda: delivered(node, 2), what="2 SRs delivered")
        for sr in received(pacs.folder):
            assert "UNVALIDATED MODEL" in sr.ConceptNameCodeSequence[0].CodeMeaning
            assert str(sr.SeriesDescription).startswith(model_card.UNVALIDATED_WARNING)
            assert read_result(sr).warning
        evidence = received(pacs.folder, evidence=True)
        assert len(evidence) == 2 and all(
            "UNVALIDATED MODEL" in str(image.SeriesDescription) for image in evidence)
        wait_until(lambda: all(s["state"] == "closed" for s in studies(node))
                   and len(studies(node)) == 2, what="the two study results")
        assert all(s["model_validated"] is False for s in studies(node))
        shown = cli("jobs", "show", "1", "--data-dir", str(node.data_dir))
        assert json.loads(shown.stdout)["model_validated"] is False
    finally:
        node.stop()
        pacs.stop()


def test_a_validated_model_gives_thresholds_and_one_result_per_study(
        tmp_path: Path, serving_artifact: Path) -> None:
    artifact = validated_copy(serving_artifact, tmp_path / "validated")
    pacs = Storescp(tmp_path / "pacs", free_port())
    node = node_with(tmp_path, artifact, pacs.port, allow=False).start()
    study = generate_uid()
    images = [save(chest_image(StudyInstanceUID=study, seed=i), tmp_path / f"{i}.dcm")
              for i in range(3)]
    try:
        assert storescu(node.port, images[:2]).all_success
        wait_until(lambda: delivered(node, 2), what="2 SRs delivered")
        for sr in received(pacs.folder):
            said = read_result(sr)
            assert not said.warning and "UNVALIDATED" not in str(sr.SeriesDescription)
            assert said.thresholds == pytest.approx(THRESHOLDS)
            assert said.flags == ("covid",) and said.flagged is True
        assert all("UNVALIDATED" not in str(image.SeriesDescription)
                   for image in received(pacs.folder, evidence=True))
        wait_until(lambda: [s["state"] for s in studies(node)] == ["closed"],
                   what="the study's result")
        [first] = studies(node)
        assert first["version"] == 1 and first["job_ids"] == [1, 2]
        assert first["flagged"] is True and first["flags"] == ["covid"]
        assert first["model_validated"] is True and first["problems"] == []

        assert storescu(node.port, images[2:]).all_success  # a late third image
        wait_until(lambda: [s["state"] for s in studies(node)] == ["closed", "superseded"],
                   what="a second version superseding the first")
        second, old = studies(node)
        assert second["version"] == 2 and second["supersedes"] == first["id"]
        assert second["job_ids"] == [1, 2, 3] and old["id"] == first["id"]
        assert len(received(pacs.folder)) == 3  # the per-image SRs stay as they are
    finally:
        node.stop()
        pacs.stop()
