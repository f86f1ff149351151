"""The dispatch process: plans routes, runs destination workers, recovers leases."""

from __future__ import annotations

import logging
import threading
import time

from sqlalchemy import Engine

from dicomrouter.config import RouterConfig
from dicomrouter.queue import JobStore, Planner
from dicomrouter.store import ObjectStore

from .health import DestinationHealth
from .worker import DestinationWorker, node_id

log = logging.getLogger("dicomrouter.dispatch")

_TRIGGER_CHECK_EVERY = 0.5
_RECOVER_EVERY = 5.0


class Dispatcher:
    def __init__(self, config: RouterConfig, engine: Engine, store: ObjectStore):
        self.config = config
        self.engine = engine
        self.store = store
        self.jobs = JobStore(engine)
        self.planner = Planner(config, engine, store)
        self.stop_event = threading.Event()
        self.threads: list[threading.Thread] = []

    def start(self) -> None:
        recovered = self.jobs.recover(owner_prefix=node_id() + ":")
        if recovered:
            log.warning("resumed %d job(s) that were in progress before a restart", recovered)
        for name, count in self.jobs.open_jobs_by_destination().items():
            if name not in self.config.destinations:
                log.warning(
                    "%d open job(s) for destination %r, which is no longer configured: "
                    "they wait until it is configured again (or cancel them with "
                    "'dicomrouter queue cancel')",
                    count,
                    name,
                )
        planner = threading.Thread(target=self._plan_loop, name="planner", daemon=True)
        self.threads.append(planner)
        for name, dest in self.config.destinations.items():
            health = DestinationHealth(name, dest, self.engine)
            for index in range(dest.max_associations):
                self.threads.append(
                    DestinationWorker(
                        name, index, self.config, self.jobs, self.store, health, self.stop_event
                    )
                )
        for thread in self.threads:
            thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop between instances; after ``timeout``, abandon sends that are stuck
        on a hung peer (their jobs go back to pending, nothing is lost)."""
        self.stop_event.set()
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.1, deadline - time.monotonic()))
        for thread in self.threads:
            if thread.is_alive() and isinstance(thread, DestinationWorker):
                log.warning("abandoning a blocked send in %s", thread.name)
                thread.abandon()

    def _plan_loop(self) -> None:
        poll = self.config.dispatch.poll_interval
        last_triggers = last_recover = 0.0
        while not self.stop_event.is_set():
            try:
                planned = self.planner.route_new_instances()
                now = time.monotonic()
                if now - last_triggers >= _TRIGGER_CHECK_EVERY:
                    self.planner.fire_stable_triggers()
                    last_triggers = now
                if now - last_recover >= _RECOVER_EVERY:
                    self.jobs.recover()
                    last_recover = now
            except Exception:
                log.exception("planning failed; retrying")
                planned = 0
                self.stop_event.wait(1.0)
            if not planned:
                self.stop_event.wait(poll)
