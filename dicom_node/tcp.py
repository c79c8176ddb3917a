"""TCP settings for every association the node opens or accepts.

pynetdicom leaves Nagle's algorithm on. A DIMSE exchange is a few small PDUs
that each wait for an answer, so every C-STORE paid for Nagle holding back the
last segment until the peer's delayed ACK (about 40 ms on Linux): four SRs to
DCMTK ``storescp`` took 195 ms over one association, and 30 ms with
``TCP_NODELAY`` (what DCMTK itself does when ``TCP_NODELAY`` is set).
"""

from __future__ import annotations

import logging
import socket
from typing import Any

from pynetdicom import evt

LOGGER = logging.getLogger(__name__)


def _no_delay(event: evt.Event) -> None:
    """``EVT_CONN_OPEN`` handler: send each PDU as soon as it is written."""
    sock: Any = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as exc:  # not a TCP socket; the association works all the same
        LOGGER.debug("TCP_NODELAY not set: %s", exc)


#: Pass in ``evt_handlers`` of ``AE.associate`` and ``AE.start_server``.
NO_DELAY = (evt.EVT_CONN_OPEN, _no_delay)
