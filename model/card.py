"""Model artifacts: a directory holding the Keras file and its model card.

``model-card.json`` records what a radiologist or an auditor needs to trust a
result: name, version, architecture, input size, class order, the
preprocessing, the sha256 of the weights file, what the model was trained on
(:class:`TrainingRecord`), what it earned on a declared test set
(:class:`TestEvidence`), the per-class operating points chosen on validation
data (:class:`OperatingPoint`) -- and ``trained: false`` for an untrained demo
model. A new model version gets a new Device UID (IHE AI Results: the SR names
the model). The engine refuses a weights file whose hash does not match its card.

Whether a model may serve clinical destinations is *computed* from that evidence
by :func:`validation_status`, never read from a flag: a card is validated only
when it carries test results on a declared data set of a stated size (from
``dicom-node evaluate``, or imported with ``model import --metrics`` and signed
by a named person) whose 95 % interval of balanced accuracy lies wholly above
chance (1/3 for three classes). Images that chose the checkpoint (the paper's
protocol) are not test images: such results never validate.

An int8 artifact (``dicom-node model quantize``, :mod:`model.quantize`) is an
OpenVINO IR made from an fp32 artifact. It keeps the fp32 model's test evidence
only as far as it reproduces that model: its card records the parity measured on
validation images (:class:`QuantizationRecord`), :func:`validation_status` judges
it against :data:`INT8_PARITY` as well, and :func:`install` refuses it when it
misses the configured bounds unless forced.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field
from pydicom.uid import generate_uid

from model.classes import CLASS_KEYS

LOGGER = logging.getLogger(__name__)

CARD_FILE = "model-card.json"
WEIGHTS_FILE = "model.keras"
#: An int8 artifact's files: the OpenVINO IR (graph and weights) and the Dense head's
#: kernel and bias, from which the evidence maps are computed (:mod:`model.evidence`).
INT8_GRAPH_FILE = "model.xml"
INT8_WEIGHTS_FILE = "model.bin"
HEAD_FILE = "head.npz"
ACTIVE_LINK = "active"


#: What every output of an unvalidated model says, in its title and its text (ASCII:
#: it goes into DICOM LO/ST values and HL7 fields as it is).
UNVALIDATED_WARNING = "UNVALIDATED MODEL - NOT FOR CLINICAL USE"
#: What every result says whatever the model (the evidence image's legend, the HL7 and
#: FHIR messages); ASCII for the same reason.
AI_RESULT_NOTICE = "AI RESULT - NOT FOR DIAGNOSTIC USE"
#: Balanced accuracy of a classifier that guesses among the three classes.
CHANCE_BALANCED_ACCURACY = 1 / len(CLASS_KEYS)


@dataclass(frozen=True)
class ParityBounds:
    """How close an int8 model's outputs must be to its fp32 source's, on at least
    ``min_images`` validation images, for it to keep the source's evidence."""

    min_top1_agreement: float = 0.99
    max_probability_difference: float = 0.02
    min_images: int = 100

    def failures(self, record: QuantizationRecord) -> list[str]:
        """What ``record`` misses of these bounds, in words (empty: within them)."""
        failed = []
        if record.validation_images < self.min_images:
            failed.append(f"parity measured on {record.validation_images} images "
                          f"(at least {self.min_images})")
        if not record.top1_agreement >= self.min_top1_agreement:
            failed.append(f"top-1 agreement {record.top1_agreement:.4f} < "
                          f"{self.min_top1_agreement}")
        if not record.max_probability_difference <= self.max_probability_difference:
            failed.append(f"largest probability difference "
                          f"{record.max_probability_difference:.4f} > "
                          f"{self.max_probability_difference}")
        return failed


#: The bounds :func:`validation_status` holds an int8 card to (the issue's defaults:
#: 99 % top-1 agreement, 0.02 largest probability difference).
INT8_PARITY = ParityBounds()


class ModelIntegrityError(RuntimeError):
    """The weights file does not match the sha256 its card pins."""


class ParityError(RuntimeError):
    """An int8 model whose parity with its fp32 source misses the configured bounds."""


class UnvalidatedModelError(RuntimeError):
    """A model without the evidence :func:`validation_status` asks for, where only a
    validated one may serve."""


class TrainingRecord(BaseModel):
    """What a model was trained from and how (written by ``train`` or ``model create``)."""

    starting_weights: str = Field(
        description="imagenet, random, or file:<name> (weights of the whole network).")
    input_size: int
    epochs: int | None = Field(default=None, description="Epochs in all, over every phase.")
    phases: int | None = None
    epochs_per_phase: int | None = None
    training_images: int | None = None
    validation_images: int | None = None
    test_images: int | None = None
    data_sources: list[str] = Field(default_factory=list)
    checkpoint_chosen_on: Literal["validation", "test", "last epoch"] | None = None
    precision: str = Field(
        default="float32",
        description="The Keras dtype policy training computed in (mixed_float16 on a GPU); "
        "the saved model is float32 whatever it was.")


