"""What an SR made by the node says, read by concept from its content tree.

TID 1500 as the node writes it: under "Imaging Measurements" (DCM 126010), the
first measurement group (TID 1501) holds the result as its one qualitative
evaluation -- a CODE item DCM 121071 "Finding" whose value is the predicted
class's SNOMED CT code -- and no measurement; each other group has a finding
type naming a class (also a CODE item DCM 121071 "Finding": TID 1501 uses the
same concept for both, so the group's role tells them apart) and one NUM item
DCM 122157 "Probability" (UCUM "1") with that class's probability.

Around that: the document title (the root's concept name: DCM 126000 "Imaging
Measurement Report", or for an unvalidated model the local code 99DCMNODE
UNVALIDATED-IMR whose meaning is the warning); the root's first items, TEXT
DCM 121106 "Comment": the warning with its reason (unvalidated models only), then
the intended use. Where the model has an operating point for a class, its group
also holds NUM DCM 122411 "Threshold Value" and CODE 99DCMNODE THRESHOLD-MET =
SCT Yes/No, and the first group a CODE 99DCMNODE FLAGGED = Yes/No (Yes when any
class met its threshold); the first group's Comment names the view.

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
COMMENT = ("121106", "DCM")
THRESHOLD = ("122411", "DCM")
THRESHOLD_MET = ("THRESHOLD-MET", "99DCMNODE")
FLAGGED = ("FLAGGED", "99DCMNODE")
YES_NO = {("373066001", "SCT"): True, ("373067005", "SCT"): False}
STANDARD_TITLE = ("126000", "DCM")
UNVALIDATED_TITLE = ("UNVALIDATED-IMR", "99DCMNODE")
#: As model.card.UNVALIDATED_WARNING says it, written out for the same reason.
WARNING = "UNVALIDATED MODEL - NOT FOR CLINICAL USE"
INTENDED_USE = "Intended use: research and decision support."


class MalformedReport(AssertionError):
    """The SR's content tree is not shaped as the node's TID 1500 report."""


@dataclass(frozen=True)
class Result:
    """The SR's result: the Finding (a class key) and each class's probability; the
    document title's meaning; the classes that met their threshold (in class
    order) and each threshold; the first group's Flagged value (None: no such
    item, the model has no operating points); the view text; and whether the
    unvalidated-model warning is there (title and first item, both or neither)."""

    finding: str
    probabilities: dict[str, float]
    title: str
    flags: tuple[str, ...]
    thresholds: dict[str, float]
    flagged: bool | None
    view: str
    warning: bool


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
    """What the SR says, read by concept; :class:`MalformedReport` where it is not
    shaped as the node writes it or contradicts itself."""
    first, *others = measurement_groups(sr)
    findings = _items(first, FINDING)
    _expect(len(findings) == 1, f"{len(findings)} Finding items in the first group")
    _expect(not _items(first, PROBABILITY), "a Probability in the first group")
    probabilities: dict[str, float] = {}
    thresholds: dict[str, float] = {}
    met: dict[str, bool] = {}
    for group in others:
        kinds = _items(group, FINDING)
        _expect(len(kinds) == 1, f"a probability group with {len(kinds)} Finding items")
        key = _class_of(kinds[0])
        _expect(key not in probabilities, f"two probability groups for {key}")
        probabilities[key] = _number(group, PROBABILITY, key)
        if _items(group, THRESHOLD) or _items(group, THRESHOLD_MET):
            thresholds[key] = _number(group, THRESHOLD, key)
            met[key] = _yes_no(group, THRESHOLD_MET, key)
            _expect(met[key] == (probabilities[key] >= thresholds[key]),
                    f"{key}: threshold met {met[key]} for {probabilities[key]} "
                    f"against {thresholds[key]}")
    flags = tuple(key for key in CLASS_CODES if met.get(key))
    flagged = _yes_no(first, FLAGGED, "the result") if _items(first, FLAGGED) else None
    _expect(flagged == (bool(flags) if thresholds else None),
            f"Flagged {flagged} with thresholds met by {flags or 'no class'}")
    title, warning = _title(sr)
    return Result(_class_of(findings[0]), probabilities, title, flags, thresholds, flagged,
                  _view(first), warning)


def _number(group: Dataset, name: tuple[str, str], key: str) -> float:
    values = _items(group, name)
    _expect(len(values) == 1, f"{len(values)} {name} items for {key}")
    _expect(values[0].ValueType == "NUM", f"a {name} of type {values[0].ValueType}")
    (measured,) = values[0].MeasuredValueSequence
    (unit,) = measured.MeasurementUnitsCodeSequence
    _expect((str(unit.CodeValue), str(unit.CodingSchemeDesignator)) == ("1", "UCUM"),
            f"a {name} in {unit.CodeValue} ({unit.CodingSchemeDesignator})")
    return float(measured.NumericValue)


def _yes_no(group: Dataset, name: tuple[str, str], what: str) -> bool:
    values = _items(group, name)
    _expect(len(values) == 1 and values[0].ValueType == "CODE",
            f"{len(values)} {name} CODE items for {what}")
    (code,) = values[0].ConceptCodeSequence
    value = (str(code.CodeValue), str(code.CodingSchemeDesignator))
    _expect(value in YES_NO, f"{name} = {value}, neither SCT Yes nor No")
    return YES_NO[value]


def _view(first: Dataset) -> str:
    views = [str(item.TextValue) for item in _items(first, COMMENT)
             if item.ValueType == "TEXT" and str(item.TextValue).startswith("View")]
    _expect(len(views) == 1, f"{len(views)} view comments in the first group")
    return views[0]


def comments(sr: Dataset) -> list[str]:
    """The root's TEXT Comment items, in order."""
    return [str(item.TextValue) for item in sr.get("ContentSequence", [])
            if concept(item) == COMMENT and item.ValueType == "TEXT"
            and item.RelationshipType == "CONTAINS"]


def _title(sr: Dataset) -> tuple[str, bool]:
    """The title's meaning, and whether the SR carries the unvalidated-model warning:
    title, first root item and intended use must agree."""
    (name,) = sr.ConceptNameCodeSequence
    code = (str(name.CodeValue), str(name.CodingSchemeDesignator))
    _expect(code in (STANDARD_TITLE, UNVALIDATED_TITLE), f"a title {code}")
    notes = comments(sr)
    first = sr.ContentSequence[0]
    warned = concept(first) == COMMENT and str(first.get("TextValue", "")).startswith(WARNING)
    _expect(warned == (code == UNVALIDATED_TITLE),
            f"title {code} with {'a' if warned else 'no'} warning first")
    _expect(sum(WARNING in note for note in notes) == int(warned), "a misplaced warning")
    _expect(sum(note.startswith(INTENDED_USE) for note in notes) == 1,
            "no single intended-use comment")
    return str(name.CodeMeaning), warned


def tracking_uids(sr: Dataset) -> list[str]:
    """The Tracking Unique Identifier of each measurement group, in order."""
    uids = []
    for group in measurement_groups(sr):
        found = _items(group, TRACKING_UID, "HAS OBS CONTEXT")
        _expect(len(found) == 1 and found[0].ValueType == "UIDREF",
                f"a measurement group with {len(found)} tracking UIDs")
        uids.append(str(found[0].UID))
    return uids
