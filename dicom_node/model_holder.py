"""The model holder: the engine and SR builder of the active model, reloaded when it
changes.

``dicom-node model install`` switches the ``active`` link; the holder notices
between batches, loads and warms the new engine, builds one SR so highdicom's
tables are read before the first image waits, and exempts the long-lived
objects from garbage collection (:func:`gc.freeze`) until the next swap.
"""

from __future__ import annotations

import gc
import logging
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dicom_node import audit, evidence
from dicom_node.config import Settings
from dicom_node.report import ReportBuilder
from model import card as model_card

if TYPE_CHECKING:
    from model.engine import Engine

LOGGER = logging.getLogger(__name__)


def unservable_reason(card: model_card.ModelCard, settings: Settings) -> str | None:
    """Why the node must not serve the model of ``card`` (None: it may).

    A model serves when :func:`model.card.validation_status` validates its card, or
    when ``allow_unvalidated_models`` is on -- and then every result says so.
    """
    status = model_card.validation_status(card)
    if status.validated or settings.allow_unvalidated_models:
        return None
    return (f"{card.name} {card.display_version} is not validated ({status.reason}); "
            "install a validated model, or set allow_unvalidated_models = true for demos "
            f"and tests (every result then says {model_card.UNVALIDATED_WARNING})")


@dataclass(frozen=True)
class LoadedModel:
    """An engine ready for batches, and the SR builder bound to its model card."""

    engine: Engine
    reports: ReportBuilder


class ModelHolder:
    """Holds the active model; :meth:`current` reloads it when the active link moved."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._loaded: LoadedModel | None = None
        self._path: Path | None = None
        self._refused: Path | None = None
        #: Set once a model is loaded and warm.
        self.ready = threading.Event()

    def holds_active(self) -> bool:
        """Whether the model loaded is the active one (nothing is loaded here: the worker
        loads it; a model installed since is picked up at its next batch or idle poll)."""
        return self._loaded is not None and self._path == model_card.active(
            self.settings.model_dir)

    def current(self) -> LoadedModel | None:
        """The active model, loaded; None while no model is installed, or while the
        active one is not validated and ``allow_unvalidated_models`` is off (jobs wait)."""
        active = model_card.active(self.settings.model_dir)
        if active is None:
            return None
        if active != self._path:
            if not self._servable(active):
                return None
            self._load(active)
        return self._loaded

    def _servable(self, active: Path) -> bool:
        """Whether ``active`` may serve; says why not once per model."""
        try:
            refusal = unservable_reason(model_card.read_card(active), self.settings)
        except (OSError, ValueError) as exc:
            refusal = f"its card cannot be read: {exc}"
        if refusal is None:
            self._refused = None
            return True
        if self._refused != active:
            LOGGER.error("model %s will not serve: %s; jobs wait in the queue", active.name,
                         refusal)
            self._refused = active
        self._loaded, self._path = None, None
        return False

    def _load(self, active: Path) -> None:
        from model.engine import Engine

        LOGGER.info("loading model %s", active.name)
        # The previous model's objects go back to the collector with it; if this load
        # fails, the next call tries again whichever model is active then.
        self._loaded, self._path = None, None
        gc.unfreeze()
        s = self.settings
        engine = Engine(active, backend=s.inference_backend, device=s.inference_device,
                        batch_size=s.batch_size, threads=s.inference_threads,
                        evidence=s.evidence_image,
                        xla=None if s.inference_xla == "auto" else s.inference_xla == "on")
        engine.warmup()
        reports = ReportBuilder(engine.card)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reports.warm_up()
            if s.evidence_image:
                evidence.warm_up(engine.card)
        self._loaded, self._path = LoadedModel(engine, reports), active
        _freeze_long_lived()
        LOGGER.info("model %s ready (batches of up to %d)", active.name, engine.batch_size)
        card = engine.card
        audit.model("loaded", card.name, card.display_version, card.sha256,
                    reports.validation.validated)
        self.ready.set()


def _freeze_long_lived() -> None:
    """Exempt the objects that live as long as the model from garbage collection.

    TensorFlow, Keras and the loaded model are hundreds of thousands of objects;
    every full collection -- set off by SR building, and by pynetdicom's server
    even when idle -- would walk them while holding the GIL. Frozen, they are
    skipped. They are unfrozen before a new model replaces them, so an old
    model's cycles are still collected. Figures: docs/performance.md.
    """
    gc.collect()
    gc.freeze()
    LOGGER.debug("%d objects exempted from garbage collection", gc.get_freeze_count())
