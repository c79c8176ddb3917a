"""Study results on a real SQLite job store: gathering, the quiet period, the answer,
late images that supersede, images that disagree, and what is left out."""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from dicom_node import studies
from dicom_node.db import Delivery, DeliveryItem, JobState, StudyState, utcnow
from dicom_node.jobs import (
    STUDY_KEY_SECRET_FILE,
    JobResult,
    JobStore,
    ReceivedInstance,
    study_key,
    study_key_secret,
)
from dicom_node.studies import StudyBook, describe

from helpers.store import statements

STUDY = "1.2.3.1000"
SECRET = b"s" * 32
QUIET = 30.0


def instance(n: int, study: str = STUDY, view: str | None = "frontal",
             patient: str = "PAT-1", accession: str | None = "ACC-1") -> ReceivedInstance:
    data = f"instance {n}".encode()
    return ReceivedInstance(
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1", sop_instance_uid=f"1.2.3.{n}",
        series_instance_uid="1.2.3.100", study_instance_uid=study,
        transfer_syntax_uid="1.2.840.10008.1.2.1", calling_ae="STORESCU",
        peer_address="127.0.0.1", sha256=hashlib.sha256(data).hexdigest(),
        size_bytes=len(data), view=view, patient_key=study_key(SECRET, study, patient),
        accession_key=study_key(SECRET, study, accession))


@pytest.fixture
def store(tmp_path: Path) -> JobStore:
    return JobStore(f"sqlite:///{tmp_path / 'jobs.db'}", max_attempts=1,
                    study_quiet_seconds=QUIET)


def receive(store: JobStore, n: int, study: str = STUDY, view: str | None = "frontal",
            patient: str = "PAT-1", accession: str | None = "ACC-1") -> int:
    job = store.record(instance(n, study, view, patient, accession), f"ab/{n:032x}.dcm",
                       JobState.QUEUED, "chest")
    assert job is not None
    return job.id


def classify(store: JobStore, probabilities: dict[int, dict[str, float]],
             flags: dict[int, list[str]] | None = None) -> None:
    """Claim every queued job and store its result, as the worker does."""
    jobs = store.claim("w", limit=100, lease_seconds=60)
    results = [JobResult(j.id, max(probabilities[j.id], key=probabilities[j.id].__getitem__),
                         probabilities[j.id], "cxr 1.0.0", f"sr/{j.id}.dcm",
                         flags=(flags or {}).get(j.id, []), model_validated=True)
               for j in jobs]
    assert all(store.complete_batch("w", results))


def later(seconds: float = QUIET + 1) -> datetime:
    return utcnow() + timedelta(seconds=seconds)


def test_two_frontal_images_make_one_result_after_the_quiet_period(store: JobStore) -> None:
    first, second = receive(store, 1), receive(store, 2)
    classify(store, {first: {"normal": 0.7, "pneumonia": 0.2, "covid": 0.1},
                     second: {"normal": 0.3, "pneumonia": 0.6, "covid": 0.1}},
             flags={second: ["pneumonia"]})
    book = StudyBook(store)
    assert book.close_due(utcnow()) == []  # still within the quiet period
    [closed] = book.close_due(later())
    result = describe(closed)
    assert result["state"] == "closed" and result["version"] == 1
    assert result["flagged"] is True and result["flags"] == ["pneumonia"]
    assert result["job_ids"] == [first, second]
    assert result["probabilities"]["pneumonia"] == {
        "probability": 0.6, "job_id": second, "sop_instance_uid": "1.2.3.2"}
    assert result["probabilities"]["normal"]["job_id"] == first
    assert result["label"] == "normal"  # the highest of the per-class maxima
    assert result["problems"] == [] and result["model_validated"] is True


def test_unflagged_study(store: JobStore) -> None:
    job = receive(store, 1)
    classify(store, {job: {"normal": 0.8, "pneumonia": 0.1, "covid": 0.1}})
    [closed] = StudyBook(store).close_due(later())
    assert closed.flagged is False and closed.flags == [] and closed.label == "normal"


