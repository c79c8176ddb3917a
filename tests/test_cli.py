"""The dicom-node command line, run as a user would run it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import CALLING_AE, NodeProcess
from dicom_factory import chest_image, ct_head, save


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dicom_node", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_echo(node: NodeProcess) -> None:
    ok = cli("echo", "127.0.0.1", str(node.port), "--calling-ae", CALLING_AE)
    assert ok.returncode == 0 and "0x0000" in ok.stdout
    refused = cli("echo", "127.0.0.1", str(node.port), "--calling-ae", "STRANGER")
    assert refused.returncode == 1 and "not established" in refused.stderr


def test_send_then_jobs_list_and_show(node: NodeProcess, tmp_path: Path) -> None:
    chest = save(chest_image(), tmp_path / "chest.dcm")
    head = save(ct_head(), tmp_path / "head.dcm")
    sent = cli("send", "127.0.0.1", str(node.port), str(chest), str(head),
               "--calling-ae", CALLING_AE)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert sent.stdout.count("0x0000") == 2

    listed = cli("jobs", "list", "--json", "--data-dir", str(node.data_dir))
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [r["state"] for r in rows] == ["ignored", "queued"]
    for key in ("id", "state", "sop_instance_uid", "study_instance_uid", "calling_ae",
                "attempts"):
        assert key in rows[0]
    assert rows[1]["calling_ae"] == CALLING_AE

    only = json.loads(cli("jobs", "list", "--json", "--state", "queued", "--data-dir",
                          str(node.data_dir)).stdout)
    assert len(only) == 1 and only[0]["state"] == "queued"

    shown = cli("jobs", "show", str(only[0]["id"]), "--data-dir", str(node.data_dir))
    assert json.loads(shown.stdout)["sr_sop_instance_uid"]
    table = cli("jobs", "list", "--data-dir", str(node.data_dir))
    assert "queued" in table.stdout and "ignored" in table.stdout
    assert cli("jobs", "show", "999", "--data-dir", str(node.data_dir)).returncode == 1


def test_send_reports_refusals(node: NodeProcess, tmp_path: Path) -> None:
    ds = chest_image()
    del ds.PixelData
    bad = save(ds, tmp_path / "bad.dcm")
    sent = cli("send", "127.0.0.1", str(node.port), str(bad), "--calling-ae", CALLING_AE)
    assert sent.returncode == 1
    assert "0xA900" in sent.stdout


def test_serve_reads_config_file_and_flags(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text('ae_title = "FROM_FILE"\naccept_any_calling_ae = true\n')
    node = NodeProcess(tmp_path / "var", extra_args=["--config", str(config)]).start()
    try:
        ok = cli("echo", "127.0.0.1", str(node.port), "--called-ae", "FROM_FILE",
                 "--calling-ae", "ANYONE")
        assert ok.returncode == 0, ok.stderr
    finally:
        assert node.stop() == 0
    assert "stopped" in node.log


def test_bad_config_is_reported_not_a_traceback(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text('ae_title = "WAY_TOO_LONG_AE_TITLE"\n')
    result = cli("serve", "--config", str(config), "--data-dir", str(tmp_path / "v"))
    assert result.returncode == 2
    assert "ae_title" in result.stderr and "Traceback" not in result.stderr
