"""The numbers of the DICOM Upper Layer (PS3.8) and of DIMSE (PS3.7): the only copy
in the code base. Every other module names these values instead of writing them."""

from __future__ import annotations

from enum import IntEnum

#: The DICOM application context (PS3.7 A.2.1).
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
#: The Verification SOP Class (C-ECHO).
VERIFICATION_SOP_CLASS = "1.2.840.10008.1.1"
#: The one transfer syntax of command sets (PS3.7 6.3.1).
IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"


class PduType(IntEnum):
    """PS3.8 9.3.1."""

    A_ASSOCIATE_RQ = 0x01
    A_ASSOCIATE_AC = 0x02
    A_ASSOCIATE_RJ = 0x03
    P_DATA_TF = 0x04
    A_RELEASE_RQ = 0x05
    A_RELEASE_RP = 0x06
    A_ABORT = 0x07


class AbortSource(IntEnum):
    """A-ABORT source (PS3.8 9.3.8)."""

    SERVICE_USER = 0x00
    SERVICE_PROVIDER = 0x02


class AbortReason(IntEnum):
    """A-ABORT reason when the source is the service provider (PS3.8 9.3.8)."""

    NOT_SPECIFIED = 0x00
    UNRECOGNIZED_PDU = 0x01
    UNEXPECTED_PDU = 0x02
    UNRECOGNIZED_PDU_PARAMETER = 0x04
    UNEXPECTED_PDU_PARAMETER = 0x05
    INVALID_PDU_PARAMETER = 0x06


class RejectResult(IntEnum):
    """A-ASSOCIATE-RJ result (PS3.8 9.3.4)."""

    PERMANENT = 0x01
    TRANSIENT = 0x02


class RejectSource(IntEnum):
    """A-ASSOCIATE-RJ source (PS3.8 9.3.4)."""

    SERVICE_USER = 0x01
    PROVIDER_ACSE = 0x02
    PROVIDER_PRESENTATION = 0x03


#: PS3.8 table 9-21: the A-ASSOCIATE-RJ sources, and the reasons each may give.
REJECT_SOURCE_NAMES = {
    1: "Service User",
    2: "Service Provider (ACSE)",
    3: "Service Provider (Presentation)",
}
REJECT_REASON_NAMES = {
    1: {
        1: "No reason given",
        2: "Application context name not supported",
        3: "Calling AE title not recognised",
        7: "Called AE title not recognised",
    },
    2: {1: "No reason given", 2: "Protocol version not supported"},
    3: {1: "Temporary congestion", 2: "Local limit exceeded"},
}


class Rejection(tuple[int, int, int]):
    """(result, source, reason) of an A-ASSOCIATE-RJ."""

    __slots__ = ()

    def __new__(cls, result: int, source: int, reason: int) -> Rejection:
        return super().__new__(cls, (result, source, reason))

    @property
    def permanent(self) -> bool:
        """Only "rejected-transient" (result 2) is worth retrying soon."""
        return self[0] != RejectResult.TRANSIENT

    def describe(self) -> str:
        """Source and reason in words; a value the standard reserves (which some
        peers send) is named as such instead of failing."""
        _result, source, reason = self
        source_name = REJECT_SOURCE_NAMES.get(source, f"reserved source {source}")
        reason_name = REJECT_REASON_NAMES.get(source, {}).get(reason, f"reserved reason {reason}")
        return f"source {source_name}, reason {reason_name}"


REJECT_CALLING_AE = Rejection(RejectResult.PERMANENT, RejectSource.SERVICE_USER, 0x03)
REJECT_CALLED_AE = Rejection(RejectResult.PERMANENT, RejectSource.SERVICE_USER, 0x07)
REJECT_CONTEXT_NAME = Rejection(RejectResult.PERMANENT, RejectSource.SERVICE_USER, 0x02)
REJECT_PROTOCOL_VERSION = Rejection(RejectResult.PERMANENT, RejectSource.PROVIDER_ACSE, 0x02)
REJECT_LIMIT = Rejection(RejectResult.TRANSIENT, RejectSource.PROVIDER_PRESENTATION, 0x02)


class ContextResult(IntEnum):
    """Presentation context result in an A-ASSOCIATE-AC (PS3.8 9.3.3.2)."""

    ACCEPTANCE = 0x00
    USER_REJECTION = 0x01
    NO_REASON = 0x02
    ABSTRACT_SYNTAX_NOT_SUPPORTED = 0x03
    TRANSFER_SYNTAXES_NOT_SUPPORTED = 0x04


class PdvControl(IntEnum):
    """Bits of a PDV's message control header (PS3.8 E.2)."""

    COMMAND = 0x01
    LAST = 0x02


