"""The Storage SCP: association policy and the C-STORE handler.

The handler answers one question, as pynetdicom intends: which status to send.
It validates (full decode, intake rules, pixel budget), persists (spool: temp
file, fsync, rename, fsync dir), enqueues (job row committed) and only then
returns 0x0000. Every failure becomes a specific status; nothing escapes.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import socketserver
import ssl
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, cast

from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode_file_meta
from pynetdicom.events import Event
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from dicom_node import audit, faults, intake, metrics
from dicom_node.config import Settings
from dicom_node.db import JobState
from dicom_node.errors import (
    ConfigError,
    DatasetMismatch,
    IntakeError,
    Status,
    UndecodableDataset,
)
from dicom_node.jobs import JobStore, ReceivedInstance, study_key, study_key_secret
from dicom_node.libraries import bound_pdu_reads
from dicom_node.spool import Spool, SpooledFile
from dicom_node.tcp import NO_DELAY
from model.preprocess import MUST_PROPAGATE

LOGGER = logging.getLogger(__name__)

#: Transfer syntaxes we accept. Deflated is absent on purpose: pydicom inflates
#: without a bound, so a deflate bomb would exhaust memory (it is refused at
#: negotiation instead).
TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLossless,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
]
assert DeflatedExplicitVRLittleEndian not in TRANSFER_SYNTAXES

#: Part 10 files start with a zeroed preamble, so a received PE/ELF preamble
#: (CVE-2019-11687) is never stored.
_PREAMBLE = b"\x00" * 128 + b"DICM"

@dataclass(frozen=True)
class StoreOutcome:
    """What happened to one C-STORE request (for logs and tests)."""

    status: int
    job_id: int | None = None
    duplicate: bool = False
    #: The ``outcome`` and ``reason`` it is counted under (see dicom_node.metrics).
    outcome: str = "queued"
    reason: str = "view_frontal"
    #: For the audit trail.
    study_instance_uid: str | None = None


class StorageService:
    """The receive path behind the C-STORE handler."""

    def __init__(self, settings: Settings, store: JobStore, spool: Spool,
                 on_queued: Callable[[], None] | None = None) -> None:
        self.settings = settings
        self.store = store
        self.spool = spool
        self._on_queued = on_queued
        self._secret = study_key_secret(settings.data_dir)
        self._io = ThreadPoolExecutor(max_workers=settings.max_associations,
                                      thread_name_prefix="spool")

    def handle_store(self, event: Event) -> Dataset:
        """``evt.EVT_C_STORE`` handler: never raises, always returns a status data set."""
        try:
            outcome = self._store(event)
            metrics.INSTANCES.labels(outcome.outcome, outcome.reason).inc()
            _audit_store(event, outcome.study_instance_uid)
            return _status(outcome.status)
        except IntakeError as exc:
            if not exc.logged:
                LOGGER.warning("C-STORE refused (0x%04X): %s", exc.status, exc.comment)
            metrics.INSTANCES.labels("refused", metrics.refusal_reason(exc)).inc()
            _audit_store(event, None, f"0x{exc.status:04X} {exc.comment}",
                         malformed=isinstance(exc, UndecodableDataset | DatasetMismatch))
            return _status(exc.status, exc.comment)
        except MUST_PROPAGATE:
            raise
        except BaseException:  # a native extension's panic too
            LOGGER.exception("C-STORE failed unexpectedly")
            metrics.INSTANCES.labels("refused", metrics.refusal_reason(None)).inc()
            _audit_store(event, None, "0xC211 internal error")
            return _status(Status.INTERNAL_ERROR, "internal error")

    def _store(self, event: Event) -> StoreOutcome:
        if faults.ARMED:
            faults.reached("received")
        raw = event.encoded_dataset(include_meta=False)
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
        except Exception as exc:
            raise UndecodableDataset(f"data set cannot be parsed: {type(exc).__name__}") from exc
        intake.decode_elements(ds)
        uids = _identify(event, ds)
        decision = intake.decide(ds, self.settings.intake)
        queue = decision.disposition is intake.Disposition.QUEUE

        # The spool write (page-cache copy and fsync, GIL released) overlaps the
        # hash, the duplicate lookup and the pixel decode; nothing is
        # acknowledged before all of them succeeded.
        pending = (self._io.submit(self.spool.write, [_PREAMBLE, encode_file_meta(event.file_meta),
                                                      raw])
                   if queue else None)
        try:
            instance = ReceivedInstance(
                **uids,
                transfer_syntax_uid=str(event.context.transfer_syntax),
                calling_ae=str(event.assoc.requestor.ae_title).strip(),
                peer_address=str(event.assoc.requestor.address),
                sha256=hashlib.sha256(raw).hexdigest(),
                size_bytes=len(raw),
                view=decision.view.value if decision.view else None,
                patient_key=study_key(self._secret, uids["study_instance_uid"], _patient(ds)),
                accession_key=study_key(self._secret, uids["study_instance_uid"],
                                        ds.get("AccessionNumber")),
            )
            duplicate = self.store.find_duplicate(instance.sop_instance_uid, instance.sha256)
            if duplicate is None and queue:
                intake.decode_pixels(ds, self.settings.max_pixels)
        except BaseException:
            self._discard(pending)
            raise
        if duplicate is not None:
            self._discard(pending)
            LOGGER.info("duplicate of job %d acknowledged, not queued again", duplicate.id)
            return StoreOutcome(Status.SUCCESS, duplicate.id, duplicate=True,
                                outcome="duplicate", reason="duplicate",
                                study_instance_uid=instance.study_instance_uid)
        if pending is None:
            job = self.store.record(instance, None, JobState.IGNORED, decision.reason)
            LOGGER.info("instance ignored (%s)", decision.reason)
            return StoreOutcome(Status.SUCCESS, job.id if job else None, duplicate=job is None,
                                outcome="ignored" if job else "duplicate",
                                reason=metrics.ignored_reason(decision) if job else "duplicate",
                                study_instance_uid=instance.study_instance_uid)
        return self._enqueue(instance, pending.result(), decision)

    def _enqueue(self, instance: ReceivedInstance, spooled: SpooledFile,
                 decision: intake.IntakeDecision) -> StoreOutcome:
        try:
            job = self.store.record(instance, spooled.name, JobState.QUEUED, decision.reason)
        except Exception:
            self.spool.remove(spooled.name)
            LOGGER.exception("job row could not be committed; instance refused")
            raise IntakeError("job store unavailable", Status.OUT_OF_RESOURCES) from None
        if faults.ARMED:
            faults.reached("committed")
        if job is None:  # the same instance arrived concurrently on another association
            self.spool.remove(spooled.name)
            return StoreOutcome(Status.SUCCESS, None, duplicate=True, outcome="duplicate",
                                reason="duplicate",
                                study_instance_uid=instance.study_instance_uid)
        LOGGER.info("job %d queued from %s (%d bytes)", job.id, instance.calling_ae,
                    spooled.size)
        if self._on_queued is not None:
            self._on_queued()
        view = decision.view.value if decision.view is not None else "undetermined"
        return StoreOutcome(Status.SUCCESS, job.id, reason=f"view_{view}",
                            study_instance_uid=instance.study_instance_uid)

    def _discard(self, pending: Future[SpooledFile] | None) -> None:
        """Wait for a spool write that is no longer wanted and delete what it wrote."""
        if pending is None:
            return
        try:
            spooled = pending.result()
        except Exception:
            return  # the write failed and cleaned up after itself
        self.spool.remove(spooled.name)

    def close(self) -> None:
        """Wait for spool writes in flight."""
        self._io.shutdown(wait=True)


def _store_responded(event: Event) -> None:
    """``EVT_PDU_SENT`` handler, bound only with fault injection armed: a P-DATA-TF PDU
    written to the socket by an acceptor that only answers is a response (pynetdicom
    triggers the event after the write; ``EVT_DIMSE_SENT`` comes before encoding)."""
    if type(event.pdu).__name__ == "P_DATA_TF":
        faults.reached("responded")


def _identify(event: Event, ds: Dataset) -> dict[str, str]:
    """The instance's UIDs, validated, and consistent with the C-STORE request."""
    request = cast(C_STORE, event.request)
    sop_instance = intake.check_uid(ds.get("SOPInstanceUID"), "SOPInstanceUID")
    sop_class = intake.check_uid(ds.get("SOPClassUID"), "SOPClassUID")
    if sop_instance != str(request.AffectedSOPInstanceUID).strip("\x00 "):
        raise DatasetMismatch("SOP Instance UID differs from the C-STORE request")
    if sop_class != str(request.AffectedSOPClassUID).strip("\x00 "):
        raise DatasetMismatch("SOP Class UID differs from the C-STORE request")
    return {
        "sop_class_uid": sop_class,
        "sop_instance_uid": sop_instance,
        "series_instance_uid": intake.check_uid(ds.get("SeriesInstanceUID"), "SeriesInstanceUID"),
        "study_instance_uid": intake.check_uid(ds.get("StudyInstanceUID"), "StudyInstanceUID"),
    }


