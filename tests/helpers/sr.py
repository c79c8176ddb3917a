"""What an SR made by the node says, read by concept from its content tree.

TID 1500 as the node writes it: under "Imaging Measurements" (DCM 126010), the
first measurement group (TID 1501) holds the result as its one qualitative
evaluation -- a CODE item DCM 121071 "Finding" whose value is the predicted
class's SNOMED CT code -- and no measurement; each other group has a finding
type naming a class (also a CODE item DCM 121071 "Finding": TID 1501 uses the
same concept for both, so the group's role tells them apart) and one NUM item
DCM 122157 "Probability" (UCUM "1") with that class's probability.

The codes are written out here, not taken from the node, so that a wrong code in
the node fails the tests instead of agreeing with them.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.dataset import Dataset

#: SNOMED CT code of each class, as the SR must carry it.
CLASS_CODES = {"covid": "840539006", "normal": "17621005", "pneumonia": "233604007"}
_CLASS_BY_CODE = {code: key for key, code in CLASS_CODES.items()}

IMAGING_MEASUREMENTS = ("126010", "DCM")
MEASUREMENT_GROUP = ("125007", "DCM")
FINDING = ("121071", "DCM")
PROBABILITY = ("122157", "DCM")
TRACKING_UID = ("112040", "DCM")


class MalformedReport(AssertionError):
    """The SR's content tree is not shaped as the node's TID 1500 report."""


@dataclass(frozen=True)
class Result:
    """The SR's result: the Finding (a class key) and each class's probability."""

    finding: str
    probabilities: dict[str, float]


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise MalformedReport(message)


def concept(item: Dataset) -> tuple[str, str] | None:
    """(Code Value, Coding Scheme Designator) of a content item's concept name."""
    names = item.get("ConceptNameCodeSequence")
    if not names:
        return None
    return str(names[0].CodeValue), str(names[0].CodingSchemeDesignator)


def measurement_groups(sr: Dataset) -> list[Dataset]:
    """The measurement groups of the report, in document order."""
    containers = [item for item in sr.get("ContentSequence", [])
                  if concept(item) == IMAGING_MEASUREMENTS]
    _expect(len(containers) == 1, f"{len(containers)} Imaging Measurements containers")
    groups = [item for item in containers[0].get("ContentSequence", [])
              if concept(item) == MEASUREMENT_GROUP and item.ValueType == "CONTAINER"]
    _expect(bool(groups), "no measurement group")
    return groups


def _class_of(item: Dataset) -> str:
    _expect(item.ValueType == "CODE", f"a Finding item of type {item.ValueType}")
    (code,) = item.ConceptCodeSequence
    _expect(str(code.CodingSchemeDesignator) == "SCT",
            f"a Finding coded in {code.CodingSchemeDesignator}, not SNOMED CT")
    _expect(str(code.CodeValue) in _CLASS_BY_CODE, f"a Finding {code.CodeValue} of no class")
    return _CLASS_BY_CODE[str(code.CodeValue)]


def _items(group: Dataset, name: tuple[str, str], relationship: str = "CONTAINS"
           ) -> list[Dataset]:
    return [item for item in group.get("ContentSequence", [])
            if concept(item) == name and item.RelationshipType == relationship]


def read_result(sr: Dataset) -> Result:
    """The Finding of the first measurement group and the probability of each class."""
    first, *others = measurement_groups(sr)
    findings = _items(first, FINDING)
    _expect(len(findings) == 1, f"{len(findings)} Finding items in the first group")
    _expect(not _items(first, PROBABILITY), "a Probability in the first group")
    probabilities: dict[str, float] = {}
    for group in others:
        kinds = _items(group, FINDING)
        _expect(len(kinds) == 1, f"a probability group with {len(kinds)} Finding items")
        key = _class_of(kinds[0])
        values = _items(group, PROBABILITY)
        _expect(len(values) == 1, f"{len(values)} Probability items for {key}")
        _expect(values[0].ValueType == "NUM", f"a Probability of type {values[0].ValueType}")
        (measured,) = values[0].MeasuredValueSequence
        (unit,) = measured.MeasurementUnitsCodeSequence
        _expect((str(unit.CodeValue), str(unit.CodingSchemeDesignator)) == ("1", "UCUM"),
                f"a Probability in {unit.CodeValue} ({unit.CodingSchemeDesignator})")
        _expect(key not in probabilities, f"two probability groups for {key}")
        probabilities[key] = float(measured.NumericValue)
    return Result(_class_of(findings[0]), probabilities)


def tracking_uids(sr: Dataset) -> list[str]:
    """The Tracking Unique Identifier of each measurement group, in order."""
    uids = []
    for group in measurement_groups(sr):
        found = _items(group, TRACKING_UID, "HAS OBS CONTEXT")
        _expect(len(found) == 1 and found[0].ValueType == "UIDREF",
                f"a measurement group with {len(found)} tracking UIDs")
        uids.append(str(found[0].UID))
    return uids
