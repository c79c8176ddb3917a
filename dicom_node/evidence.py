"""The evidence image: where the network found its answer, as a DICOM Secondary Capture.

:func:`render` draws, at the source image's own resolution or reduced to at most
``max_side`` pixels a side (the node's ``evidence_max_size``, 1024 by default), the
radiograph as it was displayed to the network (:func:`model.preprocess.dicom_gray8`: Modality
LUT, VOI LUT or first window, MONOCHROME1 inverted) with the class-activation
map of the predicted class (:mod:`model.evidence`: what spoke for that class
over the others) as a colour overlay where it is high, and a legend burned in:
the class, the three probabilities, the model, "AI RESULT - NOT FOR DIAGNOSTIC
USE" and, for an unvalidated model, the warning the SR carries.

:func:`build_evidence` wraps that image in a Secondary Capture Image (PS3.3
A.8.1, built by highdicom): RGB, uncompressed, Conversion Type WSD
(workstation), Burned In Annotation YES; in the source's study, in a series of
its own (number :data:`SERIES_NUMBER`); patient and study attributes copied
from the source as the SR copies them; the source image in the Source Image
Sequence; the model in Contributing Equipment with its Device UID, as the SR
names it (IHE AI Results). :func:`png` gives the same image for the demo.
"""

from __future__ import annotations

import logging
from io import BytesIO

import highdicom as hd
import numpy as np
from highdicom.sc import SCImage
from numpy.typing import NDArray
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSNearLossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from dicom_node import __version__
from dicom_node.report import (
    MANUFACTURER,
    NODE_NAME,
    model_equipment,
    set_model_device_uid,
    source_header,
)
from model import evidence as model_evidence
from model.card import AI_RESULT_NOTICE, UNVALIDATED_WARNING, ModelCard, validation_status
from model.classes import CLASS_KEYS, CLASSES, by_key
from model.preprocess import dicom_gray8

LOGGER = logging.getLogger(__name__)

#: The evidence image's series (the SR's is 9901).
SERIES_NUMBER = 9902
DISCLAIMER = AI_RESULT_NOTICE
#: Opacity of the overlay where the map is at its highest.
MAX_OPACITY = 0.55
#: Below this fraction of its maximum the map is not drawn: the radiograph stays gray.
FLOOR = 0.2
#: PS3.16 CID 7202: why the source image is referenced.
SOURCE_PURPOSE = hd.sr.CodedConcept("121322", "DCM",
                                    "Source image for image processing operation")
DERIVATION = ("Class-activation map of the predicted class (its contribution to the "
              "class's log-odds, exact for the network's linear head) over the source "
              "image as displayed; legend burned in")
#: Transfer syntaxes whose pixels may have lost information (PS3.3 C.7.6.1.1.5: an
#: image derived from them is lossy too).
_LOSSY = {JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLSNearLossless, JPEG2000, HTJ2K}
#: Person names the image copies from its source (both Type 2: present in the header).
_NAMES = ("PatientName", "ReferringPhysicianName")

#: Google's Turbo colour map (Mikhailov 2019), its published polynomial fit
#: (Apache-2.0): rows are the coefficients of 1, x, ..., x^5; columns R, G, B.
_TURBO = np.array([
    [0.13572138, 0.09140261, 0.10667330],
    [4.61539260, 2.19418839, 12.64194608],
    [-42.66032258, 4.84296658, -60.58204836],
    [132.13108234, -14.18503333, 110.36276771],
    [-152.94239396, 4.27729857, -89.90310912],
    [59.28637943, 2.82956604, 27.34824973],
])


def turbo_lut() -> NDArray[np.uint8]:
    """The Turbo colour map as a 256 x 3 lookup table."""
    x = np.linspace(0.0, 1.0, 256)
    powers = np.stack([x**n for n in range(6)], axis=1)
    lut: NDArray[np.uint8] = np.clip(np.rint(powers @ _TURBO * 255.0), 0, 255).astype(np.uint8)
    return lut


_LUT = turbo_lut()
#: Opacity (0-255) of each of the map's 256 levels: none up to FLOOR, then rising
#: linearly to MAX_OPACITY.
_OPACITY = [round(255 * MAX_OPACITY * min(max((v / 255 - FLOOR) / (1 - FLOOR), 0.0), 1.0))
            for v in range(256)]


