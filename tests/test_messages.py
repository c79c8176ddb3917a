"""The worklist messages of closed study results, on a real job store and spool: which
image's identifiers they carry, when there is none, corrections, one study's failure,
and an unreadable message file at dispatch."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import hl7
import pytest
from pydicom import Dataset
from sqlalchemy import select

from dicom_node.config import Settings
from dicom_node.db import Delivery, DeliveryItem, DeliveryState, JobState, StudyResult, utcnow
from dicom_node.jobs import JobResult, JobStore, ReceivedInstance, study_key
from dicom_node.messages import Messenger
from dicom_node.scheduler import Dispatcher
from dicom_node.spool import Spool
from dicom_node.studies import StudyBook

from dicom_factory import chest_image, part10_bytes
from helpers.mllp import MllpReceiver, Mode

SECRET = b"k" * 32
QUIET = 30.0


class Site:
    """A job store, a spool and settings with one hl7 destination."""

    def __init__(self, root: Path, ris_port: int = 9) -> None:
        self.settings = Settings(data_dir=root, study_quiet_seconds=QUIET,
                                 destinations=[{"kind": "hl7",
                                                "address": f"127.0.0.1:{ris_port}"}])
        self.store = JobStore(self.settings.database_url, study_quiet_seconds=QUIET)
        self.spool = Spool(self.settings.storage_dir)
        self.messenger = Messenger(self.settings, self.spool)

    def receive(self, ds: Dataset) -> int:
        """Spool ``ds`` and record it as a queued frontal image."""
        data = part10_bytes(ds)
        spooled = self.spool.write([data])
        study = str(ds.StudyInstanceUID)
        job = self.store.record(ReceivedInstance(
            sop_class_uid=str(ds.SOPClassUID), sop_instance_uid=str(ds.SOPInstanceUID),
            series_instance_uid=str(ds.SeriesInstanceUID), study_instance_uid=study,
            transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID), calling_ae="STORESCU",
            peer_address="127.0.0.1", sha256=hashlib.sha256(data).hexdigest(),
            size_bytes=len(data), view="frontal",
            patient_key=study_key(SECRET, study, ds.get("PatientID")),
            accession_key=study_key(SECRET, study, ds.get("AccessionNumber"))),
            spooled.name, JobState.QUEUED, "chest")
        assert job is not None
        return job.id

    def classify(self) -> None:
        jobs = self.store.claim("w", limit=100, lease_seconds=60)
        assert all(self.store.complete_batch("w", [
            JobResult(j.id, "normal", {"covid": 0.1, "normal": 0.8, "pneumonia": 0.1},
                      "cxr 1.0.0", f"sr/{j.id}.dcm", flags=[], model_validated=True)
            for j in jobs]))

    def close(self, book: StudyBook | None = None, after: float = QUIET + 1) -> list[int]:
        book = book or StudyBook(self.store, self.messenger.on_close)
        return [s.id for s in book.close_due(utcnow() + timedelta(seconds=after))]

    def messages(self) -> list[Delivery]:
        with self.store.sessions() as session:
            return list(session.scalars(select(Delivery).where(
                Delivery.study_result_id.is_not(None)).order_by(Delivery.id)))

    def oru(self, delivery: Delivery) -> hl7.Message:
        assert delivery.payload_file is not None
        return hl7.parse(self.spool.path(delivery.payload_file).read_bytes().decode())


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    made = Site(tmp_path / "var")
    yield made
    made.store.close()


def test_identifiers_come_from_the_images_the_answer_takes_them_from(site: Site) -> None:
    """The study's patient is the first image's that has a Patient ID, its order the
    first's that has an accession number (as studies.form decides), not simply the
    first image's."""
    study = "1.2.3.77"
    site.receive(chest_image(StudyInstanceUID=study, PatientID="", AccessionNumber=""))
    site.receive(chest_image(StudyInstanceUID=study, PatientID="PAT-9", AccessionNumber="",
                             seed=1))
    site.receive(chest_image(StudyInstanceUID=study, PatientID="PAT-9",
                             AccessionNumber="ACC-3", seed=2))
    site.classify()
    assert len(site.close()) == 1
    [oru] = site.messages()
    assert oru.state is DeliveryState.PENDING and oru.item is DeliveryItem.ORU
    message = site.oru(oru)
    assert str(message.segment("PID")[3][0][0]) == "PAT-9"
    assert str(message.segment("OBR")[18]) == "ACC-3"
    assert str(message.segment("MSH")[10]) == oru.message_id


def test_a_study_without_a_patient_id_gets_no_message_and_says_why(site: Site) -> None:
    site.receive(chest_image(PatientID=""))
    site.classify()
    site.close()
    [oru] = site.messages()
    assert oru.state is DeliveryState.DEAD and oru.payload_file is None
    assert "no Patient ID" in (oru.last_error or "")
    with site.store.sessions() as session:
        job_id = session.scalars(select(StudyResult.job_ids)).one()[0]
    assert site.store.retry_dead_deliveries(job_id) == 0  # nothing to retry: keeps its reason


def test_a_correction_ends_the_superseded_versions_pending_messages(site: Site) -> None:
    study = "1.2.3.78"
    site.receive(chest_image(StudyInstanceUID=study))
    site.classify()
    site.close()
    site.receive(chest_image(StudyInstanceUID=study, seed=1))  # a late image: version 2
    site.classify()
    site.close(after=2 * QUIET + 2)
    first, second = site.messages()
    # Version 1's ORU, still pending, would reach the RIS after version 2's correction.
    assert first.state is DeliveryState.DEAD and "superseded by version 2" in (
        first.last_error or "")
    assert second.state is DeliveryState.PENDING
    assert str(site.oru(second).segment("OBR")[25]) == "C"


def test_one_study_that_cannot_close_holds_back_no_other(site: Site) -> None:
    bad, good = "1.2.3.80", "1.2.3.81"
    site.receive(chest_image(StudyInstanceUID=bad))
    site.receive(chest_image(StudyInstanceUID=good, seed=1))
    site.classify()

    def failing(session: object, study: StudyResult, jobs: object) -> None:
        if study.study_instance_uid == bad:
            raise OSError("disk full")
        site.messenger.on_close(session, study, jobs)  # type: ignore[arg-type]

    closed = site.close(StudyBook(site.store, failing))
    results = {s.study_instance_uid: s for s in StudyBook(site.store).list()}
    assert closed == [results[good].id]
    assert results[bad].state.value == "open"  # tried again on the next run, whole
    assert [m.study_result_id for m in site.messages()] == [results[good].id]


def test_an_unreadable_message_file_is_dead_alone_and_the_others_go(tmp_path: Path) -> None:
    with MllpReceiver(Mode.ACCEPT) as ris:
        site = Site(tmp_path / "var", ris_port=ris.port)
        try:
            site.receive(chest_image(StudyInstanceUID="1.2.3.90"))
            site.receive(chest_image(StudyInstanceUID="1.2.3.91", seed=1))
            site.classify()
            site.close()
            lost, kept = site.messages()
            assert lost.payload_file is not None
            site.spool.path(lost.payload_file).unlink()
            assert Dispatcher(site.settings, site.store, site.spool).run_once() == 2
            lost, kept = site.messages()
            assert lost.state is DeliveryState.DEAD
            assert "unreadable" in (lost.last_error or "")
            assert kept.state is DeliveryState.DONE and len(ris.messages) == 1
        finally:
            site.store.close()

