"""The result writer on its own: where a job's SR goes, and how large its evidence image is."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from dicom_node.batches import Prepared
from dicom_node.config import Settings
from dicom_node.db import DeliveryItem, Job
from dicom_node.jobs import JobStore, Route
from dicom_node.report import Classification, ReportBuilder
from dicom_node.results import ResultWriter
from dicom_node.spool import Spool
from model.card import ModelCard

from dicom_factory import dx_16bit

Writer = Callable[..., ResultWriter]


@pytest.fixture
def writer(tmp_path: Path) -> Iterator[Writer]:
    """Makes result writers with the given settings; their job stores are closed after."""
    stores: list[JobStore] = []

    def make(**settings: object) -> ResultWriter:
        configured = Settings(data_dir=tmp_path / str(len(stores)),  # type: ignore[arg-type]
                              **{"destinations": ["PACS@127.0.0.1:104"], **settings})
        stores.append(JobStore(configured.database_url))
        return ResultWriter(configured, stores[-1], Spool(configured.storage_dir), "test")

    yield make
    for store in stores:
        store.close()


def _job(calling_ae: str = "MODALITY", peer: str | None = "127.0.0.5") -> Job:
    return Job(calling_ae=calling_ae, peer_address=peer)


def _sr(destination: str, kind: str = "dicom") -> Route:
    return Route(kind, destination, DeliveryItem.SR)


def _evidence(destination: str, kind: str = "dicom") -> Route:
    return Route(kind, destination, DeliveryItem.EVIDENCE)


def test_every_sr_goes_to_the_configured_destinations(writer: Writer) -> None:
    assert writer().routes(_job(), evidence=False) == [_sr("PACS@127.0.0.1:104")]


def test_the_evidence_image_goes_beside_the_sr_where_the_destination_takes_it(
        writer: Writer) -> None:
    mixed = writer(destinations=[
        "PACS@127.0.0.1:104",
        {"kind": "dicom", "address": "VIEWER@127.0.0.1:106", "objects": ["evidence"]},
        {"kind": "dicomweb", "url": "http://127.0.0.1:8042/dicom-web", "objects": ["sr"]},
        {"kind": "hl7", "address": "127.0.0.1:2575"},
        {"kind": "fhir", "url": "http://127.0.0.1:8080/fhir"}])
    assert mixed.routes(_job()) == [
        _sr("PACS@127.0.0.1:104"), _evidence("PACS@127.0.0.1:104"),
        _evidence("VIEWER@127.0.0.1:106"), _sr("http://127.0.0.1:8042/dicom-web", "dicomweb")]
    # No evidence image was made (its failure is logged): only the SRs go.
    assert mixed.routes(_job(), evidence=False) == [
        _sr("PACS@127.0.0.1:104"), _sr("http://127.0.0.1:8042/dicom-web", "dicomweb")]


def test_return_to_the_calling_ae_at_its_known_port(writer: Writer) -> None:
    returning = writer(return_to_calling_ae=True, calling_ae_ports={"MODALITY": 11113})
    assert returning.routes(_job()) == [
        _sr("PACS@127.0.0.1:104"), _evidence("PACS@127.0.0.1:104"),
        _sr("MODALITY@127.0.0.5:11113"), _evidence("MODALITY@127.0.0.5:11113")]


def test_no_return_without_a_port_an_address_or_the_setting(writer: Writer) -> None:
    on = writer(return_to_calling_ae=True, calling_ae_ports={"MODALITY": 11113})
    off = writer(calling_ae_ports={"MODALITY": 11113})
    pacs_only = [_sr("PACS@127.0.0.1:104")]
    assert on.routes(_job(calling_ae="OTHER"), evidence=False) == pacs_only
    assert on.routes(_job(peer=None), evidence=False) == pacs_only
    assert off.routes(_job(), evidence=False) == pacs_only


@pytest.mark.parametrize(("max_size", "shape"), [(800, (800, 600)), (0, (1280, 960))])
def test_the_evidence_image_is_as_large_as_the_setting_allows(
        writer: Writer, max_size: int, shape: tuple[int, int]) -> None:
    made = writer(evidence_max_size=max_size)
    card = ModelCard(version="1.0.0", architecture="concatenated", input_size=300,
                     sha256="0123456789abcdef" * 4, trained=False)
    source = dx_16bit(rows=1280, columns=960)
    result = Classification("normal", {"normal": 0.8, "pneumonia": 0.1, "covid": 0.1})
    name = made.write_evidence(
        Prepared(Job(id=1), source, np.zeros((300, 300, 3), np.float32)), result,
        ReportBuilder(card), np.zeros((10, 10, 3), np.float32), (generate_uid(), generate_uid()))
    assert name is not None
    image = dcmread(made.spool.path(name))
    assert (image.Rows, image.Columns) == shape


@pytest.mark.parametrize("size", [1, 511])
def test_an_evidence_image_too_small_for_its_legend_is_refused(size: int) -> None:
    with pytest.raises(ValueError, match="evidence_max_size"):
        Settings(evidence_max_size=size)
