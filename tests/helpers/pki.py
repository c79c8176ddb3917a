"""Throwaway TLS credentials made with ``openssl`` in a test's own folder: a site CA
with a server and a client certificate, and another CA with the same (never kept in
the repository)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from helpers.environment import require_tool

#: An end entity of the test CAs, server and client, with the names it is valid for.
_LEAF_EXTENSIONS = """\
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth, clientAuth
subjectAltName = {names}
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""
#: Loopback, by address and by name.
LOOPBACK = "IP:127.0.0.1, DNS:localhost"
#: The one name of :attr:`Pki.misnamed_server`.
OTHER_NAME = "pacs.example.org"


@dataclass(frozen=True)
class Credential:
    """A PEM private key (unencrypted) and its certificate."""

    key: Path
    cert: Path


@dataclass(frozen=True)
class Pki:
    """The site's CA with a server and a client certificate for loopback, and a server
    certificate for :data:`OTHER_NAME` only; another CA (an attacker's, or a
    misconfigured peer's) with a server and a client certificate for loopback."""

    ca: Credential
    server: Credential
    client: Credential
    misnamed_server: Credential
    other_ca: Credential
    other_server: Credential
    other_client: Credential

    @classmethod
    def make(cls, folder: Path) -> Pki:
        """Every key and certificate, under ``folder`` (created), valid for two days."""
        folder.mkdir(parents=True)
        ca, other = _make_ca(folder, "site-ca"), _make_ca(folder, "other-ca")
        return cls(ca, _issue(folder, "server", ca), _issue(folder, "client", ca),
                   _issue(folder, "misnamed-server", ca, f"DNS:{OTHER_NAME}"),
                   other, _issue(folder, "other-server", other),
                   _issue(folder, "other-client", other))


def dcmtk_tls(credential: Credential | None, ca: Credential) -> list[str]:
    """DCMTK's TLS switches: our key and certificate (None: anonymous TLS), and the CA
    that must have signed the peer's certificate."""
    own = ["+tls", str(credential.key), str(credential.cert)] if credential else ["+tla"]
    return [*own, "+cf", str(ca.cert)]


def _openssl(*args: str) -> None:
    subprocess.run([require_tool("openssl"), *args], check=True, capture_output=True,
                   timeout=60)


def _make_ca(folder: Path, name: str) -> Credential:
    ca = Credential(folder / f"{name}.key", folder / f"{name}.pem")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca.key),
             "-out", str(ca.cert), "-days", "2", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return ca


def _issue(folder: Path, name: str, ca: Credential, names: str = LOOPBACK) -> Credential:
    leaf = Credential(folder / f"{name}.key", folder / f"{name}.pem")
    request, extensions = folder / f"{name}.csr", folder / f"{name}.ext"
    extensions.write_text(_LEAF_EXTENSIONS.format(names=names))
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(leaf.key),
             "-out", str(request), "-subj", f"/CN={name}")
    _openssl("x509", "-req", "-in", str(request), "-CA", str(ca.cert), "-CAkey", str(ca.key),
             "-CAcreateserial", "-days", "2", "-extfile", str(extensions),
             "-out", str(leaf.cert))
    return leaf
