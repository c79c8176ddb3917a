"""Post-training int8 quantisation, validated before it can serve.

``dicom-node model quantize MODEL --calibration DIR --validation DIR --out DIR``:

1. The fp32 artifact is converted to OpenVINO with the evidence features as a
   second output (:func:`model.engine.with_features`), so the int8 model serves
   evidence images too.
2. NNCF's post-training quantisation (``nncf.quantize``) measures each
   activation's range on the calibration images -- the user's own, a few hundred
   from their PACS, through the same preprocessing as inference
   (:func:`model.preprocess.load`) -- and inserts int8 quantise/dequantise pairs
   that OpenVINO's CPU plugin fuses into int8 kernels (AVX2, AVX-512 VNNI, AMX).
3. Both models classify the validation images through :class:`model.engine.Engine`,
   exactly as they would serve: top-1 agreement, the largest probability difference,
   the fp32 model's mean top probability (parity on near-uniform outputs proves
   little), and per class the sensitivity and specificity of each model where a
   ``labels.csv`` (``filename,label``) names the truth.
4. The artifact (IR, head weights, card with a :class:`model.card.QuantizationRecord`
   and a new Device UID) is written to a staging directory and renamed into place.

The int8 card keeps the fp32 card's test evidence and operating points; whether it
may use them is judged from the recorded parity (:data:`model.card.INT8_PARITY`)
by :func:`model.card.validation_status`, and ``model install`` refuses it when it
misses the configured bounds.
"""

from __future__ import annotations

import csv
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from model import card as model_card
from model import engine as model_engine
from model import preprocess
from model.classes import CLASS_KEYS

LOGGER = logging.getLogger(__name__)

Preset = Literal["mixed", "performance"]
#: Below this many calibration images the activation ranges are a guess (NNCF's
#: default subset is 300); quantisation goes on, with a warning.
RECOMMENDED_CALIBRATION_IMAGES = 300
LABELS_FILE = "labels.csv"
#: Operations kept in fp32 (name patterns of the converted model): the 1x1 fusion
#: convolution and the Dense head. They are under 1 % of the compute, and an error
#: there reaches the logits undamped; in fp32 the evidence maps (int8 features through
#: the fp32 head) also add up to the served logits exactly.
FP32_LAYERS = (f".*{model_engine.FEATURES_LAYER}.*", f".*{model_engine.HEAD_LAYER}.*")


class QuantizeError(ValueError):
    """The inputs cannot make an int8 model; the message says why."""


@dataclass(frozen=True)
class ImageSet:
    """Images read from a folder: the network inputs, their file names and sha256
    digests, and the names of the files that could not be read, with why."""

    tensors: NDArray[np.float32]
    names: list[str]
    digests: list[str]
    unreadable: dict[str, str]


def image_files(folder: Path) -> list[Path]:
    """The candidate image files of ``folder`` (not recursive): every regular file but
    hidden ones and ``labels.csv``, sorted (DICOM files often have no suffix)."""
    if not folder.is_dir():
        raise QuantizeError(f"{folder} is not a folder")
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.name != LABELS_FILE)


def read_images(folder: Path, size: int, interpolation: str) -> ImageSet:
    """Every readable image of ``folder`` as a network input."""
    tensors, names, digests, unreadable = [], [], [], {}
    for path in image_files(folder):
        try:
            tensors.append(preprocess.load(path, size, interpolation))  # type: ignore[arg-type]
        except preprocess.PreprocessError as exc:
            unreadable[path.name] = str(exc)
            continue
        names.append(path.name)
        digests.append(model_card.sha256_file(path))
    stacked = (np.stack(tensors) if tensors else
               np.zeros((0, size, size, 3), dtype=np.float32))
    return ImageSet(stacked, names, digests, unreadable)


def read_labels(path: Path) -> dict[str, str]:
    """``filename -> label`` from a CSV with those two columns (others are ignored)."""
    labels: dict[str, str] = {}
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"filename", "label"} <= set(reader.fieldnames):
            raise QuantizeError(f"{path.name}: needs the columns filename and label")
        for row in reader:
            label = row["label"].strip().lower()
            if label not in CLASS_KEYS:
                raise QuantizeError(f"{path.name}: label {row['label']!r} of "
                                    f"{row['filename']!r} is not one of {list(CLASS_KEYS)}")
            labels[Path(row["filename"]).name] = label
    return labels


