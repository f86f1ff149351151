"""Metrics computed at scrape time from the index and the storage folder.

The queue lives in the index, so its depth is read, never counted along the way:
counters in three processes would drift from the truth after a crash, a restart
or a manual retry; the index cannot. Every query is an indexed lookup per
destination (``ix_jobs_claim`` on destination, state), bounded by the number of
*open* jobs, never by the history of finished ones.

Series:

- ``dicomrouter_queue_jobs{destination,state}``: jobs scheduled, pending or in
  progress;
- ``dicomrouter_queue_oldest_pending_age_seconds{destination}``: age of the oldest
  job not delivered yet (pending or in progress; jobs waiting for their send window
  are not late), 0 when there is none;
- ``dicomrouter_destination_state{destination,state}``: 1 for the current state
  among ok, paused (by an operator), probing (unreachable, probed with C-ECHO) and
  disabled;
- ``dicomrouter_storage_free_bytes``, ``dicomrouter_storage_total_bytes``,
  ``dicomrouter_storage_min_free_bytes`` (the watermark below which C-STOREs are
  refused);
- ``dicomrouter_retention_stored_instances``/``_bytes`` (now),
  ``dicomrouter_retention_eligible_instances``/``_bytes`` and
  ``dicomrouter_retention_kept_undelivered_instances``/``_bytes`` (as of the last
  purge run), ``dicomrouter_retention_last_run_timestamp_seconds`` and
  ``dicomrouter_retention_last_run_ok``;
- ``dicomrouter_index_up``: 0 when the index could not be read for this scrape;
- ``dicomrouter_unplanned_instances`` and
  ``dicomrouter_unplanned_oldest_age_seconds``: acknowledged instances whose plan
  could not be written (retried automatically), and how long the oldest has waited;
- ``dicomrouter_orphaned_jobs{destination}``: open jobs of destinations that are no
  longer configured (nothing sends them);
- ``dicomrouter_process_up{role}``: 1 when a receiver (``receiver``, or
  ``receiver-1``..``receiver-N`` with ``dicom.processes`` N) / the dispatch process of this
  node has a fresh heartbeat and reports ok (what ``/readyz`` checks);
- ``dicomrouter_certificate_expiry_seconds{key}``: seconds until a configured
  certificate file (``key`` is its configuration key, e.g. ``http.tls.certificate``)
  expires; negative once expired;
- ``dicomrouter_build_info{version}``.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import Engine, func, select

from dicomrouter import __version__
from dicomrouter.config import RouterConfig
from dicomrouter.control.jobs import orphaned_queues
from dicomrouter.control.loops import held_count
from dicomrouter.control.nodes import UP, list_nodes
from dicomrouter.control.retention import retention_status
from dicomrouter.control.unplanned import summary
from dicomrouter.queue import states as S
from dicomrouter.store import heartbeat
from dicomrouter.store.schema import destination_state, jobs
from dicomrouter.tls import TlsError, certificate_not_after

log = logging.getLogger("dicomrouter.metrics")

QUEUE_STATES = S.OPEN_STATES
LATE_STATES = S.LATE_STATES
DESTINATION_STATES = tuple(str(state) for state in S.DestinationState)


@dataclass
class DestinationQueue:
    """One destination's queue and health as the index says now."""

    name: str
    jobs: dict[str, int]
    oldest_pending_at: float | None
    state: str
    since: float | None  # when it was paused or found unreachable, if known


def destination_state_name(enabled: bool, row: Any) -> str:
    """ok, paused (operator), probing (unreachable) or disabled (configuration)."""
    return str(S.destination_state(enabled, row))


