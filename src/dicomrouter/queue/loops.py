"""Runtime loop guards of the planner: what the static check cannot see.

``config`` refuses a destination that is this router itself. A loop through another
node (we send to B, B sends everything back) only shows at run time, when an
instance arrives. Two guards, both decided while planning, in the planner's
transaction, and both written to ``loop_events`` so that the trace can say why:

- *not sent back* (unless ``dispatch.send_back_to_sender``): a route that names the
  destination an instance came from (its AE title is the instance's calling AE, its
  host the address the instance came from) skips that destination for it;
- *held*: an instance whose calling AE title is a destination's (or, from this
  machine, the one we present to it: our own copy), and that we delivered to that
  destination within ``dispatch.loop_window`` (or are sending there now), came
  back: it is not routed at all. It waits, visible in the status,
  the trace and ``dicomrouter loops``, until someone releases it; the alert
  ``loop_detected`` says so. Without the hold, two routers that forward everything
  to each other would send the same instance back and forth for ever.

The AE title alone decides the hold (a forwarding peer may come from another
address than the one we send to, behind NAT or from another interface); the
address decides too for *not sent back*, where the issue names "its calling AE
at that address".
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Row, select

from dicomrouter.config import BaseDestinationConfig, DicomDestinationConfig, RouterConfig
from dicomrouter.config.hosts import is_own_address, literal_address, resolve, same_address
from dicomrouter.store.schema import job_instances, jobs, loop_events

from . import states as S
from .jobs import Delivery

log = logging.getLogger("dicomrouter.planner")

HELD = "held"
NOT_SENT_BACK = "not_sent_back"
#: Longest wait, per planning pass, for the destinations' host names. Spent before
#: the planner takes the index write lock (see ``LoopGuard.prepare``), never under it.
RESOLVE_TIMEOUT = 1.0


@dataclass
class _Skip:
    """Instances of one resource that a route would have sent back to their sender."""

    destination: str
    study_uid: str
    members: list[Any]


class LoopGuard:
    """The two guards over one configuration; ``apply`` swaps it between passes."""

    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self._skips: list[_Skip] = []

    def apply(self, config: RouterConfig) -> None:
        self.config = config

    # -- held: came back from where we just sent it -------------------------------
    def hold_echo(self, conn: Connection, row: Row[Any], now: float) -> bool:
        """Hold ``row`` (record it, return True) when it came back from a
        destination that we delivered it to within ``loop_window``, or are sending it
        to now. A hold that was released lets this generation through."""
        window = self.config.dispatch.loop_window
        if not window or row.generation < 2:
            return False  # a first copy cannot have been sent anywhere yet
        senders = [
            name
            for name, dest in self.config.destinations.items()
            if isinstance(dest, DicomDestinationConfig)  # only a DICOM peer sends back
            and (dest.ae_title == row.calling_ae or self._our_own_copy(dest, row))
        ]
        if not senders:
            return False
        sent = conn.execute(
            select(job_instances.c.destination, job_instances.c.state, job_instances.c.updated_at)
            .join(jobs, jobs.c.id == job_instances.c.job_id)
            .where(
                job_instances.c.instance_id == row.id,
                job_instances.c.generation < row.generation,
                job_instances.c.destination.in_(senders),
                (
                    job_instances.c.state.in_((S.ITEM_COMPLETED, S.ITEM_WARNING))
                    & (job_instances.c.updated_at >= now - window)
                )
                | ((job_instances.c.state == S.ITEM_PENDING) & (jobs.c.state == S.IN_PROGRESS)),
            )
            .order_by(job_instances.c.updated_at.desc())
            .limit(1)
        ).first()
        if sent is None:
            return False
        released = conn.execute(
            select(loop_events.c.id).where(
                loop_events.c.instance_id == row.id,
                loop_events.c.generation == row.generation,
                loop_events.c.kind == HELD,
                loop_events.c.released_at.is_not(None),
            )
        ).first()
        if released is not None:
            return False
        if sent.state == S.ITEM_PENDING:
            when = "while it was being sent there"
        else:
            when = f"{max(0.0, now - sent.updated_at):.0f}s after it was delivered there"
        reason = (
            f"came back from {sent.destination} ({row.calling_ae} at {row.source_address}) "
            f"{when}: a routing loop (dispatch.loop_window); held, not forwarded"
        )
        conn.execute(
            loop_events.insert().values(
                kind=HELD,
                instance_id=row.id,
                generation=row.generation,
                sop_instance_uid=row.sop_instance_uid,
                study_instance_uid=row.study_instance_uid,
                destination=sent.destination,
                at=now,
                reason=reason,
            )
        )
        log.warning("instance %s %s", row.sop_instance_uid, reason)
        return True

    @staticmethod
    def _drop_held(conn: Connection, plans: list[Delivery]) -> None:
        wanted = sorted({(i, g) for plan in plans for i, g in plan.members.items()})
        if not wanted:
            return
        ids = sorted({i for i, _ in wanted})
        held: set[tuple[int, int]] = set()
        released: set[tuple[int, int]] = set()
        for start in range(0, len(ids), 500):
            for event in conn.execute(
                select(
                    loop_events.c.instance_id, loop_events.c.generation, loop_events.c.released_at
                ).where(
                    loop_events.c.kind == HELD,
                    loop_events.c.instance_id.in_(ids[start : start + 500]),
                )
            ):
                key = (event.instance_id, event.generation)
                (held if event.released_at is None else released).add(key)
        held -= released
        if not held:
            return
        for plan in plans:
            for key in held:
                if plan.members.get(key[0]) == key[1]:
                    del plan.members[key[0]]

    def _our_own_copy(self, dest: DicomDestinationConfig, row: Row[Any]) -> bool:
        """The instance came from this machine under the calling AE title we present
        to ``dest``: our own copy, back through a destination that is this router
        after all (a name the configuration check could not resolve in time)."""
        calling = dest.calling_ae_title or self.config.ae_title
        if calling != row.calling_ae:
            return False
        address = literal_address(row.source_address)
        return address is not None and is_own_address(address)

    # -- not sent back to its sender ----------------------------------------------
    def prepare(self, calling_aes: Iterable[str] | None = None) -> None:
        """Look up, before the planner takes the index write lock, the host names
        :meth:`not_sent_back` may need: those of destinations whose AE title is one of
        ``calling_aes`` (None: every destination). Inside the transaction it only
        reads the lookup cache: a DNS server that hangs must never hold the lock
        that every C-STORE needs. The lookups run at once, within one
        :data:`RESOLVE_TIMEOUT` for all of them, and are cached (config/hosts.py)."""
        if self.config.dispatch.send_back_to_sender:
            return
        aes = None if calling_aes is None else set(calling_aes)
        hosts = {
            dest.host
            for dest in self.config.destinations.values()
            if isinstance(dest, DicomDestinationConfig) and (aes is None or dest.ae_title in aes)
        }
        for host in hosts:
            resolve(host, 0.0)  # starts every lookup that is not cached
        deadline = time.monotonic() + RESOLVE_TIMEOUT
        for host in hosts:
            resolve(host, max(0.0, deadline - time.monotonic()))

    def begin(self) -> None:
        """A planning pass starts: forget skips of a pass that was rolled back."""
        self._skips = []

    def not_sent_back(
        self, dest_name: str, dest: BaseDestinationConfig, study_uid: str, members: Iterable[Any]
    ) -> list[Any]:
        """``members`` without those that came from ``dest`` itself (unless
        ``send_back_to_sender``); the skipped ones are remembered for ``record``."""
        members = list(members)
        if self.config.dispatch.send_back_to_sender or not isinstance(dest, DicomDestinationConfig):
            return members  # only a DICOM destination can have sent an instance to us
        from_dest = [m for m in members if getattr(m, "calling_ae", None) == dest.ae_title]
        if not from_dest:
            return members
        # The cache only (``prepare`` looked it up): this runs under the write lock.
        found = resolve(dest.host, 0.0)
        if found.complete:
            skipped = [m for m in from_dest if same_address(m.source_address, found.addresses)]
        else:
            # The name did not answer in time: its AE title decides, as for a hold.
            log.warning(
                "%s did not resolve in time; instances from AE %s are taken as sent by it",
                dest.host,
                dest.ae_title,
            )
            skipped = from_dest
        if not skipped:
            return members
        self._skips.append(_Skip(dest_name, study_uid, skipped))
        ids = {m.id for m in skipped}
        return [m for m in members if m.id not in ids]

    def record(self, conn: Connection, plans: Iterable[Delivery], now: float) -> None:
        """Before the pass's deliveries are queued (in its transaction): take held
        instances out of them (a series or study forwarded as a whole names them
        too), write this pass's skips and log one line per destination and resource."""
        self._drop_held(conn, list(plans))
        rows: dict[tuple[int, int, str], dict[str, object]] = {}
        for skip in self._skips:
            for member in skip.members:
                rows[(member.id, member.generation, skip.destination)] = {
                    "kind": NOT_SENT_BACK,
                    "instance_id": member.id,
                    "generation": member.generation,
                    "sop_instance_uid": member.sop_instance_uid,
                    "study_instance_uid": skip.study_uid,
                    "destination": skip.destination,
                    "at": now,
                    "reason": f"{skip.destination} sent it ({member.calling_ae} at "
                    f"{member.source_address}); not sent back (dispatch.send_back_to_sender)",
                }
            log.info(
                "not sending %d instance(s) of study %s back to %s, which sent them "
                "(dispatch.send_back_to_sender: false)",
                len(skip.members),
                skip.study_uid,
                skip.destination,
            )
        self._skips = []
        if not rows:
            return
        ids = sorted({key[0] for key in rows})
        known: set[tuple[int, int, str]] = set()
        for start in range(0, len(ids), 500):
            known.update(
                (r.instance_id, r.generation, r.destination)
                for r in conn.execute(
                    select(
                        loop_events.c.instance_id,
                        loop_events.c.generation,
                        loop_events.c.destination,
                    ).where(
                        loop_events.c.kind == NOT_SENT_BACK,
                        loop_events.c.instance_id.in_(ids[start : start + 500]),
                    )
                )
            )
        fresh = [row for key, row in rows.items() if key not in known]
        if fresh:
            conn.execute(loop_events.insert(), fresh)
