"""What the node counts, for Prometheus (served by :mod:`dicom_node.health`).

Events are counted where they happen, in this process's :data:`REGISTRY`: instances
received (queued, ignored, refused, duplicate, by reason), associations, inference
batches (size and time), results (time from receive) and deliveries (outcome by
destination kind; time from result to delivered). What is a state rather than an
event -- jobs and deliveries by state, the active model, disk headroom -- is read
when Prometheus scrapes, by a :class:`NodeCollector` that each node owns.

Labels are bounded sets (reasons are short keywords, never free text): no UID, AE
title or patient data ever becomes a label.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import (
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Histogram,
)
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from dicom_node.db import DeliveryState, JobState, utcnow
from dicom_node.errors import (
    DatasetMismatch,
    IntakeError,
    OutOfResources,
    PixelBudgetExceeded,
    PolicyRefused,
    Status,
    UndecodableDataset,
)
from model import card as model_card

if TYPE_CHECKING:
    from dicom_node.intake import IntakeDecision
    from dicom_node.jobs import JobStore

LOGGER = logging.getLogger(__name__)

#: Every counter and histogram of this process (plus its CPU, memory and descriptors).
REGISTRY = CollectorRegistry(auto_describe=True)
REGISTRY.register(PROCESS_COLLECTOR)
REGISTRY.register(PLATFORM_COLLECTOR)

#: Seconds, from a second to a day: results wait for a model, deliveries for a peer.
_LATENCY_BUCKETS = (0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 4 * 3600,
                    24 * 3600)

INSTANCES = Counter(
    "dicom_node_instances_received", "C-STORE requests answered, by outcome (queued, "
    "ignored, duplicate, refused) and reason.", ["outcome", "reason"], registry=REGISTRY)
ASSOCIATIONS = Counter(
    "dicom_node_associations", "Associations, by outcome (accepted, rejected, aborted).",
    ["outcome"], registry=REGISTRY)
RECEIVE_TO_RESULT = Histogram(
    "dicom_node_receive_to_result_seconds", "From an instance's receipt to its stored "
    "result (SR written, deliveries queued).", buckets=_LATENCY_BUCKETS, registry=REGISTRY)
RESULT_TO_DELIVERED = Histogram(
    "dicom_node_result_to_delivered_seconds", "From a result (or study message) being "
    "queued for a destination to its delivery, by destination kind.", ["kind"],
    buckets=_LATENCY_BUCKETS, registry=REGISTRY)
BATCH_SIZE = Histogram(
    "dicom_node_inference_batch_size", "Images per forward pass.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=REGISTRY)
BATCH_SECONDS = Histogram(
    "dicom_node_inference_seconds", "Seconds per forward pass (one batch; with two "
    "lanes, including time its streams waited for the other lane's batch).",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=REGISTRY)
DELIVERIES = Counter(
    "dicom_node_deliveries", "Delivery attempts, by destination kind and outcome (done, "
    "retry, dead).", ["kind", "outcome"], registry=REGISTRY)

#: The refusal reason of each IntakeError, most specific first.
_REFUSALS: tuple[tuple[type[IntakeError], str], ...] = (
    (PolicyRefused, "policy"),
    (PixelBudgetExceeded, "pixel_budget"),
    (DatasetMismatch, "dataset_mismatch"),
    (UndecodableDataset, "undecodable"),
    (OutOfResources, "out_of_resources"),
)


def refusal_reason(error: IntakeError | None) -> str:
    """The ``reason`` label of a refused instance (None: an unexpected failure)."""
    if error is None:
        return "internal_error"
    for kind, reason in _REFUSALS:
        if isinstance(error, kind):
            return reason
    return "out_of_resources" if error.status == Status.OUT_OF_RESOURCES else "internal_error"


def ignored_reason(decision: IntakeDecision) -> str:
    """The ``reason`` label of an instance the intake rules ignored: not_chest,
    body_part_undetermined, view_undetermined, or view_<lateral, oblique, ...>."""
    if decision.view is None:
        return ("body_part_undetermined" if decision.reason == "no body part information"
                else "not_chest")
    return f"view_{decision.view.value}"


def since(moment: datetime) -> float:
    """Seconds from ``moment`` (a stored UTC time) to now, never negative."""
    return max(0.0, (utcnow() - moment).total_seconds())


def delivery_outcome(kind: str, state: DeliveryState, created_at: datetime) -> None:
    """Count one delivery attempt; a delivered one adds its time since it was queued."""
    outcome = {DeliveryState.DONE: "done", DeliveryState.PENDING: "retry",
               DeliveryState.DEAD: "dead"}[state]
    DELIVERIES.labels(kind, outcome).inc()
    if state is DeliveryState.DONE:
        RESULT_TO_DELIVERED.labels(kind).observe(since(created_at))


class NodeCollector(Collector):
    """The node's states, read at each scrape: jobs and deliveries by state (from the
    job store), the active model, and the free space of the spool's file system."""

    def __init__(self, store: JobStore, model_dir: Path, spool_dir: Path,
                 min_free_bytes: int, model_loaded: Callable[[], bool]) -> None:
        self.store = store
        self.model_dir = model_dir
        self.spool_dir = spool_dir
        self.min_free_bytes = min_free_bytes
        self.model_loaded = model_loaded

    def collect(self) -> Iterable[Metric]:
        jobs = GaugeMetricFamily("dicom_node_jobs", "Jobs in the job store, by state.",
                                 labels=["state"])
        deliveries = GaugeMetricFamily("dicom_node_deliveries_by_state",
                                       "Deliveries in the job store, by state.",
                                       labels=["state"])
        try:
            counts = self.store.counts()
            delivery_counts = self.store.delivery_counts()
        except Exception as exc:  # the database is down: say so in /readyz, not here
            LOGGER.warning("metrics: the job store cannot be read (%s)", type(exc).__name__)
        else:
            for state in JobState:
                jobs.add_metric([state.value], counts.get(state.value, 0))
            for delivery_state in DeliveryState:
                deliveries.add_metric([delivery_state.value],
                                      delivery_counts.get(delivery_state.value, 0))
        yield jobs
        yield deliveries
        yield from self._model()
        free = GaugeMetricFamily("dicom_node_disk_free_bytes",
                                 "Free space of the spool's file system.")
        try:
            free.add_metric([], shutil.disk_usage(self.spool_dir).free)
        except OSError:
            pass
        yield free
        yield GaugeMetricFamily("dicom_node_disk_min_free_bytes",
                                "Below this the node refuses instances with 0xA700 "
                                "(min_free_disk_mb).", value=self.min_free_bytes)

    def _model(self) -> Iterable[Metric]:
        loaded = GaugeMetricFamily("dicom_node_model_loaded",
                                   "1 when the worker holds the active model, loaded.")
        loaded.add_metric([], 1 if self.model_loaded() else 0)
        yield loaded
        info = InfoMetricFamily("dicom_node_model", "The active model (none: no model).",
                                labels=["name", "version", "architecture", "validation"])
        active = model_card.active(self.model_dir)
        if active is None:
            info.add_metric(["none", "", "", "none"], {})
        else:
            try:
                card = model_card.read_card(active)
            except (OSError, ValueError):
                info.add_metric([active.name, "", "", "unreadable"], {})
            else:
                status = model_card.validation_status(card)
                info.add_metric([card.name, card.display_version, card.architecture,
                                 "validated" if status.validated else "unvalidated"], {})
        yield info