def read_queues(engine: Engine, config: RouterConfig) -> list[DestinationQueue]:
    """Queue depth by state, the oldest late job and the state of every destination
    that is configured or still has state in the index."""
    with engine.connect() as conn:
        health = {row.name: row for row in conn.execute(select(destination_state))}
        result = []
        for name in sorted(set(config.senders) | set(health)):  # a group has no queue
            counts = dict.fromkeys(QUEUE_STATES, 0)
            for state, count in conn.execute(
                select(jobs.c.state, func.count())
                .where(jobs.c.destination == name, jobs.c.state.in_(QUEUE_STATES))
                .group_by(jobs.c.state)
            ):
                counts[state] = int(count)
            # Job ids grow with creation time: min(id) is answered from the index.
            oldest_id = (
                select(func.min(jobs.c.id))
                .where(jobs.c.destination == name, jobs.c.state.in_(LATE_STATES))
                .scalar_subquery()
            )
            oldest = conn.execute(select(jobs.c.created_at).where(jobs.c.id == oldest_id)).scalar()
            row = health.get(name)
            dest = config.destinations.get(name)
            state = destination_state_name(dest.enabled if dest else True, row)
            since = row.paused_since if row is not None and state != "ok" else None
            result.append(DestinationQueue(name, counts, oldest, state, since))
    return result