def parity_record(reference: NDArray[np.float32], candidate: NDArray[np.float32],
                  truth: list[str | None]) -> dict[str, Any]:
    """The parity and per-class figures of ``candidate`` against ``reference``
    (probabilities N x 3), with ``truth`` the label of each image or None.

    Returns the :class:`model.card.QuantizationRecord` fields they fill.
    """
    if reference.shape != candidate.shape or len(reference) != len(truth):
        raise ValueError("reference, candidate and truth must describe the same images")
    if len(reference) == 0:
        raise QuantizeError("no validation images could be read")
    ref_top, cand_top = np.argmax(reference, axis=1), np.argmax(candidate, axis=1)
    parity = model_engine.compare(reference, candidate)
    record: dict[str, Any] = {
        "validation_images": len(reference),
        "top1_agreement": parity.top1_agreement,
        "max_probability_difference": parity.max_abs_diff,
        "mean_top_probability": float(np.mean(np.max(reference, axis=1))),
    }
    labelled = np.array([label is not None for label in truth])
    record["labelled_images"] = int(labelled.sum())
    per_class: dict[str, dict[str, float]] = {}
    if labelled.any():
        target = np.array([CLASS_KEYS.index(label) for label in truth if label is not None])
        for index, key in enumerate(CLASS_KEYS):
            positive = target == index
            figures: dict[str, float] = {"positives": int(positive.sum()),
                                         "negatives": int((~positive).sum())}
            for name, top in (("fp32", ref_top[labelled]), ("int8", cand_top[labelled])):
                if positive.any():
                    figures[f"sensitivity_{name}"] = float(np.mean(top[positive] == index))
                if (~positive).any():
                    figures[f"specificity_{name}"] = float(np.mean(top[~positive] != index))
            per_class[key] = figures
    record["per_class"] = per_class
    return record


