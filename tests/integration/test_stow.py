"""STOW-RS delivery (dicom_node.stow) against Orthanc's DICOMweb plugin and a scripted
origin server.

What Orthanc 1.10 with orthanc-dicomweb 1.7 answers: 200 when all are stored; 400
with the good instances in the Referenced SOP Sequence and the bad one in the Failed
SOP Sequence (0xC000) when an instance lacks a mandatory UID; 404 for a wrong root;
200 without the instance when its Lua filter fails; and 200 *listing* an instance its
Lua ReceivedInstanceFilter refused (returned false), which is never stored.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from dicom_node.db import DeliveryState
from dicom_node.loopback import free_port
from dicom_node.stow import send_stow

from dicom_factory import chest_image, save
from peers import Canned, FakeStow, Orthanc

pytestmark = pytest.mark.integration

DONE, PENDING, DEAD = DeliveryState.DONE, DeliveryState.PENDING, DeliveryState.DEAD
TIMEOUT = 10.0
#: Refuses (false) or fails (a Lua error) an instance by its Series Description.
LUA_FILTER = """
function ReceivedInstanceFilter(dicom, origin, info)
   if dicom.SeriesDescription == 'REFUSE' then
      return false
   end
   if dicom.SeriesDescription == 'LUA ERROR' then
      error('refused by the test filter')
   end
   return true
