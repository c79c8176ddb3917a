"""The result router on its own: where a job's SR goes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dicom_node.config import Settings
from dicom_node.db import Job
from dicom_node.jobs import JobStore
from dicom_node.results import ResultWriter
from dicom_node.spool import Spool

Writer = Callable[..., ResultWriter]


@pytest.fixture
def writer(tmp_path: Path) -> Iterator[Writer]:
    """Makes result writers with the given settings; their job stores are closed after."""
    stores: list[JobStore] = []

    def make(**settings: object) -> ResultWriter:
        configured = Settings(data_dir=tmp_path / str(len(stores)),
                              destinations=["PACS@127.0.0.1:104"],
                              **settings)  # type: ignore[arg-type]
        stores.append(JobStore(configured.database_url))
        return ResultWriter(configured, stores[-1], Spool(configured.storage_dir), "test")

    yield make
    for store in stores:
        store.close()


def _job(calling_ae: str = "MODALITY", peer: str | None = "127.0.0.5") -> Job:
    return Job(calling_ae=calling_ae, peer_address=peer)


def test_every_sr_goes_to_the_configured_destinations(writer: Writer) -> None:
    assert writer().destinations(_job()) == ["PACS@127.0.0.1:104"]


def test_return_to_the_calling_ae_at_its_known_port(writer: Writer) -> None:
    returning = writer(return_to_calling_ae=True, calling_ae_ports={"MODALITY": 11113})
    assert returning.destinations(_job()) == ["PACS@127.0.0.1:104", "MODALITY@127.0.0.5:11113"]


def test_no_return_without_a_port_an_address_or_the_setting(writer: Writer) -> None:
    on = writer(return_to_calling_ae=True, calling_ae_ports={"MODALITY": 11113})
    off = writer(calling_ae_ports={"MODALITY": 11113})
    assert on.destinations(_job(calling_ae="OTHER")) == ["PACS@127.0.0.1:104"]
    assert on.destinations(_job(peer=None)) == ["PACS@127.0.0.1:104"]
    assert off.destinations(_job()) == ["PACS@127.0.0.1:104"]
