"""Test-only fault injection: SIGKILL the node at a named step of the receive path.

Off unless ``DICOM_NODE_TEST_KILL_AT`` is set in the environment the process
starts with, as ``STEP`` or ``STEP:N`` (the N-th time the step is reached; 1 by
default). The durability tests use it to prove that an instance the sender saw
acknowledged survives a crash at any step, and that nothing half-received is
queued. When it is not set, :data:`ARMED` is None and each step costs one
attribute read (``if faults.ARMED:``) and no call. A node started with it armed
says so in its log at start-up.

The steps, in order, for one received instance:

* ``received``: its data set is read off the association (the C-STORE handler
  starts);
* ``temp_written``, ``temp_fsynced``, ``renamed``: the spool's temporary file is
  written, fsynced, renamed to its final name;
* ``committed``: its job row is committed;
* ``responded``: the C-STORE response is written to the socket.
"""

from __future__ import annotations

import os
import signal
import threading

ENV = "DICOM_NODE_TEST_KILL_AT"
STEPS = ("received", "temp_written", "temp_fsynced", "renamed", "committed", "responded")


def parse(value: str | None) -> tuple[str, int] | None:
    """``STEP`` or ``STEP:N`` -> (step, N); None when unset or empty; ValueError for
    a step that does not exist or an N below 1."""
    if not value:
        return None
    step, _, count = value.partition(":")
    nth = int(count) if count else 1
    if step not in STEPS or nth < 1:
        raise ValueError(f"{ENV}={value!r}: expected one of {', '.join(STEPS)}, "
                         "optionally ':N' with N >= 1")
    return step, nth


#: (step, N) when armed; None in production.
ARMED = parse(os.environ.get(ENV))
_reached = 0
_lock = threading.Lock()


def reached(step: str) -> None:
    """Count ``step``; SIGKILL this process when it is the armed step's N-th time.
    Call only under ``if faults.ARMED:``."""
    global _reached
    if ARMED is None or step != ARMED[0]:
        return
    with _lock:
        _reached += 1
        if _reached == ARMED[1]:
            os.kill(os.getpid(), signal.SIGKILL)