def _patient(ds: Dataset) -> str:
    """Patient ID with its issuer: what tells two patients apart (never logged)."""
    return f"{ds.get('PatientID', '') or ''}^{ds.get('IssuerOfPatientID', '') or ''}".strip("^")


def _status(code: int, comment: str | None = None) -> Dataset:
    status = Dataset()
    status.Status = code
    if comment and code != Status.SUCCESS:
        status.ErrorComment = comment[:64]
    return status


def _count_association(event: Event, outcome: str) -> None:
    """``EVT_ACCEPTED``/``EVT_REJECTED``/``EVT_ABORTED``: counted, and audited with the
    reason of a refusal (pynetdicom's own checks, in its order: a refused AE title is
    a Security Alert too)."""
    metrics.ASSOCIATIONS.labels(outcome).inc()
    if outcome == "aborted":
        return
    requestor = event.assoc.requestor
    calling = str(requestor.ae_title).strip()
    if outcome == "accepted":
        audit.association(calling, str(requestor.address))
        return
    ae = event.assoc.ae
    primitive = requestor.primitive
    allowed = [t.strip() for t in ae.require_calling_aet]
    if allowed and calling not in allowed:
        refusal, security = "calling AE title not recognised", True
    elif ae.require_called_aet and primitive is not None and \
            str(primitive.called_ae_title).strip() != str(event.assoc.acceptor.ae_title).strip():
        refusal, security = "called AE title not recognised", True
    else:
        refusal, security = "too many associations (max_associations)", False
    audit.association(calling, str(requestor.address), refusal, security)


