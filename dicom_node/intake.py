"""Intake: decode a received data set fully and decide whether it is a frontal chest
radiograph.

pydicom reads lazily: a malformed element is only noticed when it is accessed.
:func:`decode_fully` therefore touches every element (sequences included) and
decodes the pixel data inside a guard, so that any fault surfaces *before* the
node acknowledges the instance. The pixel budget is checked from the declared
attributes before a single pixel is decoded.

:func:`decide` applies the :class:`~dicom_node.config.IntakeRules`: SOP Class,
Modality and body part first, then, for a chest image, the view (the network was
trained on frontal PA/AP radiographs only).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
from pydicom import config as pydicom_config
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import pixel_array  # type: ignore[attr-defined]
from pydicom.pixels.utils import get_expected_length
from pydicom.sr import codedict
from pydicom.sr.coding import Code
from pydicom.uid import UID
from pydicom.valuerep import validate_value

from dicom_node.config import IntakeRules
from dicom_node.errors import (
    DatasetMismatch,
    PixelBudgetExceeded,
    PolicyRefused,
    UndecodableDataset,
)
from model.preprocess import MUST_PROPAGATE

LOGGER = logging.getLogger(__name__)

#: Deepest sequence nesting accepted in a received data set.
MAX_SEQUENCE_DEPTH = 32


class Disposition(StrEnum):
    """What the node does with a decoded instance."""

    QUEUE = "queue"
    IGNORE = "ignore"


class View(StrEnum):
    """The projection of a chest image, as intake judged it."""

    FRONTAL = "frontal"
    UNDETERMINED = "undetermined"
    LATERAL = "lateral"
    OBLIQUE = "oblique"
    DECUBITUS = "decubitus"
    #: Any other non-frontal projection (axial, tangential, ...; CID 4010 has many).
    OTHER = "other"


@dataclass(frozen=True)
class IntakeDecision:
    """The intake verdict and its reason (free of patient data, safe to log).

    ``view`` is ``None`` when the image was not judged for a view (not a chest
    image); a queued decision's view is always FRONTAL or UNDETERMINED.
    """

    disposition: Disposition
    reason: str
    view: View | None = None


def check_uid(value: object, keyword: str) -> str:
    """Return ``value`` as a UID string, or raise :class:`DatasetMismatch`.

    A UID is valid as pydicom's UI validation judges it (PS3.5 9.1: numeric
    components without leading zeros, separated by single dots, at most 64
    characters); in RAISE mode it neither warns nor logs the received value.
    """
    text = str(value).strip("\x00 ") if value is not None else ""
    try:
        validate_value("UI", text, pydicom_config.RAISE)
    except ValueError:
        text = ""
    if not text:
        raise DatasetMismatch(f"{keyword} is missing or not a valid UID")
    return text


def decode_elements(ds: Dataset) -> None:
    """Force-decode every element of ``ds``, sequences included.

    Raises :class:`UndecodableDataset`; never anything else.
    """
    try:
        _walk(ds, 0)
    except UndecodableDataset:
        raise
    except RecursionError as exc:
        raise UndecodableDataset("data set nested too deeply") from exc
    except MUST_PROPAGATE:
        raise
    except BaseException as exc:  # a native extension's panic too
        raise UndecodableDataset(f"malformed element: {type(exc).__name__}") from exc


def _walk(ds: Dataset, depth: int) -> None:
    # No radiograph nests sequences this deep; a crafted file that does would
    # otherwise hit the interpreter's recursion limit (pydicom issue #2330).
    if depth > MAX_SEQUENCE_DEPTH:
        raise UndecodableDataset(f"sequences nested deeper than {MAX_SEQUENCE_DEPTH}")
    for elem in ds:  # iterating converts each raw element, which parses its value
        if elem.VR == "SQ":
            for item in elem.value:
                _walk(item, depth + 1)


def decode_pixels(ds: Dataset, max_pixels: int) -> None:
    """Check the pixel budget, then decode the pixel data of ``ds`` in full.

    Raises :class:`UndecodableDataset`, :class:`DatasetMismatch` or
    :class:`PixelBudgetExceeded`; never anything else.
    """
    if "PixelData" not in ds:
        raise DatasetMismatch("image SOP Class without Pixel Data")
    _check_pixel_budget(ds, max_pixels)
    _check_display_numbers(ds)
    try:
        # Every frame is decoded (compressed data must prove decodable); native data,
        # already checked for length, is only viewed, and the unused high bits are
        # left to the worker's lookup table.
        pixels = pixel_array(ds, view_only=True, correct_unused_bits=False)
    except MUST_PROPAGATE:
        raise
    except BaseException as exc:  # a Rust decoder's panic too
        raise UndecodableDataset(f"pixel data cannot be decoded: {type(exc).__name__}") from exc
    if not isinstance(pixels, np.ndarray) or pixels.size == 0:
        raise UndecodableDataset("pixel data decoded to nothing")


#: The numbers the display pipeline computes with (PS3.3 C.11.1, C.11.2): an image whose
#: window or rescale is not a number cannot be shown as it would be read, so it is not
#: acknowledged for classification (the worker could only fail it later).
_DISPLAY_NUMBERS = ("WindowCenter", "WindowWidth", "RescaleSlope", "RescaleIntercept")


def _check_display_numbers(ds: Dataset) -> None:
    for keyword in _DISPLAY_NUMBERS:
        value = ds.get(keyword)
        if value is None:
            continue
        values = value if isinstance(value, MultiValue) else [value]
        try:
            numbers = [float(v) for v in values]
        except (TypeError, ValueError):
            numbers = []
        if not numbers or not all(np.isfinite(numbers)):
            raise DatasetMismatch(f"{keyword} is not a number")
        if keyword == "WindowWidth":
            # PS3.3 C.11.2.1.2: at least 1; above 0 for LINEAR_EXACT.
            exact = str(ds.get("VOILUTFunction", "") or "").strip().upper() == "LINEAR_EXACT"
            if any(w <= 0 if exact else w < 1 for w in numbers):
                raise DatasetMismatch("Window Width is below its minimum")


def _int_attr(ds: Dataset, keyword: str, default: int | None = None) -> int:
    value = ds.get(keyword, default)
    try:
        number = int(value) if value is not None else -1
    except (TypeError, ValueError) as exc:
        raise DatasetMismatch(f"{keyword} is not an integer") from exc
    if number < 1:
        raise DatasetMismatch(f"{keyword} is missing or not positive")
    return number


def _check_pixel_budget(ds: Dataset, max_pixels: int) -> None:
    """Check the declared image size against the budget and, for native data, the length."""
    rows = _int_attr(ds, "Rows")
    columns = _int_attr(ds, "Columns")
    frames = _int_attr(ds, "NumberOfFrames", 1)
    samples = _int_attr(ds, "SamplesPerPixel", 1)
    bits_allocated = _int_attr(ds, "BitsAllocated")
    if bits_allocated not in (1, 8, 16, 32):
        raise DatasetMismatch("Bits Allocated is not 1, 8, 16 or 32")
    declared = rows * columns * frames * samples
    if declared > max_pixels:
        raise PixelBudgetExceeded(f"image declares {declared} pixels, budget is {max_pixels}")
    transfer_syntax = UID(ds.file_meta.TransferSyntaxUID)
    if not transfer_syntax.is_compressed:
        try:
            expected = get_expected_length(ds)
        except AttributeError as exc:  # no Photometric Interpretation: not interpretable
            raise UndecodableDataset("pixel data cannot be decoded: AttributeError") from exc
        actual = len(ds.PixelData)
        # Native Pixel Data is padded to an even length (PS3.5 8.1.1).
        if actual not in (expected, expected + 1):
            raise DatasetMismatch("Pixel Data length does not match the image attributes")


def _words(ds: Dataset, keyword: str) -> list[str]:
    value = ds.get(keyword)
    if value is None or value == "":
        return []
    if isinstance(value, MultiValue | list | tuple):
        return [str(v).upper().strip() for v in value if str(v).strip()]
    return [str(value).upper().strip()]


def _anatomic_codes(ds: Dataset) -> list[str]:
    codes: list[str] = []
    for item in ds.get("AnatomicRegionSequence", []) or []:
        value = item.get("CodeValue")
        if value:
            codes.append(str(value).upper().strip())
    return codes


def decide(ds: Dataset, rules: IntakeRules) -> IntakeDecision:
    """Apply the intake rules to a decoded data set: SOP Class, Modality and body part,
    then, for a chest image that would be queued, its view.

    Raises :class:`PolicyRefused` where the rules say to refuse.
    """
    decision = _judge_body_part(ds, rules)
    if decision.disposition is not Disposition.QUEUE:
        return decision
    return _judge_view(ds, rules, decision.reason)


def _judge_body_part(ds: Dataset, rules: IntakeRules) -> IntakeDecision:
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class not in rules.sop_classes:
        return _non_chest(rules, "SOP Class is not a radiograph class")
    modality = str(ds.get("Modality", "")).upper().strip()
    if modality not in {m.upper() for m in rules.modalities}:
        return _non_chest(rules, f"modality {modality or 'missing'} not accepted")

    body_parts = {b.upper() for b in rules.chest_body_parts}
    anatomic = {c.upper() for c in rules.chest_anatomic_codes}
    part = _words(ds, "BodyPartExamined")
    codes = _anatomic_codes(ds)
    if any(p in body_parts for p in part) or any(c in anatomic for c in codes):
        return IntakeDecision(Disposition.QUEUE, "body part is chest")
    if part or codes:
        return _non_chest(rules, "body part is not chest")

    keywords = [k.upper() for k in rules.chest_keywords]
    for attribute in rules.description_attributes:
        for text in _words(ds, attribute):
            if any(k in text for k in keywords):
                return IntakeDecision(Disposition.QUEUE, f"{attribute} says chest")

    if rules.undetermined == "accept":
        return IntakeDecision(Disposition.QUEUE, "no body part information; accepted")
    if rules.undetermined == "ignore":
        return IntakeDecision(Disposition.IGNORE, "no body part information")
    raise PolicyRefused("no body part information")


def _non_chest(rules: IntakeRules, reason: str) -> IntakeDecision:
    if rules.non_chest == "refuse":
        raise PolicyRefused(f"not a chest radiograph: {reason}")
    return IntakeDecision(Disposition.IGNORE, reason)


# --- the view ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Evidence:
    """What one source says of the view. ``value`` is quoted in reasons, so it is only
    ever a term of the rules or orientation letters, never free text."""

    view: View
    source: str
    value: str = ""

    def describe(self) -> str:
        where = f"{self.source} {self.value}" if self.value else self.source
        return f"view is {self.view} ({where})"


def _judge_view(ds: Dataset, rules: IntakeRules, chest_reason: str) -> IntakeDecision:
    """The strongest source with evidence decides; the two coded sources must agree."""
    coded = _coded_view(ds, rules)
    positioned = _positioned_view(ds, rules)
    if coded and positioned and (coded.view is View.FRONTAL) != (positioned.view is View.FRONTAL):
        # Bad input: never classify an image whose own header contradicts itself.
        reason = (f"view conflict: View Position {positioned.value}, "
                  f"View Code Sequence {coded.view}")
        other = positioned if coded.view is View.FRONTAL else coded
        # Refused, the reason alone already says why, within the 64-character Error Comment.
        return _not_frontal(rules, other.view, reason, refusal=reason)
    evidence = coded or positioned or _oriented_view(ds) or _described_view(ds, rules)
    if evidence is None:
        return _undetermined_view(rules, chest_reason)
    if evidence.view is View.FRONTAL:
        return IntakeDecision(Disposition.QUEUE, f"{chest_reason}; {evidence.describe()}",
                              View.FRONTAL)
    return _not_frontal(rules, evidence.view, evidence.describe())


def _not_frontal(rules: IntakeRules, view: View, reason: str,
                 refusal: str | None = None) -> IntakeDecision:
    if rules.non_frontal == "refuse":
        raise PolicyRefused(refusal or f"not a frontal view: {reason}")
    return IntakeDecision(Disposition.IGNORE, reason, view)


def _undetermined_view(rules: IntakeRules, chest_reason: str) -> IntakeDecision:
    if rules.undetermined_view == "accept":
        return IntakeDecision(Disposition.QUEUE, f"{chest_reason}; view undetermined; accepted",
                              View.UNDETERMINED)
    if rules.undetermined_view == "ignore":
        return IntakeDecision(Disposition.IGNORE, "view undetermined", View.UNDETERMINED)
    raise PolicyRefused("view undetermined")


def _coded_view(ds: Dataset, rules: IntakeRules) -> _Evidence | None:
    """View Code Sequence (0054,0220): the code value of its first item."""
    items = ds.get("ViewCodeSequence") or []
    if not items:
        return None
    value = str(items[0].get("CodeValue", "") or "").upper().strip()
    if value in _upper(rules.frontal_view_codes):
        return _Evidence(View.FRONTAL, "View Code Sequence", value)
    if value in _upper(rules.non_frontal_view_codes):
        return _Evidence(_kind(_code_meaning(value, items[0])), "View Code Sequence", value)
    return None


def _positioned_view(ds: Dataset, rules: IntakeRules) -> _Evidence | None:
    """View Position (0018,5101), one value."""
    values = _words(ds, "ViewPosition")
    if len(values) != 1:
        return None
    if values[0] in _upper(rules.frontal_view_positions):
        return _Evidence(View.FRONTAL, "View Position", values[0])
    if values[0] in _upper(rules.non_frontal_view_positions):
        return _Evidence(_kind(values[0]), "View Position", values[0])
    return None


#: Letters of Patient Orientation (PS3.3 C.7.6.1.1.1).
_DIRECTIONS = frozenset("LRAPHF")


def _oriented_view(ds: Dataset) -> _Evidence | None:
    """Patient Orientation (0020,0020): the directions of the rows and the columns.

    They span the image plane: coronal (no A or P in either) is frontal, sagittal
    (no L or R) lateral, and a plane between the two oblique. Anything but two
    non-empty values of orientation letters is no evidence.
    """
    value = ds.get("PatientOrientation")
    values = list(value) if isinstance(value, MultiValue | list | tuple) else [value]
    directions = [str(v).upper().strip() for v in values if v is not None]
    if len(directions) != 2 or any(not d or set(d) - _DIRECTIONS for d in directions):
        return None
    letters = set("".join(directions))
    across, through = bool(letters & set("LR")), bool(letters & set("AP"))
    if not letters & set("HF"):  # an axial plane: not a projection of the chest we know
        view = View.OTHER
    elif across and through:
        view = View.OBLIQUE
    elif across:
        view = View.FRONTAL
    elif through:
        view = View.LATERAL
    else:
        return None
    return _Evidence(view, "Patient Orientation", "\\".join(directions))


#: Splits a description into words: every run of characters that are not letters or
#: digits separates two words ("CHEST_PA" is CHEST and PA; "PAIN" is not PA).
_WORD_BREAK = re.compile(r"[\W_]+")


def _described_view(ds: Dataset, rules: IntakeRules) -> _Evidence | None:
    """The first description attribute, in the rules' order, that names one kind of view.

    One that names both (a two-view study's "CHEST PA AND LAT") says nothing of this
    image. The text itself is never quoted: it is free text and may hold anything.
    """
    frontal = _upper(rules.frontal_view_words)
    non_frontal = _upper(rules.non_frontal_view_words)
    for attribute in rules.description_attributes:
        words = {w for text in _words(ds, attribute) for w in _WORD_BREAK.split(text) if w}
        says_frontal, says_other = words & frontal, words & non_frontal
        if says_frontal and not says_other:
            return _Evidence(View.FRONTAL, attribute)
        if says_other and not says_frontal:
            return _Evidence(_kind(" ".join(sorted(says_other))), attribute)
    return None


#: How the kind of a non-frontal view is named, checked in this order (a "lateral
#: oblique" is oblique): a word of the term equal to, or starting with, a marker. Only
#: the view recorded depends on this, never whether an image is queued.
_KINDS = (
    (View.DECUBITUS, ("DECUB", "LLD", "RLD")),
    (View.OBLIQUE, ("OBL", "LLO", "RLO", "LAO", "RAO", "LPO", "RPO")),
    (View.LATERAL, ("LAT", "LL", "RL", "SAGITTAL")),
)


def _kind(term: str) -> View:
    """The kind of a non-frontal view, from a View Position, words or a code meaning."""
    words = [w for w in _WORD_BREAK.split(term.upper()) if w]
    for view, markers in _KINDS:
        if any(w.startswith(markers) for w in words):
            return view
    return View.OTHER


#: CID 4010 DX View as pydicom ships it (SCT; its Code compares equal to legacy SRT).
_DX_VIEWS = tuple(codedict.codes.cid4010.concepts.values())


def _code_meaning(value: str, item: Dataset) -> str:
    """The standard meaning of a CID 4010 code value (SCT or SRT); else the item's own."""
    for scheme in ("SCT", "SRT"):
        probe = Code(value, scheme, "")
        for code in _DX_VIEWS:
            if code == probe:
                return str(code.meaning)
    return str(item.get("CodeMeaning", "") or "")


def _upper(terms: list[str]) -> set[str]:
    return {t.upper().strip() for t in terms}
