"""Delivery to destinations: per-instance outcomes for the dispatcher."""

from .dicom import DestinationUnavailable, DicomSender, InstanceResult, OutgoingInstance
from .status import Outcome, classify_status, describe_status

__all__ = [
    "DestinationUnavailable",
    "DicomSender",
    "InstanceResult",
    "Outcome",
    "OutgoingInstance",
    "classify_status",
    "describe_status",
]