def test_every_image_extends_the_quiet_period(store: JobStore) -> None:
    receive(store, 1)
    [opened] = StudyBook(store).list()
    receive(store, 2)
    [extended] = StudyBook(store).list()
    assert extended.id == opened.id and extended.closes_at > opened.closes_at


def test_a_study_waits_for_its_queued_images(store: JobStore) -> None:
    job = receive(store, 1)
    book = StudyBook(store)
    assert book.close_due(later()) == []  # not yet classified
    classify(store, {job: {"normal": 0.5, "pneumonia": 0.3, "covid": 0.2}})
    assert len(book.close_due(later())) == 1


def test_a_late_image_supersedes_the_closed_result(store: JobStore) -> None:
    first, second = receive(store, 1), receive(store, 2)
    classify(store, {first: {"normal": 0.8, "pneumonia": 0.1, "covid": 0.1},
                     second: {"normal": 0.7, "pneumonia": 0.2, "covid": 0.1}})
    book = StudyBook(store)
    [old] = book.close_due(later())
    third = receive(store, 3)
    classify(store, {third: {"normal": 0.1, "pneumonia": 0.1, "covid": 0.8}},
             flags={third: ["covid"]})
    [new] = book.close_due(later())
    assert new.version == 2 and new.supersedes_id == old.id
    assert new.job_ids == [first, second, third] and new.flags == ["covid"]
    states = {s.id: s.state for s in book.list()}
    assert states == {old.id: StudyState.SUPERSEDED, new.id: StudyState.CLOSED}


def test_an_image_of_another_patient_is_left_out_with_the_reason(store: JobStore) -> None:
    first, other = receive(store, 1), receive(store, 2, patient="PAT-2")
    classify(store, {first: {"normal": 0.8, "pneumonia": 0.1, "covid": 0.1},
                     other: {"normal": 0.1, "pneumonia": 0.1, "covid": 0.8}},
             flags={other: ["covid"]})
    [closed] = StudyBook(store).close_due(later())
    assert closed.job_ids == [first] and closed.flagged is False
    assert closed.problems == [f"job {other}: another patient than the study's first image "
                               f"(job {first})"]
    assert "PAT" not in " ".join(closed.problems)
    left_out = store.get(other)
    assert left_out is not None and left_out.study_note is not None
    assert "another patient" in left_out.study_note
    kept = store.get(first)
    assert kept is not None and kept.study_note is None


def test_an_image_of_another_accession_is_left_out(store: JobStore) -> None:
    first, other = receive(store, 1), receive(store, 2, accession="ACC-2")
    classify(store, {first: {"normal": 0.8, "pneumonia": 0.1, "covid": 0.1},
                     other: {"normal": 0.8, "pneumonia": 0.1, "covid": 0.1}})
    [closed] = StudyBook(store).close_due(later())
    assert closed.job_ids == [first] and "another accession" in closed.problems[0]


def test_missing_identifiers_do_not_count_as_disagreement(store: JobStore) -> None:
    first, bare = receive(store, 1), receive(store, 2, accession=None)
    classify(store, {first: {"normal": 0.8, "pneumonia": 0.1, "covid": 0.1},
                     bare: {"normal": 0.8, "pneumonia": 0.1, "covid": 0.1}})
    [closed] = StudyBook(store).close_due(later())
    assert closed.job_ids == [first, bare] and closed.problems == []


def test_a_failed_image_is_named_and_requeuing_it_reopens_the_study(store: JobStore) -> None:
    good, bad = receive(store, 1), receive(store, 2)
    jobs = store.claim("w", limit=10, lease_seconds=60)
    store.fail(bad, "w", "preprocessing failed", retry=False)
    store.complete_batch("w", [JobResult(good, "normal", {"normal": 0.9, "pneumonia": 0.05,
                                                          "covid": 0.05}, "cxr 1.0.0")])
    assert len(jobs) == 2
    book = StudyBook(store)
    [closed] = book.close_due(later())
    assert closed.job_ids == [good] and closed.problems == [
        f"job {bad}: not classified: the job failed"]
    assert store.requeue_failed_job(bad)
    [reopened] = [s for s in book.list() if s.state is StudyState.OPEN]
    assert reopened.version == 2 and reopened.supersedes_id == closed.id


