"""The shipped Orthanc auto-routing (deploy/orthanc/autoroute.lua and orthanc.json, as
deploy/compose.yaml mounts them) in Debian's Orthanc, with a real node configured by
deploy/node/node.toml: only chest radiographs go to the node, and nothing the node sends
back comes to it again.

Orthanc runs its Lua callbacks one at a time, in the order the instances were stored,
and ``SendToModality`` returns only once the node has acknowledged (after its job row
is committed). So once the node holds an instance sent last, every instance stored
before it has been judged: what the node does not hold by then was not routed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset

from dicom_node.db import DeliveryState, JobState

from dicom_factory import chest_image, ct_head, save
from helpers.environment import CALLING_AE, wait_until
from helpers.processes import FAST_DELIVERY, NodeProcess
from peers import Orthanc, storescu

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
ORTHANC_JSON = DEPLOY / "orthanc" / "orthanc.json"
AUTOROUTE = DEPLOY / "orthanc" / "autoroute.lua"
NODE_TOML = DEPLOY / "node" / "node.toml"


def lua_constant(name: str) -> str:
    """A ``local NAME = '...'`` string constant of the shipped Lua script."""
    match = re.search(rf"^local {name} = '([^']*)'", AUTOROUTE.read_text(), re.MULTILINE)
    assert match, f"{AUTOROUTE} defines no {name}"
    return match.group(1)


@pytest.fixture
def routed(tmp_path: Path, serving_artifact: Path) -> Iterator[tuple[Orthanc, NodeProcess]]:
    """Orthanc as shipped, routing to a node as shipped; only ports, folders and hosts
    are the test's (and the node's destination, which names the compose service)."""
    shipped = json.loads(ORTHANC_JSON.read_text())
    node_entry = lua_constant("NODE")
    node = NodeProcess(tmp_path / "var", extra_args=[
        "--config", str(NODE_TOML), "--model", str(serving_artifact)], env=FAST_DELIVERY)
    modalities: dict[str, Any] = {
        node_entry: {**shipped["DicomModalities"][node_entry], "Host": "127.0.0.1",
                     "Port": node.port},
        # The site's PACS entry, standing for the tests' storescu.
        "pacs": {**shipped["DicomModalities"]["pacs"], "AET": CALLING_AE,
                 "Host": "127.0.0.1"},
    }
    orthanc = Orthanc(tmp_path / "orthanc", ae_title=shipped["DicomAet"], settings=shipped,
                      modalities=modalities, lua_files=[AUTOROUTE])
    try:
        node.env["DICOM_NODE_DESTINATIONS"] = json.dumps(
            [f"{orthanc.ae_title}@127.0.0.1:{orthanc.dicom_port}"])
        node.start()
        yield orthanc, node
    finally:
        node.stop()
        orthanc.stop()


def send(orthanc: Orthanc, folder: Path, images: list[Dataset], calling: str = CALLING_AE
         ) -> None:
    """Store ``images`` in Orthanc on one association, each acknowledged."""
    files = [save(ds, folder / f"{ds.SOPInstanceUID}.dcm") for ds in images]
    run = storescu(orthanc.dicom_port, files, calling=calling, called=orthanc.ae_title)
    assert run.all_success and len(run.responses) == len(files), run.output


def received(node: NodeProcess) -> set[str]:
    """SOP Instance UIDs of every instance the node was sent (queued or ignored)."""
    with node.job_store() as store:
        return {job.sop_instance_uid for job in store.list(limit=1000)}


def delivered(node: NodeProcess, uids: set[str]) -> bool:
    """The jobs of ``uids`` done, each with its SR and evidence image delivered (whatever
    else the node holds)."""
    with node.job_store() as store:
        jobs = [job for job in store.list(limit=1000) if job.sop_instance_uid in uids]
        deliveries = store.deliveries([job.id for job in jobs])
    return len(jobs) == len(uids) and all(
        job.state is JobState.DONE and len(deliveries[job.id]) == 2
        and all(d.state is DeliveryState.DONE for d in deliveries[job.id]) for job in jobs)


def uid(ds: Dataset) -> str:
    return str(ds.SOPInstanceUID)


def test_only_chest_radiographs_are_routed_and_no_result_comes_back(
        routed: tuple[Orthanc, NodeProcess], tmp_path: Path) -> None:
    orthanc, node = routed
    ct, hand = ct_head(seed=1), chest_image(seed=2, body_part="HAND")
    chest_ct = ct_head(seed=8, BodyPartExamined="CHEST")  # the modality alone keeps it
    # A chest DX that arrives with the node's calling AE title: as the node's own results
    # do, whatever they hold.
    from_node = chest_image(seed=3)
    chest, no_body_part = chest_image(seed=4), chest_image(seed=5, body_part=None)
    cr_thorax = chest_image(seed=6, modality="CR", body_part="thorax")
    send(orthanc, tmp_path, [ct, chest_ct, hand])
    send(orthanc, tmp_path, [from_node], calling=lua_constant("NODE_CALLING_AE"))
    send(orthanc, tmp_path, [chest, no_body_part, cr_thorax])
    expected = {uid(chest), uid(no_body_part), uid(cr_thorax)}

    wait_until(lambda: uid(cr_thorax) in received(node), timeout=120,
               what="the last chest image at the node")
    assert received(node) == expected

    # The node's SR and evidence image of each reach Orthanc (its AE title accepted)...
    wait_until(lambda: delivered(node, expected), timeout=240, what="every result delivered")
    results = [ds for ds in orthanc.instances() if ds.Modality in ("SR", "OT")]
    assert len(results) == 6
    # ... and, once an image stored after them has reached the node, were not routed.
    marker = chest_image(seed=7)
    send(orthanc, tmp_path, [marker])
    wait_until(lambda: uid(marker) in received(node), timeout=120, what="the marker image")
    assert received(node) == expected | {uid(marker)}

    # Orthanc's script logs a send once the node has answered it and the association
    # is released: after the marker's job is in the node's database.
    wait_until(lambda: orthanc.log_text.count("autoroute: sent") >= 4, timeout=60,
               what="Orthanc's log of the marker's routing")
    log = orthanc.log_text
    assert log.count("autoroute: sent") == 4, log
    assert "autoroute: FAILED" not in log
