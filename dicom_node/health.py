"""The node's HTTP status endpoint: ``/metrics``, ``/healthz`` and ``/readyz``.

Bound to ``metrics_host:metrics_port`` (127.0.0.1:9112 by default; port 0 turns it
off), GET only, no identifiers in any answer.

* ``/metrics``: Prometheus' text format (:mod:`dicom_node.metrics`).
* ``/healthz``: alive -- the node's threads are running (the receiving server, the
  worker, the scheduler). 503 names the one that stopped: restart the node.
* ``/readyz``: able to do its work -- the database answers, the spool takes a file,
  the spool's disk is above ``min_free_disk_mb``, the worker holds the active model,
  and no destination has had a delivery failing for longer than
  ``ready_destination_failing_seconds``. 503 names every check that failed.

Both answer JSON: ``{"ok": false, "checks": {"disk": {"ok": false, "detail":
"..."}, ...}}``.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from dicom_node import metrics
from dicom_node.config import Settings
from dicom_node.errors import ConfigError
from dicom_node.jobs import JobStore
from dicom_node.spool import Spool

LOGGER = logging.getLogger(__name__)

#: A check: ``(ok, detail)``.
Check = Callable[[], tuple[bool, str]]


@dataclass(frozen=True)
class Probes:
    """What the status endpoint looks at, given by the node."""

    settings: Settings
    store: JobStore
    spool: Spool
    #: Whether the worker holds the active model, loaded.
    model_loaded: Callable[[], bool]
    #: Name -> is alive, for each thread the node runs.
    threads: dict[str, Callable[[], bool]]


class StatusServer:
    """``/metrics``, ``/healthz`` and ``/readyz`` on a small threaded HTTP server."""

    def __init__(self, probes: Probes) -> None:
        self.probes = probes
        s = probes.settings
        self.node_registry = CollectorRegistry()
        self.node_registry.register(metrics.NodeCollector(
            probes.store, s.model_dir, s.storage_dir, s.min_free_disk_mb * 2**20,
            probes.model_loaded))
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port (0 before start)."""
        return self._server.server_address[1] if self._server is not None else 0

    def start(self) -> None:
        """Bind and serve in a daemon thread; ConfigError when the address cannot be bound
        (a port in use)."""
        s = self.probes.settings
        handler = type("Handler", (_Handler,), {"status": self})
        try:
            self._server = ThreadingHTTPServer((s.metrics_host, s.metrics_port), handler)
        except OSError as exc:
            raise ConfigError(f"the status endpoint cannot listen on {s.metrics_host}:"
                              f"{s.metrics_port} ({exc.strerror or exc}): set metrics_port "
                              "to a free port, or 0 to turn it off") from exc
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="status-http", daemon=True)
        self._thread.start()
        LOGGER.info("metrics and health on http://%s:%d (/metrics, /healthz, /readyz)",
                    s.metrics_host, self.port)

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    # --- the answers ---

    def exposition(self) -> bytes:
        """Every metric of this process and this node, in Prometheus' text format."""
        return generate_latest(metrics.REGISTRY) + generate_latest(self.node_registry)

    def health(self) -> dict[str, Any]:
        """Liveness: each of the node's threads is running."""
        return _verdict({name: (alive(), "running" if alive() else "stopped")
                         for name, alive in self.probes.threads.items()})

    def readiness(self) -> dict[str, Any]:
        """Readiness: every check of the module docstring."""
        checks: dict[str, Check] = {"database": self._database, "spool": self._spool,
                                    "disk": self._disk, "model": self._model,
                                    "destinations": self._destinations}
        results: dict[str, tuple[bool, str]] = {}
        for name, check in checks.items():
            if name == "destinations" and not results["database"][0]:
                results[name] = (False, "unknown: the database does not answer")
                continue
            try:
                results[name] = check()
            except Exception as exc:
                results[name] = (False, f"{type(exc).__name__}: {exc}")
        return _verdict(results)

    def _database(self) -> tuple[bool, str]:
        self.probes.store.ping()
        return True, "answers"

    def _spool(self) -> tuple[bool, str]:
        self.probes.spool.check_writable()
        return True, "writable"

    def _disk(self) -> tuple[bool, str]:
        free = shutil.disk_usage(self.probes.settings.storage_dir).free // 2**20
        minimum = self.probes.settings.min_free_disk_mb
        return free > minimum, f"{free} MB free, minimum {minimum} MB"

    def _model(self) -> tuple[bool, str]:
        if self.probes.model_loaded():
            return True, "loaded"
        return False, "no model loaded (none installed, not servable, or loading)"

    def _destinations(self) -> tuple[bool, str]:
        limit = self.probes.settings.ready_destination_failing_seconds
        failing = self.probes.store.failing_destinations(limit)
        if not failing:
            return True, f"none failing for more than {limit:.0f} s"
        return False, "; ".join(
            f"{kind} {destination} failing for {metrics.since(since):.0f} s"
            for kind, destination, since in failing)


def _verdict(results: dict[str, tuple[bool, str]]) -> dict[str, Any]:
    return {"ok": all(ok for ok, _ in results.values()),
            "checks": {name: {"ok": ok, "detail": detail}
                       for name, (ok, detail) in results.items()}}


class _Handler(BaseHTTPRequestHandler):
    """GET /metrics, /healthz, /readyz; anything else 404 (or 405 for other methods)."""

    status: StatusServer
    #: A client that connects and says nothing is dropped after this many seconds.
    timeout = 10
    server_version = "dicom-node"
    sys_version = ""

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(200, self.status.exposition(), CONTENT_TYPE_LATEST)
        elif path in ("/healthz", "/readyz"):
            verdict = self.status.health() if path == "/healthz" else self.status.readiness()
            if not verdict["ok"] and path == "/readyz":
                LOGGER.debug("not ready: %s", verdict)
            self._send(200 if verdict["ok"] else 503,
                       json.dumps(verdict, indent=1).encode(), "application/json")
        else:
            self._send(404, b"not found: /metrics, /healthz or /readyz\n", "text/plain")

    def _refuse(self) -> None:
        self._send(405, b"GET only\n", "text/plain")

    do_POST = do_PUT = do_DELETE = do_PATCH = _refuse

    def _send(self, code: int, body: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        LOGGER.debug("status endpoint: " + format, *args)
