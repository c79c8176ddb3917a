"""The result writer: one SR per classified image, written durably, routed, stored.

For each image of a batch it builds the SR (:class:`dicom_node.report.ReportBuilder`),
writes it to the spool, and decides where it goes -- every configured
destination, and the calling AE's Storage SCP when ``return_to_calling_ae`` is on.
The batch's results and deliveries are then stored in one transaction.
"""

from __future__ import annotations

import logging
import warnings
from io import BytesIO

import numpy as np
from numpy.typing import NDArray

from dicom_node.batches import Prepared
from dicom_node.config import Settings
from dicom_node.db import Job
from dicom_node.destination import Destination
from dicom_node.jobs import JobResult, JobStore
from dicom_node.report import Classification, ReportBuilder, flags
from dicom_node.spool import Spool
from model.card import UNVALIDATED_WARNING
from model.classes import CLASS_KEYS

LOGGER = logging.getLogger(__name__)


class ResultWriter:
    """Writes and routes the results of ``owner``'s batches."""

    def __init__(self, settings: Settings, store: JobStore, spool: Spool, owner: str) -> None:
        self.settings = settings
        self.store = store
        self.spool = spool
        self.owner = owner

    def write_batch(self, prepared: list[Prepared], probabilities: NDArray[np.float32],
                    reports: ReportBuilder) -> None:
        """SRs of a classified batch, then its results and deliveries in one transaction.

        A job whose SR cannot be built is failed with the reason; a job whose lease
        was lost meanwhile is left alone (logged), the others are stored.
        """
        results = [result for item, row in zip(prepared, probabilities, strict=True)
                   if (result := self.write_one(item, row, reports)) is not None]
        stored = self.store.complete_batch(self.owner, results)
        for result, ours in zip(results, stored, strict=True):
            if ours:
                LOGGER.info("job %d: %s (%s)%s%s", result.job_id, result.label,
                            ", ".join(f"{k} {v:.3f}" for k, v in result.probabilities.items()),
                            f", flagged {'+'.join(result.flags)}" if result.flags else "",
                            "" if result.model_validated else f" -- {UNVALIDATED_WARNING}")
            else:
                LOGGER.warning("job %d: lease lost before the result was stored",
                               result.job_id)

    def write_one(self, item: Prepared, row: NDArray[np.float32],
                  reports: ReportBuilder) -> JobResult | None:
        """Build and durably write the SR of one classified job; None (and the job
        failed with the reason) if it cannot be built."""
        job = item.job
        card = reports.card
        probabilities = {key: float(p) for key, p in zip(CLASS_KEYS, row, strict=True)}
        label = CLASS_KEYS[int(np.argmax(row))]
        try:
            with warnings.catch_warnings():
                # highdicom's warnings quote attribute values (patient names): keep them
                # out of the log.
                warnings.simplefilter("ignore")
                result = Classification(label, probabilities, view=job.view or "undetermined")
                sr = reports.build(item.source, result,
                                   job.sr_sop_instance_uid, job.sr_series_instance_uid)
            encoded = BytesIO()
            sr.save_as(encoded, enforce_file_format=True)
            sr_name = self.spool.write_report(job.id, encoded.getvalue())
        except Exception as exc:
            self.store.fail(job.id, self.owner, f"SR could not be built: {exc}")
            LOGGER.warning("job %d: SR could not be built (%s)", job.id, type(exc).__name__)
            return None
        return JobResult(job.id, label, probabilities, f"{card.name} {card.display_version}",
                         sr_name, self.destinations(job),
                         flags=flags(card, probabilities),
                         model_validated=reports.validation.validated)

    def destinations(self, job: Job) -> list[str]:
        """Where ``job``'s SR goes: the configured destinations, and the calling AE when
        ``return_to_calling_ae`` is on and its Storage SCP port is known."""
        destinations = list(self.settings.destinations)
        if self.settings.return_to_calling_ae and job.peer_address:
            port = self.settings.calling_ae_ports.get(job.calling_ae)
            if port:
                destinations.append(str(Destination(job.calling_ae, job.peer_address, port)))
        return destinations

