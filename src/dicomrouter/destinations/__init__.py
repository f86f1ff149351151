"""Delivery to destinations: per-instance outcomes for the dispatcher.

The DICOM sender (and pynetdicom with it) is loaded on first use: the HTTP process
needs the status vocabulary on every page but a sender only for an echo.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .outgoing import InstanceResult, OutgoingInstance, PreparedFile
from .status import Outcome, classify_status, describe_status

if TYPE_CHECKING:
    from .dicom import (
        DestinationUnavailable,
        DicomSender,
        VerificationNotSupported,
    )

_FROM_DICOM = frozenset(
    {
        "DestinationUnavailable",
        "DicomSender",
        "VerificationNotSupported",
    }
)


def __getattr__(name: str) -> Any:
    if name in _FROM_DICOM:
        from . import dicom

        return getattr(dicom, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DestinationUnavailable",
    "DicomSender",
    "InstanceResult",
    "Outcome",
    "OutgoingInstance",
    "PreparedFile",
    "VerificationNotSupported",
    "classify_status",
    "describe_status",
]
