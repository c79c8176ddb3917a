"""A scripted FHIR server on loopback: answers every POST the way it is told, records it."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Literal

Mode = Literal["created", "invalid", "error", "hang"]

#: The OperationOutcome of an "invalid" answer; longer than an Attempt's detail keeps.
INVALID_DIAGNOSTICS = ("DiagnosticReport.code: unknown code in the value set; "
                       + "x" * 300)
ERROR_DIAGNOSTICS = "database unavailable"
LOCATION = "DiagnosticReport/42/_history/1"


@dataclass(frozen=True)
class Received:
    """One request as the server read it (header names lower case)."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes


def operation_outcome(diagnostics: str, code: str = "invalid") -> bytes:
    return json.dumps({"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": code, "diagnostics": diagnostics}]}).encode()


class FhirServer:
    """``with FhirServer("created") as server:`` -- a threaded HTTP server on
    127.0.0.1 (a free port) at :attr:`url`.

    Modes: ``created`` 201 with a Location; ``invalid`` 400 with an OperationOutcome;
    ``error`` 500 with an OperationOutcome; ``hang`` reads the request and never
    answers until the server stops. ``status`` answers that code with an
    OperationOutcome instead (408, 429, 404, 302 ...). :attr:`received` lists the
    requests in order. Leaving the block stops it within a few seconds, hanging
    requests included.
    """

    def __init__(self, mode: Mode = "created", status: int | None = None) -> None:
        self.mode: Mode = mode
        self.status = status
        self.received: list[Received] = []
        self._stop = threading.Event()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        kwargs={"poll_interval": 0.05},
                                        name="fhir-server", daemon=True)

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/fhir"

    def __enter__(self) -> FhirServer:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()  # hanging handlers return, closing their connections
        stopper = threading.Thread(target=self._httpd.shutdown, daemon=True)
        stopper.start()
        stopper.join(timeout=5)
        self._thread.join(timeout=5)
        self._httpd.server_close()

    def _answer(self, handler: BaseHTTPRequestHandler) -> None:
        if self.status is not None:
            # a redirect points back here: followed, it would show as a second request
            moved = {"Location": f"{self.url}/moved"} if 300 <= self.status < 400 else {}
            self._send(handler, self.status, operation_outcome(f"scripted {self.status}"),
                       moved)
        elif self.mode == "created":
            self._send(handler, 201, b"", {"Location": f"{self.url}/{LOCATION}"})
        elif self.mode == "invalid":
            self._send(handler, 400, operation_outcome(INVALID_DIAGNOSTICS))
        elif self.mode == "error":
            self._send(handler, 500, operation_outcome(ERROR_DIAGNOSTICS, "exception"))
        else:
            self._stop.wait(timeout=60)
            handler.close_connection = True

    @staticmethod
    def _send(handler: BaseHTTPRequestHandler, status: int, body: bytes,
              headers: dict[str, str] | None = None) -> None:
        handler.send_response(status)
        for name, value in {"Content-Type": "application/fhir+json",
                            "Content-Length": str(len(body)), **(headers or {})}.items():
            handler.send_header(name, value)
        handler.end_headers()
        handler.wfile.write(body)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                server.received.append(Received(
                    "POST", self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                server._answer(self)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # quiet: pytest shows the test's own output

        return Handler
