"""Property-based tests of the intake rules (hypothesis): whatever the attributes, the
rules answer in their own terms and never queue what they must not."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from dicom_node import intake
from dicom_node.config import IntakeRules
from dicom_node.errors import PolicyRefused
from dicom_node.intake import Disposition, View

RULES = IntakeRules()
STRICT = IntakeRules(non_chest="refuse", undetermined="refuse", undetermined_view="refuse",
                     non_frontal="refuse")

_text = st.text(alphabet=st.characters(codec="ascii", exclude_characters="\\\x00"),
                max_size=24)
_cs = st.one_of(_text.map(lambda t: t.upper()[:16]), st.sampled_from(
    ["", "CHEST", "THORAX", "HEAD", "ABDOMEN", "chest", " CHEST ", "PA", "AP", "LL", "RL",
     "LATERAL", "LAT", "OBLIQUE", "XX"]))


@st.composite
def datasets(draw: st.DrawFn) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = draw(st.sampled_from([*RULES.sop_classes, "1.2.840.10008.5.1.4.1.1.2",
                                           "1.2.840.10008.5.1.4.1.1.7", "1.2.3.4"]))
    ds.Modality = draw(st.sampled_from([*RULES.modalities, "CT", "MR", "OT", "", "dx"]))
    for keyword in ("BodyPartExamined", "ViewPosition"):
        if draw(st.booleans()):
            setattr(ds, keyword, draw(_cs))
    for keyword in ("StudyDescription", "SeriesDescription", "ProtocolName"):
        if draw(st.booleans()):
            setattr(ds, keyword, draw(st.one_of(_text, st.sampled_from(
                ["CHEST PA", "Thorax ap", "CHEST LAT", "XR CHEST 2 VIEWS", "Knee"]))))
    if draw(st.booleans()):
        ds.PatientOrientation = draw(st.lists(st.sampled_from(
            ["A", "P", "L", "R", "H", "F", "FL", "AL", ""]), min_size=0, max_size=3))
    if draw(st.booleans()):
        item = Dataset()
        item.CodeValue = draw(st.one_of(st.sampled_from(
            [*RULES.frontal_view_codes, "R-10206", "399067008", "G-A123"]), _cs))
        item.CodingSchemeDesignator = draw(st.sampled_from(["SCT", "SRT", "DCM", "99X"]))
        item.CodeMeaning = draw(_text)
        ds.ViewCodeSequence = Sequence([item])
    return ds


def _decide(ds: Dataset, rules: IntakeRules) -> intake.IntakeDecision | None:
    """The decision, or None when the rules refuse (PolicyRefused, their only error)."""
    try:
        return intake.decide(ds, rules)
    except PolicyRefused:
        return None


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(datasets())
def test_the_rules_never_queue_what_they_must_not(ds: Dataset) -> None:
    decision = _decide(ds, RULES)
    assert decision is not None  # the default rules ignore, they never refuse
    assert decision.reason  # there is always a reason to log
    assert decision == intake.decide(ds, RULES)  # the same attributes, the same verdict
    if decision.disposition is Disposition.QUEUE:
        assert ds.SOPClassUID in RULES.sop_classes
        assert str(ds.Modality).strip().upper() in {m.upper() for m in RULES.modalities}
        assert decision.view in (View.FRONTAL, View.UNDETERMINED)
    else:
        assert decision.disposition is Disposition.IGNORE


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(datasets())
def test_strict_rules_queue_only_frontal_chest_and_refuse_the_rest(ds: Dataset) -> None:
    """With every doubt refused (not chest, chest undetermined, not frontal, view
    undetermined), the rules queue a subset of what the default rules queue as frontal,
    refuse everything else and never merely ignore it."""
    lenient = _decide(ds, RULES)
    strict = _decide(ds, STRICT)
    assert lenient is not None
    if strict is None:
        return  # refused
    assert strict.disposition is Disposition.QUEUE and strict.view is View.FRONTAL
    assert lenient.disposition is Disposition.QUEUE and lenient.view is View.FRONTAL
    assert lenient.reason == strict.reason
