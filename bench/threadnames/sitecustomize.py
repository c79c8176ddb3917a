"""Given by ``bench/e2e.py`` to the node's process only (on its ``PYTHONPATH``): each
thread's OS name (``/proc/<pid>/task/<tid>/comm``, 15 characters) becomes its Python
name when it starts, so that the bench can read each thread's CPU time. Threads that
native code starts (OpenVINO's) inherit the name of the thread that started them. Not
part of the node: a bench's instrument. Linux only; anywhere else it does nothing. First
on the path, it stands in for any other ``sitecustomize`` (Debian's Python has one),
which the bench does not need.
"""

from __future__ import annotations

import ctypes
import sys
import threading

if sys.platform == "linux":
    _PR_SET_NAME = 15
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
    _run = threading.Thread._bootstrap_inner  # type: ignore[attr-defined]

    def _named(self: threading.Thread) -> None:
        _prctl(_PR_SET_NAME, ctypes.c_char_p(self.name.encode(errors="replace")[:15]), 0, 0, 0)
        _run(self)

    threading.Thread._bootstrap_inner = _named  # type: ignore[attr-defined]
