"""Ask a DICOM destination to commit what it stored (Storage Commitment Push Model).

One association per request, proposing only the commitment SOP class: the N-ACTION
goes out, then the association stays open ``wait`` seconds for a report on it
(``on_report`` answers it). Most SCPs (Orthanc, dcm4chee) report later on a new
association to our listener instead: the receiver answers that one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from dicomrouter.dicomnet import Reply, Request, Status
from dicomrouter.dicomnet.commitment import (
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
    REQUEST_COMMITMENT,
    STORAGE_COMMITMENT_INSTANCE,
    STORAGE_COMMITMENT_PUSH,
    CommitmentRequest,
    Reference,
    encode_action,
)

from .association import AssociationLost
from .dicom import DestinationUnavailable, DicomSender
from .status import describe_status

log = logging.getLogger(__name__)

#: What the N-ACTION came to.
REQUESTED = "requested"  # N-ACTION-RSP success: a report is due
REFUSED = "refused"  # the SOP class refused, or the N-ACTION failed: no report will come
UNAVAILABLE = "unavailable"  # no association, or lost: a report may or may not come


@dataclass(frozen=True)
class CommitmentAttempt:
    outcome: str
    message: str
    #: Reports answered on the N-ACTION's association.
    reports: int = 0


def request_commitment(
    sender: DicomSender,
    transaction_uid: str,
    references: Sequence[Reference],
    on_report: Callable[[Request], Iterable[Reply]],
    wait: float,
) -> CommitmentAttempt:
    where = f"{sender.config.ae_title}@{sender.config.host}:{sender.config.port}"
    proposed = [
        (STORAGE_COMMITMENT_PUSH, IMPLICIT_VR_LITTLE_ENDIAN),
        (STORAGE_COMMITMENT_PUSH, EXPLICIT_VR_LITTLE_ENDIAN),
    ]
    try:
        assoc = sender._associate(proposed)
    except DestinationUnavailable as exc:
        if not exc.transient:  # rejected-permanent: this calling AE may never ask
            return CommitmentAttempt(REFUSED, f"storage commitment refused: {exc}")
        return CommitmentAttempt(UNAVAILABLE, str(exc))
    try:
        syntax = next(
            (ts for sop, ts in proposed if (sop, ts) in assoc.contexts),
            None,
        )
        if syntax is None:
            return CommitmentAttempt(
                REFUSED,
                f"{where} does not support storage commitment: it refused the Storage "
                f"Commitment Push Model SOP Class ({STORAGE_COMMITMENT_PUSH})",
            )
        reports = 0

        def counted(request: Request) -> Iterable[Reply]:
            nonlocal reports
            reports += 1
            return on_report(request)

        assoc.on_request = counted
        data = encode_action(CommitmentRequest(transaction_uid, tuple(references)), syntax)
        response = assoc.action(
            STORAGE_COMMITMENT_PUSH, STORAGE_COMMITMENT_INSTANCE, REQUEST_COMMITMENT, data, syntax
        )
        if response.status != Status.SUCCESS:
            detail = describe_status(response.status)
            if response.comment:
                detail = f"{detail}: {response.comment}"
            return CommitmentAttempt(
                REFUSED, f"{where} answered the storage commitment request with {detail}"
            )
        if wait > 0 and not reports:
            assoc.wait_for_request(wait)
        return CommitmentAttempt(
            REQUESTED,
            f"storage commitment of {len(references)} instance(s) requested from {where}",
            reports,
        )
    except AssociationLost as exc:
        return CommitmentAttempt(UNAVAILABLE, f"storage commitment request to {where}: {exc}")
    finally:
        assoc.release()
