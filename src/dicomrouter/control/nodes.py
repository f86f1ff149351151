"""The nodes sharing this index: who is up, what each runs, and forgetting one.

Read from the heartbeats alone (``store/heartbeat.py``), so any node, the API, the
dashboard and the CLI see every node the same way, whichever node they run on. A
node is *down* when every heartbeat of it is older than
:data:`~dicomrouter.store.heartbeat.STALE_AFTER`: stopped, killed, hung, or cut off
from the index. Its rows stay (and it stays down, and alerted) until it beats again
or an operator forgets it: a node taken out for good.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import Engine, delete, func, select

from dicomrouter.store import audit, heartbeat
from dicomrouter.store.dialect import database_now
from dicomrouter.store.schema import process_heartbeats

from .errors import Conflict, NotFound
from .versions import latest_version

UP, DOWN = "up", "down"


@dataclass(frozen=True)
class NodeProcess:
    """One process (role) of a node, from its latest heartbeat."""

    role: str
    pid: int
    ok: bool
    detail: str
    started_at: float
    heartbeat_age_s: float
    software_version: str
    config_version: int | None
    open_associations: int


@dataclass(frozen=True)
class Node:
    """One node: ``down`` when its newest heartbeat is stale. ``config_version`` is
    the oldest its processes run (a process left behind is what matters);
    ``behind`` when that is older than the newest recorded version."""

    name: str
    state: str
    software_version: str
    config_version: int | None
    behind: bool
    last_heartbeat_age_s: float
    open_associations: int
    processes: list[NodeProcess]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Nodes:
    """Every node of the index, by name, and the newest recorded configuration."""

    nodes: list[Node]
    newest_config_version: int | None

    @property
    def down(self) -> list[Node]:
        return [n for n in self.nodes if n.state == DOWN]

    @property
    def behind(self) -> list[Node]:
        return [n for n in self.nodes if n.behind]

    def as_dict(self) -> dict[str, Any]:
        return {
            "nodes": [n.as_dict() for n in self.nodes],
            "newest_config_version": self.newest_config_version,
        }


def list_nodes(engine: Engine, now: float | None = None) -> Nodes:
    """Every node that has a heartbeat row, sorted by name. Ages are in the
    database's time, the clock heartbeats are written in (``now`` aside)."""
    newest = latest_version(engine, with_yaml=False)
    newest_id = None if newest is None else newest.id
    beats, db_now = heartbeat.read_at(engine)
    now = db_now if now is None else now
    by_node: dict[str, list[heartbeat.Heartbeat]] = {}
    for beat in beats:
        by_node.setdefault(beat.node, []).append(beat)
    return Nodes([_node(name, beats, now, newest_id) for name, beats in by_node.items()], newest_id)


def get_node(engine: Engine, name: str, now: float | None = None) -> Node:
    found = [n for n in list_nodes(engine, now).nodes if n.name == name]
    if not found:
        raise NotFound(f"no node {name!r} has a heartbeat in this index")
    return found[0]


def _node(name: str, beats: list[heartbeat.Heartbeat], now: float, newest: int | None) -> Node:
    processes = [
        NodeProcess(
            b.role,
            b.pid,
            b.ok,
            b.detail,
            b.started_at,
            round(max(0.0, now - b.heartbeat_at), 1),
            b.software_version,
            b.config_version,
            b.open_associations,
        )
        for b in beats
    ]
    age = min(p.heartbeat_age_s for p in processes)
    state = DOWN if age > heartbeat.STALE_AFTER else UP
    versions = [p.config_version for p in processes if p.config_version is not None]
    config_version = min(versions) if versions else None
    releases = sorted({p.software_version for p in processes if p.software_version})
    return Node(
        name=name,
        state=state,
        software_version=", ".join(releases),
        config_version=config_version,
        behind=config_version is not None and newest is not None and config_version < newest,
        last_heartbeat_age_s=age,
        # Every receiving process (a role named receiver, or receiver-<n>).
        open_associations=sum(
            p.open_associations for p in processes if p.role.startswith(heartbeat.RECEIVER)
        ),
        processes=processes,
    )


def forget(
    engine: Engine, name: str, *, actor: str, source: str = "", now: float | None = None
) -> Node:
    """Remove a node taken out for good: its heartbeat rows go, so it is neither
    shown nor alerted as down. A node that is up is refused (it would only come
    back at its next heartbeat); one that starts again later simply reappears.
    Audited as ``node.forget``."""
    node = get_node(engine, name, now)
    if node.state == UP:
        raise Conflict(
            f"node {name!r} is up (heartbeat {node.last_heartbeat_age_s:.0f} s ago): "
            "stop it first; only a node that is down can be forgotten"
        )
    table = process_heartbeats
    with engine.begin() as conn:
        stale = (database_now(conn) if now is None else now) - heartbeat.STALE_AFTER
        # Checked again in the deleting transaction: one that beat meanwhile stays.
        fresh = conn.execute(
            select(func.count()).where(table.c.node == name, table.c.heartbeat_at >= stale)
        ).scalar_one()
        if fresh:
            raise Conflict(f"node {name!r} beat again meanwhile: it is up")
        removed = conn.execute(delete(table).where(table.c.node == name)).rowcount
    audit.record(
        engine,
        actor,
        "node.forget",
        name,
        source=source,
        detail={"processes": removed, "last_heartbeat_age_s": node.last_heartbeat_age_s},
    )
    return node
