"""Delivery: status classes, backoff, destinations."""

from __future__ import annotations

import pytest

from dicom_node.deliver import Destination, Outcome, backoff, classify


@pytest.mark.parametrize(("status", "outcome"), [
    (0x0000, Outcome.DONE), (0x0001, Outcome.DONE), (0xB000, Outcome.DONE),
    (0xB006, Outcome.DONE), (0xB007, Outcome.DONE),
    (0xA700, Outcome.RETRY), (0xA7FF, Outcome.RETRY),
    (0xA900, Outcome.DEAD), (0xC000, Outcome.DEAD), (0xC211, Outcome.DEAD),
    (0x0122, Outcome.DEAD), (0x0110, Outcome.DEAD),
])
def test_status_classes(status: int, outcome: Outcome) -> None:
    assert classify(status) is outcome


def test_warning_retried_only_when_configured() -> None:
    assert classify(0xB000, retry_on_warning=True) is Outcome.RETRY


def test_backoff_is_exponential_with_a_cap() -> None:
    assert [backoff(n, 10, 2, 60) for n in range(1, 6)] == [10, 20, 40, 60, 60]


def test_destination_parsing() -> None:
    d = Destination.parse("ORTHANC@127.0.0.1:4242")
    assert (d.ae_title, d.host, d.port) == ("ORTHANC", "127.0.0.1", 4242)
    assert str(d) == "ORTHANC@127.0.0.1:4242"
    assert Destination.parse("PACS@[::1]:104").host == "::1"
    for bad in ("ORTHANC", "A@h", "TOO_LONG_AE_TITLE_X@h:1", "A@h:0", "A@h:70000", "A@h:x"):
        with pytest.raises(ValueError):
            Destination.parse(bad)
