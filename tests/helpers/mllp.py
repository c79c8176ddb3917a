"""An MLLP receiver for the tests, on python-hl7 (the sender builds with hl7apy, so one
library checks the other).

``with MllpReceiver(Mode.ACCEPT) as rx:`` listens on 127.0.0.1 on a free port
(``rx.port``), parses every message it receives with ``hl7.parse``
(``rx.messages``, raw payloads in ``rx.payloads``) and answers it the way its mode
says. Stops with bounded waits; a thread that does not stop fails the test.
"""

from __future__ import annotations

import enum
import socket
import threading
from types import TracebackType
from typing import Any

import hl7  # type: ignore[import-untyped]

START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c\r"
STOP_TIMEOUT = 5.0


class Mode(enum.StrEnum):
    """How the receiver answers."""

    ACCEPT = "AA"
    ERROR = "AE"
    REJECT = "AR"
    COMMIT_ACCEPT = "CA"
    #: an AA whose MSA-2 is another control ID
    OTHER_MESSAGE = "other"
    #: a framed reply that is not HL7
    GARBAGE = "garbage"
    #: ``raw_reply`` framed, as given
    RAW = "raw"
    #: close the connection after reading the message, without answering
    CLOSE = "close"
    #: read the message and never answer (until stopped)
    HANG = "hang"


class MllpReceiver:
    """A one-message-per-connection MLLP server on 127.0.0.1 (context manager)."""

    def __init__(self, mode: Mode = Mode.ACCEPT, error_text: str = "Unknown patient",
                 raw_reply: bytes = b"", read_timeout: float = 5.0) -> None:
        self.mode = mode
        self.error_text = error_text
        self.raw_reply = raw_reply
        self.read_timeout = read_timeout
        self.messages: list[Any] = []
        self.payloads: list[bytes] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Port 0: the kernel picks a free port, with no window for another process.
        self._listener.bind(("127.0.0.1", 0))
        self.host = "127.0.0.1"
        self.port: int = self._listener.getsockname()[1]

    def __enter__(self) -> MllpReceiver:
        self._listener.listen(8)
        self._listener.settimeout(0.05)
        self._spawn(self._accept_loop)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for thread in list(self._threads):
            thread.join(STOP_TIMEOUT)
        self._listener.close()
        alive = [t.name for t in self._threads if t.is_alive()]
        if alive:
            raise RuntimeError(f"MLLP receiver threads did not stop: {alive}")

    def _spawn(self, target: Any, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True,
                                  name=f"mllp-rx-{len(self._threads)}")
        self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._spawn(self._serve, conn)

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            payload = self._read(conn)
            if payload is None:
                return
            self.payloads.append(payload)
            try:
                message = hl7.parse(payload.decode("utf-8"))
            except Exception as exc:
                self.errors.append(f"unparsable: {type(exc).__name__}: {exc}")
                return
            self.messages.append(message)
            if self.mode is Mode.CLOSE:
                return
            if self.mode is Mode.HANG:
                self._stop.wait()
                return
            conn.sendall(START_BLOCK + self._reply(message) + END_BLOCK)

    def _read(self, conn: socket.socket) -> bytes | None:
        conn.settimeout(self.read_timeout)
        buffer = bytearray()
        while END_BLOCK not in buffer:
            try:
                chunk = conn.recv(65536)
            except OSError as exc:
                self.errors.append(f"read: {type(exc).__name__}")
                return None
            if not chunk:
                self.errors.append("closed before the end block")
                return None
            buffer += chunk
        if not buffer.startswith(START_BLOCK) or not buffer.endswith(END_BLOCK):
            self.errors.append("bad MLLP framing")
            return None
        return bytes(buffer[1:-2])

    def _reply(self, message: Any) -> bytes:
        if self.mode is Mode.GARBAGE:
            return b"this is not HL7\r"
        if self.mode is Mode.RAW:
            return self.raw_reply
        code = "AA" if self.mode is Mode.OTHER_MESSAGE else str(self.mode.value)
        ack = message.create_ack(ack_code=code, message_id="ACK0001")
        msa = ack.segment("MSA")
        if self.mode is Mode.OTHER_MESSAGE:
            msa.assign_field("SOMEONE-ELSE", 2)
        if code in ("AE", "AR"):
            msa.assign_field(ack.escape(self.error_text), 3)
        return str(ack).encode("utf-8")
