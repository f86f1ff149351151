"""Destination health: count connection failures, pause, probe, resume (whatever the
destination's kind: the probe is its sender's ``probe()``, a C-ECHO for DICOM).

A destination that refuses connections is not retried job by job (that would burn
every job's attempts while a PACS is down for maintenance). After
``pause_after_failures`` consecutive failures it is *paused*: only probes go
out, every ``probe_interval``. The first successful probe resumes it and pulls its
whole queue forward, so nothing waits out a long backoff after the peer is back.

The truth is the index's ``destination_state`` row, shared by every node on the
index: failures are counted there (one atomic increment each, whichever node saw
them), and a pause or a resume written by one node is what every node's workers
obey. Each process re-reads the row at most once a second (``REFRESH``), so workers
everywhere stop claiming within about a second of a pause and start again within
about a second of a resume; the same read brings an operator's pause
(``admin_paused``, set by the API or the dashboard). While an operator holds it, no
probes go out: the operator, not the peer, decides when it resumes.

One node probes a paused destination: the one named in ``probe_owner``, until
``probe_until`` (a lease, measured with the database's clock). It takes the lease
when it is free or run out, probes every ``probe_interval`` and renews the lease
with each probe, for ``LEASE_PROBES`` intervals; the others never probe while it
lives. When that node dies its lease runs out and the next node that looks takes
it. On SQLite there is one node, and the same rules cost nothing.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any

from sqlalchemy import Engine, or_, select, update

from dicomrouter.config import BaseDestinationConfig
from dicomrouter.store.dialect import database_now, upsert_insert
from dicomrouter.store.schema import destination_state

log = logging.getLogger("dicomrouter.dispatch")

OK = "ok"
PAUSED = "paused"
#: How often the shared state (and the operator's pause flag) is re-read (seconds).
REFRESH = 1.0
ADMIN_REFRESH = REFRESH  # the name it had when only the operator's flag was re-read
#: A prober's lease lasts this many probe intervals from its last probe: a live prober
#: renews it in time; a dead one's runs out one interval after it missed a probe.
LEASE_PROBES = 2


def default_owner() -> str:
    """Who probes, as ``probe_owner`` shows it, when the caller names no owner: this
    host and process (the dispatcher names its node, ``node.name``, and process)."""
    return f"{socket.gethostname()}:{os.getpid()}"


class DestinationHealth:
    """One destination's health, as this process sees it (refreshed from the index at
    most every ``REFRESH`` s) and changes it (written through at once).

    ``owner`` names this process as a prober (default: host and pid); two objects of
    one destination with different owners behave as two nodes. ``reader`` serves the
    periodic re-reads (an engine that does not take the write lock; default
    ``engine``)."""

    def __init__(
        self,
        name: str,
        config: BaseDestinationConfig,
        engine: Engine,
        owner: str | None = None,
        reader: Engine | None = None,
    ):
        self.name = name
        self.config = config
        self.engine = engine
        self.reader = reader or engine
        self.owner = owner or default_owner()
        self._lock = threading.Lock()
        self.state = OK
        self.failures = 0
        #: time.monotonic() before which this process does not try to probe: its own
        #: pace, beside the shared lease (0: as soon as the lease allows).
        self.next_probe_at = 0.0
        self.admin_paused = False
        self.last_error: str | None = None
        self.paused_since: float | None = None  # when it was paused as unreachable
        self.probe_owner: str | None = None
        self.probe_until: float | None = None
        self._checked = 0.0  # time.monotonic() of the last read of the row
        self._skew = 0.0  # the database's clock minus ours, as of the last read
        self._load()

    # -- the shared row ------------------------------------------------------------------

    def _load(self) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                upsert_insert(conn.dialect.name, destination_state)
                .values(name=self.name, state=OK, consecutive_failures=0, updated_at=time.time())
                .on_conflict_do_nothing(index_elements=["name"])
            )
            self._read(conn)

    def _read(self, conn: Any) -> None:
        """Take the row as this process's view (caller holds the lock, or is __init__)."""
        row = conn.execute(
            select(destination_state).where(destination_state.c.name == self.name)
        ).first()
        now = database_now(conn)
        self._skew = now - time.time()
        self._checked = time.monotonic()
        if row is None:  # deleted under us (never by the router): start again
            return
        admin = bool(row.admin_paused)
        if admin != self.admin_paused and self._checked_once:
            log.warning(
                "destination %s %s by an operator", self.name, "paused" if admin else "resumed"
            )
        if row.state != self.state and self._checked_once:
            log.warning(
                "destination %s %s (another node saw it)",
                self.name,
                "paused as unreachable" if row.state == PAUSED else "answers again: resumed",
            )
        self._checked_once = True
        self.admin_paused = admin
        self.state = row.state
        self.failures = row.consecutive_failures
        self.last_error = row.last_error
        self.paused_since = row.paused_since if row.state == PAUSED else None
        self.probe_owner = row.probe_owner
        self.probe_until = row.probe_until

    _checked_once = False

    def _refresh(self) -> None:
        """Re-read the row, at most every ``REFRESH`` s (caller holds the lock). On a
        database error the last known state stands."""
        if time.monotonic() - self._checked < REFRESH:
            return
        try:
            with self.reader.connect() as conn:
                self._read(conn)
        except Exception as exc:
            self._checked = time.monotonic()
            log.warning("cannot read the state of destination %s: %s", self.name, exc)

    def _write(self, condition: Any = None, **values: Any) -> bool:
        """Update the row (where ``condition`` holds, if given) and read it back, in one
        write transaction; ``condition`` and ``values`` may be callables of the
        database's time. Returns
        whether the row was updated (caller holds the lock)."""
        with self.engine.begin() as conn:
            now = database_now(conn)
            resolved = {k: v(now) if callable(v) else v for k, v in values.items()}
            statement = update(destination_state).where(destination_state.c.name == self.name)
            if condition is not None:
                statement = statement.where(condition(now) if callable(condition) else condition)
            done = conn.execute(statement.values(updated_at=now, **resolved)).rowcount > 0
            self._read(conn)
        return bool(done)

    # -- what the workers ask ------------------------------------------------------------

    @property
    def paused(self) -> bool:
        """Nothing may be claimed: unreachable (probing) or paused by an operator."""
        with self._lock:
            self._refresh()
            return self.state == PAUSED or self.admin_paused

    @property
    def unreachable(self) -> bool:
        """Paused because it could not be reached (not by an operator)."""
        with self._lock:
            self._refresh()
            return self.state == PAUSED and not self.admin_paused

    def unavailable_delay(self) -> float:
        """How long a job waits after the destination could not be reached."""
        return min(
            self.config.retry.initial_delay * 2 ** max(self.failures - 1, 0),
            self.config.probe_interval,
        )

    # -- what the workers report ---------------------------------------------------------

    def record_success(self) -> None:
        with self._lock:
            self._refresh()
            if self.failures == 0 and self.state == OK:
                return
            was_paused = self.state == PAUSED
            self._resumed(last_success_at=lambda now: now)
        if was_paused:
            log.warning("destination %s answers again: resumed", self.name)

    def record_unreachable(self, reason: str, pause_now: bool = False) -> None:
        """One more failed connection, counted across nodes; pause after
        ``pause_after_failures`` of them, or at once with ``pause_now`` (the
        destination refused us: credentials)."""
        interval = self.config.probe_interval
        with self._lock:
            self._write(
                consecutive_failures=destination_state.c.consecutive_failures + 1,
                last_error=reason[:1000],
            )
            if self.state != OK or not (
                pause_now or self.failures >= self.config.pause_after_failures
            ):
                return
            # Paused now (unless another node did it first): the first probe is due
            # one interval from now, by whichever node takes the lease then.
            if not self._write(
                destination_state.c.state == OK,
                state=PAUSED,
                paused_since=lambda now: now,
                probe_owner=None,
                probe_until=lambda now: now + interval,
                next_probe_at=lambda now: now + interval,
            ):
                return
            self.next_probe_at = time.monotonic() + interval
        log.warning(
            "destination %s paused after %s (%s); probing every %gs",
            self.name,
            "it refused us" if pause_now else f"{self.failures} failed connections",
            reason,
            interval,
        )

    def probe_due(self) -> bool:
        """Whether this process should probe now: the destination is paused as
        unreachable, this process's interval has passed, and it holds the probe
        lease (renewed here) or the lease was free or had run out (taken here)."""
        interval = self.config.probe_interval
        with self._lock:
            self._refresh()
            if self.admin_paused or self.state != PAUSED or time.monotonic() < self.next_probe_at:
                return False
            if self.probe_owner != self.owner and not self._lease_over():
                return False  # another node probes (or the first probe is not due)
            c = destination_state.c
            took = self._write(
                lambda now: (
                    (c.state == PAUSED)
                    & (c.admin_paused == 0)
                    & or_(
                        c.probe_owner == self.owner,
                        c.probe_until.is_(None),
                        c.probe_until <= now,
                    )
                ),
                probe_owner=self.owner,
                probe_until=lambda now: now + LEASE_PROBES * interval,
                next_probe_at=lambda now: now + interval,
            )
            if not took:
                return False
            self.next_probe_at = time.monotonic() + interval
            return True

    def database_time(self) -> float:
        """The database's time now, by this clock and its offset as of the last read
        (``paused_since`` is in the database's time)."""
        return time.time() + self._skew

    def _lease_over(self) -> bool:
        """Whether the probe lease is free or run out, by the database's clock as of
        the last read (caller holds the lock)."""
        return self.probe_until is None or self.probe_until <= time.time() + self._skew

    def probe_failed(self, reason: str) -> None:
        with self._lock:
            self._write(last_error=reason[:1000])

    def resume(self) -> None:
        """The probe succeeded: resumed, for every node (they see it within ``REFRESH``)."""
        with self._lock:
            self._resumed()
            self.next_probe_at = 0.0
        log.warning("destination %s answers again: resumed", self.name)

    def _resumed(self, **values: Any) -> None:
        self._write(
            state=OK,
            consecutive_failures=0,
            paused_since=None,
            probe_owner=None,
            probe_until=None,
            next_probe_at=None,
            **values,
        )
