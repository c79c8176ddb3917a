"""TCP settings for every association the node opens or accepts, and what they need.

pynetdicom leaves Nagle's algorithm on; with it each C-STORE waits for the
peer's delayed ACK of its command PDU (about 40 ms on Linux). Every association
therefore sets ``TCP_NODELAY`` (DCMTK does the same when ``TCP_NODELAY`` is in
its environment). Responses that come back that fast expose a race between a
request and its association's reactor thread; :func:`send_c_store` closes it.
Figures: docs/performance.md.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import Any

from pynetdicom import evt

from dicom_node.libraries import reactor_paused

LOGGER = logging.getLogger(__name__)

#: The longest :func:`send_c_store` waits for the reactor after a response.
_REACTOR_WAIT_SECONDS = 5.0


def _no_delay(event: evt.Event) -> None:
    """``EVT_CONN_OPEN`` handler: send each PDU as soon as it is written."""
    transport = event.assoc.dul.socket
    if transport is None or transport.socket is None:  # both are set once connected
        return
    try:
        transport.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as exc:  # not a TCP socket; the association works all the same
        LOGGER.debug("TCP_NODELAY not set: %s", exc)


#: Pass in ``evt_handlers`` of ``AE.associate`` and ``AE.make_server``.
NO_DELAY = (evt.EVT_CONN_OPEN, _no_delay)


def send_c_store(assoc: Any, dataset: Any) -> Any:
    """``assoc.send_c_store(dataset)``, returning once the association can take the
    next request; every C-STORE on an association we open goes through here.

    ``send_c_store`` pauses the association's reactor thread so that it cannot
    take the response off the queue, and releases it once the response is in. If
    the next request starts before that thread has run again, the thread takes
    the next response as unexpected and that request waits out the DIMSE
    timeout. So this waits, bounded, until the reactor runs again.
    """
    try:
        return assoc.send_c_store(dataset)
    finally:
        deadline = time.monotonic() + _REACTOR_WAIT_SECONDS
        while reactor_paused(assoc) and assoc.is_established and time.monotonic() < deadline:
            time.sleep(0.0001)