end
"""


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    peer = Orthanc(tmp_path / "orthanc", dicomweb=True, lua=LUA_FILTER)
    try:
        yield peer
    finally:
        peer.stop()


def scripted(answer: Canned) -> Iterator[FakeStow]:
    peer = FakeStow(answer)
    try:
        yield peer
    finally:
        peer.stop()


def stored_uids(orthanc: Orthanc) -> set[str]:
    return {str(d.SOPInstanceUID) for d in orthanc.instances()}


def pair(tmp_path: Path, second_series: str = "OK", drop: str | None = None
         ) -> tuple[list[Path], list[str]]:
    """Two synthetic DX images of one study: files and SOP Instance UIDs."""
    first, second = chest_image(seed=1), chest_image(seed=2)
    second.StudyInstanceUID = first.StudyInstanceUID
    second.SeriesDescription = second_series
    if drop is not None:
        del second[drop]
    paths = [save(first, tmp_path / "first.dcm"), save(second, tmp_path / "second.dcm")]
    return paths, [str(first.SOPInstanceUID), str(second.SOPInstanceUID)]


def stow_response(stored: list[str], failed: dict[str, int]) -> bytes:
    """A Store Instances Response (PS3.18 10.5.3) in DICOM JSON."""
    response = Dataset()
    response.ReferencedSOPSequence = [_item(uid) for uid in stored]
    response.FailedSOPSequence = [_item(uid, reason) for uid, reason in failed.items()]
    return json.dumps(response.to_json_dict()).encode()


def _item(uid: str, reason: int | None = None) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    item.ReferencedSOPInstanceUID = uid
    if reason is not None:
        item.FailureReason = reason
    return item


# --- Orthanc with its DICOMweb plugin --------------------------------------------------


def test_two_real_files_stored_in_one_request(orthanc: Orthanc, shared_dicom: Path) -> None:
    # The two shared files that have a File Meta group (STOW-RS sends Part 10).
    files = [shared_dicom / "cxr_cr_sc_jpeg_baseline_mono2.dcm",
             shared_dicom / "cxr_dx_sc_implicit_le_mono2.dcm"]
    attempts = send_stow(orthanc.stow_url, files, TIMEOUT)
    assert [a.state for a in attempts] == [DONE, DONE], attempts
    assert [a.status for a in attempts] == [0, 0]
    sent = {str(d.SOPInstanceUID): str(d.StudyInstanceUID)
            for d in (dcmread(f, stop_before_pixels=True) for f in files)}
    stored = {str(d.SOPInstanceUID): str(d.StudyInstanceUID) for d in orthanc.instances()}
    assert stored == sent


def test_unreadable_file_is_dead_alone(orthanc: Orthanc, tmp_path: Path) -> None:
    paths, uids = pair(tmp_path)
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00")
    attempts = send_stow(orthanc.stow_url, [broken, paths[0], tmp_path / "absent.dcm"],
                         TIMEOUT)
    assert [a.state for a in attempts] == [DEAD, DONE, DEAD], attempts
    assert all(attempts[i].detail.startswith("file un") for i in (0, 2)), attempts
    assert stored_uids(orthanc) == {uids[0]}


def test_instance_without_series_uid_is_dead_and_the_other_stored(
        orthanc: Orthanc, tmp_path: Path) -> None:
    # Orthanc answers 400 and lists each: the good one stored, the other failed 0xC000.
    paths, uids = pair(tmp_path, drop="SeriesInstanceUID")
    attempts = send_stow(orthanc.stow_url, paths, TIMEOUT)
    assert [a.state for a in attempts] == [DONE, DEAD], attempts
    assert attempts[1].status == 0xC000
    assert stored_uids(orthanc) == {uids[0]}


def test_instance_failed_by_orthanc_without_saying_is_not_done(
        orthanc: Orthanc, tmp_path: Path) -> None:
    # Orthanc 1.10 / DICOMweb 1.7 answers 200 and leaves the instance out of both
    # sequences when its Lua filter fails; a later plugin answers 202 and 0x0110.
    paths, uids = pair(tmp_path, second_series="LUA ERROR")
    attempts = send_stow(orthanc.stow_url, paths, TIMEOUT)
    assert attempts[0].state is DONE
    assert attempts[1].state is not DONE, attempts
    assert stored_uids(orthanc) == {uids[0]}


def test_orthanc_lists_an_instance_its_filter_refused_as_stored(
        orthanc: Orthanc, tmp_path: Path) -> None:
    # A known gap, pinned so that an Orthanc upgrade that fixes it is noticed: a
    # ReceivedInstanceFilter returning false is a silent loss over STOW-RS.
    paths, uids = pair(tmp_path, second_series="REFUSE")
    attempts = send_stow(orthanc.stow_url, paths, TIMEOUT)
    assert [a.state for a in attempts] == [DONE, DONE]
    assert stored_uids(orthanc) == {uids[0]}


def test_wrong_root_is_dead_with_the_code(orthanc: Orthanc, tmp_path: Path) -> None:
    paths, _ = pair(tmp_path)
    attempts = send_stow(orthanc.stow_url.replace("/dicom-web", "/no-such-root"), paths,
                         TIMEOUT)
    assert [a.state for a in attempts] == [DEAD, DEAD], attempts
    assert all("HTTP 404" in a.detail for a in attempts)
    assert stored_uids(orthanc) == set()


def test_resent_instance_is_done_again(orthanc: Orthanc, tmp_path: Path) -> None:
    # A retry re-sends the same files: Orthanc keeps one object and says stored.
    paths, uids = pair(tmp_path)
    assert [a.state for a in send_stow(orthanc.stow_url, paths, TIMEOUT)] == [DONE, DONE]
    assert [a.state for a in send_stow(orthanc.stow_url, paths, TIMEOUT)] == [DONE, DONE]
    assert stored_uids(orthanc) == set(uids)
    assert len(orthanc.get("/instances")) == 2


# --- no server, refused URLs ----------------------------------------------------------


def test_server_down_makes_every_file_pending(tmp_path: Path) -> None:
    paths, _ = pair(tmp_path)
    started = time.monotonic()
    attempts = send_stow(f"http://127.0.0.1:{free_port()}/dicom-web", paths, 2.0)
    assert time.monotonic() - started < 10
    assert [a.state for a in attempts] == [PENDING, PENDING], attempts
    assert all("ConnectionError" in a.detail for a in attempts)


def test_unreadable_file_stays_dead_when_the_server_is_down(tmp_path: Path) -> None:
    paths, _ = pair(tmp_path)
    attempts = send_stow(f"http://127.0.0.1:{free_port()}/dicom-web",
                         [tmp_path / "absent.dcm", paths[0]], 2.0)
    assert [a.state for a in attempts] == [DEAD, PENDING]


@pytest.mark.parametrize("url", ["http://pacs.example.org/dicom-web",
                                 "http://10.0.0.7:8042/dicom-web", "ftp://127.0.0.1/x",
                                 "not a url"])
def test_plain_http_to_another_host_is_refused(url: str, tmp_path: Path) -> None:
    paths, _ = pair(tmp_path)
    attempts = send_stow(url, paths, 2.0)
    assert [a.state for a in attempts] == [DEAD, DEAD]
    assert all("https" in a.detail for a in attempts), attempts


# --- a scripted origin server: answers Orthanc 1.10 never gives -------------------------


@pytest.mark.parametrize(("answer", "expected"), [
    (Canned(503), [PENDING, PENDING]),
    (Canned(500), [PENDING, PENDING]),
    (Canned(429, headers={"Retry-After": "1"}), [PENDING, PENDING]),
    (Canned(408), [PENDING, PENDING]),
    (Canned(401), [DEAD, DEAD]),
    (Canned(403), [DEAD, DEAD]),
    (Canned(409), [DEAD, DEAD]),
    (Canned(415), [DEAD, DEAD]),
    (Canned(301, headers={"Location": "/elsewhere"}), [DEAD, DEAD]),
    (Canned(200), [DONE, DONE]),
    (Canned(202), [PENDING, PENDING]),
], ids=lambda v: str(v.status) if isinstance(v, Canned) else "")
def test_whole_request_answers(answer: Canned, expected: list[DeliveryState],
                               tmp_path: Path) -> None:
    paths, _ = pair(tmp_path)
    for peer in scripted(answer):
        started = time.monotonic()
        attempts = send_stow(peer.url, paths, TIMEOUT)
        assert time.monotonic() - started < 10  # no retries inside the request
        assert [a.state for a in attempts] == expected, attempts
        assert peer.posts == 1
        if answer.status != 200:
            assert all(f"HTTP {answer.status}" in a.detail for a in attempts)


@pytest.mark.parametrize(("status", "reason", "expected"), [
    (202, 0xA700, PENDING),  # out of resources: try again
    (202, 0xA900, DEAD),  # data set does not match SOP Class
    (202, 0xC122, DEAD),
    (202, 0x0110, DEAD),  # processing failure
    (202, 0x0122, DEAD),  # SOP Class not supported
    (409, 0x0110, DEAD),
    (400, 0xC000, DEAD),
])
def test_per_instance_failure_reason(status: int, reason: int, expected: DeliveryState,
                                     tmp_path: Path) -> None:
    paths, uids = pair(tmp_path)
    body = stow_response([uids[0]], {uids[1]: reason})
    for peer in scripted(Canned(status, body, {"Content-Type": "application/dicom+json"})):
        attempts = send_stow(peer.url, paths, TIMEOUT)
        assert [a.state for a in attempts] == [DONE, expected], attempts
        assert attempts[1].status == reason


def test_per_instance_answer_read_without_content_type(tmp_path: Path) -> None:
    # Orthanc sends its non-200 answers without a Content-Type.
    paths, uids = pair(tmp_path)
    for peer in scripted(Canned(202, stow_response([uids[1]], {uids[0]: 0xA700}))):
        attempts = send_stow(peer.url, paths, TIMEOUT)
        assert [a.state for a in attempts] == [PENDING, DONE], attempts


def test_warning_reason_is_stored(tmp_path: Path) -> None:
    paths, uids = pair(tmp_path)
    response = Dataset()
    response.ReferencedSOPSequence = [_item(uid) for uid in uids]
    response.ReferencedSOPSequence[1].WarningReason = 0xB000
    body = json.dumps(response.to_json_dict()).encode()
    for peer in scripted(Canned(202, body, {"Content-Type": "application/dicom+json"})):
        attempts = send_stow(peer.url, paths, TIMEOUT)
        assert [a.state for a in attempts] == [DONE, DONE], attempts
        assert attempts[1].status == 0xB000


def test_instance_missing_from_a_200_response_is_pending(tmp_path: Path) -> None:
    paths, uids = pair(tmp_path)
    for peer in scripted(Canned(200, stow_response([uids[0]], {}),
                                {"Content-Type": "application/dicom+json"})):
        attempts = send_stow(peer.url, paths, TIMEOUT)
        assert [a.state for a in attempts] == [DONE, PENDING], attempts


def test_bearer_token_sent_and_kept_out_of_the_details(tmp_path: Path) -> None:
    paths, _ = pair(tmp_path)
    for peer in scripted(Canned(401)):
        attempts = send_stow(peer.url, paths, TIMEOUT, token="s3cret-token")
        assert peer.headers.get("Authorization") == "Bearer s3cret-token"
        assert peer.headers.get("Content-Type", "").startswith("multipart/related")
        assert all("s3cret" not in a.detail for a in attempts)