def legend_lines(label: str, probabilities: dict[str, float], model_text: str,
                 validated: bool) -> list[str]:
    """The legend's text, top to bottom (ASCII: the built-in font has no dashes).

    Parameters
    ----------
    label
        The predicted class's key.
    probabilities
        Each class's probability, by key.
    model_text
        The model as named ("name version").
    validated
        False adds :data:`model.card.UNVALIDATED_WARNING` as the last line.
    """
    lines = [f"AI finding: {by_key(label).display_name}"]
    # A tab separates a name from its value, drawn right-aligned.
    lines += [f"{c.display_name}\t{100.0 * float(probabilities[c.key]):.1f} %" for c in CLASSES]
    lines += [f"Model: {model_text}", DISCLAIMER]
    if not validated:
        lines.append(UNVALIDATED_WARNING)
    return lines


#: The shorter side a reduced evidence image keeps at least (its own, if shorter): the
#: legend (at least 13-pixel text, about 300 pixels wide) must fit across it, even on a
#: long, narrow source such as a stitched spine.
MIN_SHORT_SIDE = 512


def evidence_size(rows: int, columns: int, max_side: int) -> tuple[int, int]:
    """The evidence image's rows and columns for a source of ``rows`` x ``columns``: the
    same, or with its longer side ``max_side`` and its aspect kept (0: the same) -- but
    its shorter side never reduced below :data:`MIN_SHORT_SIDE`."""
    longer, shorter = max(rows, columns), min(rows, columns)
    if max_side <= 0 or longer <= max_side:
        return rows, columns
    scale = min(1.0, max(max_side / longer, MIN_SHORT_SIDE / shorter))
    return max(1, round(rows * scale)), max(1, round(columns * scale))


def render(source: Dataset, class_maps: NDArray[np.floating], label: str,
           probabilities: dict[str, float], model_text: str, validated: bool,
           max_side: int = 0) -> NDArray[np.uint8]:
    """The evidence image (rows x columns x 3, RGB) at the source's resolution, or with
    its longer side ``max_side`` where the source's is longer.

    A map of a few cells a side has nothing to show at a radiograph's full
    resolution, and the radiograph under it is there to find one's way, not to be
    read: reduced, the image costs a fraction to draw, store and send (a
    2048 x 2500 source's is 15 MB of RGB at its own size; docs/performance.md).
    The radiograph is reduced by averaging the source pixels each image pixel
    covers (Pillow's box filter), so that fine patterns (an anti-scatter grid's
    lines) do not alias into stripes that are not there.

    Parameters
    ----------
    source
        The classified image (its pixels are decoded here, as the network's were).
    class_maps
        That image's maps, h x w x classes (:meth:`model.engine.Engine.predict_with_maps`).
    label
        The predicted class (a key of :data:`model.classes.CLASS_KEYS`): its map is drawn.
    probabilities
        Each class's probability, by key.
    model_text
        The model as the legend names it ("name version").
    validated
        Whether :func:`model.card.validation_status` validates the model; if not, the
        legend carries the warning.
    max_side
        The image's longer side at most, in pixels (0: the source's own size).

    Raises
    ------
    ValueError
        An unknown label, or maps that are not h x w x classes.
    model.preprocess.PreprocessError
        The source's pixels cannot be decoded.
    """
    if label not in CLASS_KEYS:
        raise ValueError(f"label: {label!r} is not one of {CLASS_KEYS}")
    if class_maps.ndim != 3 or class_maps.shape[-1] != len(CLASS_KEYS):
        raise ValueError(f"class_maps: expected h x w x {len(CLASS_KEYS)}, "
                         f"got {class_maps.shape}")
    gray = dicom_gray8(source)
    rows, columns = evidence_size(gray.shape[0], gray.shape[1], max_side)
    if (rows, columns) != gray.shape:
        gray = np.asarray(Image.fromarray(gray, mode="L").resize(
            (columns, rows), Image.Resampling.BOX), dtype=np.uint8)
    heat = model_evidence.upsample(
        model_evidence.evidence(class_maps, CLASS_KEYS.index(label)), rows, columns)
    rgb = overlay(gray, heat)
    return draw_legend(rgb, legend_lines(label, probabilities, model_text, validated),
                       warning=not validated)


def overlay(gray: NDArray[np.uint8], heat: NDArray[np.float32]) -> NDArray[np.uint8]:
    """``heat`` ([0, 1]) in Turbo colours over ``gray``, opaque in proportion to how far
    it rises above :data:`FLOOR`.

    The map is quantised to 256 levels (as its colours are); colour and opacity are
    256-entry tables applied by Pillow, and the blend is Pillow's composite, all in
    C: a 2048 x 2048 image takes tens of milliseconds, not the quarter second of the
    same arithmetic in float32 numpy.
    """
    # heat is in [0, 1]: + 0.5 and truncation round to the nearest level.
    levels = Image.fromarray((heat * 255.0 + 0.5).astype(np.uint8), mode="L")
    colours = levels.convert("P")
    colours.putpalette(_LUT.tobytes())
    mask = levels.point(_OPACITY)
    base = Image.fromarray(gray, mode="L").convert("RGB")
    return np.asarray(Image.composite(colours.convert("RGB"), base, mask), dtype=np.uint8)


