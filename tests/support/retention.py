"""A router's store, index, planner and queue without the network, for retention tests.

Objects are stored and indexed with the receiver's own calls, planned by the real
planner, and delivered (or refused) by settling claims as a dispatch worker does.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import select

from dicomrouter.config import parse_config
from dicomrouter.queue import ItemResult, JobStore, Planner
from dicomrouter.queue import states as S
from dicomrouter.retention import Purger
from dicomrouter.store import (
    InstanceIndex,
    ObjectStore,
    Provenance,
    create_index_engine,
)
from dicomrouter.store.schema import instances, job_instances, jobs
from tests.support.seed import store_as_receiver

DAY = 86400.0
DEST = {"ae_title": "PACS", "host": "127.0.0.1", "port": 4242}


class Site:
    def __init__(self, tmp_path: Path, **config: Any):
        config.setdefault("storage", {"path": str(tmp_path / "store")})
        config.setdefault("destinations", {"pacs": DEST})
        config.setdefault("routes", [{"name": "all", "to": ["pacs"]}])
        self.config = parse_config(config, environ={})
        self.store = ObjectStore(self.config.storage.path, self.config.node.name)
        self.store.prepare()
        self.engine = create_index_engine(self.config.database_url)
        self.index = InstanceIndex(self.engine)
        self.planner = Planner(self.config, self.engine, self.store)
        self.jobs = JobStore(self.engine)
        self.purger = Purger(self.config, self.engine, self.store)

    def settings(self) -> dict[str, Any]:
        """The configuration as a process started on this site reads it (YAML), with
        the index this site uses (SQLite or PostgreSQL) named."""
        data: dict[str, Any] = json.loads(self.config.model_dump_json())
        data["database"] = self.config.database_url
        return data

    def receive(self, files: list[Path]) -> list[str]:
        """Store and index as the receiver does; returns the relative paths."""
        return store_as_receiver(self.store, self.index, files, Provenance("CT1", "R", "h"))

    def plan(self, fire: bool = True) -> None:
        while self.planner.route_new_instances():
            pass
        if fire:
            self.planner.fire_stable_triggers(now=time.time() + 10 * 365 * DAY)

    def settle(self, state: str = S.ITEM_COMPLETED, destination: str = "pacs") -> list[int]:
        """Claim the due jobs and give every instance ``state``."""
        claim = self.jobs.claim(destination, "test", lease=60, max_jobs=10_000)
        if claim is None:
            return []
        self.jobs.record_results(
            [ItemResult(i.job_id, i.instance_id, state, 0, "test") for i in claim.items]
        )
        self.jobs.finish(
            claim,
            self.config.destinations[destination],
            count_attempt=True,
            unavailable_delay=0.0,
            message="",
            outcome="completed",
            sent=len(claim.items),
            failed=0,
        )
        return list(claim.job_ids)

    def purge(self, days_later: float, **kwargs: Any) -> Any:
        return self.purger.run(now=time.time() + days_later * DAY, **kwargs)

    def rows(self) -> dict[str, Any]:
        with self.engine.connect() as conn:
            return {r.sop_instance_uid: r for r in conn.execute(select(instances))}

    def queued_sops(self) -> set[str]:
        """SOP Instance UIDs that any delivery holds."""
        with self.engine.connect() as conn:
            return set(
                conn.execute(
                    select(instances.c.sop_instance_uid).join(
                        job_instances, job_instances.c.instance_id == instances.c.id
                    )
                ).scalars()
            )

    def live_without_file(self) -> list[str]:
        """Live rows whose file is missing: must always be empty."""
        return [
            row.sop_instance_uid
            for row in self.rows().values()
            if row.purged_at is None and not self.store.absolute(row.path).exists()
        ]

    def open_deliveries_of_purged(self) -> list[tuple[int, int]]:
        """(job, instance) pending in an open job for a purged instance: must be empty."""
        with self.engine.connect() as conn:
            return [
                (r.job_id, r.instance_id)
                for r in conn.execute(
                    select(job_instances.c.job_id, job_instances.c.instance_id)
                    .join(instances, instances.c.id == job_instances.c.instance_id)
                    .join(jobs, jobs.c.id == job_instances.c.job_id)
                    .where(
                        instances.c.purged_at.is_not(None),
                        job_instances.c.state == S.ITEM_PENDING,
                        jobs.c.state.in_(S.OPEN_STATES),
                    )
                )
            ]


class Choreography:
    """Run two actors in threads, stopping each at named points in a scripted order.

    ``point(actor, name)`` is called by the code under test (through hooks or
    wrappers); it blocks only at the points the script names, until the script moves
    that actor on. ``play([(actor, point), ...])`` runs each actor up to each point in
    turn, then lets every actor finish. Deterministic: no sleeps, no timing.
    """

    def __init__(self, actors: dict[str, Callable[[], Any]]):
        self.actors = actors
        self.results: dict[str, Any] = {}
        self.errors: dict[str, BaseException] = {}
        self._scripted: set[str] = set()
        self._arrived: dict[str, threading.Event] = {}
        self._release: dict[str, threading.Event] = {}
        self._threads: dict[str, threading.Thread] = {}

    def point(self, actor: str, name: str) -> None:
        key = f"{actor}:{name}"
        if key not in self._scripted:
            return
        self._arrived[key].set()
        if not self._release[key].wait(30):
            raise TimeoutError(f"choreography stuck at {key}")

    def _run(self, actor: str) -> None:
        try:
            self.results[actor] = self.actors[actor]()
        except BaseException as exc:  # reported by play()
            self.errors[actor] = exc
        finally:
            self.point(actor, "done")

    def play(self, script: list[tuple[str, str]]) -> None:
        keys = [f"{actor}:{name}" for actor, name in script]
        self._scripted = set(keys)
        for key in keys:
            self._arrived[key] = threading.Event()
            self._release[key] = threading.Event()
        held: dict[str, str] = {}
        for (actor, _name), key in zip(script, keys, strict=True):
            if actor in held:
                self._release[held[actor]].set()
            elif actor not in self._threads:
                thread = threading.Thread(target=self._run, args=(actor,), daemon=True)
                self._threads[actor] = thread
                thread.start()
            assert self._arrived[key].wait(30), f"{key} never reached"
            held[actor] = key
        for key in held.values():
            self._release[key].set()
        for thread in self._threads.values():
            thread.join(30)
        if self.errors:
            raise next(iter(self.errors.values()))
