"""TLS with DCMTK as the peer, on both sides of the node.

Receiving: storescu with a client certificate from the node's CA is stored and
queued; anonymous TLS, a certificate from another CA, or plain TCP are refused and
leave nothing behind. Sending: the node delivers its SR to a storescp that speaks
TLS and asks for our client certificate; a storescp whose certificate another CA
signed, and one without TLS, get nothing (the deliveries are retried, never sent in
clear text).

Each test makes its own throwaway CAs, keys and certificates (:mod:`helpers.pki`) in
its temporary directory; no key material is kept in the repository.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from dicom_node import audit
from dicom_node.db import Delivery, DeliveryItem, DeliveryState, JobState
from dicom_node.deliver import send_many
from dicom_node.destination import ClientTls, Destination, Target
from dicom_node.loopback import free_port
from dicom_node.node import Node

from dicom_factory import chest_image, save
from helpers.environment import wait_until
from helpers.pki import OTHER_NAME, Pki, dcmtk_tls
from helpers.processes import FAST_DELIVERY, NodeProcess, node_with_destinations
from peers import Storescp, storescu

pytestmark = pytest.mark.integration

NodeFactory = Callable[..., Node]


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    """A site CA and another, each with a server and a client certificate."""
    return Pki.make(tmp_path / "pki")


def test_storescu_with_a_client_certificate_is_stored_and_without_one_refused(
        make_node: NodeFactory, pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    node = make_node(tls_certificate=pki.server.cert, tls_private_key=pki.server.key,
                     tls_ca_certificates=pki.ca.cert)
    port = node.settings.port
    (tmp_path / "in").mkdir()
    image = chest_image()
    sent = storescu(port, [save(image, tmp_path / "in" / "accepted.dcm")],
                    extra=dcmtk_tls(pki.client, pki.ca), timeout=60)
    assert sent.returncode == 0 and sent.all_success, sent.output
    (job,) = node.store.list(limit=10)
    assert job.state is JobState.QUEUED and job.sop_instance_uid == image.SOPInstanceUID
    assert len(list(node.spool.files())) == 1

    refused = {"anonymous TLS": dcmtk_tls(None, pki.ca),
               "a certificate from another CA": dcmtk_tls(pki.other_client, pki.ca),
               "plain TCP": []}
    with caplog.at_level(logging.WARNING, logger="dicom_node"):
        for what, flags in refused.items():
            path = save(chest_image(), tmp_path / "in" / f"{what.replace(' ', '-')}.dcm")
            run = storescu(port, [path], extra=flags, timeout=60)
            assert run.returncode != 0 and not run.responses, (what, run.output)
    # Each refused at the handshake, before the node read a PDU.
    assert sum("TLS" in r.getMessage() for r in caplog.records
               if r.name == "dicom_node.scp") == len(refused)
    assert [j.id for j in node.store.list(limit=10)] == [job.id]
    assert len(list(node.spool.files())) == 1
    # Each a Security Alert (Node Authentication) in the audit trail, with the address.
    alerts = [m for m in audit.read(node.settings.audit_dir)
              if m["EventIdentification"].get("EventOutcomeDescription", "").startswith(
                  "TLS handshake failed")]
    assert len(alerts) == len(refused)
    assert {m["EventIdentification"]["EventTypeCode"][0]["originalText"] for m in alerts} \
        == {"Node Authentication"}
    assert {m["ActiveParticipant"][1]["NetworkAccessPointID"] for m in alerts} == {"127.0.0.1"}


def _start_node(tmp_path: Path, artifact: Path, destinations: list[dict[str, Any]]
                ) -> NodeProcess:
    return node_with_destinations(tmp_path, artifact, destinations, {
        **FAST_DELIVERY, "DICOM_NODE_DELIVERY_MAX_ATTEMPTS": "1000"})


def _sr_deliveries(node: NodeProcess) -> dict[str, Delivery]:
    """The SR delivery of the node's one job, by destination address."""
    with node.job_store() as store:
        jobs = store.list()
        found = store.deliveries([j.id for j in jobs])
    return {d.destination: d for ds in found.values() for d in ds if d.item is DeliveryItem.SR}


