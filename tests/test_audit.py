"""The audit trail: a whole run of a real node leaves the PS3.15 A.5 events, with UIDs
and AE titles and no patient data; a syslog collector gets them as RFC 5424; the
files rotate; `dicom-node audit tail` and `model install` as a user runs them."""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path
from typing import Any

import pytest

from dicom_node import audit
from dicom_node.loopback import free_port
from model import card

from dicom_factory import chest_image, window_not_a_number
from helpers.dimse import associate, store
from helpers.environment import CALLING_AE, wait_until
from helpers.processes import NodeProcess, cli
from peers import Storescp

pytestmark = pytest.mark.integration

#: The identifiers chest_image gives every patient.
PATIENT = ("Test^Synthetic", "SYN-0001", "19700101")


def events(folder: Path) -> list[tuple[str, str, int, str]]:
    """``(event, first type or action, outcome, description)`` of each message."""
    found = []
    for message in audit.read(folder):
        event = message["EventIdentification"]
        kind = event.get("EventTypeCode", [{"originalText": event["EventActionCode"]}])[0]
        found.append((event["EventID"]["originalText"], kind["originalText"],
                      event["EventOutcomeIndicator"], event.get("EventOutcomeDescription", "")))
    return found


def test_a_run_leaves_every_event_with_uids_and_ae_titles_and_no_patient_data(
        make_node: Any, serving_artifact: Path, tmp_path: Path) -> None:
    collector = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    collector.bind(("127.0.0.1", 0))
    collector.settimeout(10)
    pacs = Storescp(tmp_path / "pacs", free_port())
    try:
        node = make_node(destinations=[f"PACS@127.0.0.1:{pacs.port}"],
                         allow_unvalidated_models=True,
                         audit_syslog=f"udp://127.0.0.1:{collector.getsockname()[1]}")
        chest, broken = chest_image(), window_not_a_number()
        assert store(node, [chest, broken]) == [0, 0xA900]
        assert associate(node.settings.port, [chest], calling="STRANGER").is_rejected
        card.install(serving_artifact, node.settings.model_dir, allow_unvalidated=True)
        wait_until(lambda: node.store.delivery_counts() == {"done": 2}, timeout=120,
                   what="the SR and the evidence image delivered")
        job = node.store.list()[0]
        node.stop()
        datagram = collector.recv(65536)
    finally:
        pacs.stop()
        collector.close()

    folder = node.settings.audit_dir
    seen = events(folder)
    ok, minor = audit.SUCCESS, audit.MINOR_FAILURE
    assert seen[0] == ("Application Activity", "Application Start", ok, "")
    assert seen[-1] == ("Application Activity", "Application Stop", ok, "")
    expected = [
        ("User Authentication", "Login", ok, ""),
        ("DICOM Instances Transferred", "C", ok, ""),
        ("DICOM Instances Transferred", "C", minor, "0xA900 WindowCenter is not a number"),
        ("Security Alert", "Malformed input", minor, "0xA900 WindowCenter is not a number"),
        ("User Authentication", "Login", minor, "calling AE title not recognised"),
        ("Security Alert", "Node Authentication", minor, "calling AE title not recognised"),
        ("Security Alert", "Software Configuration", ok, "model loaded"),
        ("DICOM Instances Transferred", "R", ok, ""),
    ]
    for event in expected:
        assert event in seen, (event, seen)
    messages = list(audit.read(folder))
    # In: the sender's AE title and address, the study, the instance and its class.
    stored = next(m for m in messages if m["EventIdentification"]["EventActionCode"] == "C"
                  and m["EventIdentification"]["EventOutcomeIndicator"] == ok)
    assert stored["ActiveParticipant"][0]["AlternativeUserID"] == f"AETITLES={CALLING_AE}"
    assert stored["ActiveParticipant"][0]["NetworkAccessPointID"] == "127.0.0.1"
    study = stored["ParticipantObjectIdentification"][0]
    assert study["ParticipantObjectID"] == chest.StudyInstanceUID
    assert study["ParticipantObjectDescription"]["SOPClass"] == [
        {"UID": chest.SOPClassUID, "NumberOfInstances": 1, "Instance": [chest.SOPInstanceUID]}]
    # Out: the SR and the evidence image, to the PACS's AE title at its address.
    sent = [m for m in messages if m["EventIdentification"]["EventActionCode"] == "R"]
    assert {m["ActiveParticipant"][1]["AlternativeUserID"] for m in sent} == {"AETITLES=PACS"}
    assert sorted(m["ParticipantObjectIdentification"][0]["ParticipantObjectDescription"]
                  ["SOPClass"][0]["Instance"][0] for m in sent) == sorted(
        [job.sr_sop_instance_uid, job.evidence_sop_instance_uid])
    # The model, by name, version, hash and validation.
    loaded = next(m for m in messages if m["EventIdentification"].get(
        "EventOutcomeDescription") == "model loaded")
    details = loaded["ParticipantObjectIdentification"][0]["ParticipantObjectDetail"]
    assert {"type": "validation", "value": "UNVALIDATED"} in details
    # No patient name, ID or birth date anywhere in the trail.
    text = "".join(p.read_text() for p in folder.iterdir())
    for identifier in PATIENT:
        assert identifier not in text
    # The collector got the first message as RFC 5424: <authpriv.info>1 TIME HOST APP ...
    header = re.match(rb"<86>1 \S+ \S+ dicom-node \d+ 110100 - (?:\xef\xbb\xbf)?(.*)$",
                      datagram, re.S)
    assert header is not None, datagram[:200]
    assert json.loads(header.group(1)) == messages[0]