def test_ignored_and_viewless_images_open_no_study(store: JobStore) -> None:
    ignored = instance(1)
    assert store.record(ignored, None, JobState.IGNORED, "view is lateral")
    receive(store, 2, view=None)  # a job from before views were recorded
    assert StudyBook(store).list() == []


def test_studies_are_kept_apart(store: JobStore) -> None:
    a, b = receive(store, 1), receive(store, 2, study="1.2.3.2000")
    classify(store, {a: {"normal": 0.8, "pneumonia": 0.1, "covid": 0.1},
                     b: {"normal": 0.1, "pneumonia": 0.8, "covid": 0.1}})
    closed = {s.study_instance_uid: s for s in StudyBook(store).close_due(later())}
    assert closed[STUDY].job_ids == [a] and closed["1.2.3.2000"].job_ids == [b]


def test_many_studies_due_at_once_close_a_few_a_run_with_their_own_images(
        store: JobStore, monkeypatch: pytest.MonkeyPatch) -> None:
    # At most three a run here; the second study, an image still in the network,
    # holds back none of those due after it.
    monkeypatch.setattr(studies, "STUDIES_PER_RUN", 3)
    uids = [f"1.2.3.{3000 + s}" for s in range(5)]
    jobs = {uid: [receive(store, 10 * s + i, study=uid) for i in range(2)]
            for s, uid in enumerate(uids)}
    claimed = store.claim("w", limit=100, lease_seconds=60)
    # The second study's second image is still running; the fourth's second failed.
    running, failed = jobs[uids[1]][1], jobs[uids[3]][1]
    store.fail(failed, "w", "preprocessing failed: test", retry=False)
    done = [j for j in claimed if j.id not in (running, failed)]
    assert all(store.complete_batch("w", [JobResult(
        j.id, "normal", {"normal": 0.8, "pneumonia": 0.1, "covid": 0.1}, "cxr 1.0.0",
        f"sr/{j.id}.dcm", flags=[], model_validated=True) for j in done]))
    book = StudyBook(store)
    first = {s.study_instance_uid: s for s in book.close_due(later())}
    assert list(first) == [uids[0], uids[2], uids[3]]  # the longest due first
    for uid in first:
        assert first[uid].job_ids == [j for j in jobs[uid] if j != failed], uid
    assert len(first[uids[3]].problems or []) == 1  # its failed image, named
    [second] = book.close_due(later())
    assert second.study_instance_uid == uids[4] and second.job_ids == jobs[uids[4]]
    assert book.close_due(later()) == []  # the second study still waits for its image
    assert store.complete_batch("w", [JobResult(
        running, "normal", {"normal": 0.8, "pneumonia": 0.1, "covid": 0.1}, "cxr 1.0.0",
        f"sr/{running}.dcm", flags=[], model_validated=True)]) == [True]
    [last] = book.close_due(later())
    assert last.study_instance_uid == uids[1] and last.job_ids == jobs[uids[1]]