@pytest.mark.slow
def test_the_sr_goes_to_a_tls_storescp_and_nowhere_unverified(
        tmp_path: Path, serving_artifact: Path, pki: Pki) -> None:
    """The node's own SR to three storescps, each configured with our CA: one that
    verifies our client certificate gets it; one whose certificate another CA signed
    (and that would take anyone) and one without TLS get nothing, and their
    deliveries stay pending and are retried."""
    peers: list[Storescp] = []
    node: NodeProcess | None = None
    try:
        secure = Storescp(tmp_path / "secure", free_port(),
                          faults=dcmtk_tls(pki.server, pki.ca))  # asks for our certificate
        peers.append(secure)
        # Would take anyone (-ic): only the node's own check can keep the SR from it.
        impostor = Storescp(tmp_path / "impostor", free_port(), ae_title="IMPOSTOR",
                            faults=[*dcmtk_tls(pki.other_server, pki.other_ca), "-ic"])
        peers.append(impostor)
        plain = Storescp(tmp_path / "plain", free_port(), ae_title="PLAIN")
        peers.append(plain)
        ca, client = str(pki.ca.cert), {"tls_certificate": str(pki.client.cert),
                                         "tls_private_key": str(pki.client.key)}
        addresses = {"secure": f"PACS@127.0.0.1:{secure.port}",
                     "impostor": f"IMPOSTOR@127.0.0.1:{impostor.port}",
                     "plain": f"PLAIN@127.0.0.1:{plain.port}"}
        node = running = _start_node(tmp_path, serving_artifact, [
            {"address": addresses["secure"], "objects": ["sr"], "tls_ca_certificates": ca,
             **client},
            {"address": addresses["impostor"], "objects": ["sr"], "tls_ca_certificates": ca},
            {"address": addresses["plain"], "objects": ["sr"], "tls_ca_certificates": ca,
             **client}])
        (tmp_path / "in").mkdir()
        sent = storescu(running.port, [save(chest_image(), tmp_path / "in" / "a.dcm")])
        assert sent.all_success, sent.output

        def settled() -> bool:  # each delivered, or tried twice
            found = _sr_deliveries(running)
            return len(found) == 3 and all(
                d.state is DeliveryState.DONE or d.attempts >= 2 for d in found.values())

        wait_until(settled, timeout=240, what="every SR delivery done or retried")
        by_address = _sr_deliveries(running)
        assert by_address[addresses["secure"]].state is DeliveryState.DONE, by_address[
            addresses["secure"]].last_error
        with running.job_store() as store:
            (job,) = store.list()
        assert secure.received_uids() == [job.sr_sop_instance_uid]
        for name in ("impostor", "plain"):
            delivery = by_address[addresses[name]]
            assert delivery.state is not DeliveryState.DONE
            assert "TLS handshake failed" in (delivery.last_error or ""), delivery.last_error
        assert impostor.received_uids() == [] and plain.received_uids() == []
    finally:
        if node is not None:
            node.stop()
        for peer in peers:
            peer.stop()


def test_the_name_in_the_scp_s_certificate_is_checked(tmp_path: Path, pki: Pki) -> None:
    """A certificate from the right CA for another host is refused; naming that host
    as ``tls_server_name`` (an SCP reached by an address its certificate lacks) lets
    the same send through."""
    image = chest_image()
    path = save(image, tmp_path / "image.dcm")  # what it sends does not matter here
    scp = Storescp(tmp_path / "misnamed", free_port(), faults=dcmtk_tls(pki.misnamed_server,
                                                                       pki.ca))
    try:
        destination = Destination("PACS", "127.0.0.1", scp.port)
        tls = ClientTls(pki.ca.cert, pki.client.cert, pki.client.key)
        (refused,) = send_many(destination, [path], "DICOM_NODE", 10, tls=tls)
        assert refused.state is DeliveryState.PENDING and scp.received_uids() == []
        assert "TLS handshake failed" in refused.detail
        (done,) = send_many(destination, [path], "DICOM_NODE", 10,
                            tls=replace(tls, server_name=OTHER_NAME))
        assert done.state is DeliveryState.DONE, done
        assert scp.received_uids() == [image.SOPInstanceUID]
    finally:
        scp.stop()


_ADDRESS = "PACS@10.0.0.5:104"


def test_a_dicom_destination_s_tls_settings_make_its_client_tls(tmp_path: Path) -> None:
    ca, cert, key = tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem"
    tls = Target.model_validate({"address": _ADDRESS, "tls_ca_certificates": ca,
                                 "tls_certificate": cert, "tls_private_key": key}).client_tls
    assert tls is not None
    assert (tls.ca_certificates, tls.certificate, tls.private_key, tls.server_name) == (
        ca, cert, key, None)
    assert Target.model_validate(_ADDRESS).client_tls is None


@pytest.mark.parametrize("entry", [
    {"address": _ADDRESS, "tls_ca_certificates": "ca.pem", "tls_certificate": "cert.pem"},
    {"address": _ADDRESS, "tls_ca_certificates": "ca.pem", "tls_private_key": "key.pem"},
    {"address": _ADDRESS, "tls_certificate": "cert.pem", "tls_private_key": "key.pem"},
    {"address": _ADDRESS, "tls_server_name": "pacs.example.org"},
    {"address": _ADDRESS, "tls_ca_certificates": "ca.pem", "tls_server_name": ""},
    {"kind": "dicomweb", "url": "https://pacs.example.org/dw", "tls_ca_certificates": "ca.pem"},
], ids=["certificate without key", "key without certificate", "client certificate without CA",
        "server name without CA", "empty server name", "another kind"])
def test_a_tls_setting_that_cannot_work_is_refused(entry: dict[str, str]) -> None:
    with pytest.raises(ValidationError, match="tls_"):
        Target.model_validate(entry)