class TestEvidence(BaseModel):
    """Test results on a declared data set: what :func:`validation_status` judges."""

    data_set: str = Field(description="What the test set is (name, origin).")
    images: int | None = Field(default=None,
                               description="Test set size; None: the evidence is incomplete.")
    patients: int | None = Field(default=None,
                                 description="Patients in the test set; None: not known.")
    interval_unit: Literal["patient", "image"] | None = Field(
        default=None, description="What the bootstrap of the 95 % intervals drew: patients "
        "(each with all of their images) or single images (too narrow where a patient has "
        "several); None: not stated.")
    sources: list[str] = Field(default_factory=list)
    balanced_accuracy: float | None = None
    balanced_accuracy_95: list[float] | None = Field(
        default=None, description="95 % interval [low, high] of the balanced accuracy.")
    overall_accuracy: float | None = None
    #: class -> sensitivity, specificity, roc_auc and their ``*_95`` intervals (and a
    #: ``note`` when the checkpoint was chosen on these test images)
    per_class: dict[str, dict[str, Any]] = Field(default_factory=dict)
    evaluated_by: Literal["evaluate", "import"] = "evaluate"
    #: The person who supplied imported metrics and vouches for them.
    signed_by: str | None = None
    evaluated_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat())
    #: True under the paper's protocol: the checkpoint was chosen on these test images,
    #: so every figure is optimistic.
    checkpoint_chosen_on_test: bool = False


class OperatingPoint(BaseModel):
    """One class's decision threshold, chosen on validation data for a target sensitivity,
    with what it gives on the test set."""

    threshold: float = Field(ge=0.0, le=1.0)
    target_sensitivity: float = Field(gt=0.0, le=1.0)
    validation_images: int
    validation_sensitivity: float | None = None
    validation_specificity: float | None = None
    test_sensitivity: float | None = None
    test_sensitivity_95: list[float] | None = None
    test_specificity: float | None = None
    test_specificity_95: list[float] | None = None


class QuantizationRecord(BaseModel):
    """How an int8 model was made from its fp32 source, and how closely it follows it
    (written by ``dicom-node model quantize``)."""

    toolkit: str = Field(description="e.g. nncf 3.4.0, openvino 2026.4.1")
    preset: str
    source_version: str
    source_sha256: str
    source_device_uid: str
    calibration_images: int
    validation_images: int
    overlap_images: int = Field(
        default=0, description="Images both in the calibration and the validation set.")
    top1_agreement: float
    max_probability_difference: float
    mean_top_probability: float = Field(
        description="The fp32 model's mean top probability on the validation images: "
        "parity near chance-level outputs (about 0.33) proves little.")
    labelled_images: int = 0
    #: class -> sensitivity and specificity of each model on the labelled validation
    #: images (sensitivity_fp32, sensitivity_int8, specificity_fp32, specificity_int8,
    #: positives, negatives)
    per_class: dict[str, dict[str, float]] = Field(default_factory=dict)
    quantized_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat())


def starting_weights(weights: str) -> str:
    """The card's name for a ``--weights`` value: imagenet, random (for ``none``) or
    ``file:<name>`` (the file's name only: where it lay says nothing about the model)."""
    if weights in ("imagenet", "none"):
        return "imagenet" if weights == "imagenet" else "random"
    return f"file:{Path(weights).name}"


@dataclass(frozen=True)
class Validation:
    """Whether a card earned clinical use, and why (or why not)."""

    validated: bool
    reason: str

    def __str__(self) -> str:
        """``validated: yes (why)`` or ``validated: no (why not)``, as the commands say it."""
        return f"validated: {'yes' if self.validated else 'no'} ({self.reason})"


