"""Where the node depends on more than a library's public API, in one place.

Two kinds of thing live here and nowhere else:

* **Library-global settings**, set once by :func:`configure` when the node (or
  one of its network commands) starts: they change how pynetdicom and pydicom
  behave for the whole process, so no module sets them at import time.
* **Reaches into private internals** -- attributes or layouts a library does not
  promise to keep. Each has a guard test in ``tests/test_libraries.py`` that
  fails loudly when an upgrade renames or removes what it relies on.
"""

from __future__ import annotations

from typing import Any

import pynetdicom
from pydicom import config as pydicom_config
from pydicom.dataset import Dataset
from pynetdicom import _config as pynetdicom_config

_PYNETDICOM_SETTINGS = {
    "LOG_REQUEST_IDENTIFIERS": False,
    "LOG_RESPONSE_IDENTIFIERS": False,
    "STORE_SEND_CHUNKED_DATASET": True,
}


def configure() -> None:
    """Set the library-global settings the node relies on (idempotent).

    * pynetdicom logs the identifiers of C-STORE/C-FIND requests and responses
      (patient name, ID, dates) unless told not to: never, in a hospital log.
    * pynetdicom's C-STORE of a *path* sends the file's encoded data set as it
      is on disk (the exact bytes made durable) instead of decoding and
      re-encoding it; the association must accept the file's own transfer
      syntax, the only one delivery proposes.
    * pydicom's value validation warns about received values that break their
      VR's rules, and its messages can quote the value (patient data). The node
      checks what it relies on itself (UIDs, image attributes), so reading does
      not validate.
    """
    for name, value in _PYNETDICOM_SETTINGS.items():
        # Setting a name pynetdicom no longer has would silently do nothing.
        if not hasattr(pynetdicom_config, name):
            raise RuntimeError(f"pynetdicom {pynetdicom.__version__} has no _config.{name}; "
                               "check dicom_node/libraries.py before upgrading")
        setattr(pynetdicom_config, name, value)
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE


def reactor_paused(assoc: Any) -> bool:
    """Whether the association's reactor thread is still paused after a request.

    ``Association.send_c_store`` pauses the reactor so that it cannot take the
    response off the queue, and releases it once the response is in; pynetdicom
    3.0 has no public way to see that state (``Association._is_paused``).
    """
    return bool(assoc._is_paused)


def mark_as_written_encoding(ds: Dataset) -> None:
    """Mark ``ds`` as already in the encoding it will be written in (Explicit VR Little
    Endian, its own Specific Character Set), so that writing it does not walk it to
    correct ambiguous VRs -- which would decode every element kept as raw bytes.

    ``Dataset.set_original_encoding`` is public, but the character set it must be
    given to match is only exposed as ``Dataset._character_set``; anything else
    leaves :attr:`Dataset.is_original_encoding` false and writing slow.
    """
    ds.set_original_encoding(False, True, ds._character_set)


def only_item(template: Any) -> Dataset:
    """The single content item of a highdicom template built with one item.

    highdicom templates (``TrackingIdentifier`` with a UID alone,
    ``QualitativeEvaluation``, ``Measurement`` without qualifiers) are
    sequences of content items; their layout is not part of highdicom's API, so
    the one-item shape is checked rather than assumed.
    """
    items = list(template)
    if len(items) != 1:
        raise RuntimeError(f"highdicom {type(template).__name__} now holds {len(items)} "
                           "content items where one was expected; check the SR builder")
    item: Dataset = items[0]
    return item