def quantize(
    source: Path,
    calibration: Path,
    validation: Path,
    out: Path,
    labels: Path | None = None,
    version: str | None = None,
    preset: Preset = "mixed",
    threads: int = 0,
) -> model_card.ModelCard:
    """Make an int8 artifact at ``out`` from the fp32 artifact ``source`` (see the
    module's docstring); return its card.

    Parameters
    ----------
    source
        The fp32 artifact.
    calibration
        Folder of images whose activations set the int8 ranges.
    validation
        Folder of images on which parity is measured.
    out
        The new artifact directory (must not exist).
    labels
        CSV ``filename,label`` of the validation images (default: ``labels.csv`` in
        ``validation`` when there is one).
    version
        The int8 model's version (default: the source's with ``-int8``).
    preset
        NNCF's preset: mixed (asymmetric activations) or performance.
    threads
        CPU threads of the two engines that measure parity (0: all).

    Raises
    ------
    QuantizeError
        ``source`` is already int8, ``out`` exists, or no image could be read.
    model.card.ModelIntegrityError
        ``source`` does not match its card.
    """
    import nncf
    import openvino as ov

    source_card = model_card.verify(source)
    if source_card.precision == "int8":
        raise QuantizeError(f"{source} is already int8; quantize its fp32 source")
    if out.exists():
        raise QuantizeError(f"{out} exists; choose a new directory")
    size, interpolation = source_card.input_size, source_card.interpolation
    calibrating = read_images(calibration, size, interpolation)
    validating = read_images(validation, size, interpolation)
    for what, folder, images in (("calibration", calibration, calibrating),
                                 ("validation", validation, validating)):
        for name, why in images.unreadable.items():
            LOGGER.warning("%s image %s skipped: %s", what, name, why)
        if not images.names:
            raise QuantizeError(f"no {what} image could be read in {folder}")
    if len(calibrating.names) < RECOMMENDED_CALIBRATION_IMAGES:
        LOGGER.warning("%d calibration images; %d or more from your own PACS give "
                       "steadier activation ranges", len(calibrating.names),
                       RECOMMENDED_CALIBRATION_IMAGES)
    labels = labels or (validation / LABELS_FILE if (validation / LABELS_FILE).is_file()
                        else None)
    truth_of = read_labels(labels) if labels is not None else {}
    truth: list[str | None] = [truth_of.get(name) for name in validating.names]

    import keras

    fp32 = keras.models.load_model(source / source_card.weights_file, compile=False)
    ov_model = model_engine.to_openvino(model_engine.with_features(fp32))
    kernel, bias = model_engine.head_weights(fp32)
    del fp32
    quantized = nncf.quantize(
        ov_model,
        nncf.Dataset(list(calibrating.tensors), lambda image: image[None]),
        subset_size=len(calibrating.names),
        preset=(nncf.QuantizationPreset.MIXED if preset == "mixed"
                else nncf.QuantizationPreset.PERFORMANCE),
        ignored_scope=nncf.IgnoredScope(patterns=list(FP32_LAYERS), validate=False),
    )

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=".quantize-"))
    try:
        ov.save_model(quantized, str(staging / model_card.INT8_GRAPH_FILE),
                      compress_to_fp16=False)
        np.savez(staging / model_card.HEAD_FILE, kernel=kernel, bias=bias)
        # By content (parity on calibration images is optimistic: the card says so).
        calibrated = set(calibrating.digests)
        overlap = sum(digest in calibrated for digest in validating.digests)
        record: dict[str, Any] = {
            "toolkit": f"nncf {nncf.__version__}, openvino {ov.__version__}",
            "preset": preset, "source_version": source_card.display_version,
            "source_sha256": source_card.sha256,
            "source_device_uid": source_card.device_uid,
            "calibration_images": len(calibrating.names), "overlap_images": overlap,
            # Until measured below: a card that says nothing passed.
            "validation_images": 0, "top1_agreement": 0.0,
            "max_probability_difference": 1.0, "mean_top_probability": 0.0,
        }
        card = _int8_card(source_card, staging, version, record)
        model_card.write_card(staging, card)

        reference = model_engine.Engine(source, backend="keras-fp32", device="cpu",
                                        batch_size=8, threads=threads)
        expected = reference.predict(validating.tensors)
        del reference
        candidate = model_engine.Engine(staging, backend="openvino-int8", batch_size=8,
                                        threads=threads)
        actual = candidate.predict(validating.tensors)
        record.update(parity_record(expected, actual, truth))
        card = card.model_copy(update={
            "quantization": model_card.QuantizationRecord.model_validate(record)})
        model_card.write_card(staging, card)
        model_card.verify(staging)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return card


def _int8_card(source: model_card.ModelCard, staging: Path, version: str | None,
               record: dict[str, Any]) -> model_card.ModelCard:
    """The int8 model's card: the source's identity, provenance and evidence, its own
    files, version, Device UID and quantisation record."""
    import nncf
    import openvino as ov
    from pydicom.uid import generate_uid

    graph = staging / model_card.INT8_GRAPH_FILE
    weights = graph.with_suffix(".bin")
    if weights.name != model_card.INT8_WEIGHTS_FILE:
        raise RuntimeError(f"OpenVINO wrote {weights.name}, expected "
                           f"{model_card.INT8_WEIGHTS_FILE}")
    fields = source.model_dump()
    fields.update(
        version=version or f"{source.version}-int8",
        weights_file=model_card.INT8_WEIGHTS_FILE,
        sha256=model_card.sha256_file(weights),
        precision="int8",
        extra_files={
            model_card.INT8_GRAPH_FILE: model_card.sha256_file(graph),
            model_card.HEAD_FILE: model_card.sha256_file(staging / model_card.HEAD_FILE),
        },
        # Another model (its outputs differ from the source's): another device.
        device_uid=generate_uid(),
        created_at=datetime.now(UTC).isoformat(),
        framework={**source.framework, "openvino": ov.__version__, "nncf": nncf.__version__},
        notes=(f"int8 quantisation of {source.name} {source.display_version} "
               f"(sha256 {source.sha256[:16]}). " + source.notes).strip(),
        quantization=model_card.QuantizationRecord.model_validate(record),
    )
    return model_card.ModelCard.model_validate(fields)
