"""Model artifacts: a directory holding the Keras file and its model card.

``model-card.json`` records what a radiologist or an auditor needs to trust a
result: name, version, architecture, input size, class order, the
preprocessing, the sha256 of the weights file, what the model was trained on,
its metrics -- and ``trained: false`` for an untrained demo model. A new model
version gets a new Device UID (IHE AI Results: the SR names the model).
The engine refuses a weights file whose hash does not match its card.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field
from pydicom.uid import generate_uid

from model.classes import CLASS_KEYS

LOGGER = logging.getLogger(__name__)

CARD_FILE = "model-card.json"
WEIGHTS_FILE = "model.keras"
ACTIVE_LINK = "active"


class ModelIntegrityError(RuntimeError):
    """The weights file does not match the sha256 its card pins."""


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
    trained: bool
    device_uid: str = Field(default_factory=generate_uid)
    manufacturer: str = "dicom-node project"
    created_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat())
    training_data: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    framework: dict[str, str] = Field(default_factory=dict)
    notes: str = ""

    @property
    def display_version(self) -> str:
        """``version`` with an ``-untrained`` marker where it applies."""
        return self.version if self.trained else f"{self.version}-untrained"


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
    weights = artifact / card.weights_file
    if Path(card.weights_file).name != card.weights_file or not weights.is_file():
        raise ModelIntegrityError(f"weights file {card.weights_file!r} missing or not local")
    actual = sha256_file(weights)
    if actual != card.sha256:
        raise ModelIntegrityError(
            f"{weights.name}: sha256 {actual[:12]}... does not match the card's "
            f"{card.sha256[:12]}...; refusing to load"
        )
    return card


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


def install(artifact: Path, models_dir: Path) -> Path:
    """Verify ``artifact``, copy it under ``models_dir`` and make it the active model.

    The switch is atomic: a new symlink is created beside ``active`` and renamed
    over it, so a reader sees either the old model or the new one, never neither.
    """
    card = verify(artifact)
    models_dir.mkdir(parents=True, exist_ok=True)
    name = f"{card.name}-{card.display_version}-{card.sha256[:12]}"
    target = models_dir / name
    if not target.exists():
        staging = Path(tempfile.mkdtemp(dir=models_dir, prefix=".install-"))
        for item in (CARD_FILE, card.weights_file):
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
