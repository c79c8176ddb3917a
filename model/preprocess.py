"""DICOM or image file -> float32 H x W x 3 in [0, 1], the way the network was trained.

The paper's pipeline fed 8-bit grayscale PNGs to Keras with ``rescale=1/255``
and the authors evaluated with ``cv2.resize`` (bilinear) to 300x300, the gray
image replicated on three channels. For DICOM we first reproduce that 8-bit
image: decode (compressed syntaxes through pylibjpeg/openjpeg/pyjpegls), the
Modality LUT, the VOI LUT or the first window (a min-max fallback when there is
none), MONOCHROME1 inverted, scaled to 0..255. PNG/JPEG files take the same
8-bit path from the start, so the same pixels give the same tensor.
"""

from __future__ import annotations

import functools
import mmap
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray
from PIL import Image
from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import (  # type: ignore[attr-defined]
    apply_modality_lut,
    apply_voi_lut,
    pixel_array,
)
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

Interpolation = Literal["bilinear", "nearest"]
#: The authors' evaluation resized with cv2.resize's default, bilinear.
DEFAULT_INTERPOLATION: Interpolation = "bilinear"
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
#: Elements longer than this are left on disk when a source is read (the pixel data),
#: and read when they are used.
DEFER_BYTES = 256 * 1024
_PIXEL_DATA = 0x7FE00010
_NATIVE = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


class PreprocessError(ValueError):
    """The file cannot be turned into a network input; the message says why."""


#: What a decoder's failure must never be mistaken for. Anything else escaping a pixel
#: decoder -- including pyo3's ``PanicException``, which the Rust decoders
#: (pylibjpeg-rle) raise on crafted data and which derives from BaseException, not
#: Exception -- means the pixel data cannot be decoded.
MUST_PROPAGATE = (KeyboardInterrupt, SystemExit, GeneratorExit)


def _pixels(ds: Dataset, **options: Any) -> NDArray[Any]:
    """``pydicom.pixels.pixel_array(ds, **options)``; PreprocessError when it fails."""
    try:
        decoded: NDArray[Any] = pixel_array(ds, **options)
    except MUST_PROPAGATE:
        raise
    except BaseException as exc:  # see MUST_PROPAGATE
        raise PreprocessError(f"pixel data cannot be decoded: {type(exc).__name__}") from exc
    return decoded


def load(path: Path, size: int, interpolation: Interpolation = DEFAULT_INTERPOLATION
         ) -> NDArray[np.float32]:
    """Read a DICOM or image file and return the network input (size x size x 3, [0, 1])."""
    if path.suffix.lower() in _IMAGE_SUFFIXES:
        return to_tensor(image_gray8(path), size, interpolation)
    return dicom_tensor(_read_dicom(path), size, interpolation)


def read_gray8(path: Path) -> NDArray[np.uint8]:
    """The 8-bit grayscale image the network's training data were made of."""
    if path.suffix.lower() in _IMAGE_SUFFIXES:
        return image_gray8(path)
    return dicom_gray8(_read_dicom(path))


def _read_dicom(path: Path) -> Dataset:
    try:
        return read_source(path, force=True)
    except Exception as exc:
        raise PreprocessError(f"{path.name}: not DICOM and not an image file") from exc


def read_source(path: Path, force: bool = False) -> Dataset:
    """A DICOM file read for classification: its header in memory, its pixel data (any
    element over :data:`DEFER_BYTES`) left on disk until used.

    :func:`dicom_tensor` then maps only the first frame of uncompressed pixel data,
    instead of reading the whole element into fresh memory (a 2048 x 2048 source is
    8 MB); anything else that uses the pixels (pydicom's ``pixel_array``, the evidence
    image) reads them from the file as pydicom does.
    """
    return dcmread(path, force=force, defer_size=DEFER_BYTES)


def image_gray8(path: Path) -> NDArray[np.uint8]:
    """A PNG/JPEG as 8-bit gray (RGB is converted with ITU-R 601 luma, as cv2 does)."""
    try:
        with Image.open(path) as img:
            if img.mode in ("I;16", "I;16B", "I"):
                data = np.asarray(img, dtype=np.float64)
                return _stretch(data)
            return np.asarray(img.convert("L"), dtype=np.uint8)
    except OSError as exc:
        raise PreprocessError(f"{path.name}: cannot read image: {exc}") from exc


