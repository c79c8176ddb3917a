"""TCP settings for every association the node opens or accepts, and what they need.

pynetdicom leaves Nagle's algorithm on. A C-STORE request is a command PDU and
then data set PDUs; Nagle holds the data back until the peer acknowledges the
command, and the peer delays that ACK (about 40 ms on Linux) because it is
waiting for the rest. So every C-STORE waited 40 ms: four SRs to DCMTK
``storescp`` took 195 ms over one association, and 30 ms with ``TCP_NODELAY``
(which DCMTK sets itself when ``TCP_NODELAY`` is in its environment). Responses
that come back this fast expose a race in pynetdicom between a request and its
association's reactor thread; :func:`send_c_store` closes it.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import Any

from pynetdicom import evt

LOGGER = logging.getLogger(__name__)


def _no_delay(event: evt.Event) -> None:
    """``EVT_CONN_OPEN`` handler: send each PDU as soon as it is written."""
    transport = event.assoc.dul.socket
    if transport is None or transport.socket is None:  # both are set once connected
        return
    try:
        transport.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as exc:  # not a TCP socket; the association works all the same
        LOGGER.debug("TCP_NODELAY not set: %s", exc)


#: Pass in ``evt_handlers`` of ``AE.associate`` and ``AE.start_server``.
NO_DELAY = (evt.EVT_CONN_OPEN, _no_delay)


def send_c_store(assoc: Any, dataset: Any) -> Any:
    """``assoc.send_c_store(dataset)``, returning once the association can take the
    next request; every C-STORE on an association we opened goes through here.

    ``send_c_store`` pauses the association's reactor thread, so that it cannot
    take the response off the queue, and releases it once the response is in.
    If the next ``send_c_store`` starts before that thread has run again, the
    thread is already past its pause and takes the next response as an
    unexpected message ("Received unexpected C-STORE service message"); that
    send then waits out the DIMSE timeout and is retried. With ``TCP_NODELAY``
    a response is back in under a millisecond, and with the cores busy this
    hit about 2 % of the sends (24 of 1,200 with four CPU-bound processes
    beside the sender; none with this wait). pynetdicom 3.0.4 has no public
    way to see the reactor's state, hence its ``_is_paused``.
    """
    try:
        return assoc.send_c_store(dataset)
    finally:
        deadline = time.monotonic() + 5.0
        while (getattr(assoc, "_is_paused", False) and assoc.is_established
               and time.monotonic() < deadline):
            time.sleep(0.0001)