def _audit_store(event: Event, study_uid: str | None, refusal: str | None = None,
                 malformed: bool = False) -> None:
    """One C-STORE in the audit trail (the UIDs of the request: the data set may be
    unreadable); malformed input is a Security Alert too."""
    requestor = event.assoc.requestor
    calling, address = str(requestor.ae_title).strip(), str(requestor.address)
    request = cast(C_STORE, event.request)
    audit.received(calling, address, study_uid,
                   _uid_or_none(request.AffectedSOPClassUID),
                   _uid_or_none(request.AffectedSOPInstanceUID), refusal)
    if malformed:
        audit.alert(audit.MALFORMED_INPUT, refusal or "malformed", calling, address)


def _uid_or_none(value: object) -> str | None:
    """A request's UID for the audit, if it is one (never arbitrary bytes)."""
    try:
        return intake.check_uid(value, "UID")
    except DatasetMismatch:
        return None


def _audit_abuse(address: str, reason: str) -> None:
    audit.alert(audit.MALFORMED_INPUT, f"connection closed: {reason}", None, address)


def _handle_echo(event: Event) -> int:
    return Status.SUCCESS


def check_calling_ae_policy(settings: Settings) -> None:
    """ConfigError when the settings let no calling AE title associate."""
    if not settings.accept_any_calling_ae and not settings.allowed_calling_ae:
        raise ConfigError("no calling AE title is allowed: set allowed_calling_ae "
                          "(--allow-calling-ae) or accept_any_calling_ae")


def build_ae(settings: Settings) -> AE:
    """The AE with our association policy, presentation contexts, timeouts and limits.

    pynetdicom takes an empty calling-AE list as *accept anyone*; ours means
    *nobody*, so a node configured that way refuses to serve (ConfigError)
    rather than run a server that rejects every association.
    """
    check_calling_ae_policy(settings)
    ae = AE(ae_title=settings.ae_title)
    ae.require_calling_aet = [] if settings.accept_any_calling_ae else settings.allowed_calling_ae
    ae.require_called_aet = True
    ae.maximum_associations = settings.max_associations
    ae.maximum_pdu_size = settings.max_pdu_size
    ae.acse_timeout = settings.acse_timeout
    ae.dimse_timeout = settings.dimse_timeout
    ae.network_timeout = settings.network_timeout
    ae.add_supported_context(Verification)
    # Every storage class is accepted at negotiation, so an auto-router sending
    # a whole study never fails; the intake rules decide what is kept.
    for context in AllStoragePresentationContexts:
        assert context.abstract_syntax is not None
        ae.add_supported_context(context.abstract_syntax, TRANSFER_SYNTAXES)
    return ae


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """Server TLS context (TLS 1.2+); client certificates required when a CA is set."""
    if settings.tls_certificate is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(settings.tls_certificate, settings.tls_private_key)
    if settings.tls_ca_certificates is not None:
        context.load_verify_locations(settings.tls_ca_certificates)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


#: The longest PDU read when ``max_pdu_size`` is 0 (unlimited), and the least any
#: PDU may be (an A-ASSOCIATE-RQ with many contexts and a user identity).
UNLIMITED_PDU_READ = 64 * 2**20
MIN_PDU_READ = 2**20


def pdu_limit(settings: Settings) -> int:
    """The longest PDU the node reads: ``max_pdu_size`` (what it tells requestors it
    takes in P-DATA), at least 1 MiB for association requests; 64 MiB when
    ``max_pdu_size`` is 0. A peer declaring more is disconnected before a byte of
    it is read."""
    return max(settings.max_pdu_size or UNLIMITED_PDU_READ, MIN_PDU_READ)


