"""Map DIMSE C-STORE status codes to what the dispatcher should do next.

The dispatcher only needs to know whether an instance is delivered (``SUCCESS``,
``WARNING``), worth retrying later (``TRANSIENT``) or never deliverable to this
destination as it stands (``PERMANENT``). Retrying a permanent failure wastes the
destination's time and ours; giving up on a transient one loses data, so the
mapping follows PS3.4 Annex B.2.3 and PS3.7 Annex C closely.
"""

from __future__ import annotations

from enum import StrEnum


class Outcome(StrEnum):
    """What happened to one instance sent to a destination (a ``str`` subclass: the
    value is what the index stores)."""

    SUCCESS = "success"
    """Stored by the destination."""
    WARNING = "warning"
    """Stored, but the destination reported a warning (coercion, discarded elements...)."""
    TRANSIENT = "transient"
    """Not stored; retrying later may succeed (out of resources, aborted, timed out)."""
    PERMANENT = "permanent"
    """Not stored; retrying the same object to the same destination will fail again."""

    @property
    def delivered(self) -> bool:
        """True when the destination holds the object (success or warning)."""
        return self in (Outcome.SUCCESS, Outcome.WARNING)


# Exact codes from PS3.7 Annex C (general DIMSE statuses) and PS3.4 Annex B.2.3
# (Storage Service Class). Ranges are handled in ``describe_status``.
_EXACT: dict[int, str] = {
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
    meaning = _EXACT.get(status)
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


def classify_status(status: int) -> Outcome:
    """Classify a C-STORE response status.

    * ``0x0000`` success.
    * ``0xB0xx`` warning: PS3.4 says the object *was* stored (coercion, elements
      discarded, data set does not match SOP class), so it counts as delivered.
    * ``0xA7xx`` out of resources: the only class of failure a later retry can fix
      (disk full, PACS busy); also ``0x0213`` resource limitation for the same reason.
    * ``0xA9xx``, ``0xCxxx``, ``0x0122`` (SOP class not supported), ``0x0124`` (not
      authorized), ``0x0211``/``0x0212`` and anything unknown: permanent. Unknown codes
      are treated as permanent so a misbehaving peer cannot make us retry forever;
      the message keeps the code so an operator can requeue by hand.
    """
    if status == 0x0000:
        return Outcome.SUCCESS
    if status & 0xFF00 == 0xB000:
        return Outcome.WARNING
    if status & 0xFF00 == 0xA700 or status == 0x0213:
        return Outcome.TRANSIENT
    return Outcome.PERMANENT