def test_the_files_rotate_and_reading_keeps_the_order(tmp_path: Path) -> None:
    trail = audit.open_trail(tmp_path, "node", "DICOM_NODE", max_bytes=2000, backups=3)
    try:
        for index in range(40):
            audit.received("PEER", "127.0.0.1", f"1.2.3.{index}", "1.2.840.10008.5.1.4.1.1.1",
                           f"1.2.3.{index}.1")
    finally:
        trail.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["node.jsonl", "node.jsonl.1", "node.jsonl.2", "node.jsonl.3"]
    kept = [m["ParticipantObjectIdentification"][0]["ParticipantObjectID"]
            for m in audit.read(tmp_path)]
    assert kept == [f"1.2.3.{i}" for i in range(40 - len(kept), 40)]  # the newest, in order
    assert all(p.stat().st_size <= 2000 for p in tmp_path.iterdir())


def test_model_install_and_audit_tail_as_a_user_runs_them(small_artifact: Path,
                                                           tmp_path: Path) -> None:
    data = tmp_path / "var"
    refused = cli("model", "install", str(small_artifact), "--data-dir", str(data))
    assert refused.returncode == 1
    installed = cli("model", "install", str(small_artifact), "--allow-unvalidated",
                    "--data-dir", str(data))
    assert installed.returncode == 0, installed.stderr
    tail = cli("audit", "tail", "--data-dir", str(data), "--json", "-n", "5")
    assert tail.returncode == 0, tail.stderr
    messages = [json.loads(line) for line in tail.stdout.splitlines()]
    assert [m["EventIdentification"]["EventOutcomeIndicator"] for m in messages] == [
        audit.MINOR_FAILURE, audit.SUCCESS]
    refusal = messages[0]["EventIdentification"]["EventOutcomeDescription"]
    assert "not validated" in refusal or "unvalidated" in refusal.lower(), refusal
    model = messages[1]["ParticipantObjectIdentification"][0]
    assert model["ParticipantObjectID"] == "cxr-covid-pneumonia 0.0.1-untrained"
    table = cli("audit", "tail", "--data-dir", str(data), "--event", "Security Alert")
    assert table.returncode == 0 and "Software Configuration" in table.stdout


def test_serve_with_a_model_records_its_install(serving_artifact: Path, tmp_path: Path) -> None:
    node = NodeProcess(tmp_path / "var", extra_args=["--allow-calling-ae", CALLING_AE,
                                                     "--model", str(serving_artifact)]).start()
    try:
        wait_until(lambda: "ready (batches" in node.log, timeout=120, what="the model loaded")
    finally:
        node.stop()
    [installed] = [m for m in audit.read(tmp_path / "var" / "audit")
                   if m["EventIdentification"].get("EventOutcomeDescription", "").startswith(
                       "model installed")]
    event = installed["EventIdentification"]
    assert (event["EventOutcomeIndicator"], event["EventOutcomeDescription"]) == (
        audit.SUCCESS, "model installed")
    assert installed["ParticipantObjectIdentification"][0]["ParticipantObjectID"] == \
        "cxr-covid-pneumonia 0.0.1-untrained"