class _NodeServer(ThreadedAssociationServer):
    """pynetdicom's threaded association server, made with ``AE.make_server``, that
    disconnects peers not in ``allowed_hosts`` (empty: anyone) before reading a
    single PDU, through socketserver's ``verify_request`` hook."""

    def __init__(self, *args: Any, allowed_hosts: frozenset[str] = frozenset(),
                 **kwargs: Any) -> None:
        self.allowed_hosts = allowed_hosts
        super().__init__(*args, **kwargs)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        if not self.allowed_hosts or client_address[0] in self.allowed_hosts:
            return True
        LOGGER.warning("connection from a host not in allowed_peer_hosts refused")
        audit.association("", str(client_address[0]), "host not in allowed_peer_hosts",
                          security=True)
        return False

    def get_request(self) -> tuple[socket.socket, Any]:
        """Accept a connection, nothing more. pynetdicom's own ``get_request`` runs the
        TLS handshake here, on the one thread that accepts every connection, with no
        timeout: a peer that connects and says nothing stopped the node accepting
        anyone. The handshake runs in the connection's own thread instead
        (:meth:`process_request_thread`), bounded by ``acse_timeout``."""
        self.socket = cast(socket.socket, self.socket)
        return self.socket.accept()

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        if self.ssl_context is not None:
            previous = request.gettimeout()
            try:
                request.settimeout(self.ae.acse_timeout)
                request = self.ssl_context.wrap_socket(request, server_side=True)
                request.settimeout(previous)
            except OSError as exc:  # ssl.SSLError and TimeoutError are OSErrors
                LOGGER.warning("TLS handshake failed (%s): connection closed",
                               type(exc).__name__)
                audit.alert(audit.NODE_AUTHENTICATION,
                            f"TLS handshake failed ({type(exc).__name__})", None,
                            str(client_address[0]))
                self.shutdown_request(request)
                return
        super().process_request_thread(request, client_address)

    def shutdown(self) -> None:
        """Stop serving and close the socket. (pynetdicom's own shutdown also takes the
        server off the list that ``AE.start_server`` keeps, where this one is not.)"""
        socketserver.BaseServer.shutdown(self)
        self.server_close()


class StorageSCP:
    """The running server: start, stop, and the services behind it."""

    def __init__(self, settings: Settings, store: JobStore, spool: Spool,
                 on_queued: Callable[[], None] | None = None) -> None:
        self.settings = settings
        self._ae = build_ae(settings)
        self.service = StorageService(settings, store, spool, on_queued)
        self._server: _NodeServer | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> ThreadedAssociationServer:
        """Bind and serve in background threads; return the server."""
        handlers: list[Any] = [
            (evt.EVT_C_STORE, self.service.handle_store),
            (evt.EVT_C_ECHO, _handle_echo),
            NO_DELAY,
            (evt.EVT_CONN_OPEN, self._bound_reads),
            (evt.EVT_ACCEPTED, _count_association, ["accepted"]),
            (evt.EVT_REJECTED, _count_association, ["rejected"]),
            (evt.EVT_ABORTED, _count_association, ["aborted"]),
        ]
        if faults.ARMED:
            LOGGER.warning("TEST FAULT INJECTION ARMED (%s=%s:%d): this node kills itself; "
                           "never in production", faults.ENV, *faults.ARMED)
            handlers.append((evt.EVT_PDU_SENT, _store_responded))
        server = cast(_NodeServer, self._ae.make_server(
            (self.settings.host, self.settings.port),
            evt_handlers=handlers,
            ssl_context=tls_context(self.settings),
            server_class=_NodeServer,
            allowed_hosts=frozenset(self.settings.allowed_peer_hosts),
        ))
        self._thread = threading.Thread(target=server.serve_forever, name="association-server",
                                        daemon=True)
        self._thread.start()
        self._server = server
        LOGGER.info("listening on %s:%d as %s", self.settings.host, server.server_address[1],
                    self.settings.ae_title)
        return server

    def _bound_reads(self, event: Event) -> None:
        """``EVT_CONN_OPEN`` handler: no PDU over :func:`pdu_limit` is read, and none may
        take longer than ``network_timeout`` to arrive (:func:`bound_pdu_reads`)."""
        transport = event.assoc.dul.socket
        if transport is None or transport.socket is None:
            return
        bound_pdu_reads(transport, pdu_limit(self.settings), self.settings.network_timeout,
                        on_refused=_audit_abuse)

    def serving(self) -> bool:
        """Whether the thread that accepts associations is running."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def port(self) -> int:
        """The bound port (useful when configured as 0)."""
        assert self._server is not None
        return int(self._server.server_address[1])

    def stop(self) -> None:
        """Stop accepting, abort open associations, wait for spool writes in flight."""
        with self._lock:
            if self._server is not None:
                self._server.shutdown()
            self._ae.shutdown()
            self.service.close()
            self._server = None