def test_a_study_that_cannot_close_waits_and_holds_back_none_behind_it(
        store: JobStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(studies, "STUDIES_PER_RUN", 2)
    uids = [f"1.2.3.{4000 + s}" for s in range(3)]
    for s, uid in enumerate(uids):
        classify(store, {receive(store, s, study=uid): {
            "normal": 0.8, "pneumonia": 0.1, "covid": 0.1}})
    broken = set(uids[:2])

    def on_close(session: object, study: studies.StudyResult, jobs: object) -> None:
        if study.study_instance_uid in broken:
            raise RuntimeError("the worklist message could not be made")

    book = StudyBook(store, on_close=on_close)
    now = later()
    assert book.close_due(now) == []  # the first two fail, and wait
    [third] = book.close_due(now)  # so the third is not held back
    assert third.study_instance_uid == uids[2]
    assert book.close_due(now) == []
    broken.clear()
    assert book.close_due(now + timedelta(seconds=studies.RETRY_SECONDS - 1)) == []
    retried = book.close_due(now + timedelta(seconds=studies.RETRY_SECONDS))
    assert [s.study_instance_uid for s in retried] == uids[:2]


def _open_studies(store: JobStore, count: int, first: int) -> list[str]:
    """``count`` studies of one classified frontal image each."""
    uids = [f"1.2.3.{first + s}" for s in range(count)]
    for s, uid in enumerate(uids):
        classify(store, {receive(store, first + s, study=uid): {
            "normal": 0.1, "pneumonia": 0.2 + 0.01 * s, "covid": 0.7 - 0.01 * s}})
    return uids


def test_without_messages_due_studies_close_together_and_one_failure_is_its_own(
        store: JobStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """No worklist destination: the due results close together, five in as many
    statements as one; when one of them cannot close, the others still do in the
    same run, and it waits its retry time with nothing of it written."""
    executed = statements(store.engine)
    [alone] = _open_studies(store, 1, 5000)
    executed.clear()
    assert [s.study_instance_uid for s in StudyBook(store).close_due(later())] == [alone]
    one = len(executed)
    uids = _open_studies(store, 5, 5100)
    executed.clear()
    closed = StudyBook(store).close_due(later())
    assert [s.study_instance_uid for s in closed] == uids and len(executed) == one
    for s, study in enumerate(closed):
        assert study.state is StudyState.CLOSED and study.label == "covid"
        assert study.probabilities["covid"]["probability"] == pytest.approx(0.7 - 0.01 * s)

    uids = _open_studies(store, 3, 5200)
    form = studies.form

    def failing(jobs: list[studies.Job]) -> studies.Answer:
        if jobs[0].study_instance_uid == uids[1]:
            raise ValueError("a result that cannot be read")
        return form(jobs)

    monkeypatch.setattr(studies, "form", failing)
    now = later()
    closed = StudyBook(store).close_due(now)
    assert [s.study_instance_uid for s in closed] == [uids[0], uids[2]]
    [waiting] = StudyBook(store).list(study_instance_uid=uids[1])
    assert waiting.state is StudyState.OPEN and waiting.label is None
    assert waiting.closed_at is None and waiting.job_ids is None
    assert waiting.closes_at == now + timedelta(seconds=studies.RETRY_SECONDS)
    monkeypatch.setattr(studies, "form", form)
    assert StudyBook(store).close_due(now) == []
    [retried] = StudyBook(store).close_due(now + timedelta(seconds=studies.RETRY_SECONDS))
    assert retried.study_instance_uid == uids[1] and retried.label == "covid"


def test_without_messages_a_study_the_database_refuses_holds_back_none(
        store: JobStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """Closed together, the database refuses one study's update when the others' have
    gone (at the flush): all of it is rolled back, and one by one the others close, the
    refused one keeping none of its change and waiting its retry time."""
    uids = _open_studies(store, 3, 5400)
    close = StudyBook._close

    def refused(session: Any, study: studies.StudyResult, jobs: list[studies.Job],
                now: datetime) -> None:
        close(session, study, jobs, now)
        if study.study_instance_uid == uids[1]:
            study.version = None  # type: ignore[assignment]  # NOT NULL: the flush fails

    monkeypatch.setattr(StudyBook, "_close", staticmethod(refused))
    now = later()
    closed = StudyBook(store).close_due(now)
    assert [s.study_instance_uid for s in closed] == [uids[0], uids[2]]
    assert all(s.state is StudyState.CLOSED and s.version == 1 for s in closed)
    [waiting] = StudyBook(store).list(study_instance_uid=uids[1])
    assert waiting.state is StudyState.OPEN and waiting.version == 1
    assert waiting.label is None and waiting.closed_at is None
    assert waiting.closes_at == now + timedelta(seconds=studies.RETRY_SECONDS)


def test_with_messages_a_study_that_fails_keeps_nothing_and_the_others_close(
        store: JobStore) -> None:
    """With worklist messages, a study whose message fails halfway (its delivery row
    already added) keeps none of it; the studies before and after it close with theirs."""
    uids = _open_studies(store, 3, 5300)
    added: list[str] = []

    def on_close(session: Any, study: studies.StudyResult, jobs: object) -> None:
        session.add(Delivery(study_result_id=study.id, kind="hl7", destination="RIS",
                             item=DeliveryItem.ORU, message_id=study.study_instance_uid[-8:],
                             next_attempt_at=utcnow()))
        session.flush()
        added.append(study.study_instance_uid)
        if study.study_instance_uid == uids[1]:
            raise OSError("the spool is full")

    closed = StudyBook(store, on_close=on_close).close_due(later())
    assert added == uids  # each once: no study was closed twice
    assert [s.study_instance_uid for s in closed] == [uids[0], uids[2]]
    with store.sessions() as session:
        rows = session.scalars(select(Delivery).where(Delivery.study_result_id.is_not(None)))
        assert sorted(d.study_result_id for d in rows) == sorted(s.id for s in closed)
    [failed] = StudyBook(store).list(study_instance_uid=uids[1])
    assert failed.state is StudyState.OPEN


def test_study_key_depends_on_the_secret_and_the_study() -> None:
    key = study_key(SECRET, STUDY, "PAT-1")
    assert key is not None and len(key) == 16
    assert key == study_key(SECRET, STUDY, " PAT-1 ")
    assert key != study_key(SECRET, "1.2.3.2000", "PAT-1")
    assert key != study_key(b"t" * 32, STUDY, "PAT-1")  # a database copy alone cannot be
    # searched: without the secret, hashing candidate Patient IDs finds nothing
    assert key != hashlib.sha256(f"{STUDY}\0PAT-1".encode()).hexdigest()[:16]
    assert study_key(SECRET, STUDY, "") is None and study_key(SECRET, STUDY, None) is None


def test_the_secret_is_made_once_private_and_kept(tmp_path: Path) -> None:
    first = study_key_secret(tmp_path / "var")
    assert len(first) == 32 and study_key_secret(tmp_path / "var") == first
    mode = (tmp_path / "var" / STUDY_KEY_SECRET_FILE).stat().st_mode & 0o777
    assert mode == 0o600


def test_a_classified_image_without_identifiers_neither_defines_nor_hides_a_patient(
        store: JobStore) -> None:
    bare = receive(store, 1, patient="", accession=None)
    x, y = receive(store, 2, patient="PAT-X"), receive(store, 3, patient="PAT-Y")
    classify(store, {j: {"normal": 0.8, "pneumonia": 0.1, "covid": 0.1} for j in (bare, x, y)})
    [closed] = StudyBook(store).close_due(later())
    assert closed.job_ids == [bare, x]
    assert closed.problems == [f"job {y}: another patient than the study's first image "
                               f"(job {x})"]


def test_without_operating_points_a_study_is_neither_flagged_nor_unflagged(
        store: JobStore) -> None:
    job = receive(store, 1)
    jobs = store.claim("w", limit=10, lease_seconds=60)
    assert store.complete_batch("w", [JobResult(
        jobs[0].id, "normal", {"normal": 0.8, "pneumonia": 0.1, "covid": 0.1}, "cxr 1.0.0",
        flags=None, model_validated=True)]) == [True]
    [closed] = StudyBook(store).close_due(later())
    assert closed.job_ids == [job] and closed.flagged is None and closed.flags == []


def test_a_late_image_says_so_in_its_job(store: JobStore) -> None:
    first = receive(store, 1)
    classify(store, {first: {"normal": 0.8, "pneumonia": 0.1, "covid": 0.1}})
    StudyBook(store).close_due(later())
    late = store.get(receive(store, 2))
    assert late is not None and "reopened as version 2" in late.intake_reason
    assert late.intake_reason.startswith("chest")
