"""Destination health: count connection failures, pause, probe, resume (whatever the
destination's kind: the probe is its sender's ``probe()``, a C-ECHO for DICOM).

A destination that refuses connections is not retried job by job (that would burn
every job's attempts while a PACS is down for maintenance). After
``pause_after_failures`` consecutive failures it is *paused*: only probes go
out, every ``probe_interval``. The first successful probe resumes it and pulls its
whole queue forward, so nothing waits out a long backoff after the peer is back.
The state is mirrored in the index so the CLI and the API can show it.

An operator may also pause a destination (``destination_state.admin_paused``, set
by the API or the dashboard in another process). The flag is re-read from the index
at most once a second, so workers stop claiming within about a second of a pause
and start again within about a second of a resume; no probes go out meanwhile,
because the operator, not the peer, decides when it resumes.
"""

from __future__ import annotations

import logging
import threading
import time

from sqlalchemy import Engine, select, update

from dicomrouter.config import BaseDestinationConfig
from dicomrouter.store.schema import destination_state

log = logging.getLogger("dicomrouter.dispatch")

OK = "ok"
PAUSED = "paused"
#: How often the operator's pause flag is re-read from the index (seconds).
ADMIN_REFRESH = 1.0


class DestinationHealth:
    def __init__(self, name: str, config: BaseDestinationConfig, engine: Engine):
        self.name = name
        self.config = config
        self.engine = engine
        self._lock = threading.Lock()
        self.state = OK
        self.failures = 0
        self.next_probe_at = 0.0
        self.admin_paused = False
        self.last_error: str | None = None
        self.paused_since: float | None = None  # when it was paused as unreachable
        self._admin_checked = 0.0  # time.monotonic() of the last read of the flag
        self._load()

    def _load(self) -> None:
        with self.engine.begin() as conn:
            row = conn.execute(
                select(destination_state).where(destination_state.c.name == self.name)
            ).first()
            if row is None:
                conn.execute(
                    destination_state.insert().values(
                        name=self.name, state=OK, consecutive_failures=0, updated_at=time.time()
                    )
                )
                return
        self.state = row.state
        self.admin_paused = bool(row.admin_paused)
        self._admin_checked = time.monotonic()
        self.failures = row.consecutive_failures
        self.last_error = row.last_error
        self.paused_since = row.paused_since if row.state == PAUSED else None
        # After a restart, probe a paused destination at once.
        self.next_probe_at = 0.0

    def _save(self, **values: object) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                update(destination_state)
                .where(destination_state.c.name == self.name)
                .values(
                    state=self.state,
                    consecutive_failures=self.failures,
                    next_probe_at=self.next_probe_at or None,
                    updated_at=time.time(),
                    **values,
                )
            )

    @property
    def paused(self) -> bool:
        """Nothing may be claimed: unreachable (probing) or paused by an operator."""
        with self._lock:
            self._refresh_admin()
            return self.state == PAUSED or self.admin_paused

    def _refresh_admin(self) -> None:
        """Re-read the operator's pause flag, at most every ``ADMIN_REFRESH`` s
        (caller holds the lock). On a database error the last known value stands."""
        now = time.monotonic()
        if now - self._admin_checked < ADMIN_REFRESH:
            return
        self._admin_checked = now
        try:
            with self.engine.connect() as conn:
                flag = conn.execute(
                    select(destination_state.c.admin_paused).where(
                        destination_state.c.name == self.name
                    )
                ).scalar()
        except Exception as exc:
            log.warning("cannot read the pause flag of %s: %s", self.name, exc)
            return
        paused = bool(flag)
        if paused != self.admin_paused:
            log.warning(
                "destination %s %s by an operator",
                self.name,
                "paused" if paused else "resumed",
            )
        self.admin_paused = paused

    def unavailable_delay(self) -> float:
        """How long a job waits after the destination could not be reached."""
        return min(
            self.config.retry.initial_delay * 2 ** max(self.failures - 1, 0),
            self.config.probe_interval,
        )

    def record_success(self) -> None:
        with self._lock:
            if self.failures == 0 and self.state == OK:
                return
            self.failures = 0
            self.state = OK
            self.paused_since = None
            self._save(last_success_at=time.time(), paused_since=None)

    def record_unreachable(self, reason: str, pause_now: bool = False) -> None:
        """One more failed connection; pause after ``pause_after_failures`` of them,
        or at once with ``pause_now`` (the destination refused us: credentials)."""
        with self._lock:
            self.failures += 1
            self.last_error = reason
            values: dict[str, object] = {"last_error": reason[:1000]}
            if self.state == OK and (
                pause_now or self.failures >= self.config.pause_after_failures
            ):
                self.state = PAUSED
                self.next_probe_at = time.time() + self.config.probe_interval
                self.paused_since = time.time()
                values["paused_since"] = self.paused_since
                log.warning(
                    "destination %s paused after %s (%s); probing every %gs",
                    self.name,
                    "it refused us" if pause_now else f"{self.failures} failed connections",
                    reason,
                    self.config.probe_interval,
                )
            self._save(**values)

    def probe_due(self) -> bool:
        with self._lock:
            self._refresh_admin()
            if self.admin_paused or self.state != PAUSED or time.time() < self.next_probe_at:
                return False
            self.next_probe_at = time.time() + self.config.probe_interval
            return True

    @property
    def unreachable(self) -> bool:
        """Paused because it could not be reached (not by an operator)."""
        with self._lock:
            self._refresh_admin()
            return self.state == PAUSED and not self.admin_paused

    def probe_failed(self, reason: str) -> None:
        with self._lock:
            self.last_error = reason
            self._save(last_error=reason[:1000])

    def resume(self) -> None:
        with self._lock:
            self.state = OK
            self.failures = 0
            self.next_probe_at = 0.0
            self.paused_since = None
            self._save(paused_since=None)
        log.warning("destination %s answers again: resumed", self.name)