def font_size(rows: int, columns: int) -> int:
    """The legend's font size in pixels: about 1/48 of the image's shorter side, at
    least 13 (legible on a 440-pixel image)."""
    return max(13, round(min(rows, columns) / 48))


def draw_legend(rgb: NDArray[np.uint8], lines: list[str], warning: bool
                ) -> NDArray[np.uint8]:
    """``rgb`` with the legend burned into its top left corner: the lines on a darkened
    box, the first one (the finding) and, with ``warning``, the last one highlighted,
    and below them the colour scale of the map."""
    rows, columns = rgb.shape[:2]
    size = font_size(rows, columns)
    font = ImageFont.load_default(size=size)
    pad, step = size // 2, round(size * 1.25)
    names = [line.partition("\t")[0] for line in lines if "\t" in line]
    # Values right-aligned in one column, just after the longest name.
    column = max((int(font.getlength(name)) for name in names), default=0) \
        + int(font.getlength("  100.0 %"))
    width = max(column, *(int(font.getlength(line)) for line in lines if "\t" not in line))
    # Darkened, not opaque: the anatomy under the legend stays faintly visible.
    shaded = rgb.copy()
    shaded[:(len(lines) + 1) * step + 2 * pad, :width + 2 * pad] //= 4
    image = Image.fromarray(shaded)
    draw = ImageDraw.Draw(image)
    for i, line in enumerate(lines):
        colour = (255, 255, 255)
        if i == 0:
            colour = (255, 230, 120)
        elif warning and i == len(lines) - 1:
            colour = (255, 90, 90)
        left, _, right = line.partition("\t")
        draw.text((pad, pad + i * step), left, font=font, fill=colour)
        if right:
            draw.text((pad + column, pad + i * step), right, font=font, fill=colour,
                      anchor="ra")
    _colour_bar(draw, font, pad, pad + len(lines) * step, width)
    return np.asarray(image, dtype=np.uint8)


def _colour_bar(draw: ImageDraw.ImageDraw, font: ImageFont.FreeTypeFont | ImageFont.ImageFont,
                x0: int, y0: int, width: int) -> None:
    """The map's colour scale as drawn, from :data:`FLOOR` (below it, no colour) to the
    most, on a line of the legend starting at (x0, y0) and ``width`` long."""
    low, high = "evidence: low", "high"
    size = int(getattr(font, "size", 11))
    start = x0 + int(font.getlength(low)) + size // 2
    end = x0 + width - int(font.getlength(high)) - size // 2
    draw.text((x0, y0), low, font=font, fill=(255, 255, 255))
    draw.text((x0 + width, y0), high, font=font, fill=(255, 255, 255), anchor="ra")
    top, bottom = y0 + size // 4, y0 + size * 3 // 4
    span = max(end - start, 1)
    for x in range(start, end):
        level = FLOOR + (1.0 - FLOOR) * (x - start) / span
        colour = tuple(int(v) for v in _LUT[round(level * 255)])
        draw.line([(x, top), (x, bottom)], fill=colour)


def png(rgb: NDArray[np.uint8]) -> bytes:
    """The evidence image as PNG (for the demo)."""
    out = BytesIO()
    Image.fromarray(rgb).save(out, format="PNG")
    return out.getvalue()


def series_description(label: str, validated: bool) -> str:
    """What viewers show first (LO, 64 characters): the finding, and the warning for an
    unvalidated model."""
    text = f"AI evidence: {by_key(label).display_name}"
    return (text if validated else f"{text} - UNVALIDATED MODEL")[:64]


