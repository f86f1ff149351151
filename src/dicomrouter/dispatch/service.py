"""The dispatch process: plans routes, runs destination workers, recovers leases.

A configuration reload (:meth:`Dispatcher.apply`) never disturbs a job in flight:
the planner takes the new routes between two passes; a destination whose settings
changed (or that was removed) has its workers *retired*, each finishing the claim in
hand and then exiting, and only then is the destination started again with the new
settings (so ``max_associations`` holds across the change); new destinations start
at once. Jobs live in the index, not in the workers, so none is lost or sent twice.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass

from sqlalchemy import Engine

from dicomrouter.config import BaseDestinationConfig, RouterConfig
from dicomrouter.queue import JobStore, Planner, commitment, groups
from dicomrouter.queue.planner import PLAN_BATCH
from dicomrouter.retention import sweeper
from dicomrouter.store import ObjectStore

from .health import DestinationHealth
from .transforming import Transforms
from .worker import DestinationWorker, owner_prefix

log = logging.getLogger("dicomrouter.dispatch")

_TRIGGER_CHECK_EVERY = 0.5
_RECOVER_EVERY = 5.0
_REPLAN_CHECK_EVERY = 1.0  # set-aside instances due again (see queue.unplanned)
_COMMITMENT_CHECK_EVERY = 5.0  # storage commitments past their timeout (queue.commitment)
_GROUP_MOVE_EVERY = 2.0  # waiting work of paused group members (queue.groups)
_MAX_PLAN_BACKOFF = 30.0


class _Worker(DestinationWorker):
    """A worker that can be retired on a reload. Each worker has its own stop event
    (the dispatcher sets them all to shut down, which stops a send between
    instances); a retired worker sets its own only in ``_tick``, which runs between
    claims, so the claim it is sending is finished first."""

    _retired = False

    def retire(self) -> None:
        self._retired = True

    def _tick(self) -> bool:
        if self._retired:
            self.stop_event.set()
            return False
        return super()._tick()


@dataclass
class _Destination:
    """The running workers of one destination and the settings they run with."""

    settings: tuple[BaseDestinationConfig, str, float, float]
    workers: list[_Worker]


def _settings(config: RouterConfig, name: str) -> tuple[BaseDestinationConfig, str, float, float]:
    """Everything a destination's workers take from the configuration."""
    dest = config.destinations[name]
    return (dest, config.ae_title, config.dispatch.lease, config.dispatch.poll_interval)


