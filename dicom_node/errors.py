"""Exceptions of the node and the DIMSE statuses they map to.

Every refusal on the receive path is an :class:`IntakeError` that carries the
C-STORE status it is answered with (PS3.4 Annex B.2.3), so a handler never has
to pick a literal and no exception ever reaches the peer as a crash.
"""

from __future__ import annotations


class Status:
    """C-STORE response statuses used by the node, in one place (PS3.4 B.2.3)."""

    SUCCESS = 0x0000
    #: Refused: Out of Resources. Transient: disk space, database busy.
    OUT_OF_RESOURCES = 0xA700
    #: Error: Data Set does not match SOP Class (missing or inconsistent attributes).
    DATASET_MISMATCH = 0xA900
    #: Error: Cannot understand. The data set or its pixel data cannot be decoded.
    CANNOT_DECODE = 0xC210
    #: Error: Cannot understand. An unexpected failure inside the node.
    INTERNAL_ERROR = 0xC211
    #: Error: Cannot understand. Refused by the intake policy (not a chest radiograph).
    POLICY_REFUSED = 0xC220
    #: Error: Cannot understand. The image exceeds the configured pixel budget.
    PIXEL_BUDGET_EXCEEDED = 0xC221


class NodeError(Exception):
    """Base class of every error raised by dicom_node."""


class ConfigError(NodeError):
    """The configuration is invalid; the message names the field."""


class IntakeError(NodeError):
    """A received instance is refused; :attr:`status` is the DIMSE answer.

    The message is sent to the peer as Error Comment (at most 64 characters),
    so it must never contain patient data.
    """

    status: int = Status.INTERNAL_ERROR
    #: True when whoever raised it has logged it already (lack of disk space is logged
    #: once an episode, not once an instance): the handler then does not log it again.
    logged: bool = False

    def __init__(self, message: str, status: int | None = None, logged: bool = False
                 ) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status
        self.logged = logged

    @property
    def comment(self) -> str:
        """The Error Comment (0000,0902) sent with the status: LO, 64 chars."""
        return str(self)[:64]


class UndecodableDataset(IntakeError):
    """The data set, an element of it, or its pixel data cannot be decoded."""

    status = Status.CANNOT_DECODE


class DatasetMismatch(IntakeError):
    """Required attributes are missing or inconsistent with the SOP Class."""

    status = Status.DATASET_MISMATCH


class PixelBudgetExceeded(IntakeError):
    """The declared image is larger than ``max_pixels`` allows."""

    status = Status.PIXEL_BUDGET_EXCEEDED


class PolicyRefused(IntakeError):
    """The intake policy refuses the instance (``non_chest = "refuse"``)."""

    status = Status.POLICY_REFUSED


class OutOfResources(IntakeError):
    """No room to store the instance durably (disk full, database unavailable)."""

    status = Status.OUT_OF_RESOURCES