def build_evidence(
    source: Dataset,
    rgb: NDArray[np.uint8],
    label: str,
    card: ModelCard,
    sop_instance_uid: str,
    series_instance_uid: str,
    institution_name: str | None = None,
) -> SCImage:
    """The evidence image as a Secondary Capture Image in the source's study.

    Parameters
    ----------
    source
        The classified image (its header: patient, study, the reference).
    rgb
        :func:`render`'s image, rows x columns x 3, uint8 (the source's size or
        reduced; Derivation Description says which).
    label
        The predicted class (a key of :data:`model.classes.CLASS_KEYS`).
    card
        The model's card: Contributing Equipment, the warning when not validated.
    sop_instance_uid, series_instance_uid
        The image's identity (mint them with the job, as the SR's, so that a re-sent
        image is the same object).
    institution_name
        Optional Institution Name.

    Raises
    ------
    ValueError
        highdicom finds the image or the source invalid, or an unknown label.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"rgb: expected rows x columns x 3 uint8, got {rgb.shape} {rgb.dtype}")
    header = source_header(source)
    validation = validation_status(card)
    # highdicom checks person names with a warning that quotes the name (patient data,
    # which must not reach a log): the names are copied after it has built the image.
    ref = Dataset()
    ref.update({element.tag: element for element in header
                if element.keyword not in _NAMES})
    sc = SCImage.from_ref_dataset(
        ref_dataset=ref,
        pixel_array=rgb,
        photometric_interpretation="RGB",
        bits_allocated=8,
        # highdicom asks a PATIENT image for an orientation; the value is replaced by
        # the source's own below (its rows and columns, reduced or not, run the same
        # way), empty when it has none.
        coordinate_system="PATIENT",
        patient_orientation=("P", "F"),
        series_instance_uid=series_instance_uid,
        series_number=SERIES_NUMBER,
        sop_instance_uid=sop_instance_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=NODE_NAME,
        software_versions=__version__,
        device_serial_number=None,
        institution_name=institution_name,
        series_description=series_description(label, validation.validated),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        contributing_equipment=[model_equipment(
            card, "Class-activation map of the chest radiograph classification")],
    )
    # Every attribute of the Patient and Study modules the source has (issuers, other
    # IDs, age, study description...), as the SR copies them: a PACS files both under
    # the same patient and study. The names were held back above; the copy, like the
    # lines below, writes them in without validating them.
    sc.copy_patient_and_study_information(header)
    for keyword in _NAMES:
        sc[keyword].value = header[keyword].value
    # The source's rows and columns, at most reduced, and its body part: its
    # orientation (Type 2, empty when it has none), body part and laterality hold.
    # Laterality (Type 2C) is required unless the body part says unpaired: empty
    # (unknown) when the source says neither.
    sc["PatientOrientation"].value = header.get("PatientOrientation") or ""
    for keyword in ("BodyPartExamined", "Laterality"):
        if keyword in header:
            sc[keyword] = header[keyword]
    if "BodyPartExamined" not in sc and "Laterality" not in sc:
        sc.Laterality = ""
    sc.ConversionType = "WSD"
    sc.BurnedInAnnotation = "YES"
    sc.SecondaryCaptureDeviceManufacturer = MANUFACTURER
    sc.SecondaryCaptureDeviceManufacturerModelName = NODE_NAME
    sc.SecondaryCaptureDeviceSoftwareVersions = __version__
    rows, columns = rgb.shape[:2]
    if (rows, columns) != (header.get("Rows"), header.get("Columns")):
        sc.DerivationDescription = (f"{DERIVATION}; reduced from {header.get('Rows')} x "
                                    f"{header.get('Columns')} to {rows} x {columns}")
    else:
        sc.DerivationDescription = DERIVATION
    sc.SourceImageSequence = [_source_reference(header)]
    if _lossy(header):  # once lossy, always lossy (PS3.3 C.7.6.1.1.5)
        sc.LossyImageCompression = "01"
        for keyword in ("LossyImageCompressionRatio", "LossyImageCompressionMethod"):
            if keyword in header:
                sc[keyword] = header[keyword]
    set_model_device_uid(sc, card)
    return sc


def warm_up(card: ModelCard) -> None:
    """Build one evidence image of a made-up source: highdicom reads its tables of the
    standard (about 0.5 s, once per process) before the first real image."""
    source = Dataset()
    source.SOPClassUID = SecondaryCaptureImageStorage
    source.SOPInstanceUID, source.StudyInstanceUID = generate_uid(), generate_uid()
    source.Rows = source.Columns = 64
    source.SamplesPerPixel, source.PhotometricInterpretation = 1, "MONOCHROME2"
    source.BitsAllocated = source.BitsStored = 8
    source.HighBit, source.PixelRepresentation = 7, 0
    source.PixelData = bytes(64 * 64)
    rgb = render(source, np.zeros((2, 2, len(CLASS_KEYS)), dtype=np.float32), CLASS_KEYS[0],
                 dict.fromkeys(CLASS_KEYS, 1.0 / len(CLASS_KEYS)), card.name, False)
    build_evidence(source, rgb, CLASS_KEYS[0], card, generate_uid(), generate_uid()
                   ).save_as(BytesIO(), enforce_file_format=True)


def _source_reference(source: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    item.PurposeOfReferenceCodeSequence = [SOURCE_PURPOSE]
    return item


def _lossy(source: Dataset) -> bool:
    """Whether the source's pixels were ever lossy compressed, as far as it says."""
    meta = getattr(source, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    return str(source.get("LossyImageCompression", "")) == "01" or syntax in _LOSSY
