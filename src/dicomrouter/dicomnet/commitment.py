"""Storage Commitment Push Model (PS3.4 annex J): the data sets of its N-ACTION and
N-EVENT-REPORT, encoded and decoded with pydicom, and its constants.

The SCU asks with an N-ACTION-RQ (action type 1) on the well-known SOP instance
``1.2.840.10008.1.20.1.1``, whose data set carries a Transaction UID and the
Referenced SOP Sequence of the instances to commit. The SCP answers later with an
N-EVENT-REPORT-RQ carrying the same Transaction UID: event type 1 when every
instance is committed, 2 when some failed (Failed SOP Sequence, each item with its
Failure Reason). It may send it on the association of the N-ACTION or on a new one
it requests itself, with the SCP role for this SOP class (J.3.3).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from io import BytesIO

from pydicom import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence

from .pdu import ProtocolError

#: Storage Commitment Push Model SOP Class.
STORAGE_COMMITMENT_PUSH = "1.2.840.10008.1.20.1"
#: Its well-known SOP instance, the N-ACTION's and N-EVENT-REPORT's subject.
STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"
#: N-ACTION action type: "Request Storage Commitment".
REQUEST_COMMITMENT = 1
#: N-EVENT-REPORT event types.
EVENT_ALL_COMMITTED = 1
EVENT_SOME_FAILED = 2

IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"

_UID = re.compile(r"[0-9]+(\.[0-9]+)*")

#: PS3.4 J.3.2.1.1.1 (Failure Reason).
FAILURE_REASONS = {
    0x0110: "processing failure",
    0x0112: "no such object instance",
    0x0213: "resource limitation",
    0x0122: "referenced SOP class not supported",
    0x0119: "class / instance conflict",
    0x0131: "duplicate transaction UID",
}


def describe_failure(reason: int | None) -> str:
    if reason is None:
        return "no failure reason given"
    name = FAILURE_REASONS.get(reason, "unknown failure reason")
    return f"{name} (0x{reason:04X})"


@dataclass(frozen=True)
class Reference:
    sop_class: str
    sop_instance: str


@dataclass(frozen=True)
class Failure:
    sop_class: str
    sop_instance: str
    reason: int | None


@dataclass(frozen=True)
class CommitmentRequest:
    """What an N-ACTION-RQ asks to commit."""

    transaction_uid: str
    references: tuple[Reference, ...]


@dataclass(frozen=True)
class CommitmentReport:
    """What an N-EVENT-REPORT-RQ says was committed, and what was not."""

    transaction_uid: str
    event_type: int
    committed: tuple[Reference, ...]
    failed: tuple[Failure, ...]


def _encode(dataset: Dataset, syntax: str) -> bytes:
    if syntax not in (IMPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_LITTLE_ENDIAN):
        raise ValueError(f"cannot encode a data set in {syntax}")
    buffer = DicomBytesIO()
    buffer.is_little_endian = True
    buffer.is_implicit_VR = syntax == IMPLICIT_VR_LITTLE_ENDIAN
    write_dataset(buffer, dataset)
    return buffer.getvalue()


def _decode(data: bytes, syntax: str) -> Dataset:
    if syntax not in (IMPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_LITTLE_ENDIAN):
        raise ProtocolError(f"storage commitment data set in {syntax}")
    try:
        return read_dataset(BytesIO(data), syntax == IMPLICIT_VR_LITTLE_ENDIAN, True)
    except Exception as exc:  # pydicom raises many types on malformed data
        raise ProtocolError(f"unreadable storage commitment data set: {exc}") from exc


def _references(items: Iterable[Reference]) -> Sequence:
    sequence = []
    for reference in items:
        item = Dataset()
        item.ReferencedSOPClassUID = reference.sop_class
        item.ReferencedSOPInstanceUID = reference.sop_instance
        sequence.append(item)
    return Sequence(sequence)


def encode_action(request: CommitmentRequest, syntax: str = IMPLICIT_VR_LITTLE_ENDIAN) -> bytes:
    """The N-ACTION-RQ data set (PS3.4 J.3.2.1.1)."""
    dataset = Dataset()
    dataset.TransactionUID = request.transaction_uid
    dataset.ReferencedSOPSequence = _references(request.references)
    return _encode(dataset, syntax)


def decode_action(data: bytes, syntax: str = IMPLICIT_VR_LITTLE_ENDIAN) -> CommitmentRequest:
    dataset = _decode(data, syntax)
    try:
        return CommitmentRequest(
            str(dataset.TransactionUID),
            tuple(
                Reference(str(i.ReferencedSOPClassUID), str(i.ReferencedSOPInstanceUID))
                for i in dataset.get("ReferencedSOPSequence", [])
            ),
        )
    except Exception as exc:
        raise ProtocolError(f"invalid storage commitment request: {exc}") from exc


def encode_report(report: CommitmentReport, syntax: str = IMPLICIT_VR_LITTLE_ENDIAN) -> bytes:
    """The N-EVENT-REPORT-RQ data set (PS3.4 J.3.3.1.1)."""
    dataset = Dataset()
    dataset.TransactionUID = report.transaction_uid
    if report.committed:
        dataset.ReferencedSOPSequence = _references(report.committed)
    if report.failed:
        failed = _references(Reference(f.sop_class, f.sop_instance) for f in report.failed)
        for item, failure in zip(failed, report.failed, strict=True):
            if failure.reason is not None:
                item.FailureReason = failure.reason
        dataset.FailedSOPSequence = failed
    return _encode(dataset, syntax)


def decode_report(
    data: bytes, event_type: int | None, syntax: str = IMPLICIT_VR_LITTLE_ENDIAN
) -> CommitmentReport:
    """The N-EVENT-REPORT-RQ data set; :class:`ProtocolError` when it is not one
    (no Transaction UID, an event type other than 1 or 2, unreadable)."""
    if event_type not in (EVENT_ALL_COMMITTED, EVENT_SOME_FAILED):
        raise ProtocolError(f"storage commitment event type {event_type} (1 or 2 expected)")
    dataset = _decode(data, syntax)
    try:
        transaction = str(dataset.TransactionUID)
        committed = tuple(
            Reference(str(i.ReferencedSOPClassUID), str(i.ReferencedSOPInstanceUID))
            for i in dataset.get("ReferencedSOPSequence", [])
        )
        failed = tuple(
            Failure(
                str(i.ReferencedSOPClassUID),
                str(i.ReferencedSOPInstanceUID),
                int(i.FailureReason) if i.get("FailureReason") is not None else None,
            )
            for i in dataset.get("FailedSOPSequence", [])
        )
    except Exception as exc:
        raise ProtocolError(f"invalid storage commitment report: {exc}") from exc
    if not _UID.fullmatch(transaction) or len(transaction) > 64:
        raise ProtocolError(f"storage commitment report with Transaction UID {transaction!r}")
    return CommitmentReport(transaction, event_type, committed, failed)
