"""Map DIMSE C-STORE status codes to what the dispatcher should do next.

The dispatcher only needs to know whether an instance is delivered (``SUCCESS``,
``WARNING``), worth retrying later (``TRANSIENT``) or never deliverable to this
destination as it stands (``PERMANENT``). Retrying a permanent failure wastes the
destination's time and ours; giving up on a transient one loses data, so the
mapping follows PS3.4 Annex B.2.3 and PS3.7 Annex C closely.
"""

from __future__ import annotations

from enum import StrEnum

from dicomrouter.dicomnet.constants import describe_status

__all__ = ["Outcome", "classify_status", "describe_status"]


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
