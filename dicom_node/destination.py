"""Where results go: a Storage SCP named ``AET@HOST:PORT`` (:class:`Destination`),
and the entries of the ``destinations`` setting (:class:`Target`), each of a kind:
DICOM C-STORE, DICOMweb STOW-RS, HL7 v2 over MLLP or FHIR.

The settings validate destinations with it, the result router adds the
calling AE's Storage SCP with it, and delivery opens associations to it.
"""

from __future__ import annotations

import ipaddress
import os
import re
import ssl
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pynetdicom.utils import set_ae

_DESTINATION = re.compile(r"^(?P<ae>[^@]{1,16})@(?P<host>[A-Za-z0-9.\-:\[\]]+):(?P<port>\d{1,5})$")


def check_ae_title(value: str, field: str) -> str:
    """``value`` stripped, if it is a valid AE title (PS3.5 6.2); else ValueError naming
    ``field``.

    pynetdicom's validation is the one its associations apply: 1-16 characters
    of the default repertoire, no backslash or control characters, not only
    spaces (pydicom's allows a backslash, the multi-value separator).
    """
    try:
        set_ae(value, field, allow_empty=False, allow_none=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{field}: {value!r} is not a valid AE title (1-16 ASCII, no '\\')"
                         ) from exc
    return value.strip()