class CommandField(IntEnum):
    """Command Field (0000,0100) of requests (PS3.7 E.1); a response is the request's
    value with bit 15 set (:func:`response_field`)."""

    C_STORE_RQ = 0x0001
    C_GET_RQ = 0x0010
    C_FIND_RQ = 0x0020
    C_MOVE_RQ = 0x0021
    C_ECHO_RQ = 0x0030
    N_EVENT_REPORT_RQ = 0x0100
    N_GET_RQ = 0x0110
    N_SET_RQ = 0x0120
    N_ACTION_RQ = 0x0130
    N_CREATE_RQ = 0x0140
    N_DELETE_RQ = 0x0150
    C_CANCEL_RQ = 0x0FFF

    C_STORE_RSP = 0x8001
    C_GET_RSP = 0x8010
    C_FIND_RSP = 0x8020
    C_MOVE_RSP = 0x8021
    C_ECHO_RSP = 0x8030
    N_EVENT_REPORT_RSP = 0x8100
    N_GET_RSP = 0x8110
    N_SET_RSP = 0x8120
    N_ACTION_RSP = 0x8130
    N_CREATE_RSP = 0x8140
    N_DELETE_RSP = 0x8150


RESPONSE_BIT = 0x8000


def response_field(request_field: int) -> int:
    """The Command Field of the response to ``request_field``."""
    return request_field | RESPONSE_BIT


def is_response(command_field: int) -> bool:
    return bool(command_field & RESPONSE_BIT)


class DataSetType(IntEnum):
    """Command Data Set Type (0000,0800): 0x0101 means none; any other value means a
    data set follows (PS3.7 E.1). We write 0x0001."""

    PRESENT = 0x0001
    ABSENT = 0x0101


class Priority(IntEnum):
    MEDIUM = 0x0000
    HIGH = 0x0001
    LOW = 0x0002


class Status(IntEnum):
    """DIMSE statuses we send or act on (PS3.7 annex C, PS3.4 annex B/C)."""

    SUCCESS = 0x0000
    #: Warnings: the object was stored (coercion, elements discarded, mismatch).
    WARNING_COERCION = 0xB000
    WARNING_ELEMENTS_DISCARDED = 0xB006
    WARNING_DATA_SET_MISMATCH = 0xB007
    PENDING = 0xFF00
    PENDING_WARNING = 0xFF01
    CANCEL = 0xFE00
    PROCESSING_FAILURE = 0x0110
    NO_SUCH_SOP_CLASS = 0x0118
    SOP_CLASS_NOT_SUPPORTED = 0x0122
    NOT_AUTHORIZED = 0x0124
    UNRECOGNIZED_OPERATION = 0x0211
    OUT_OF_RESOURCES = 0xA700
    DATA_SET_DOES_NOT_MATCH = 0xA900
    CANNOT_UNDERSTAND = 0xC000
    #: 0xC0xx "cannot understand" statuses we give a meaning of our own.
    INVALID_UID = 0xC001
    UID_MISMATCH = 0xC002


def is_pending(status: int) -> bool:
    return status in (Status.PENDING, Status.PENDING_WARNING)


# Exact codes from PS3.7 Annex C (general DIMSE statuses) and PS3.4 Annex B.2.3
# (Storage Service Class). Ranges are handled in ``describe_status``.
STATUS_MEANINGS: dict[int, str] = {
    0x0000: "Success",
    0x0001: "Requested optional attributes are not supported",
    0x0105: "No such attribute",
    0x0106: "Invalid attribute value",
    0x0107: "Attribute list error",
    0x0110: "Processing failure",
    0x0111: "Duplicate SOP Instance",
    0x0112: "No such SOP Instance",
    0x0113: "No such event type",
    0x0114: "No such argument",
    0x0115: "Invalid argument value",
    0x0116: "Attribute value out of range",
    0x0117: "Invalid SOP Instance",
    0x0118: "No such SOP Class",
    0x0119: "Class-Instance conflict",
    0x0120: "Missing attribute",
    0x0121: "Missing attribute value",
    0x0122: "Refused: SOP Class not supported",
    0x0123: "No such action type",
    0x0124: "Refused: not authorized",
    0x0210: "Duplicate invocation",
    0x0211: "Unrecognized operation",
    0x0212: "Mistyped argument",
    0x0213: "Resource limitation",
    0xB000: "Coercion of data elements",
    0xB006: "Elements discarded",
    0xB007: "Data set does not match SOP Class",
    0xFE00: "Cancel",
}


def describe_status(status: int) -> str:
    """Return ``"0xA700 Out of resources"``-style text with the PS3.4/PS3.7 meaning.

    The hex code is always included because PACS vendors use private values inside
    the standard ranges and operators grep their logs for the code.
    """
    code = f"0x{status:04X}"
    meaning = STATUS_MEANINGS.get(status)
    if meaning is None:
        high = status & 0xFF00
        if high == 0xA700:
            meaning = "Out of resources"
        elif high == 0xA900:
            meaning = "Data set does not match SOP Class"
        elif status & 0xF000 == 0xC000:
            meaning = "Cannot understand"
        elif high == 0xB000:
            meaning = "Warning"
        elif status & 0xF000 == 0xA000:
            meaning = "Failure"
        elif high == 0xFF00:
            meaning = "Pending"
        else:
            meaning = "Unknown status"
    return f"{code} {meaning}"
