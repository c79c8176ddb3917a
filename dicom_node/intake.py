"""Intake: decode a received data set fully and decide whether it is a chest radiograph.

pydicom reads lazily: a malformed element is only noticed when it is accessed.
:func:`decode_fully` therefore touches every element (sequences included) and
decodes the pixel data inside a guard, so that any fault surfaces *before* the
node acknowledges the instance. The pixel budget is checked from the declared
attributes before a single pixel is decoded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
from pydicom import config as pydicom_config
from pydicom.dataset import Dataset
from pydicom.pixels import pixel_array  # type: ignore[attr-defined]
from pydicom.pixels.utils import get_expected_length
from pydicom.uid import UID
from pydicom.valuerep import validate_value

from dicom_node.config import IntakeRules
from dicom_node.errors import (
    DatasetMismatch,
    PixelBudgetExceeded,
    PolicyRefused,
    UndecodableDataset,
)

LOGGER = logging.getLogger(__name__)

#: Deepest sequence nesting accepted in a received data set.
MAX_SEQUENCE_DEPTH = 32


class Disposition(StrEnum):
    """What the node does with a decoded instance."""

    QUEUE = "queue"
    IGNORE = "ignore"


@dataclass(frozen=True)
class IntakeDecision:
    """The intake verdict and its reason (free of patient data, safe to log)."""

    disposition: Disposition
    reason: str


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
    except Exception as exc:
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
    try:
        # Every frame is decoded (compressed data must prove decodable); native data,
        # already checked for length, is only viewed, and the unused high bits are
        # left to the worker's lookup table.
        pixels = pixel_array(ds, view_only=True, correct_unused_bits=False)
    except Exception as exc:
        raise UndecodableDataset(f"pixel data cannot be decoded: {type(exc).__name__}") from exc
    if not isinstance(pixels, np.ndarray) or pixels.size == 0:
        raise UndecodableDataset("pixel data decoded to nothing")


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
    if isinstance(value, list | tuple) or getattr(value, "is_multival", False):
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
    """Apply the intake rules to a decoded data set.

    Raises :class:`PolicyRefused` where the rules say to refuse.
    """
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
