"""The one interface every kind of destination implements, and its two errors.

The dispatch worker, the operator's echo (``control.destinations``) and the command
line only ever hold a :class:`Sender` (made by :func:`~.registry.create_sender`), so
a new kind plugs into the queue, the per-instance states, retries, pause and probe,
send windows, transforms, metrics and the trace without any of them changing.
docs/destinations.md says how to add one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

from .outgoing import InstanceResult, OutgoingInstance

__all__ = [
    "DestinationUnavailable",
    "OnResult",
    "Sender",
    "ShouldStop",
    "VerificationNotSupported",
]

OnResult = Callable[[InstanceResult], None]
ShouldStop = Callable[[], bool]


class DestinationUnavailable(Exception):
    """The destination cannot be reached or cannot take anything now (no
    connection, association rejected, a folder that cannot be written, a full disk,
    an HTTP server that answers 401/403 or 503).

    The dispatcher does not count it as a delivery attempt: it counts consecutive
    ones and, after ``pause_after_failures``, pauses the destination and probes it
    (:meth:`Sender.probe`) until it answers. ``transient`` is False only when the
    destination said it will not take anything (an A-ASSOCIATE-RJ "rejected
    permanent", no presentation context accepted); it is shown, the handling is the
    same.

    ``pause`` pauses the destination at once, without waiting for
    ``pause_after_failures``: the destination answered, and said that nothing will
    be taken until someone acts (credentials refused: HTTP 401/403). The reason is
    shown as the destination's last error; probes go on, so fixed credentials (a
    reload) or a peer that changes its mind resume it.

    It may be raised part way through a batch: the results already reported through
    ``on_result`` stand, and the instances without one stay pending, with no
    delivery attempt used.
    """

    def __init__(self, message: str, *, transient: bool = True, pause: bool = False) -> None:
        super().__init__(message)
        self.transient = transient
        self.pause = pause


class VerificationNotSupported(DestinationUnavailable):
    """The destination answered, but does not support the check a probe makes (a
    DICOM peer that accepts an association but not the Verification SOP Class): it
    is up, it just cannot be pinged. A probe treats this as an answer."""


@runtime_checkable
class Sender(Protocol):
    """Delivers batches of stored instances to one destination.

    A worker thread owns its sender; only :meth:`abort` is called from another
    thread. Every instance sent is reported once through ``on_result`` as soon as
    its outcome is known (the dispatcher persists results every 0.5 s, so a crash
    resends only what was not reported), and is in the returned list.
    """

    def send(
        self,
        batch: Sequence[OutgoingInstance],
        on_result: OnResult | None = None,
        should_stop: ShouldStop | None = None,
    ) -> list[InstanceResult]:
        """Send ``batch`` in order; return every result reported.

        * Each instance goes through :func:`~.outgoing.prepared` (its transforms)
          just before it is sent, and :func:`~.outgoing.annotate` records on its
          result how it went out.
        * Raise :class:`DestinationUnavailable` when the destination is down or
          refuses everything (nothing more can be sent): the dispatcher then counts
          a connection failure, not a delivery attempt. Results reported before it
          stand; the instances without one stay pending.
        * When the destination fails part way (a connection lost, the disk filled
          up), give the instance in hand and every later one a ``TRANSIENT`` result
          and return: the dispatcher retries them with backoff.
        * ``should_stop()`` is checked before each instance; once it is True, return
          at once: the instances not sent get no result (they stay pending).
        """
        ...

    def probe(self) -> None:
        """Check, cheaply, that the destination could take an instance now (the
        probe of a paused destination, and the operator's *echo*). Return when it
        can; raise :class:`DestinationUnavailable` (with the reason) when not, or
        :class:`VerificationNotSupported` when it answered without supporting the
        check (counted as up)."""
        ...

    def close(self) -> None:
        """Release what is kept between batches (a kept association, a session)."""
        ...

    def close_if_idle(self) -> None:
        """:meth:`close` what has been idle long enough (called between polls)."""
        ...

    def abort(self) -> None:
        """From another thread: cut a ``send`` blocked on the destination (shutdown
        must not wait out a hung peer's timeout). May do nothing when a send never
        blocks for long."""
        ...