class Dispatcher:
    def __init__(self, config: RouterConfig, engine: Engine, store: ObjectStore):
        self.config = config
        self.engine = engine
        self.store = store
        self.jobs = JobStore(engine)
        self.planner = Planner(config, engine, store)
        self.transforms = Transforms(config, engine, store.outgoing)
        self.stop_event = threading.Event()
        self.threads: list[threading.Thread] = []
        self.destinations: dict[str, _Destination] = {}
        self._lock = threading.Lock()
        self._planner_config: RouterConfig | None = None
        self._retiring: set[str] = set()  # destinations whose old workers are finishing
        #: The configuration version this process runs (None: unknown), reported in
        #: its heartbeat; set by whoever loads one (``apply``, the process at start).
        self.config_version: int | None = None

    def start(self) -> None:
        # Before the planner and workers: a file a killed purge left in trash for a
        # row that is live again goes back before anything plans or sends it.
        try:
            sweeper.recover_at_start(self.config, self.engine, self.store)
        except Exception:
            log.exception("purge recovery at start-up failed; the first sweep retries it")
        self.transforms.prepare_workdir()
        recovered = self.jobs.recover(owner_prefix=owner_prefix(self.config))
        if recovered:
            log.warning("resumed %d job(s) that were in progress before a restart", recovered)
        self._warn_orphans(self.config)
        planner = threading.Thread(target=self._plan_loop, name="planner", daemon=True)
        self.threads.append(planner)
        planner.start()
        # Retention runs here, beside the planner it must not race (both take the index
        # write lock for their decisions), never in the receiving process.
        retention = threading.Thread(
            target=sweeper.sweep_forever,
            args=(lambda: self.config, self.engine, self.store, self.stop_event),
            name="retention",
            daemon=True,
        )
        self.threads.append(retention)
        retention.start()
        with self._lock:
            for name in self.config.senders:  # a group's members send for it
                self._start_destination(name, self.config)

    def health(self) -> tuple[bool, str]:
        """For the dispatch process's heartbeat: (the planner runs, what)."""
        planner = next((t for t in self.threads if t.name == "planner"), None)
        if planner is None or not planner.is_alive():
            return False, "the dispatch process's planner has stopped"
        return True, f"planning; {len(self.destinations)} destination(s) running"

    def _warn_orphans(self, config: RouterConfig) -> None:
        for name, count in self.jobs.open_jobs_by_destination().items():
            if name not in config.destinations:
                log.warning(
                    "%d open job(s) for destination %r, which is no longer configured: "
                    "they wait until it is configured again (or cancel them with "
                    "'dicomrouter queue cancel')",
                    count,
                    name,
                )

    def _start_destination(self, name: str, config: RouterConfig) -> None:
        """Start ``name``'s workers (caller holds the lock)."""
        if self.stop_event.is_set():
            return
        dest = config.destinations[name]
        health = DestinationHealth(
            name,
            dest,
            self.engine,
            owner=f"{self.config.node.name}:{os.getpid()}",
            reader=self.planner.reader,
        )
        workers = [
            _Worker(
                name,
                index,
                config,
                self.jobs,
                self.store,
                health,
                threading.Event(),
                self.transforms,
            )
            for index in range(dest.workers)
        ]
        self.destinations[name] = _Destination(_settings(config, name), workers)
        self.threads.extend(workers)
        for worker in workers:
            worker.start()

    def apply(self, config: RouterConfig, version: int | None = None) -> None:
        """Run on a new configuration (see the module docstring); ``version`` is its
        id among the recorded configuration versions, when known."""
        with self._lock:
            old = self.config
            self.config = config
            if version is not None:
                self.config_version = version
            self._planner_config = config
            self.transforms.apply(config, version)
            for name in sorted(set(self.destinations) | set(config.senders)):
                running = self.destinations.get(name)
                if name in self._retiring:
                    continue  # restarted with the newest configuration once retired
                if running is None:
                    log.info("destination %s added: starting its workers", name)
                    self._start_destination(name, config)
                elif name not in config.senders:
                    log.info("destination %s removed: its workers stop after their jobs", name)
                    self._retire(name)
                elif running.settings != _settings(config, name):
                    log.info("destination %s changed: its workers restart after their jobs", name)
                    self._retire(name)
        if old.destinations.keys() != config.destinations.keys():
            self._warn_orphans(config)

    def _retire(self, name: str) -> None:
        """Retire ``name``'s workers; once they are gone, start it again if the
        configuration (the newest by then) still has it (caller holds the lock)."""
        retiring = self.destinations.pop(name).workers
        self._retiring.add(name)
        for worker in retiring:
            worker.retire()

        def restart() -> None:
            for worker in retiring:
                worker.join()
            with self._lock:
                self._retiring.discard(name)
                self.threads = [t for t in self.threads if t not in retiring]
                config = self.config
                if name not in config.senders or self.stop_event.is_set():
                    return
                self._start_destination(name, config)
            # New settings (a corrected address...) deserve a try now, not after backoff.
            self.jobs.wake_destination(name, config.destinations[name])

        threading.Thread(target=restart, name=f"reload-{name}", daemon=True).start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop between instances; after ``timeout``, abandon sends that are stuck
        on a hung peer (their jobs go back to pending, nothing is lost)."""
        with self._lock:
            self.stop_event.set()
            threads = list(self.threads)
        for thread in threads:
            if isinstance(thread, DestinationWorker):
                thread.stop_event.set()
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.1, deadline - time.monotonic()))
        for thread in threads:
            if thread.is_alive() and isinstance(thread, DestinationWorker):
                log.warning("abandoning a blocked send in %s", thread.name)
                thread.abandon()

    def _plan_loop(self) -> None:
        poll = self.config.dispatch.poll_interval
        last_triggers = last_recover = last_replan = last_commitments = last_moves = 0.0
        failures = 0
        while not self.stop_event.is_set():
            with self._lock:
                new_config, self._planner_config = self._planner_config, None
            if new_config is not None:
                self.planner.apply(new_config)
                poll = new_config.dispatch.poll_interval
            try:
                planned = self.planner.route_new_instances()
                now = time.monotonic()
                if now - last_triggers >= _TRIGGER_CHECK_EVERY:
                    self.planner.fire_stable_triggers()
                    last_triggers = now
                if now - last_recover >= _RECOVER_EVERY:
                    self.jobs.recover()
                    last_recover = now
                if now - last_replan >= _REPLAN_CHECK_EVERY:
                    self.planner.retry_unplanned()
                    last_replan = now
                if now - last_commitments >= _COMMITMENT_CHECK_EVERY:
                    commitment.expire(self.engine, commitment.policies(self.config.destinations))
                    last_commitments = now
                if now - last_moves >= _GROUP_MOVE_EVERY:
                    # Here, between planning passes: a study's member is chosen and
                    # moved by one thread, each time in one write transaction.
                    if self.planner.config.groups:
                        groups.move_waiting(
                            self.engine, self.planner.config, reader=self.planner.reader
                        )
                    last_moves = now
                failures = 0
            except Exception:
                # Nothing could be written (even setting an instance aside failed):
                # the instances stay to be planned; wait longer each time in a row.
                failures += 1
                log.exception("planning failed; retrying (failure %d in a row)", failures)
                planned = 0
                self.stop_event.wait(min(2.0 ** (failures - 1), _MAX_PLAN_BACKOFF))
            if planned < PLAN_BATCH:
                # Nothing, or a partial batch: let instances accumulate for one poll
                # interval. Planning a steady stream one or two instances per pass
                # spent most of the dispatch process's CPU on per-pass queries.
                self.stop_event.wait(poll)
