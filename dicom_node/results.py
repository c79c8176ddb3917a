"""The result writer: an SR and an evidence image per classified image, written
durably, routed, stored.

For each image of a batch it builds the SR (:class:`dicom_node.report.ReportBuilder`)
and, with ``evidence_image`` on and the class maps of the forward pass, the
evidence image (:mod:`dicom_node.evidence`); writes them to the spool; and decides
where they go -- every ``dicom`` and ``dicomweb`` destination (the objects each
one takes), and the calling AE's Storage SCP when ``return_to_calling_ae`` is
on. The batch's results and deliveries are then stored in one transaction. An
evidence image that cannot be made is logged and left out; the SR goes all the
same. The study-level messages (HL7, FHIR) are not made here but when the study's
result closes (:mod:`dicom_node.messages`).
"""

from __future__ import annotations

import logging
import warnings
from io import BytesIO

import numpy as np
from numpy.typing import NDArray
from pydicom.uid import generate_uid

from dicom_node import evidence, metrics
from dicom_node.batches import Prepared
from dicom_node.config import Settings
from dicom_node.db import DeliveryItem, Job
from dicom_node.destination import Destination
from dicom_node.jobs import JobResult, JobStore, Route
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
                    reports: ReportBuilder, maps: NDArray[np.float32] | None = None) -> None:
        """SRs (and evidence images, given the class maps) of a classified batch, then
        its results and deliveries in one transaction.

        A job whose SR cannot be built is failed with the reason; a job whose lease
        was lost meanwhile is left alone (logged), the others are stored.

        Parameters
        ----------
        prepared
            The batch's decoded jobs.
        probabilities
            The network's output, one row per job.
        reports
            The SR builder of the model that classified them.
        maps
            The class maps of the same forward pass (N x h x w x classes), or None
            (evidence images off).
        """
        per_image = maps if maps is not None else [None] * len(prepared)
        results = [result for item, row, cam in zip(prepared, probabilities, per_image,
                                                     strict=True)
                   if (result := self.write_one(item, row, reports, cam)) is not None]
        stored = self.store.complete_batch(self.owner, results)
        received = {item.job.id: item.job.created_at for item in prepared}
        for result, ours in zip(results, stored, strict=True):
            if ours:
                metrics.RECEIVE_TO_RESULT.observe(metrics.since(received[result.job_id]))
                LOGGER.info("job %d: %s (%s)%s%s", result.job_id, result.label,
                            ", ".join(f"{k} {v:.3f}" for k, v in result.probabilities.items()),
                            f", flagged {'+'.join(result.flags)}" if result.flags else "",
                            "" if result.model_validated else f" -- {UNVALIDATED_WARNING}")
            else:
                LOGGER.warning("job %d: lease lost before the result was stored",
                               result.job_id)

    def write_one(self, item: Prepared, row: NDArray[np.float32], reports: ReportBuilder,
                  cam: NDArray[np.float32] | None = None) -> JobResult | None:
        """Build and durably write the SR (and, given its class maps, the evidence
        image) of one classified job; None (and the job failed with the reason) if the
        SR cannot be built.

        Parameters
        ----------
        item
            The decoded job.
        row
            Its probabilities.
        reports
            The model's SR builder.
        cam
            Its class maps (h x w x classes), or None.
        """
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
                encoded = reports.encode(item.source, result,
                                         job.sr_sop_instance_uid, job.sr_series_instance_uid)
            sr_name = self.spool.write_report(job.id, encoded)
        except Exception as exc:
            self.store.fail(job.id, self.owner, f"SR could not be built: {exc}")
            LOGGER.warning("job %d: SR could not be built (%s)", job.id, type(exc).__name__)
            return None
        uids = (job.evidence_sop_instance_uid or generate_uid(),
                job.evidence_series_instance_uid or generate_uid())
        evidence_name = (self.write_evidence(item, result, reports, cam, uids)
                         if cam is not None and self.settings.evidence_image else None)
        return JobResult(job.id, label, probabilities, f"{card.name} {card.display_version}",
                         sr_name, self.routes(job, evidence=evidence_name is not None),
                         evidence_file=evidence_name,
                         evidence_uids=uids if evidence_name else None,
                         flags=flags(card, probabilities),
                         model_validated=reports.validation.validated)

    def write_evidence(self, item: Prepared, result: Classification, reports: ReportBuilder,
                       cam: NDArray[np.float32], uids: tuple[str, str]) -> str | None:
        """Render, build and durably write one job's evidence image; its spool name, or
        None (logged) when it cannot be made -- the SR goes without it.

        Parameters
        ----------
        item
            The decoded job (its source image).
        result
            What the network said of it.
        reports
            The model's SR builder (its card and validation).
        cam
            The job's class maps (h x w x classes).
        uids
            The evidence image's SOP Instance and Series Instance UIDs.
        """
        job, card = item.job, reports.card
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                rgb = evidence.render(item.source, cam, result.label, result.probabilities,
                                      f"{card.name} {card.display_version}",
                                      reports.validation.validated,
                                      self.settings.evidence_max_size)
                image = evidence.build_evidence(item.source, rgb, result.label, card, *uids)
            encoded = BytesIO()
            image.save_as(encoded, enforce_file_format=True)
            return self.spool.write_evidence(job.id, encoded.getvalue())
        except Exception as exc:
            LOGGER.warning("job %d: evidence image could not be made (%s); the SR goes "
                           "without it", job.id, type(exc).__name__)
            return None

    def routes(self, job: Job, evidence: bool = True) -> list[Route]:
        """Where ``job``'s objects go: each dicom and dicomweb destination the objects it
        takes (the evidence image only when there is one), and the SR and evidence
        image to the calling AE when ``return_to_calling_ae`` is on and its Storage SCP
        port is known."""
        items = [DeliveryItem.SR, *([DeliveryItem.EVIDENCE] if evidence else [])]
        routes = [Route(target.kind, target.key, item)
                  for target in self.settings.destinations if not target.per_study
                  for item in items if item.value in target.objects]
        if self.settings.return_to_calling_ae and job.peer_address:
            port = self.settings.calling_ae_ports.get(job.calling_ae)
            if port:
                back = str(Destination(job.calling_ae, job.peer_address, port))
                routes += [Route("dicom", back, item) for item in items]
        return routes