class ModelCard(BaseModel):
    """Identity, provenance and evaluation of one trained (or untrained) model."""

    name: str = "cxr-covid-pneumonia"
    version: str
    architecture: str
    input_size: int
    classes: list[str] = Field(default_factory=lambda: list(CLASS_KEYS))
    interpolation: str = "bilinear"
    weights_file: str = WEIGHTS_FILE
    sha256: str
    #: "float32": a Keras file (``weights_file``); "int8": an OpenVINO IR whose
    #: ``weights_file`` is the .bin, with the .xml and the head's weights in
    #: ``extra_files``.
    precision: Literal["float32", "int8"] = "float32"
    #: Other files of the artifact: name -> sha256, checked like the weights.
    extra_files: dict[str, str] = Field(default_factory=dict)
    quantization: QuantizationRecord | None = None
    trained: bool
    device_uid: str = Field(default_factory=generate_uid)
    manufacturer: str = "dicom-node project"
    created_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat())
    training_data: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    framework: dict[str, str] = Field(default_factory=dict)
    notes: str = ""
    training: TrainingRecord | None = None
    test: TestEvidence | None = None
    #: class key -> its operating point (classes without one are never flagged)
    operating_points: dict[str, OperatingPoint] = Field(default_factory=dict)

    @property
    def display_version(self) -> str:
        """``version`` with an ``-untrained`` marker where it applies."""
        return self.version if self.trained else f"{self.version}-untrained"


def validation_status(card: ModelCard) -> Validation:
    """Judge the card's evidence (its ``trained`` flag and free-form metrics count for
    nothing): validated only with test results on a declared data set of a stated
    size, signed by a person when imported, not used to choose the checkpoint, whose
    95 % interval of balanced accuracy lies wholly above chance."""
    if card.precision == "int8":
        if card.quantization is None:
            return Validation(False, "an int8 model without a record of its parity with "
                                     "its fp32 source")
        missed = INT8_PARITY.failures(card.quantization)
        if missed:
            return Validation(False, "int8 parity with its fp32 source is out of bounds: "
                                     + "; ".join(missed))
    test = card.test
    if test is None:
        return Validation(False, "the card carries no test results")
    if not test.data_set.strip():
        return Validation(False, "the test results name no data set")
    if not test.images:
        return Validation(False, "the card has test metrics but no test size")
    if test.evaluated_by == "import" and not (test.signed_by or "").strip():
        return Validation(False, "imported test metrics are not signed by a person")
    if test.checkpoint_chosen_on_test or (
            card.training is not None and card.training.checkpoint_chosen_on == "test"):
        # Under the paper's protocol the checkpoint was picked on the fold's test images;
        # a later `evaluate --record` cannot tell whether its data set is that one.
        return Validation(False, "the checkpoint was chosen on test images (protocol "
                                 "paper): its figures are optimistic; train with "
                                 "--protocol clean for a model that can be validated")
    interval = test.balanced_accuracy_95
    if interval is None or len(interval) != 2:
        return Validation(False, "the test results give no 95 % interval of balanced accuracy")
    low, high = interval
    # NaN compares false with everything: without this check it would pass as "above chance".
    if not (math.isfinite(low) and math.isfinite(high) and 0.0 <= low <= high <= 1.0):
        return Validation(False, f"the 95 % interval of balanced accuracy ({low}, {high}) is "
                                 "not an interval within 0-1")
    if low <= CHANCE_BALANCED_ACCURACY:
        return Validation(False, f"the 95 % interval of balanced accuracy ({low:.3f}-{high:.3f}) "
                                 f"reaches chance ({CHANCE_BALANCED_ACCURACY:.3f})")
    return Validation(True, f"balanced accuracy {low:.3f}-{high:.3f} (95 %) on "
                            f"{test.images} test images of {test.data_set}")


