"""Delivery to destinations: one :class:`Sender` per kind, per-instance outcomes
for the dispatcher.

Each kind's sender (the DICOM one, and pynetdicom with it) is loaded on first use
(:func:`create_sender`): the HTTP process needs the status vocabulary on every page
but a sender only for an echo.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .outgoing import InstanceResult, OutgoingInstance, PreparedFile
from .registry import SenderOptions, create_sender, kinds
from .sender import DestinationUnavailable, Sender, VerificationNotSupported
from .status import Outcome, classify_status, describe_status

if TYPE_CHECKING:
    from .dicom import DicomSender


def __getattr__(name: str) -> Any:
    if name == "DicomSender":
        from . import dicom

        return dicom.DicomSender
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DestinationUnavailable",
    "DicomSender",
    "InstanceResult",
    "Outcome",
    "OutgoingInstance",
    "PreparedFile",
    "Sender",
    "SenderOptions",
    "VerificationNotSupported",
    "classify_status",
    "create_sender",
    "describe_status",
    "kinds",
]
