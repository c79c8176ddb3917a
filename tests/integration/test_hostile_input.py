"""Realistic identifiers and hostile strings through a whole run at DEBUG: DCMTK storescu
-> the node (a small real model) -> SR and evidence image -> DCMTK storescp. The
identifiers reach the results, never the log; the hostile strings (paths, shell
syntax, format strings) reach no file name and no command."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydicom import dcmread

from dicom_node.loopback import free_port

from dicom_factory import chest_image, save
from helpers.environment import CALLING_AE, wait_until
from helpers.processes import FAST_DELIVERY, NodeProcess, all_delivered
from peers import Storescp, storescu

pytestmark = [pytest.mark.integration, pytest.mark.slow]

IDENTIFIERS = {
    "PatientName": "Kowalczyk^Agnieszka^Maria", "PatientID": "MRN-20931177",
    "PatientBirthDate": "19580214", "OtherPatientIDs": "NHS-4857773456",
    "AccessionNumber": "ACC-7781-2290", "StudyDate": "20190517", "StudyID": "ST-55102",
    "ReferringPhysicianName": "Okafor^Chidi", "InstitutionName": "St Elsewhere General",
}
#: Everything of them that must not be logged, in the forms a log could show it.
SECRETS = ["Kowalczyk", "Agnieszka", "MRN-20931177", "19580214", "1958-02-14",
           "NHS-4857773456", "ACC-7781-2290", "20190517", "2019-05-17", "ST-55102", "Okafor",
           "Elsewhere"]
HOSTILE = {
    "SeriesDescription": "../../../../tmp/pwned-series; touch /tmp/pwned-$(id -u)",
    "StudyDescription": "`touch /tmp/pwned-backtick` CHEST PA",
    "ProtocolName": "%s%s%n ${jndi:ldap://127.0.0.1/x} | tee /tmp/pwned-pipe",
    "InstitutionalDepartmentName": "..\\..\\pwned-windows",
}
#: Every name the node gives a file in its data directory.
OWN_NAMES = re.compile(
    r"(dicom-node\.db(-wal|-shm|-journal)?|node\.lock|spool/node\.lock|study-key\.secret|"
    r"spool/[0-9a-f]{2}/[0-9a-f]{32}\.dcm|spool/sr/(job|evidence)-\d+\.dcm|"
    r"spool/messages/delivery-\d+\.(hl7|json)|models/.+|audit/(node|admin)\.jsonl)")


def test_identifiers_reach_the_results_not_the_log_and_hostile_strings_reach_nothing(
        tmp_path: Path, serving_artifact: Path) -> None:
    pacs = Storescp(tmp_path / "pacs", free_port())
    (tmp_path / "in").mkdir()
    files = [save(chest_image(seed=i, **IDENTIFIERS, **HOSTILE), tmp_path / "in" / f"{i}.dcm")
             for i in range(2)]
    node = NodeProcess(tmp_path / "var", extra_args=[
        "--allow-calling-ae", CALLING_AE, "--model", str(serving_artifact),
        "--destination", f"PACS@127.0.0.1:{pacs.port}"],
        env={**FAST_DELIVERY, "DICOM_NODE_LOG_LEVEL": "DEBUG"}).start()
    try:
        assert storescu(node.port, files).all_success
        wait_until(lambda: all_delivered(node, 2), timeout=240,
                   what="2 SRs and 2 evidence images delivered")
    finally:
        node.stop()
        pacs.stop()
    results = [dcmread(path) for path in sorted(pacs.folder.iterdir())]
    assert len(results) == 4
    # The identifiers did flow through: the results carry the patient's name and ID...
    assert all(str(r.PatientName) == IDENTIFIERS["PatientName"] for r in results)
    assert all(r.PatientID == IDENTIFIERS["PatientID"] for r in results)
    # ...and the log, at DEBUG and with the libraries' own DEBUG output, never does.
    log = node.log
    assert "DEBUG" in log and "job 1" in log  # the log was written, at DEBUG
    leaked = [value for value in SECRETS if value in log]
    assert leaked == []
    # Nor does the audit trail, which holds the UIDs and AE titles of the same run.
    trail = (tmp_path / "var" / "audit" / "node.jsonl").read_text()
    assert "Application Start" in trail and "DICOM Instances Transferred" in trail
    assert [value for value in SECRETS if value in trail] == []
    # No hostile string became a file or ran as a command.
    assert not list(Path("/tmp").glob("pwned*")) and not list(tmp_path.rglob("*pwned*"))
    for path in (tmp_path / "var").rglob("*"):
        if path.is_file():
            name = path.relative_to(tmp_path / "var").as_posix()
            assert OWN_NAMES.fullmatch(name), name