def sha256_file(path: Path) -> str:
    """sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_card(artifact: Path) -> ModelCard:
    """The card of an artifact directory (no hash check: see :func:`verify`)."""
    path = artifact / CARD_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{artifact} is not a model artifact: no {CARD_FILE}")
    return ModelCard.model_validate_json(path.read_text())


def verify(artifact: Path) -> ModelCard:
    """Read the card and check the weights file against its sha256."""
    card = read_card(artifact)
    if list(card.classes) != list(CLASS_KEYS):
        raise ModelIntegrityError(f"class order {card.classes} differs from {list(CLASS_KEYS)}")
    if card.precision == "int8" and card.quantization is None:
        raise ModelIntegrityError("an int8 card without its quantization record")
    for name, expected in artifact_files(card).items():
        path = artifact / name
        if Path(name).name != name or name in ("", ".", "..") or not path.is_file():
            raise ModelIntegrityError(f"file {name!r} missing or not local")
        actual = sha256_file(path)
        if actual != expected:
            raise ModelIntegrityError(
                f"{name}: sha256 {actual[:12]}... does not match the card's "
                f"{expected[:12]}...; refusing to load"
            )
    return card


def artifact_files(card: ModelCard) -> dict[str, str]:
    """Every file of an artifact besides its card: name -> sha256."""
    return {card.weights_file: card.sha256, **card.extra_files}


def framework_versions() -> dict[str, str]:
    """Versions of the libraries a model was built with."""
    import keras
    import numpy

    versions = {"keras": keras.__version__, "backend": keras.config.backend(),
                "numpy": numpy.__version__}
    try:
        import tensorflow as tf

        versions["tensorflow"] = tf.__version__
    except ImportError:
        pass
    return versions


def save_artifact(model: Any, out: Path, card_fields: dict[str, Any]) -> ModelCard:
    """Save a Keras model and its card into the new directory ``out``."""
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty")
    out.mkdir(parents=True, exist_ok=True)
    weights = out / WEIGHTS_FILE
    model.save(weights)
    card = ModelCard(sha256=sha256_file(weights), framework=framework_versions(),
                     **card_fields)
    write_card(out, card)
    return card


def write_card(artifact: Path, card: ModelCard) -> None:
    """Write the card atomically (temp file, fsync, rename)."""
    _atomic_write(artifact / CARD_FILE, card.model_dump_json(indent=2).encode())


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def install(artifact: Path, models_dir: Path, allow_unvalidated: bool = False,
            parity: ParityBounds = INT8_PARITY, force_parity: bool = False) -> Path:
    """Verify ``artifact``, copy it under ``models_dir`` and make it the active model.

    Parameters
    ----------
    artifact
        The artifact directory to install.
    models_dir
        The node's model directory (holds the ``active`` link).
    allow_unvalidated
        Install a model that is not validated.
    parity
        The bounds an int8 model's recorded parity with its fp32 source must meet.
    force_parity
        Install an int8 model out of ``parity`` (with a warning).

    An int8 model whose recorded parity with its fp32 source misses ``parity`` is
    refused unless ``force_parity``. A model whose card is not validated
    (:func:`validation_status`) is refused unless ``allow_unvalidated``; its results
    then carry :data:`UNVALIDATED_WARNING`. The
    switch is atomic: a new symlink is created beside ``active`` and renamed over it,
    so a reader sees either the old model or the new one, never neither.

    Raises
    ------
    ModelIntegrityError
        The weights do not match the card.
    ParityError
        An int8 model out of ``parity`` and ``force_parity`` is false.
    UnvalidatedModelError
        The card is not validated and ``allow_unvalidated`` is false.
    """
    card = verify(artifact)
    if card.quantization is not None:
        missed = parity.failures(card.quantization)
        if missed and not force_parity:
            raise ParityError(
                f"int8 model {card.name} {card.display_version} does not follow its fp32 "
                f"source closely enough: {'; '.join(missed)}; install it anyway with --force "
                "(or quantize again with more calibration images)")
        if missed:
            LOGGER.warning("installing int8 model %s %s out of parity bounds: %s", card.name,
                           card.display_version, "; ".join(missed))
    status = validation_status(card)
    if not status.validated:
        if not allow_unvalidated:
            raise UnvalidatedModelError(
                f"model {card.name} {card.display_version} is not validated: {status.reason}; "
                "install it anyway with --allow-unvalidated (or the setting "
                f"allow_unvalidated_models; results will say {UNVALIDATED_WARNING})")
        LOGGER.warning("installing unvalidated model %s %s: %s", card.name,
                       card.display_version, status.reason)
    models_dir.mkdir(parents=True, exist_ok=True)
    # The card's own hash too: re-evaluating a model changes its card, not its weights,
    # and the installed copy must be the card that was judged above.
    card_hash = sha256_file(artifact / CARD_FILE)[:8]
    name = f"{card.name}-{card.display_version}-{card.sha256[:12]}-{card_hash}"
    target = models_dir / name
    if not target.exists():
        staging = Path(tempfile.mkdtemp(dir=models_dir, prefix=".install-"))
        for item in (CARD_FILE, *artifact_files(card)):
            shutil.copy2(artifact / item, staging / item)
        verify(staging)
        os.replace(staging, target)
    link = models_dir / f".{ACTIVE_LINK}-{os.getpid()}"
    link.unlink(missing_ok=True)
    link.symlink_to(name)
    os.replace(link, models_dir / ACTIVE_LINK)
    fd = os.open(models_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    LOGGER.info("model %s %s is now active", card.name, card.display_version)
    return target


def active(models_dir: Path) -> Path | None:
    """The active artifact directory, or None when no model is installed."""
    link = models_dir / ACTIVE_LINK
    if not link.exists():
        return None
    return link.resolve()


def describe(card: ModelCard) -> dict[str, Any]:
    """A JSON-friendly summary for ``dicom-node model show``: the card's fields as its file
    holds them (no computed fields: ``display_version`` is not shown)."""
    return card.model_dump(mode="json")
