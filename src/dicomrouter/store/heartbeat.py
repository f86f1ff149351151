"""Process heartbeats: is the receiver listening, is the dispatch process running?

The HTTP process answers ``/readyz`` but is only a sibling of the dispatch process
and a child of the node (which receives), so it cannot see them directly. Each of
them writes a heartbeat row every :data:`INTERVAL` seconds (one short UPDATE, from a
thread of its own) saying whether its own check passed: the receiver that its
listener accepts connections, the dispatch process that its planner runs. Readiness
is a fresh heartbeat from each, from a process that still exists, reporting ok.

Rows are keyed by (node, role), ``node`` being ``node.name``, so several nodes
sharing one index report side by side; a restarted process overwrites its
predecessor's row. Each row also says what the process runs, for the nodes view:
the dicomrouter release, the configuration version, and a receiver's open
associations.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import Engine, select, update

from dicomrouter import __version__
from dicomrouter.store.dialect import database_now
from dicomrouter.store.schema import process_heartbeats

log = logging.getLogger("dicomrouter.heartbeat")

INTERVAL = 5.0
#: A heartbeat older than this means the process is stopped, hung or gone.
STALE_AFTER = 4 * INTERVAL
RECEIVER, DISPATCH = "receiver", "dispatch"
REQUIRED_ROLES = (RECEIVER, DISPATCH)


def receiver_roles(processes: int) -> tuple[str, ...]:
    """The receivers' roles: ``receiver`` (the node itself) for one receive process,
    ``receiver-1``..``receiver-N`` for ``dicom.processes`` N above 1."""
    if processes == 1:
        return (RECEIVER,)
    return tuple(f"{RECEIVER}-{n}" for n in range(1, processes + 1))


def required_roles(processes: int) -> tuple[str, ...]:
    """Every role a ready node runs, with ``processes`` receive processes."""
    return (*receiver_roles(processes), DISPATCH)


Probe = Callable[[], tuple[bool, str]]
"""A process's own check: (ok, detail)."""


@dataclass(frozen=True)
class Heartbeat:
    node: str
    role: str
    pid: int
    started_at: float
    heartbeat_at: float
    ok: bool
    detail: str
    software_version: str = ""
    config_version: int | None = None
    open_associations: int = 0


@dataclass(frozen=True)
class ProcessCheck:
    """Readiness of one role on this node, and why not."""

    role: str
    ok: bool
    reason: str
    pid: int | None = None
    heartbeat_age_s: float | None = None


def beat(
    engine: Engine,
    node: str,
    role: str,
    started_at: float,
    ok: bool,
    detail: str,
    now: float | None = None,
    *,
    config_version: int | None = None,
    open_associations: int = 0,
) -> None:
    """Write this process's heartbeat for ``role`` on ``node``, at the database's
    time (``now`` aside): other nodes judge its age by their own reading of that
    clock, so a node whose wall clock is off is neither shown down while it beats
    nor up long after it died."""
    pid = os.getpid()
    values: dict[str, object] = {"pid": pid, "started_at": started_at}
    values.update(ok=int(ok), detail=detail[:500], software_version=__version__[:64])
    values.update(config_version=config_version, open_associations=open_associations)
    with engine.begin() as conn:
        values["heartbeat_at"] = database_now(conn) if now is None else now
        changed = conn.execute(
            update(process_heartbeats)
            .where(process_heartbeats.c.node == node, process_heartbeats.c.role == role)
            .values(**values)
        ).rowcount
        if not changed:
            conn.execute(process_heartbeats.insert().values(node=node, role=role, **values))


def read(engine: Engine, node: str | None = None) -> list[Heartbeat]:
    return read_at(engine, node)[0]


def read_at(engine: Engine, node: str | None = None) -> tuple[list[Heartbeat], float]:
    """The heartbeats (of ``node``, or all), and the database's time as they were
    read: the clock their ``heartbeat_at`` is in, to tell their age by."""
    table = process_heartbeats
    query = select(table).order_by(table.c.node, table.c.role)
    if node is not None:
        query = query.where(table.c.node == node)
    with engine.connect() as conn:
        return [
            Heartbeat(
                r.node,
                r.role,
                r.pid,
                r.started_at,
                r.heartbeat_at,
                bool(r.ok),
                r.detail,
                r.software_version,
                r.config_version,
                r.open_associations,
            )
            for r in conn.execute(query)
        ], database_now(conn)


def pid_exists(pid: int) -> bool:
    """Whether a process with this pid runs on this machine (signal 0)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check(
    engine: Engine, node: str, roles: tuple[str, ...] = REQUIRED_ROLES, now: float | None = None
) -> list[ProcessCheck]:
    """Readiness of each of ``roles`` on ``node`` (this one), from their heartbeats
    (their age in the database's time, unless ``now`` is given)."""
    beats, db_now = read_at(engine, node)
    now = db_now if now is None else now
    found = {hb.role: hb for hb in beats}
    checks = []
    for role in roles:
        hb = found.get(role)
        if hb is None:
            checks.append(ProcessCheck(role, False, f"the {role} process has not started"))
            continue
        age = round(max(0.0, now - hb.heartbeat_at), 1)
        if not pid_exists(hb.pid):
            reason, ok = f"the {role} process (pid {hb.pid}) is not running", False
        elif age > STALE_AFTER:
            reason, ok = f"no heartbeat from the {role} process for {age:.0f} s", False
        elif not hb.ok:
            reason, ok = hb.detail or f"the {role} process reports a problem", False
        else:
            reason, ok = hb.detail, True
        checks.append(ProcessCheck(role, ok, reason, hb.pid, age))
    return checks


class HeartbeatThread(threading.Thread):
    """Writes ``role``'s heartbeat now and every :data:`INTERVAL` seconds. A failed
    write (index locked, disk full) is logged once per streak and tried again: the
    heartbeat going stale is then exactly what readiness should see.

    ``config_version`` and ``open_associations`` are asked at each beat: the
    process sets what it runs where it loads a configuration version."""

    def __init__(
        self,
        engine: Engine,
        node: str,
        role: str,
        probe: Probe,
        interval: float = INTERVAL,
        *,
        config_version: Callable[[], int | None] = lambda: None,
        open_associations: Callable[[], int] = lambda: 0,
    ):
        super().__init__(name=f"heartbeat-{role}", daemon=True)
        self.engine, self.node, self.role = engine, node, role
        self.probe, self.interval = probe, interval
        self.config_version, self.open_associations = config_version, open_associations
        self.started_at = time.time()
        self.stop_event = threading.Event()
        self._failing = False

    def beat_once(self) -> None:
        try:
            ok, detail = self.probe()
        except Exception as exc:  # a broken probe is a failed check, not a dead thread
            ok, detail = False, f"check failed: {exc}"
        try:
            version, associations = self.config_version(), self.open_associations()
        except Exception as exc:  # as a broken probe: say so, keep beating
            version, associations, ok = None, 0, False
            detail = f"cannot tell what this process runs: {exc}"
        try:
            beat(
                self.engine,
                self.node,
                self.role,
                self.started_at,
                ok,
                detail,
                config_version=version,
                open_associations=associations,
            )
        except Exception as exc:
            if not self._failing:
                log.warning("cannot write the %s heartbeat: %s", self.role, exc)
            self._failing = True
        else:
            self._failing = False

    def start(self) -> None:
        self.beat_once()  # ready as soon as the process says it is
        super().start()

    def run(self) -> None:
        while not self.stop_event.wait(self.interval):
            self.beat_once()

    def stop(self, timeout: float = 5.0) -> None:
        self.stop_event.set()
        if self.is_alive():
            self.join(timeout)
