"""Event notifications: tell other systems what happened, not what went wrong.

Three events, each off unless ``notifications.<event>.enabled`` (docs/alerts.md,
"Notifications", documents the payloads):

- ``study_received``: no instance of a study arrived for ``stable_after`` (by
  default the longest ``stable_after`` of the routes with ``trigger: study``, so it
  comes when they fire; 2 minutes when no route has a study trigger). Every study
  counts, whether a route matched it or not.
- ``job_completed``: a job ended ``completed`` or ``warning``.
- ``study_delivered``: a received study whose jobs all ended ``completed`` or
  ``warning`` (canceled ones aside), none failed or open, no trigger of it armed and
  none of its instances waiting to be planned. It can come again if more instances
  of the study arrive and are delivered later (a new ``event_id``).

How: nothing is added to the receive or dispatch paths. The alerter thread of the
HTTP process (observe/alerts.py), every ``notifications.check_interval``:

1. *detects* new events with indexed queries against high-water marks kept in the
   index (``notification_marks``): the last ``attempts.id`` seen (every job that
   ends writes an attempt row in the transaction that ends it; on SQLite ids follow
   commit order, so none is skipped), and the end of the last quiet-time window
   over ``instances.received_at`` (windows overlap by ``_SLACK`` so a late commit is
   still seen). The events found and the new marks are written in one transaction
   to the outbox (``notification_outbox``), one row per event and webhook, payload
   included: an event detected before a crash is sent after the restart.
2. *drains* the outbox, in order per webhook: a POST with the webhook's timeout, ``retries`` and
   ``retry_delay`` (``alerts.post_json``), counted against the webhook's
   ``alerts.max_per_hour`` together with the alerts. A notification that could not
   be sent (or is over the limit) stays in the outbox and is tried again later, with
   growing delays, until ``give_up_after``; then it is dropped and audited.

Delivery is at least once: a crash between a POST and its bookkeeping sends that
notification again. ``event_id`` (derived from the event: the study and its last
arrival, the job and its finish time) is the same every time, for de-duplication.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any
from urllib.parse import quote

from sqlalchemy import Connection, Engine, delete, func, select, update

from dicomrouter import __version__
from dicomrouter.config import RouterConfig
from dicomrouter.queue import states as S
from dicomrouter.store import audit
from dicomrouter.store.schema import (
    attempts,
    instances,
    job_instances,
    jobs,
    notification_marks,
    notification_outbox,
    triggers,
)

from .webhooks import iso, post_json

log = logging.getLogger("dicomrouter.notifications")

DEFAULT_STABLE_AFTER = 120.0
_SLACK = 300.0  # quiet-time windows overlap by this much: a late commit is still seen
_ATTEMPTS_PER_PASS = 2000  # attempt rows looked at per pass (the rest: next pass)
_SEND_PER_PASS = 200  # notifications sent per pass, at most
_MAX_DELAY = 600.0  # longest wait before trying an unsent notification again
_PURGE_EVERY = 3600.0
_MARKS_EVERY = 60.0  # an unchanged quiet-time mark is written at most this often
_CHUNK = 500

MARK_QUIET = "study_quiet"  # end of the last quiet-time window (study_received/delivered)
MARK_ATTEMPTS = "attempts"  # last attempts.id looked at (job_completed, study_delivered)

PENDING, SENT, DROPPED = "pending", "sent", "dropped"
DELIVERED = (S.COMPLETED, S.WARNING)


def public_url(config: RouterConfig) -> str:
    """Where the dashboard is reached: ``http.public_url``, else built from the HTTP
    listener (the machine's name for a wildcard ``bind``). No trailing slash."""
    if config.http.public_url:
        return config.http.public_url
    scheme = "https" if config.http.tls is not None else "http"
    host = config.http.bind
    if host in ("", "0.0.0.0", "::"):
        host = socket.getfqdn()
    host = f"[{host}]" if ":" in host else host
    return f"{scheme}://{host}:{config.http.port}"


def study_link(config: RouterConfig, uid: str) -> str:
    """The study's trace page (where it came from, where it went)."""
    return f"{public_url(config)}/studies/{quote(uid, safe='')}"


def stable_after(config: RouterConfig) -> float:
    """How long a study must be quiet to count as received (see the module doc)."""
    configured = config.notifications.study_received.stable_after
    if configured is not None:
        return configured
    study_routes = [r.stable_after for r in config.routes if r.enabled and r.trigger == "study"]
    return max(study_routes) if study_routes else DEFAULT_STABLE_AFTER


def _chunks(values: Sequence[Any], size: int = _CHUNK) -> Iterable[Sequence[Any]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


class Notifier:
    """Detects events and sends them from the outbox; :meth:`run_once` is one pass.

    ``allowed(webhook, per_hour)`` is the alerts' rate limiter (one budget per
    webhook for alerts and notifications). ``engine`` writes, ``reader`` detects.
    """

    def __init__(
        self,
        get_config: Callable[[], RouterConfig],
        engine: Engine,
        reader: Engine,
        allowed: Callable[[str, int], bool],
        clock: Callable[[], float] = time.time,
        stop: threading.Event | None = None,
    ) -> None:
        self.get_config = get_config
        self.engine = engine
        self.reader = reader
        self.allowed = allowed
        self.clock = clock
        self.stop = stop or threading.Event()
        self._purged_at = 0.0
        self._marks_at = 0.0
        # Quiet studies this process has already recorded (event id -> when): the
        # windows overlap, and a study seen again is skipped before any more query.
        self._seen: dict[str, float] = {}

    def run_once(self) -> int:
        """Detect, then send what is due. Returns how many notifications were sent."""
        self.detect()
        return self.drain()

    # -- detection ----------------------------------------------------------------

    def detect(self) -> int:
        """Record the events that happened since the last pass in the outbox (and
        the marks, in the same transaction). Returns how many outbox rows were added."""
        config = self.get_config()
        rules = config.notifications
        now = self.clock()
        with self.reader.connect() as conn:
            marks = {row.name: row.value for row in conn.execute(select(notification_marks))}
        quiet_on = rules.study_received.enabled or rules.study_delivered.enabled
        jobs_on = rules.job_completed.enabled or rules.study_delivered.enabled
        new_marks: dict[str, float | None] = {}
        events: list[tuple[str, str, str, float, dict[str, Any]]] = []
        received: set[str] = set()
        touched: set[str] = set()
        quiet_ids: list[str] = []
        with self.reader.connect() as conn:
            if quiet_on:
                found, new_marks[MARK_QUIET] = self._received(conn, config, marks, now)
                received = {event[2] for event in found}
                quiet_ids = [event[1] for event in found]
                if rules.study_received.enabled:
                    events += found
            elif MARK_QUIET in marks:
                new_marks[MARK_QUIET] = None  # off: start afresh when turned on again
            if jobs_on:
                found, new_marks[MARK_ATTEMPTS] = self._completed(conn, config, marks)
                touched = {event[4]["study_instance_uid"] for event in found}
                if rules.job_completed.enabled:
                    events += found
            elif MARK_ATTEMPTS in marks:
                new_marks[MARK_ATTEMPTS] = None
            if rules.study_delivered.enabled:
                events += self._delivered(conn, config, sorted(received | touched), now)
        added = self._record(config, events, marks, new_marks, now)
        self._seen.update((event_id, now) for event_id in quiet_ids)
        horizon = now - 2 * (_SLACK + _MARKS_EVERY)
        self._seen = {key: at for key, at in self._seen.items() if at > horizon}
        return added

    def _record(
        self,
        config: RouterConfig,
        events: list[tuple[str, str, str, float, dict[str, Any]]],
        marks: dict[str, float],
        new_marks: dict[str, float | None],
        now: float,
    ) -> int:
        rows: list[dict[str, Any]] = []
        for event, event_id, subject, occurred_at, payload in events:
            rule = getattr(config.notifications, event)
            names = rule.webhooks if rule.webhooks is not None else sorted(config.alerts.webhooks)
            body = json.dumps(payload, default=str)
            rows += [
                {
                    "event_id": event_id,
                    "event": event,
                    "webhook": name,
                    "subject": subject[:128],
                    "payload": body,
                    "occurred_at": occurred_at,
                    "created_at": now,
                    "state": PENDING,
                    "attempts": 0,
                    "next_attempt_at": now,
                }
                for name in names
                if name in config.alerts.webhooks
            ]
        # The quiet-time mark moves at every pass; with nothing found it is written
        # only now and then (a restart re-reads at most that much: the outbox's
        # unique event ids make it harmless). A moved attempts mark is always written.
        if not rows and now - self._marks_at < _MARKS_EVERY:
            new_marks = {
                name: value
                for name, value in new_marks.items()
                if value is None
                or name not in marks
                or (name != MARK_QUIET and value != marks[name])
            }
        if not rows and not new_marks:
            return 0
        self._marks_at = now
        with self.engine.begin() as conn:
            known: set[tuple[str, str]] = set()
            ids = sorted({row["event_id"] for row in rows})
            for chunk in _chunks(ids):
                known.update(
                    (r.event_id, r.webhook)
                    for r in conn.execute(
                        select(notification_outbox.c.event_id, notification_outbox.c.webhook).where(
                            notification_outbox.c.event_id.in_(chunk)
                        )
                    )
                )
            fresh = [row for row in rows if (row["event_id"], row["webhook"]) not in known]
            if fresh:
                conn.execute(notification_outbox.insert(), fresh)
            for name, value in new_marks.items():
                conn.execute(delete(notification_marks).where(notification_marks.c.name == name))
                if value is not None:
                    conn.execute(
                        notification_marks.insert().values(name=name, value=value, updated_at=now)
                    )
        for row in fresh:
            log.debug(
                "notification %s for %s queued to %s", row["event"], row["subject"], row["webhook"]
            )
        return len(fresh)

    def _received(
        self, conn: Connection, config: RouterConfig, marks: dict[str, float], now: float
    ) -> tuple[list[tuple[str, str, str, float, dict[str, Any]]], float]:
        """Studies whose last arrival fell into the window that became quiet since
        the last pass."""
        quiet = stable_after(config)
        until = now - quiet
        previous = marks.get(MARK_QUIET)
        if previous is None:  # first pass: from now on, no backlog
            return [], until
        low = min(previous, until) - _SLACK
        candidates = list(
            conn.execute(
                select(instances.c.study_instance_uid)
                .where(instances.c.received_at > low, instances.c.received_at <= until)
                .distinct()
            ).scalars()
        )
        events = []
        for study in self._study_facts(conn, candidates):
            if study["last"] > until:
                continue  # still receiving: it comes in a later window
            uid = study["study_instance_uid"]
            occurred = study["last"] + quiet
            event_id = f"study_received:{uid}:{study['last']:.6f}"
            if event_id in self._seen:
                continue  # found by an earlier pass (the windows overlap)
            payload = self._envelope(config, "study_received", event_id, occurred)
            payload.update(
                {
                    "study_instance_uid": uid,
                    "link": study_link(config, uid),
                    "text": f"study {uid} received: {study['instances']} instance(s) in "
                    f"{study['series']} series from {', '.join(study['calling_aes']) or '?'}",
                    "study": {
                        "study_instance_uid": uid,
                        "accession_number": study["accession_number"],
                        "study_date": study["study_date"],
                        "modalities": study["modalities"],
                        "series": study["series"],
                        "instances": study["instances"],
                        "bytes": study["bytes"],
                        "calling_aes": study["calling_aes"],
                        "first_received_at": iso(study["first"]),
                        "last_received_at": iso(study["last"]),
                        "stable_after_s": quiet,
                    },
                }
            )
            events.append(("study_received", payload["event_id"], uid, occurred, payload))
        return events, until

    def _study_facts(self, conn: Connection, uids: Sequence[str]) -> list[dict[str, Any]]:
        """Counts and identifiers of each study (its instances not purged)."""
        found: dict[str, dict[str, Any]] = {}
        for chunk in _chunks(sorted(uids)):
            live = (instances.c.study_instance_uid.in_(chunk), instances.c.purged_at.is_(None))
            for row in conn.execute(
                select(
                    instances.c.study_instance_uid,
                    func.count().label("n"),
                    func.count(instances.c.series_instance_uid.distinct()).label("series"),
                    func.sum(instances.c.size).label("bytes"),
                    func.min(instances.c.received_at).label("first"),
                    func.max(instances.c.received_at).label("last"),
                    func.max(instances.c.accession_number).label("accession"),
                    func.max(instances.c.study_date).label("date"),
                )
                .where(*live)
                .group_by(instances.c.study_instance_uid)
            ):
                found[row.study_instance_uid] = {
                    "study_instance_uid": row.study_instance_uid,
                    "instances": row.n,
                    "series": row.series,
                    "bytes": int(row.bytes or 0),
                    "first": row.first,
                    "last": row.last,
                    "accession_number": row.accession,
                    "study_date": row.date,
                    "modalities": [],
                    "calling_aes": [],
                }
            for row in conn.execute(
                select(instances.c.study_instance_uid, instances.c.modality, instances.c.calling_ae)
                .where(*live)
                .distinct()
            ):
                facts = found[row.study_instance_uid]
                if row.modality and row.modality not in facts["modalities"]:
                    facts["modalities"].append(row.modality)
                if row.calling_ae and row.calling_ae not in facts["calling_aes"]:
                    facts["calling_aes"].append(row.calling_ae)
        for facts in found.values():
            facts["modalities"].sort()
            facts["calling_aes"].sort()
        return [found[uid] for uid in sorted(found)]

    def _completed(
        self, conn: Connection, config: RouterConfig, marks: dict[str, float]
    ) -> tuple[list[tuple[str, str, str, float, dict[str, Any]]], float]:
        """Jobs that ended delivered since the last pass, found through the attempt
        row each end writes."""
        previous = marks.get(MARK_ATTEMPTS)
        if previous is None:  # first pass: from now on, no backlog
            last = conn.execute(select(func.max(attempts.c.id))).scalar()
            return [], float(last or 0)
        rows = conn.execute(
            select(attempts.c.id, attempts.c.job_id)
            .where(attempts.c.id > int(previous))
            .order_by(attempts.c.id)
            .limit(_ATTEMPTS_PER_PASS)
        ).all()
        if not rows:
            return [], previous
        job_ids = list(dict.fromkeys(row.job_id for row in rows))
        ended: list[Any] = []
        for chunk in _chunks(job_ids):
            ended += conn.execute(
                select(jobs).where(
                    jobs.c.id.in_(chunk),
                    jobs.c.state.in_(DELIVERED),
                    jobs.c.finished_at.is_not(None),
                )
            ).all()
        counts = self._job_counts(conn, [row.id for row in ended])
        events = []
        for job in sorted(ended, key=lambda j: (j.finished_at, j.id)):
            items = counts.get(job.id, {})
            event_id = f"job_completed:{job.id}:{job.finished_at:.6f}"
            payload = self._envelope(config, "job_completed", event_id, job.finished_at)
            delivered = items.get(S.ITEM_COMPLETED, 0) + items.get(S.ITEM_WARNING, 0)
            payload.update(
                {
                    "study_instance_uid": job.study_instance_uid,
                    "link": study_link(config, job.study_instance_uid),
                    "text": f"job {job.id} ({job.level} {job.resource_uid}) delivered to "
                    f"{job.destination}: {delivered} instance(s), {job.state}",
                    "job": {
                        "id": job.id,
                        "link": f"{public_url(config)}/jobs/{job.id}",
                        "state": job.state,
                        "destination": job.destination,
                        "level": job.level,
                        "resource_uid": job.resource_uid,
                        "routes": [r for r in job.routes.split(",") if r],
                        "transform": job.transform or None,
                        "instances": items.get("instances", 0),
                        "completed": items.get(S.ITEM_COMPLETED, 0),
                        "warning": items.get(S.ITEM_WARNING, 0),
                        "skipped": items.get(S.ITEM_SKIPPED, 0),
                        "bytes": items.get("bytes", 0),
                        "retries": job.attempts,
                        "created_at": iso(job.created_at),
                        "finished_at": iso(job.finished_at),
                        "duration_s": round(job.finished_at - job.created_at, 3),
                    },
                }
            )
            events.append(("job_completed", event_id, str(job.id), job.finished_at, payload))
        return events, float(rows[-1].id)

    @staticmethod
    def _job_counts(conn: Connection, job_ids: Sequence[int]) -> dict[int, dict[str, int]]:
        """Per job: its instances by state (``completed``, ``warning``, ``skipped``,
        ...), ``instances`` in all, and ``bytes`` (as stored) delivered."""
        counts: dict[int, dict[str, int]] = defaultdict(lambda: {"instances": 0, "bytes": 0})
        for chunk in _chunks(list(job_ids)):
            for row in conn.execute(
                select(
                    job_instances.c.job_id,
                    job_instances.c.state,
                    func.count().label("n"),
                    func.sum(instances.c.size).label("bytes"),
                )
                .join(instances, instances.c.id == job_instances.c.instance_id)
                .where(job_instances.c.job_id.in_(chunk))
                .group_by(job_instances.c.job_id, job_instances.c.state)
            ):
                entry = counts[row.job_id]
                entry[row.state] = row.n
                entry["instances"] += row.n
                if row.state in (S.ITEM_COMPLETED, S.ITEM_WARNING):
                    entry["bytes"] += int(row.bytes or 0)
        return counts

    def _delivered(
        self, conn: Connection, config: RouterConfig, uids: Sequence[str], now: float
    ) -> list[tuple[str, str, str, float, dict[str, Any]]]:
        """Of these studies, those received and delivered everywhere now."""
        if not uids:
            return []
        until = now - stable_after(config)
        facts = {f["study_instance_uid"]: f for f in self._study_facts(conn, uids)}
        armed: set[str] = set()
        for chunk in _chunks(list(uids)):
            armed.update(
                conn.execute(
                    select(triggers.c.study_instance_uid).where(
                        triggers.c.pending == 1, triggers.c.study_instance_uid.in_(chunk)
                    )
                ).scalars()
            )
        events = []
        for uid in uids:
            study = facts.get(uid)
            if study is None or study["last"] > until or uid in armed:
                continue  # purged, still arriving, or a trigger still to fire
            waiting = conn.execute(
                select(func.count()).where(
                    instances.c.study_instance_uid == uid,
                    instances.c.routed.in_((0, -1)),
                    instances.c.purged_at.is_(None),
                )
            ).scalar_one()
            if waiting:
                continue  # not planned yet: more jobs may come
            study_jobs = conn.execute(select(jobs).where(jobs.c.study_instance_uid == uid)).all()
            relevant = [j for j in study_jobs if j.state != S.CANCELED]
            if not relevant or any(j.state not in DELIVERED for j in relevant):
                continue
            counts = self._job_counts(conn, [j.id for j in relevant])
            per_destination: dict[str, dict[str, Any]] = {}
            for job in relevant:
                entry = per_destination.setdefault(
                    job.destination,
                    {
                        "name": job.destination,
                        "jobs": 0,
                        "instances": 0,
                        "completed": 0,
                        "warning": 0,
                        "skipped": 0,
                        "bytes": 0,
                        "finished_at": 0.0,
                    },
                )
                items = counts.get(job.id, {})
                entry["jobs"] += 1
                for key in ("instances", "completed", "warning", "skipped", "bytes"):
                    entry[key] += items.get(key, 0)
                entry["finished_at"] = max(entry["finished_at"], job.finished_at)
            delivered_at = max(j.finished_at for j in relevant)
            destinations = []
            for name in sorted(per_destination):
                entry = per_destination[name]
                destinations.append({**entry, "finished_at": iso(entry["finished_at"])})
            event_id = f"study_delivered:{uid}:{delivered_at:.6f}"
            payload = self._envelope(config, "study_delivered", event_id, delivered_at)
            payload.update(
                {
                    "study_instance_uid": uid,
                    "link": study_link(config, uid),
                    "text": f"study {uid} delivered to {', '.join(sorted(per_destination))} "
                    f"({len(relevant)} job(s))",
                    "study": {
                        "study_instance_uid": uid,
                        "accession_number": study["accession_number"],
                        "study_date": study["study_date"],
                        "modalities": study["modalities"],
                        "series": study["series"],
                        "instances": study["instances"],
                        "first_received_at": iso(study["first"]),
                        "last_received_at": iso(study["last"]),
                    },
                    "jobs": len(relevant),
                    "job_ids": sorted(j.id for j in relevant),
                    "warnings": any(j.state == S.WARNING for j in relevant),
                    "destinations": destinations,
                    "delivered_at": iso(delivered_at),
                }
            )
            events.append(("study_delivered", event_id, uid, delivered_at, payload))
        return events

    def _envelope(
        self, config: RouterConfig, event: str, event_id: str, occurred_at: float
    ) -> dict[str, Any]:
        return {
            "source": "dicomrouter",
            "version": __version__,
            "router": config.ae_title,
            "host": config.node.name,
            "kind": "notification",
            "event": event,
            "event_id": event_id,
            "occurred_at": iso(occurred_at),
            "at": iso(self.clock()),
        }

    # -- delivery -------------------------------------------------------------------

    def drain(self) -> int:
        """Send what is waiting, oldest first, per webhook: a webhook's notifications
        go out in the order they were recorded, so one that fails (or is over its
        rate limit, or waits for its retry time) holds back those behind it, for that
        webhook only. Returns how many were sent."""
        config = self.get_config()
        now = self.clock()
        self._purge(config, now)
        with self.reader.connect() as conn:
            names = sorted(
                conn.execute(
                    select(notification_outbox.c.webhook)
                    .where(notification_outbox.c.state == PENDING)
                    .distinct()
                ).scalars()
            )
        sent = 0
        for name in names:
            with self.reader.connect() as conn:
                waiting = conn.execute(
                    select(notification_outbox)
                    .where(
                        notification_outbox.c.state == PENDING,
                        notification_outbox.c.webhook == name,
                    )
                    .order_by(notification_outbox.c.id)
                    .limit(_SEND_PER_PASS)
                ).all()
            sent += self._send(config, name, waiting, now)
        return sent

    def _send(self, config: RouterConfig, name: str, waiting: Sequence[Any], now: float) -> int:
        webhook = config.alerts.webhooks.get(name)
        sent = 0
        for row in waiting:
            if self.stop.is_set():
                break
            if webhook is None:
                self._drop(row, "the webhook is no longer configured (alerts.webhooks)")
                continue
            if now - row.created_at > config.notifications.give_up_after:
                self._drop(row, row.last_error or "not sent within notifications.give_up_after")
                continue
            if row.next_attempt_at > now:
                break  # waiting for its retry; the later ones wait behind it
            if not self.allowed(name, config.alerts.max_per_hour):
                log.warning("notifications to %s held back: rate limit (alerts.max_per_hour)", name)
                self._update(row.id, last_error="rate limit (alerts.max_per_hour)")
                break
            result = post_json(webhook, json.loads(row.payload), self.stop)
            tries = row.attempts + 1
            if not result.ok:
                delay = min(config.notifications.check_interval * 2**tries, _MAX_DELAY)
                self._update(
                    row.id,
                    attempts=tries,
                    next_attempt_at=self.clock() + delay,
                    last_error=result.error,
                )
                log.error(
                    "notification %s %s could not be sent to %s: %s; trying again in %.0f s",
                    row.event,
                    row.subject,
                    name,
                    result.error,
                    delay,
                )
                break
            sent += 1
            self._update(row.id, state=SENT, attempts=tries, sent_at=self.clock(), last_error=None)
            log.info("notification %s %s sent to %s", row.event, row.subject, name)
        return sent

    def _update(self, row_id: int, **values: Any) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                update(notification_outbox)
                .where(notification_outbox.c.id == row_id)
                .values(**values)
            )

    def _drop(self, row: Any, reason: str) -> None:
        self._update(row.id, state=DROPPED, last_error=reason)
        log.error(
            "notification %s %s to %s dropped: %s", row.event, row.subject, row.webhook, reason
        )
        audit.record(
            self.engine,
            audit.SYSTEM,
            "notification.dropped",
            row.event_id,
            outcome="failed",
            source="notifications",
            detail={
                "event": row.event,
                "webhook": row.webhook,
                "attempts": row.attempts,
                "error": reason,
                "occurred_at": iso(row.occurred_at),
            },
        )

    def _purge(self, config: RouterConfig, now: float) -> None:
        if now - self._purged_at < _PURGE_EVERY:
            return
        self._purged_at = now
        with self.engine.begin() as conn:
            conn.execute(
                delete(notification_outbox).where(
                    notification_outbox.c.state != PENDING,
                    notification_outbox.c.created_at < now - config.notifications.keep,
                )
            )