def dicom_gray8(ds: Dataset) -> NDArray[np.uint8]:
    """Decode a DICOM image and map it to 8-bit gray as displayed (PS3.3 C.11)."""
    stored, lut = _decode_with_lut(ds)
    if lut is None:
        return stored  # colour or wide data, already mapped by the direct path
    gray: NDArray[np.uint8] = lut[stored]
    return gray


def dicom_tensor(ds: Dataset, size: int,
                 interpolation: Interpolation = DEFAULT_INTERPOLATION) -> NDArray[np.float32]:
    """The network input for a DICOM image; equal to ``to_tensor(dicom_gray8(ds), ...)``.

    Bilinear resizing reads only the four source pixels each output pixel lies
    between, so only those go through the lookup table: a 2048 x 2048 radiograph
    costs 4 x 300 x 300 lookups, not 4 M. They are gathered as the rows, then the
    columns, they lie on (indices kept per source shape and size); a frame left on
    disk is mapped, not copied (a source without a window is still read whole, for
    the range it is stretched over).
    """
    stored, lut = _decode_with_lut(ds)
    if lut is None:
        return to_tensor(stored, size, interpolation)
    if interpolation != "bilinear":
        return to_tensor(lut[stored], size, interpolation)
    rows, columns, xs, ys = _separable_taps(*stored.shape, size)
    # The rows, then the columns, each output pixel lies between (2 size x 2 size,
    # nearest rows and columns first), as gray: four blocks of its neighbours,
    # top-left, top-right, bottom-left, bottom-right; then _bilinear's arithmetic,
    # operation for operation.
    near = np.take(np.take(stored, rows, axis=0), columns, axis=1)
    src = np.take(lut.astype(np.float32), near)
    top = src[:size, :size] * (1 - xs) + src[:size, size:] * xs
    bottom = src[size:, :size] * (1 - xs) + src[size:, size:] * xs
    out = top * (1 - ys[:, None]) + bottom * ys[:, None]
    return _channels(np.clip(np.rint(out), 0, 255).astype(np.uint8))


@functools.lru_cache(maxsize=8)
def _separable_taps(h: int, w: int, size: int
                    ) -> tuple[NDArray[np.intp], NDArray[np.intp], NDArray[np.float32],
                               NDArray[np.float32]]:
    """The rows of an ``h`` x ``w`` image each output row lies between (the upper of
    each pair, then the lower: 2 ``size``), the columns likewise, and the column and
    row weights."""
    ys, y0, y1 = _taps(h, size)
    xs, x0, x1 = _taps(w, size)
    rows, columns = np.concatenate([y0, y1]), np.concatenate([x0, x1])
    for array in (rows, columns, xs, ys):
        array.flags.writeable = False
    return rows, columns, xs, ys