@dataclass(frozen=True)
class Destination:
    """A Storage SCP: AE title, host, port."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Destination:
        """Parse ``AET@HOST:PORT`` (ValueError if it is not one)."""
        match = _DESTINATION.match(text.strip())
        if not match or not 0 < int(match["port"]) < 65536:
            raise ValueError(f"destination {text!r} is not AET@HOST:PORT")
        try:
            ae_title = check_ae_title(match["ae"], "destination")
        except ValueError as exc:
            raise ValueError(f"destination {text!r} is not AET@HOST:PORT") from exc
        return cls(ae_title, match["host"].strip("[]"), int(match["port"]))

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class ClientTls:
    """TLS to a Storage SCP (PS3.15 B.1, the Basic TLS Secure Transport Connection
    Profile): the CA bundle its certificate must chain to, our client certificate and
    key when it asks for one, and the name its certificate must carry (None: the
    destination's host; an IP address is matched against the certificate's IP
    address entries)."""

    ca_certificates: Path
    certificate: Path | None = None
    private_key: Path | None = None
    server_name: str | None = None

    def context(self) -> ssl.SSLContext:
        """A client context, TLS 1.2+, trusting ``ca_certificates`` only (not the
        system's CAs), with hostname checking. OSError (ssl.SSLError among them) if a
        file is missing or unusable, ValueError if the key is encrypted; the files are
        read at every call, so a renewed one is used."""
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH,
                                             cafile=str(self.ca_certificates))
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.certificate is not None:
            # Without a password callback OpenSSL would prompt on the terminal.
            context.load_cert_chain(self.certificate, self.private_key,
                                    password=_no_password)
        return context


def _no_password() -> str:
    raise ValueError("tls_private_key is encrypted: the node reads an unencrypted key "
                     "(readable by its user only)")


#: What a destination kind carries: DICOM objects per image (the SR, the evidence
#: image) or one message per study result.
Kind = Literal["dicom", "dicomweb", "hl7", "fhir"]
#: The DICOM objects a dicom or dicomweb destination may take.
DicomObject = Literal["sr", "evidence"]


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback address (127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def url_refusal(url: str, what: str) -> str | None:
    """Why ``url`` may not carry results (``what``: "FHIR base URL", ...), or None: it
    must be https, or plain http to a loopback host."""
    try:
        split = urlsplit(url)
        host = split.hostname or ""
    except ValueError:
        return f"{what} is not a valid URL"
    if split.scheme not in ("http", "https") or not host:
        return f"{what} must be https://host/... (or http:// to a loopback host)"
    if split.scheme == "http" and not is_loopback(host):
        return (f"{what} refused: plain http is allowed to a loopback host (127.0.0.1, "
                "localhost, ::1) only; use https")
    return None


def http_phrase(code: int) -> str:
    """The reason phrase of an HTTP status code ("" for an unknown one)."""
    try:
        return HTTPStatus(code).phrase
    except ValueError:
        return ""


class Target(BaseModel):
    """One entry of ``destinations``: where results go, and in which form.

    ``dicom`` (a Storage SCP, C-STORE; ``address = "AET@HOST:PORT"``, or the entry
    is that string alone) and ``dicomweb`` (STOW-RS to ``url``, the service's
    base URL) take the per-image DICOM objects named in ``objects``. ``hl7`` (an
    ORU^R01 over MLLP to ``address = "HOST:PORT"``) and ``fhir`` (a
    DiagnosticReport Bundle POSTed to ``url``, the FHIR base) take one message
    per study result. ``token`` or the environment variable named by
    ``token_env`` gives a bearer token to dicomweb and fhir. A dicom destination
    uses TLS when ``tls_ca_certificates`` is set (:class:`ClientTls`), and then
    never falls back to clear text.
    """

    # hide_input_in_errors: a refused entry is not echoed in the error (its token).
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    kind: Kind = "dicom"
    #: A short name for the entry (unique in the list); defaults to the address or URL.
    name: str = ""
    address: str = ""
    url: str = ""
    objects: tuple[DicomObject, ...] = ("sr", "evidence")
    token: str | None = Field(default=None, repr=False)
    token_env: str | None = None
    #: hl7: MLLP has no encryption; a RIS off this host needs this set explicitly.
    allow_plaintext: bool = False
    #: hl7: MSH-3/4 (us) and MSH-5/6 (the RIS).
    sending_application: str = "DICOM_NODE"
    sending_facility: str = ""
    receiving_application: str = ""
    receiving_facility: str = ""
    #: fhir: the identifier systems of the patient ID and the accession number.
    patient_system: str | None = None
    accession_system: str | None = None
    #: dicom: the PEM CA bundle the SCP's certificate must chain to; setting it turns
    #: TLS on. A client certificate and its (unencrypted) key, together, if the SCP
    #: asks for one. The name the SCP's certificate must carry (default: the host of
    #: ``address``).
    tls_ca_certificates: Path | None = None
    tls_certificate: Path | None = None
    tls_private_key: Path | None = None
    tls_server_name: str | None = Field(default=None, min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return {"kind": "dicom", "address": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check(self) -> Target:
        self._check_tls()
        if self.kind == "dicom":
            object.__setattr__(self, "address", str(Destination.parse(self.address)))
        elif self.kind == "hl7":
            host, _, port = self.address.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"hl7 destination {self.address!r} is not HOST:PORT")
            if not is_loopback(host) and not self.allow_plaintext:
                raise ValueError(f"hl7 destination {self.address!r}: MLLP carries the "
                                 "patient's name and ID in clear text; set allow_plaintext "
                                 "= true for a RIS on a trusted network (or reach it through "
                                 "a TLS tunnel on loopback)")
        elif refusal := url_refusal(self.url, f"{self.kind} destination url"):
            raise ValueError(refusal)
        if not self.name:
            object.__setattr__(self, "name", self.key)
        return self

    def _check_tls(self) -> None:
        given = [name for name in ("tls_ca_certificates", "tls_certificate",
                                   "tls_private_key", "tls_server_name")
                 if getattr(self, name) is not None]
        if given and self.kind != "dicom":
            raise ValueError(f"{self.kind} destination: {', '.join(given)} apply to dicom "
                             "destinations only (dicomweb and fhir use https)")
        if (self.tls_certificate is None) != (self.tls_private_key is None):
            raise ValueError("dicom destination: tls_certificate and tls_private_key must "
                             "be given together")
        if given and self.tls_ca_certificates is None:
            raise ValueError(f"dicom destination: {', '.join(given)} need "
                             "tls_ca_certificates (TLS is on only with the CA that verifies "
                             "the destination's certificate)")

    @property
    def client_tls(self) -> ClientTls | None:
        """How to reach a dicom destination over TLS; None: plain TCP."""
        if self.tls_ca_certificates is None:
            return None
        return ClientTls(self.tls_ca_certificates, self.tls_certificate,
                         self.tls_private_key, self.tls_server_name)

    @property
    def key(self) -> str:
        """What a delivery row names: the address (dicom, hl7) or the URL."""
        return self.address if self.kind in ("dicom", "hl7") else self.url

    @property
    def per_study(self) -> bool:
        """One message per study result (hl7, fhir), not DICOM objects per image."""
        return self.kind in ("hl7", "fhir")

    def bearer_token(self) -> str | None:
        """``token``, else the environment variable ``token_env`` (None if neither)."""
        if self.token:
            return self.token
        return os.environ.get(self.token_env or "") or None

    def hl7_endpoint(self) -> tuple[str, int]:
        """``(host, port)`` of an hl7 destination."""
        host, _, port = self.address.rpartition(":")
        return host.strip("[]"), int(port)

    def __str__(self) -> str:
        return f"{self.kind} {self.name}"