class IndexCollector(Collector):
    """A prometheus-client collector over the live configuration (``get_config`` is
    called at each scrape, so a hot reload shows at once)."""

    def __init__(
        self, engine: Engine, get_config: Callable[[], RouterConfig], storage_root: Any
    ) -> None:
        self.engine = engine
        self.get_config = get_config
        self.storage_root = storage_root

    def collect(self) -> Iterator[Any]:
        config = self.get_config()
        info = InfoMetricFamily("dicomrouter_build", "The router's version.")
        info.add_metric([], {"version": __version__})
        yield info
        yield from self._storage(config)
        yield from self._certificates(config)
        up = GaugeMetricFamily("dicomrouter_index_up", "1 when the index answered this scrape.")
        try:
            queues = read_queues(self.engine, config)
        except Exception:
            log.exception("metrics: cannot read the index")
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from self._retention()
        depth = GaugeMetricFamily(
            "dicomrouter_queue_jobs",
            "Jobs waiting or being sent, by destination and state.",
            labels=["destination", "state"],
        )
        age = GaugeMetricFamily(
            "dicomrouter_queue_oldest_pending_age_seconds",
            "Age of the oldest job not yet delivered (pending or in progress); 0 if none.",
            labels=["destination"],
        )
        states = GaugeMetricFamily(
            "dicomrouter_destination_state",
            "1 for the destination's current state: ok, paused (operator), probing "
            "(unreachable) or disabled.",
            labels=["destination", "state"],
        )
        now = time.time()
        for queue in queues:
            for state, count in queue.jobs.items():
                depth.add_metric([queue.name, state], count)
            oldest = queue.oldest_pending_at
            age.add_metric([queue.name], max(now - oldest, 0.0) if oldest else 0.0)
            for state in DESTINATION_STATES:
                states.add_metric([queue.name, state], 1.0 if queue.state == state else 0.0)
        yield depth
        yield age
        yield states
        held = GaugeMetricFamily(
            "dicomrouter_loop_held_instances",
            "Instances held as routing loops (they came back from a destination we had "
            "just sent them to), not released yet.",
        )
        held.add_metric([], held_count(self.engine))
        yield held
        try:
            extra = list(self._no_silent_loss(config, now))
        except Exception:  # the queue metrics above are still worth a scrape
            log.exception("metrics: cannot read unplanned instances, orphaned jobs or heartbeats")
            extra = []
        yield from extra

    def _no_silent_loss(self, config: RouterConfig, now: float) -> Iterator[Any]:
        waiting = summary(self.engine, limit=0)
        count = GaugeMetricFamily(
            "dicomrouter_unplanned_instances",
            "Acknowledged instances whose plan could not be written yet (retried with backoff).",
        )
        count.add_metric([], waiting.count)
        yield count
        oldest = GaugeMetricFamily(
            "dicomrouter_unplanned_oldest_age_seconds",
            "How long the oldest unplanned instance has waited; 0 if none.",
        )
        first = waiting.oldest_failed_at
        oldest.add_metric([], max(now - first, 0.0) if first else 0.0)
        yield oldest
        orphaned = GaugeMetricFamily(
            "dicomrouter_orphaned_jobs",
            "Open jobs of a destination that is no longer configured.",
            labels=["destination"],
        )
        for queue in orphaned_queues(self.engine, config.destinations):
            orphaned.add_metric([queue.destination], queue.total)
        yield orphaned
        up = GaugeMetricFamily(
            "dicomrouter_process_up",
            "1 when this node's process has a fresh heartbeat and reports ok (see /readyz).",
            labels=["role"],
        )
        roles = heartbeat.required_roles(config.dicom.process_count)
        for process in heartbeat.check(self.engine, config.node.name, roles):
            up.add_metric([process.role], 1.0 if process.ok else 0.0)
        yield up
        node_up = GaugeMetricFamily(
            "dicomrouter_node_up",
            "1 for each node sharing the index with a fresh heartbeat, 0 for one that is "
            "down (not forgotten): every node's scrape shows them all.",
            labels=["node"],
        )
        for node in list_nodes(self.engine).nodes:
            node_up.add_metric([node.name], 1.0 if node.state == UP else 0.0)
        yield node_up

    def _retention(self) -> Iterator[Any]:
        try:
            status = retention_status(self.engine)
        except Exception:  # an index from before schema 3 is upgraded at start-up
            log.exception("metrics: cannot read the retention status")
            return
        for name, value, text in (
            ("stored_instances", status.stored, "Stored objects (not purged)."),
            ("stored_bytes", status.stored_bytes, "Bytes of stored objects."),
            ("eligible_instances", status.eligible, "Stored objects due for purge."),
            ("eligible_bytes", status.eligible_bytes, "Bytes of stored objects due for purge."),
            (
                "kept_undelivered_instances",
                status.kept_undelivered,
                "Stored objects kept because not delivered (failed, pending, waiting).",
            ),
            (
                "kept_undelivered_bytes",
                status.kept_undelivered_bytes,
                "Bytes of stored objects kept because not delivered.",
            ),
        ):
            family = GaugeMetricFamily(f"dicomrouter_retention_{name}", text)
            family.add_metric([], float(value))
            yield family
        last = status.last_run
        if last is not None:
            stamp = GaugeMetricFamily(
                "dicomrouter_retention_last_run_timestamp_seconds",
                "When the last purge run started (POSIX seconds).",
            )
            stamp.add_metric([], last.started_at)
            yield stamp
            ok = GaugeMetricFamily(
                "dicomrouter_retention_last_run_ok", "1 when the last purge run succeeded."
            )
            ok.add_metric([], 0.0 if last.error else 1.0)
            yield ok

    def _certificates(self, config: RouterConfig) -> Iterator[Any]:
        files = config.certificate_files()
        if not files:
            return
        family = GaugeMetricFamily(
            "dicomrouter_certificate_expiry_seconds",
            "Seconds until a configured certificate file expires (negative: expired), "
            "by configuration key.",
            labels=["key"],
        )
        now = time.time()
        for key, path in sorted(files.items()):
            try:
                family.add_metric([key], certificate_not_after(path).timestamp() - now)
            except TlsError as exc:
                log.warning("metrics: cannot read the expiry date of %s (%s): %s", path, key, exc)
        yield family

    def _storage(self, config: RouterConfig) -> Iterator[Any]:
        try:
            usage = shutil.disk_usage(self.storage_root)
        except OSError:
            log.exception("metrics: cannot read disk usage of %s", self.storage_root)
            return
        for name, value, text in (
            ("free", usage.free, "Free bytes on the storage filesystem."),
            ("total", usage.total, "Size of the storage filesystem in bytes."),
            (
                "min_free",
                config.storage.min_free_space,
                "Free bytes below which C-STOREs are refused (storage.min_free_space).",
            ),
        ):
            family = GaugeMetricFamily(f"dicomrouter_storage_{name}_bytes", text)
            family.add_metric([], float(value))
            yield family