def _decode_with_lut(ds: Dataset) -> tuple[NDArray[Any], NDArray[np.uint8] | None]:
    """The first frame's stored bit patterns and the table mapping each to 8-bit gray.

    For single-sample integer data of up to 16 bits the display pipeline
    (:func:`_display_gray8`) is pointwise, so it is run once over every possible
    bit pattern (65,536 at most) instead of over every pixel. The table also
    clears the unused high bits and sign-extends, as pydicom's decoder would, so
    its input is the undecorated buffer (a view, for native transfer syntaxes).
    Otherwise returns ``(gray8, None)``, computed directly.
    """
    if "PixelData" not in ds:
        raise PreprocessError("DICOM file without Pixel Data")
    meta = getattr(ds, "file_meta", None)
    if meta is None or "TransferSyntaxUID" not in meta:
        # A bare data set (no Part 10 header) is Implicit VR Little Endian by default.
        ds.file_meta = meta if meta is not None else FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    colour = int(ds.get("SamplesPerPixel", 1)) != 1
    bits_stored = int(ds.get("BitsStored", 0) or 0)
    # A single frame is decoded as the whole pixel data, as the node's intake decoded it
    # before acknowledging: pydicom's per-frame path parses encapsulated fragments more
    # strictly (the fuzzer found a JPEG-LS file that one accepts and the other refuses).
    frame = 0 if _frames(ds) > 1 else None
    native = None if colour else _native_frame(ds)
    if native is not None:
        pixels = native
    elif colour:
        pixels = _pixels(ds, index=frame)
    else:
        pixels = _pixels(ds, index=frame, view_only=True, correct_unused_bits=False)
    if colour or pixels.ndim == 3:
        rgb = np.asarray(pixels, dtype=np.float64)
        gray = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
        return np.clip(np.rint(gray), 0, 255).astype(np.uint8), None
    if pixels.dtype.kind not in "iu" or pixels.itemsize > 2 \
            or not 0 < bits_stored <= 8 * pixels.itemsize:
        # 32-bit stored values: no table; the pipeline runs on the corrected pixels.
        corrected = _pixels(ds, index=0)
        return _display_gray8(corrected, ds), None
    if not pixels.dtype.isnative:  # Explicit VR Big Endian (retired) viewed as stored
        pixels = pixels.astype(pixels.dtype.newbyteorder("="))
    bits = 8 * pixels.itemsize
    # The stored value of each bit pattern is its low ``bits_stored`` bits: the display
    # pipeline runs over those 2**bits_stored values (4,096 for 12 bits), and each
    # pattern takes its value's gray.
    values = np.arange(2**bits_stored, dtype=np.int64)
    if pixels.dtype.kind == "i":  # sign-extend from the stored high bit, as pydicom does
        values -= (values >> (bits_stored - 1)) * 2**bits_stored
    values = values.astype(pixels.dtype)
    low_bits = np.arange(2**bits, dtype=np.uint32) & (2**bits_stored - 1)
    stored = pixels.view(np.dtype(f"u{pixels.itemsize}"))
    stretch = None
    if not _has_voi(ds) and not _already_8bit(ds):
        stretch = _modality_range(pixels, stored, ds, bits_stored, values, low_bits)
    return stored, _display_gray8(values, ds, stretch).take(low_bits)


def _modality_range(pixels: NDArray[Any], stored: NDArray[Any], ds: Dataset,
                    bits_stored: int, values: NDArray[Any], low_bits: NDArray[np.uint32]
                    ) -> tuple[float, float]:
    """The least and greatest Modality LUT output over the image's stored values: the
    range a source without a window is stretched over. ``pixels`` as their type reads
    them (signed or not), ``stored`` the same bits viewed unsigned.

    A rescale (or none) is monotonic, so its extremes are those of the least and
    greatest stored value; where no unused high bit is set (nor sign extension
    broken) those are the pixels' own, two passes over the frame. Otherwise (a
    Modality LUT Sequence, junk in the unused bits) every bit pattern present is
    counted and its value mapped: for a 2048 x 2048 frame about 25 ms instead of 0.3.
    """
    if not ds.get("ModalityLUTSequence"):
        low, high = pixels.min(), pixels.max()
        signed = pixels.dtype.kind == "i"
        first = -(2 ** (bits_stored - 1)) if signed else 0
        last = 2 ** (bits_stored - 1) - 1 if signed else 2**bits_stored - 1
        if first <= low and high <= last:  # every pixel is its stored value
            ends = np.asarray(apply_modality_lut(np.array([low, high], dtype=pixels.dtype), ds),
                              dtype=np.float64)
            return float(np.min(ends)), float(np.max(ends))
    present = np.bincount(low_bits.take(stored.ravel()), minlength=2**bits_stored) > 0
    modality = np.asarray(apply_modality_lut(values[present], ds), dtype=np.float64)
    return float(np.min(modality)), float(np.max(modality))


def _native_frame(ds: Dataset) -> NDArray[Any] | None:
    """The first frame's stored values, as pydicom's ``pixel_array(ds, view_only=True,
    correct_unused_bits=False)`` gives them, for uncompressed little-endian grayscale of
    8 or 16 bits whose attributes are all present and sane and whose pixel data are
    long enough; None for anything else (pydicom decodes it, or says why it cannot).

    Pixel data left on disk by :func:`read_source` are mapped here (read-only), the
    first frame only: pages are read as the array is.
    """
    try:
        return _read_native_frame(ds)
    except Exception:  # an attribute pydicom cannot convert, a file gone: pydicom decides
        return None


