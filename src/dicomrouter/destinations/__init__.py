"""Delivery to destinations: per-instance outcomes for the dispatcher."""

from .dicom import (
    DestinationUnavailable,
    DicomSender,
    InstanceResult,
    OutgoingInstance,
    VerificationNotSupported,
)
from .status import Outcome, classify_status, describe_status

__all__ = [
    "DestinationUnavailable",
    "DicomSender",
    "InstanceResult",
    "Outcome",
    "OutgoingInstance",
    "VerificationNotSupported",
    "classify_status",
    "describe_status",
]
