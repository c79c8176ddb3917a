"""The study result's messages to the worklist: an HL7 ORU^R01 and a FHIR Bundle per
closed study result and per ``hl7`` / ``fhir`` destination.

They are made when a study's result closes, in the transaction that closes it
(:meth:`dicom_node.studies.StudyBook.close_due` calls :meth:`Messenger.on_close`):
each delivery row is added, its message built from the result and the identifiers
of the study's first included image (read from the spool: the job store keeps no
patient data), and written durably to the spool under the delivery's id. The
dispatcher then sends the file as written, so every retry carries the same bytes
and the same message control ID. A message that cannot be built makes its
delivery dead with the reason; the others go. A study whose images carry no
Patient ID gets no message (dead, with that reason): no RIS can file a result it
cannot match to a patient. One without an accession number is sent; the RIS
matches it by patient and study.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import replace

from sqlalchemy.orm import Session

from dicom_node import fhir, hl7
from dicom_node.config import Settings
from dicom_node.db import Delivery, DeliveryItem, DeliveryState, Job, StudyResult, utcnow
from dicom_node.destination import Target
from dicom_node.findings import Identifiers, StudyFindings
from dicom_node.spool import Spool

LOGGER = logging.getLogger(__name__)


def findings(study: StudyResult, jobs: Sequence[Job], identifiers: Identifiers
             ) -> StudyFindings:
    """What a closed study result says, with the identifiers read from its images."""
    return StudyFindings(
        result_id=study.id, version=study.version, identifiers=identifiers,
        label=study.label,
        probabilities={k: float(v["probability"])
                       for k, v in (study.probabilities or {}).items()},
        flags=list(study.flags or []), flagged=study.flagged,
        model=study.model_version or "", model_validated=bool(study.model_validated),
        problems=list(study.problems or []),
        closed_at=study.closed_at or utcnow(),
        corrected=study.supersedes_id is not None)


class Messenger:
    """Adds and writes the messages of each closed study result."""

    def __init__(self, settings: Settings, spool: Spool) -> None:
        self.settings = settings
        self.spool = spool

    @property
    def targets(self) -> list[Target]:
        """The destinations that take one message per study result."""
        return [t for t in self.settings.destinations if t.per_study]

    def on_close(self, session: Session, study: StudyResult, jobs: Sequence[Job]) -> None:
        """Add a delivery per hl7 and fhir destination for ``study``, just closed, and
        write its message; inside the closing transaction."""
        if not self.targets:
            return
        if not study.job_ids:
            LOGGER.warning("study result %d has no classified image: no message sent",
                           study.id)
            return
        try:
            identifiers = self._identifiers(study, jobs)
            reason = None if identifiers.patient_id else (
                "no Patient ID in the study's images: the RIS could not match the result")
        except Exception as exc:
            identifiers, reason = None, (f"the image's identifiers cannot be read: "
                                         f"{type(exc).__name__}")
        for target in self.targets:
            item = DeliveryItem.ORU if target.kind == "hl7" else DeliveryItem.FHIR
            delivery = Delivery(study_result_id=study.id, kind=target.kind,
                                destination=target.key, item=item,
                                message_id=uuid.uuid4().hex[:20], next_attempt_at=utcnow())
            session.add(delivery)
            session.flush()  # its id names the file
            if identifiers is None or reason is not None:
                delivery.state, delivery.last_error = DeliveryState.DEAD, reason
                LOGGER.error("study result %d: no %s message: %s", study.id, target.kind,
                             reason)
                continue
            try:
                self._write(delivery, target, findings(study, jobs, identifiers))
            except OSError:
                raise  # the spool: the study closes on a later run, messages and all
            except Exception as exc:
                # The type only: a builder's message may quote the values it refused.
                delivery.state = DeliveryState.DEAD
                delivery.last_error = f"message could not be built: {type(exc).__name__}"
                LOGGER.error("study result %d: %s message could not be built (%s)", study.id,
                             target.kind, type(exc).__name__)

    def _identifiers(self, study: StudyResult, jobs: Sequence[Job]) -> Identifiers:
        """The identifiers of the images the answer is formed from, as
        :func:`dicom_node.studies.form` chose them: the patient's from the first
        included image that has a Patient ID, the order's (accession and order
        numbers) from the first that has an accession number."""
        included = [j for j in jobs if j.id in set(study.job_ids or [])]
        by_patient = next((j for j in included if j.patient_key), included[0])
        by_order = next((j for j in included if j.accession_key), by_patient)
        identifiers = self._read(by_patient)
        if by_order is by_patient:
            return identifiers
        order = self._read(by_order)
        return replace(identifiers, accession_number=order.accession_number,
                       placer_order_number=order.placer_order_number,
                       filler_order_number=order.filler_order_number,
                       requested_procedure_id=order.requested_procedure_id)

    def _read(self, job: Job) -> Identifiers:
        if job.spool_file is None:
            raise FileNotFoundError("the image is not in the spool")
        return Identifiers.from_file(self.spool.path(job.spool_file))

    def _write(self, delivery: Delivery, target: Target, found: StudyFindings) -> None:
        message_id = str(delivery.message_id)
        if target.kind == "hl7":
            data = hl7.build_oru(
                found, message_id, sending_application=target.sending_application,
                sending_facility=target.sending_facility,
                receiving_application=target.receiving_application,
                receiving_facility=target.receiving_facility, message_time=found.closed_at)
            suffix = ".hl7"
        else:
            data = fhir.build_bundle(found, message_id=message_id,
                                     patient_system=target.patient_system,
                                     accession_system=target.accession_system)
            suffix = ".json"
        delivery.payload_file = self.spool.write_message(delivery.id, data, suffix)