def _read_native_frame(ds: Dataset) -> NDArray[Any] | None:
    meta = getattr(ds, "file_meta", None)
    if meta is None or meta.get("TransferSyntaxUID") not in _NATIVE:
        return None
    if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
        return None  # pydicom refuses more than one kind of pixel data
    rows, columns = int(ds.Rows), int(ds.Columns)
    allocated, stored = int(ds.BitsAllocated), int(ds.BitsStored)
    representation, samples = int(ds.PixelRepresentation), int(ds.SamplesPerPixel)
    photometric = str(ds.PhotometricInterpretation)
    frames = int(ds.get("NumberOfFrames", 1))
    if (samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2")
            or allocated not in (8, 16) or not 0 < stored <= allocated
            or representation not in (0, 1) or not 0 < rows < 2**16
            or not 0 < columns < 2**16 or frames < 1):
        return None
    dtype = np.dtype(f"<{'i' if representation else 'u'}{allocated // 8}")
    count = rows * columns
    element = ds.get_item(_PIXEL_DATA, keep_deferred=True)
    if isinstance(element, RawDataElement) and element.value is None:  # left on disk
        if (element.length == 0xFFFFFFFF or element.length < frames * count * dtype.itemsize
                # a file read by path (not through a decompressing file object), as it
                # was when it was read
                or getattr(ds, "fileobj_type", None) is not open
                or not isinstance(ds.filename, str)):
            return None
        with open(ds.filename, "rb", buffering=0) as file:
            if os.fstat(file.fileno()).st_mtime != getattr(ds, "timestamp", None):
                return None
            # Mapped, not copied: resizing reads a few hundred of a radiograph's rows
            # (8 MB copied took a quarter of the decoding, and pushed the network's
            # data out of the caches). The array keeps the mapping, which outlives an
            # unlinked file (retention). A file cut short in place while mapped, or a
            # disk's read error, ends the process (SIGBUS) where a read would have
            # raised: the node's spool files are written once and renamed, never
            # changed in place, and a job whose worker died is retried, then failed
            # after max_attempts.
            mapped: Any = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
        # A file shorter than its header says: ValueError, and pydicom decides.
        return np.frombuffer(mapped, dtype, count=count, offset=element.value_tell
                             ).reshape(rows, columns)
    data = ds.PixelData
    if not isinstance(data, bytes) or len(data) < frames * count * dtype.itemsize:
        return None
    return np.frombuffer(data, dtype, count=count).reshape(rows, columns)


def _frames(ds: Dataset) -> int:
    try:
        return int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        return 1


def _has_voi(ds: Dataset) -> bool:
    return "VOILUTSequence" in ds or ("WindowCenter" in ds and "WindowWidth" in ds)


def _already_8bit(ds: Dataset) -> bool:
    return (int(ds.get("BitsStored", 8)) <= 8 and int(ds.get("PixelRepresentation", 0)) == 0
            and "RescaleSlope" not in ds)


def _display_gray8(pixels: NDArray[Any], ds: Dataset,
                   stretch: tuple[float, float] | None = None) -> NDArray[np.uint8]:
    """Stored values -> 8-bit gray: Modality LUT, VOI LUT or first window (else min-max
    over the image, or over ``stretch`` when given), MONOCHROME1 inverted.
    PreprocessError when the file's display attributes cannot be applied (a Window
    Center that is not a number, a malformed LUT): the image cannot be shown as it
    would be read, so it is not classified."""
    try:
        return _display(pixels, ds, stretch)
    except (PreprocessError, *MUST_PROPAGATE):
        raise
    except BaseException as exc:  # see MUST_PROPAGATE
        raise PreprocessError(f"display attributes cannot be applied: {type(exc).__name__}"
                              ) from exc


def _display(pixels: NDArray[Any], ds: Dataset,
             stretch: tuple[float, float] | None) -> NDArray[np.uint8]:
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    values = apply_modality_lut(pixels, ds)
    if _has_voi(ds):
        values = apply_voi_lut(values, ds, index=0)
        low, high = _voi_output_range(ds)
        # In place, one array: a 2048x2500 image is 40 MB of float64 per copy.
        out = np.asarray(values, dtype=np.float64)  # apply_voi_lut returned a new array
        out -= low
        out /= max(high - low, 1e-9)
        out *= 255.0
        np.clip(out, 0.0, 255.0, out=out)
    elif _already_8bit(ds):
        out = np.asarray(values, dtype=np.float64)  # already the 8-bit image
    else:
        out = _stretch(np.asarray(values, dtype=np.float64), stretch).astype(np.float64)
    if photometric == "MONOCHROME1":
        np.subtract(255.0, out, out=out)
    np.rint(out, out=out)
    return np.clip(out, 0, 255).astype(np.uint8)


def _voi_output_range(ds: Dataset) -> tuple[float, float]:
    """The output range of pydicom's VOI transform: the LUT's bit depth when a VOI LUT
    is applied (pydicom prefers it to a window), else the window's range -- the
    stored values' range carried through Rescale Slope/Intercept (PS3.3 C.11.2.1.2)."""
    if "VOILUTSequence" in ds:
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        return 0.0, float(2**bits - 1)
    bits = int(ds.get("BitsStored", 16))
    if int(ds.get("PixelRepresentation", 0)) == 1:
        low, high = float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    else:
        low, high = 0.0, float(2**bits - 1)
    if "RescaleSlope" in ds and "RescaleIntercept" in ds:
        slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        low, high = low * slope + intercept, high * slope + intercept
    return low, high


def _stretch(data: NDArray[np.float64], limits: tuple[float, float] | None = None
             ) -> NDArray[np.uint8]:
    """Min-max to 0..255 (of ``data``, or of ``limits``): the fallback when the file
    carries no window."""
    low, high = limits if limits is not None else (float(np.min(data)), float(np.max(data)))
    if high <= low:
        return np.zeros(data.shape, dtype=np.uint8)
    return np.clip(np.rint((data - low) / (high - low) * 255.0), 0, 255).astype(np.uint8)


def resize_gray8(image: NDArray[np.uint8], size: int,
                 interpolation: Interpolation = DEFAULT_INTERPOLATION) -> NDArray[np.uint8]:
    """Resize to size x size, aspect ratio not kept, as the paper did.

    ``bilinear`` follows cv2.resize's INTER_LINEAR (half-pixel centres, no
    anti-aliasing), which the authors evaluated with; ``nearest`` follows
    Keras' ``load_img`` default, which their training generator used.
    """
    h, w = image.shape
    if interpolation == "nearest":
        return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.NEAREST))
    ys, y0, y1 = _taps(h, size)
    xs, x0, x1 = _taps(w, size)
    return _bilinear(image, ys, y0, y1, xs, x0, x1)


def _bilinear(image: NDArray[np.uint8], ys: NDArray[np.float32], y0: NDArray[np.intp],
              y1: NDArray[np.intp], xs: NDArray[np.float32], x0: NDArray[np.intp],
              x1: NDArray[np.intp]) -> NDArray[np.uint8]:
    """Interpolate ``image`` at the rows/columns ``y0``/``y1`` and ``x0``/``x1``."""
    src = image.astype(np.float32)
    top = src[y0][:, x0] * (1 - xs) + src[y0][:, x1] * xs
    bottom = src[y1][:, x0] * (1 - xs) + src[y1][:, x1] * xs
    out = top * (1 - ys[:, None]) + bottom * ys[:, None]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _taps(n_in: int, n_out: int) -> tuple[NDArray[np.float32], NDArray[np.intp], NDArray[np.intp]]:
    scale = n_in / n_out
    centre = (np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5
    centre = np.clip(centre, 0, n_in - 1)
    i0 = np.floor(centre).astype(np.intp)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return (centre - i0).astype(np.float32), i0, i1


def to_tensor(gray8: NDArray[np.uint8], size: int,
              interpolation: Interpolation = DEFAULT_INTERPOLATION) -> NDArray[np.float32]:
    """8-bit gray -> size x size x 3 float32 in [0, 1] (rescale 1/255, gray on 3 channels)."""
    if gray8.ndim != 2:
        raise PreprocessError(f"expected a 2-D gray image, got shape {gray8.shape}")
    return _channels(resize_gray8(gray8, size, interpolation))


def _channels(resized: NDArray[np.uint8]) -> NDArray[np.float32]:
    scaled = resized.astype(np.float32) / 255.0
    return np.repeat(scaled[:, :, None], 3, axis=2)
