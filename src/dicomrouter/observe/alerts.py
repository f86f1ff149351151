"""Webhook alerts: tell a person when the router needs one.

An :class:`AlertEvaluator` runs as a thread in the HTTP process (never near the
receiver) and checks, every ``alerts.check_interval``, with the same cheap indexed
queries as the metrics:

- ``job_failed``: jobs that failed for good since the last check (one alert per
  destination and check, listing the jobs);
- ``destination_down``: a destination paused by an operator or unreachable for
  longer than ``after``;
- ``queue_stale``: the oldest job not yet delivered to a destination is older than
  ``after``;
- ``disk_low``: free disk in storage below ``below``;
- ``loop_detected``: instances held since the last check because they came back
  from a destination we had just sent them to (one alert per destination, listing
  them; see queue/loops.py).
- ``unplanned``: acknowledged instances whose plan could not be written, the
  oldest waiting for longer than ``after`` (one incident for the node);
- ``orphaned_jobs``: open jobs of a destination no longer configured (one incident
  per such destination);
- ``commitment_failed``: storage commitment transactions that ended since the last
  check without every instance committed (failed, refused, or timed out); one alert
  per destination and check, listing them.
- ``certificate_expiry``: a certificate file of the configuration (TLS listeners,
  destinations, CA bundles) expires within ``before`` or has expired (one incident
  per configuration key; resolved when the file is renewed or no longer named).
- ``node_down``: a node sharing the index has written no heartbeat for ``after``
  (one incident per node; resolved when it beats again, or once it is forgotten:
  a node taken out for good is not alerted).

Each condition is an *incident*: it fires once when it starts (after its delay)
and, if ``send_resolved``, once more when it ends. Incidents survive a restart of
the HTTP process because they are rebuilt from the audit log, where every alert is
recorded (``alert.<event>``, actor ``system``), sent or not. Each webhook gets at
most ``max_per_hour`` alerts in any hour; more are dropped and audited as
``suppressed``.

Delivery is a JSON POST with the stdlib (no dependency), a timeout per attempt and
``retries`` retries with doubling delays. The payload (documented in
docs/alerts.md)::

    {"source": "dicomrouter", "version": "1.2.0", "router": "DICOMROUTER",
     "host": "router-1", "event": "destination_down", "status": "firing",
     "severity": "critical", "target": "pacs",
     "summary": "destination pacs is unreachable since 2026-11-22T18:00:00Z",
     "text": "[FIRING] destination pacs is unreachable since ...",
     "since": "2026-11-22T18:00:00Z", "at": "2026-11-22T18:10:30Z",
     "details": {...}}

``text`` makes the same POST readable by chat webhooks (Slack, Mattermost).

Several nodes on one PostgreSQL index: every node's HTTP process runs the thread,
but only the leader of the duty ``alerts`` (``store/leadership.py``: a session-level
advisory lock) checks and sends, alerts and event notifications alike; the others
only ask, every round, whether the leader is gone. A node that becomes the leader
rebuilds the open incidents from the audit log first (the previous leader audited
every alert it sent), so a failover neither repeats nor forgets an alert.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, func, select

from dicomrouter import __version__
from dicomrouter.config import RouterConfig
from dicomrouter.config.models import AlertEventConfig, ResolvableAlertConfig
from dicomrouter.control.jobs import orphaned_queues
from dicomrouter.control.nodes import DOWN, list_nodes
from dicomrouter.control.unplanned import summary as unplanned_summary
from dicomrouter.queue import commitment
from dicomrouter.store import audit
from dicomrouter.store.dialect import database_now
from dicomrouter.store.leadership import Leadership
from dicomrouter.store.schema import jobs, loop_events
from dicomrouter.tls import TlsError, certificate_not_after

from .collector import read_queues
from .notify import Notifier
from .webhooks import Delivery, iso, post_json

__all__ = ["AlertEvaluator", "AlertThread", "Delivery", "iso", "post_json", "start_alerts"]

log = logging.getLogger("dicomrouter.alerts")

FIRING = "firing"
RESOLVED = "resolved"
SEVERITY = {
    "job_failed": "error",
    "destination_down": "critical",
    "queue_stale": "warning",
    "disk_low": "critical",
    "loop_detected": "error",
    "unplanned": "error",
    "orphaned_jobs": "warning",
    "certificate_expiry": "warning",
    "commitment_failed": "error",
    "node_down": "critical",
}
_JOBS_LISTED = 20  # failed jobs named in one alert; the count says how many in all
_DISK_HYSTERESIS = 1.05  # resolved only 5% above the watermark: no flapping
_HOUR = 3600.0
_LOOK_BACK = 86400.0  # failed jobs older than this are history, never alerted


@dataclass
class Alert:
    """One notification: an incident that starts (firing) or ends (resolved)."""

    event: str
    status: str
    target: str
    summary: str
    since: float | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def payload(self, config: RouterConfig, now: float) -> dict[str, Any]:
        return {
            "source": "dicomrouter",
            "version": __version__,
            "router": config.ae_title,
            "host": config.node.name,
            "event": self.event,
            "status": self.status,
            "severity": SEVERITY.get(self.event, "warning"),
            "target": self.target,
            "summary": self.summary,
            "text": f"[{self.status.upper()}] {self.summary}",
            "since": iso(self.since),
            "at": iso(now),
            "details": self.details,
        }


@dataclass
class _Incident:
    since: float  # when the condition was first seen (or recorded) to hold
    fired: bool = False


class AlertEvaluator:
    """Checks the conditions and sends the alerts; :meth:`run_once` is one check.

    ``get_config`` is called at every check, so a hot reload applies at once.
    ``engine`` writes the audit rows; ``reader`` serves the checks.
    """

    def __init__(
        self,
        get_config: Callable[[], RouterConfig],
        engine: Engine,
        reader: Engine,
        storage_root: Path,
        clock: Callable[[], float] = time.time,
        stop: threading.Event | None = None,
    ) -> None:
        self.get_config = get_config
        self.engine = engine
        self.reader = reader
        self.storage_root = storage_root
        self.clock = clock
        self.stop = stop or threading.Event()
        self._incidents: dict[tuple[str, str], _Incident] = {}
        self._failed_since: float = clock()
        self._loops_since: float = clock()
        self._commitments_since: float = clock()
        self._sent: dict[str, deque[float]] = {}
        self._restore()
        # Event notifications (observe/notify.py) go out from this thread too, under
        # the same per-webhook rate limit.
        self.notifier = Notifier(get_config, engine, reader, self._allowed, clock, self.stop)

    # -- state ------------------------------------------------------------------

    def take_over(self) -> None:
        """This process just became the alert leader (another node led until now):
        forget what it knew and rebuild it from the audit log, where the previous
        leader recorded every alert. What ended without an audit row (commitment
        failures) is looked for from one check interval back."""
        now = self.clock()
        back = now - self.get_config().alerts.check_interval
        self._incidents.clear()
        self._failed_since = self._loops_since = self._commitments_since = back
        self._restore()

    def _restore(self) -> None:
        """Rebuild open incidents and the failed-jobs watermark from the audit log,
        so a restart neither repeats nor forgets an alert."""
        try:
            _, entries = audit.query(self.reader, action="alert.", limit=1000)
        except Exception:
            log.exception("alerts: cannot read past alerts from the audit log")
            return
        seen: set[tuple[str, str]] = set()
        now, until_found, loops_found = self.clock(), False, False
        for entry in entries:  # newest first
            payload = entry["detail"].get("payload") or {}
            event, target = payload.get("event"), payload.get("target")
            if not event or not target:
                continue
            if event == "loop_detected":
                until = payload.get("details", {}).get("until")
                if not loops_found and isinstance(until, int | float):
                    self._loops_since = min(now, max(float(until), now - _LOOK_BACK))
                    loops_found = True
                continue
            if event == "job_failed":
                until = payload.get("details", {}).get("until")
                if not until_found and isinstance(until, int | float):
                    # Go on from the last check that found failures, but never
                    # look back more than a day (alerts off for months: no flood).
                    self._failed_since = min(now, max(float(until), now - _LOOK_BACK))
                    until_found = True
                continue
            if (event, target) in seen:
                continue
            seen.add((event, target))
            if payload.get("status") == FIRING:
                since = _parse_iso(payload.get("since")) or entry["at"]
                self._incidents[(event, target)] = _Incident(since, fired=True)

    def _incident(
        self, key: tuple[str, str], holds: bool, since: float | None, now: float
    ) -> _Incident | None:
        """Track a condition; return the incident while it holds, or the one that
        just ended (``holds`` False) so it can be resolved."""
        incident = self._incidents.get(key)
        if holds:
            if incident is None:
                incident = self._incidents[key] = _Incident(since or now)
            return incident
        if incident is not None:
            del self._incidents[key]
        return incident

    # -- checks -------------------------------------------------------------------

    def check(self) -> list[Alert]:
        """Evaluate every enabled condition; return the alerts to send now."""
        config = self.get_config()
        events = config.alerts.events
        now = self.clock()
        alerts: list[Alert] = []
        if events.job_failed.enabled:
            alerts += self._failed_jobs(config, now)
        if events.destination_down.enabled or events.queue_stale.enabled:
            alerts += self._destinations(config, now)
        if events.disk_low.enabled:
            alerts += self._disk(config, now)
        if events.loop_detected.enabled:
            alerts += self._loops(now)
        if events.unplanned.enabled:
            alerts += self._unplanned(config, now)
        if events.orphaned_jobs.enabled:
            alerts += self._orphaned(config, now)
        if events.certificate_expiry.enabled:
            alerts += self._certificates(config, now)
        if events.commitment_failed.enabled:
            alerts += self._commitments(now)
        if events.node_down.enabled:
            alerts += self._nodes(config, now)
        return alerts

    def _nodes(self, config: RouterConfig, now: float) -> list[Alert]:
        """One incident per node that stopped heartbeating, from its last heartbeat;
        a node forgotten meanwhile ends its incident."""
        rule = config.alerts.events.node_down
        # Heartbeats are in the database's clock: this check's moment, carried into it
        # (a node whose wall clock is off is neither down while it beats nor up after).
        with self.reader.connect() as conn:
            skew = database_now(conn) - time.time()
        found = {node.name: node for node in list_nodes(self.reader, now + skew).nodes}
        open_ones = {target for event, target in self._incidents if event == "node_down"}
        alerts: list[Alert] = []
        for name in sorted(set(found) | open_ones):
            node = found.get(name)
            down = node is not None and node.state == DOWN
            last = None if node is None else now - node.last_heartbeat_age_s
            details: dict[str, Any] = {"node": name, "forgotten": node is None}
            if node is not None:
                details.update(
                    last_heartbeat=iso(last),
                    software_version=node.software_version,
                    config_version=node.config_version,
                    processes=[p.role for p in node.processes],
                )
            back = (
                f"node {name} was forgotten (taken out)"
                if node is None
                else f"node {name} is up again"
            )
            alerts += self._transition(
                rule,
                ("node_down", name),
                down,
                last,
                now,
                f"node {name} is down: no heartbeat since {{since}}",
                back,
                details,
                delay=rule.after,
            )
        return alerts

    def _commitments(self, now: float) -> list[Alert]:
        since, alerts = self._commitments_since, []
        with self.reader.connect() as conn:
            ended = commitment.recent_failures(conn, since, now)
        by_destination: dict[str, list[dict[str, Any]]] = {}
        for row in ended:
            by_destination.setdefault(str(row["destination"]), []).append(row)
        for name, rows in sorted(by_destination.items()):
            failed = sum(int(r["failed"]) for r in rows)
            listed = [{**r, "finished_at": iso(r["finished_at"])} for r in rows[:_JOBS_LISTED]]
            alerts.append(
                Alert(
                    "commitment_failed",
                    FIRING,
                    name,
                    f"{failed} instance(s) delivered to {name} not committed: "
                    f"{rows[-1]['message'] or rows[-1]['state']}",
                    since=rows[0]["finished_at"],
                    details={
                        "destination": name,
                        "instances": failed,
                        "transactions": listed,
                        "until": now,
                    },
                )
            )
        self._commitments_since = now
        return alerts

    def _certificates(self, config: RouterConfig, now: float) -> list[Alert]:
        """One incident per configured certificate file that expires within
        ``before`` (or has expired); resolved once it is renewed or unconfigured."""
        rule = config.alerts.events.certificate_expiry
        files = config.certificate_files()
        open_ones = {target for event, target in self._incidents if event == "certificate_expiry"}
        alerts: list[Alert] = []
        for key in sorted(set(files) | open_ones):
            path = files.get(key)
            if path is None:  # no longer configured: the incident ends
                gone = f"{key} is no longer configured"
                details = {"key": key}
                alerts += self._transition(
                    rule, ("certificate_expiry", key), False, None, now, "", gone, details, 0.0
                )
                continue
            try:
                not_after = certificate_not_after(path).timestamp()
            except TlsError as exc:  # being replaced? the next check reads it again
                log.warning("alerts: cannot read the expiry date of %s (%s): %s", path, key, exc)
                continue
            left = not_after - now
            when = iso(not_after)
            if left <= 0:
                firing = f"the certificate {path} ({key}) has expired on {when}"
            else:
                firing = (
                    f"the certificate {path} ({key}) expires on {when}, in {_days(left)}: "
                    "renew it, then send SIGHUP (kill -HUP) to reload it"
                )
            alerts += self._transition(
                rule,
                ("certificate_expiry", key),
                left < rule.before,
                None,
                now,
                firing,
                f"the certificate {path} ({key}) is valid until {when}",
                {
                    "key": key,
                    "file": str(path),
                    "not_after": when,
                    "expires_in_s": round(left),
                    "before_s": rule.before,
                },
                delay=0.0,
            )
        return alerts

    def _loops(self, now: float) -> list[Alert]:
        """Instances held since the last check, one alert per destination they
        came back from."""
        since, alerts = self._loops_since, []
        window = (loop_events.c.kind == "held", loop_events.c.at > since, loop_events.c.at <= now)
        with self.reader.connect() as conn:
            counts = conn.execute(
                select(loop_events.c.destination, func.count())
                .where(*window)
                .group_by(loop_events.c.destination)
            ).all()
            for name, count in sorted(counts):
                rows = conn.execute(
                    select(
                        loop_events.c.sop_instance_uid,
                        loop_events.c.study_instance_uid,
                        loop_events.c.at,
                        loop_events.c.reason,
                    )
                    .where(*window, loop_events.c.destination == name)
                    .order_by(loop_events.c.at)
                    .limit(_JOBS_LISTED)
                ).all()
                listed = [{**row._mapping, "at": iso(row.at)} for row in rows]
                alerts.append(
                    Alert(
                        "loop_detected",
                        FIRING,
                        name,
                        f"{count} instance(s) came back from {name} shortly after we sent "
                        "them there: a routing loop; they are held, not forwarded "
                        "(dicomrouter loops list / release)",
                        since=rows[0].at if rows else now,
                        details={
                            "destination": name,
                            "count": count,
                            "instances": listed,
                            "until": now,
                        },
                    )
                )
        self._loops_since = now
        return alerts

    def _unplanned(self, config: RouterConfig, now: float) -> list[Alert]:
        rule = config.alerts.events.unplanned
        found = unplanned_summary(self.reader, limit=5)
        items = [
            {
                "sop_instance_uid": item.sop_instance_uid,
                "study_instance_uid": item.study_instance_uid,
                "attempts": item.attempts,
                "next_attempt_at": iso(item.next_attempt_at),
                "last_error": item.last_error,
            }
            for item in found.items
        ]
        reason = found.items[0].last_error if found.items else ""
        return self._transition(
            rule,
            ("unplanned", "planner"),
            found.count > 0,
            found.oldest_failed_at,
            now,
            f"{found.count} received instance(s) could not be planned since {{since}}: {reason}",
            "every received instance is planned again",
            {"count": found.count, "instances": items},
            delay=rule.after,
        )

    def _orphaned(self, config: RouterConfig, now: float) -> list[Alert]:
        rule = config.alerts.events.orphaned_jobs
        queues = {q.destination: q for q in orphaned_queues(self.reader, config.destinations)}
        open_ones = {target for event, target in self._incidents if event == "orphaned_jobs"}
        alerts: list[Alert] = []
        for name in sorted(set(queues) | open_ones):
            queue = queues.get(name)
            alerts += self._transition(
                rule,
                ("orphaned_jobs", name),
                queue is not None,
                queue.oldest_created_at if queue is not None else None,
                now,
                f"{queue.total if queue else 0} open job(s) for destination {name}, which is "
                "no longer configured: move them to another destination or cancel them",
                f"no open job is left for the removed destination {name}",
                {"destination": name, "jobs": queue.jobs if queue else {}},
                delay=0.0,
            )
        return alerts

    def _failed_jobs(self, config: RouterConfig, now: float) -> list[Alert]:
        since, alerts = self._failed_since, []
        with self.reader.connect() as conn:
            for name in sorted(config.destinations):
                condition = (
                    jobs.c.destination == name,
                    jobs.c.state == "failed",
                    jobs.c.finished_at > since,
                    jobs.c.finished_at <= now,
                )
                count = conn.execute(select(func.count()).where(*condition)).scalar_one()
                if not count:
                    continue
                rows = conn.execute(
                    select(
                        jobs.c.id,
                        jobs.c.level,
                        jobs.c.study_instance_uid,
                        jobs.c.attempts,
                        jobs.c.finished_at,
                        jobs.c.last_error,
                    )
                    .where(*condition)
                    .order_by(jobs.c.finished_at)
                    .limit(_JOBS_LISTED)
                ).all()
                listed = [{**row._mapping, "finished_at": iso(row.finished_at)} for row in rows]
                what = f"job {rows[0].id}" if count == 1 else f"{count} jobs"
                alerts.append(
                    Alert(
                        "job_failed",
                        FIRING,
                        name,
                        f"{what} to {name} failed for good: {rows[-1].last_error or 'no reason'}",
                        since=rows[0].finished_at,
                        details={"destination": name, "count": count, "jobs": listed, "until": now},
                    )
                )
        self._failed_since = now
        return alerts

    def _destinations(self, config: RouterConfig, now: float) -> list[Alert]:
        events = config.alerts.events
        alerts = []
        queues = {queue.name: queue for queue in read_queues(self.reader, config)}
        for name in sorted(config.destinations):
            queue = queues.get(name)
            if queue is None:
                continue
            down = queue.state in ("paused", "probing")
            how = "paused by an operator" if queue.state == "paused" else "unreachable"
            details = {"destination": name, "state": queue.state, "queue": queue.jobs}
            if events.destination_down.enabled:
                alerts += self._transition(
                    events.destination_down,
                    ("destination_down", name),
                    down,
                    queue.since,
                    now,
                    f"destination {name} is {how} since {{since}}",
                    f"destination {name} is back ({queue.state})",
                    details,
                    delay=events.destination_down.after,
                )
            if events.queue_stale.enabled:
                oldest = queue.oldest_pending_at
                age = now - oldest if oldest else 0.0
                stale = oldest is not None and age > events.queue_stale.after
                alerts += self._transition(
                    events.queue_stale,
                    ("queue_stale", name),
                    stale,
                    oldest,
                    now,
                    f"the oldest job for {name} waits for {age / 60:.0f} min (since {{since}})",
                    f"the queue of {name} is moving again",
                    {**details, "oldest_pending_age_s": round(age, 1)},
                    delay=0.0,  # the job's age is the delay
                )
        return alerts

    def _disk(self, config: RouterConfig, now: float) -> list[Alert]:
        rule = config.alerts.events.disk_low
        try:
            usage = shutil.disk_usage(self.storage_root)
        except OSError as exc:
            log.warning("alerts: cannot read disk usage of %s: %s", self.storage_root, exc)
            return []
        key = ("disk_low", str(self.storage_root))
        low = usage.free < rule.below or (
            key in self._incidents and usage.free < rule.below * _DISK_HYSTERESIS
        )
        details = {
            "path": str(self.storage_root),
            "free_bytes": usage.free,
            "total_bytes": usage.total,
            "below_bytes": rule.below,
            "refuse_below_bytes": config.storage.min_free_space,
        }
        return self._transition(
            rule,
            key,
            low,
            None,
            now,
            f"free disk in {self.storage_root} is {_human(usage.free)}, below {_human(rule.below)}",
            f"free disk in {self.storage_root} is {_human(usage.free)} again",
            details,
            delay=0.0,
        )

    def _transition(
        self,
        rule: ResolvableAlertConfig,
        key: tuple[str, str],
        holds: bool,
        since: float | None,
        now: float,
        firing: str,
        resolved: str,
        details: dict[str, Any],
        delay: float,
    ) -> list[Alert]:
        """The alert to send for a condition that holds (or not) now: firing once it
        has held for ``delay``, resolved when it ends after having fired. ``{since}``
        in ``firing`` becomes the start of the incident."""
        incident = self._incident(key, holds, since, now)
        if incident is None:
            return []
        event, target = key
        if holds:
            if incident.fired or now - incident.since < delay:
                return []
            incident.fired = True
            summary = firing.replace("{since}", iso(incident.since) or "?")
            return [Alert(event, FIRING, target, summary, incident.since, details)]
        if incident.fired and rule.send_resolved:
            return [Alert(event, RESOLVED, target, resolved, incident.since, details)]
        return []

    # -- delivery -------------------------------------------------------------------

    def run_once(self) -> list[Alert]:
        """One check; send what it found. Returns the alerts (for tests and logs)."""
        config = self.get_config()
        if not config.alerts.webhooks:
            self._failed_since = self.clock()  # nobody to tell: not a backlog for later
            self._loops_since = self._failed_since
            return []
        alerts = self.check()
        for alert in alerts:
            self.send(alert, config)
        return alerts

    def send(self, alert: Alert, config: RouterConfig) -> None:
        rule: AlertEventConfig = getattr(config.alerts.events, alert.event)
        names = rule.webhooks if rule.webhooks is not None else sorted(config.alerts.webhooks)
        payload = alert.payload(config, self.clock())
        for name in names:
            webhook = config.alerts.webhooks.get(name)
            if webhook is None:
                continue
            if not self._allowed(name, config.alerts.max_per_hour):
                log.warning(
                    "alert %s %s to %s suppressed: rate limit", alert.event, alert.target, name
                )
                self._audit(alert, "suppressed", name, payload, None)
                continue
            result = post_json(webhook, payload, self.stop)
            if result.ok:
                log.info(
                    "alert %s %s (%s) sent to %s", alert.event, alert.target, alert.status, name
                )
            else:
                log.error(
                    "alert %s %s could not be sent to %s: %s",
                    alert.event,
                    alert.target,
                    name,
                    result.error,
                )
            self._audit(alert, "ok" if result.ok else "failed", name, payload, result)

    def _allowed(self, webhook: str, per_hour: int) -> bool:
        now = self.clock()
        sent = self._sent.setdefault(webhook, deque())
        while sent and sent[0] <= now - _HOUR:
            sent.popleft()
        if len(sent) >= per_hour:
            return False
        sent.append(now)
        return True

    def _audit(
        self,
        alert: Alert,
        outcome: str,
        webhook: str,
        payload: dict[str, Any],
        result: Delivery | None,
    ) -> None:
        audit.record(
            self.engine,
            audit.SYSTEM,
            f"alert.{alert.event}",
            alert.target,
            outcome=outcome,
            source="alerts",
            detail={
                "webhook": webhook,
                "attempts": result.attempts if result else 0,
                "http_status": result.status if result else None,
                "error": result.error if result else "rate limit (alerts.max_per_hour)",
                "payload": payload,
            },
        )


class AlertThread(threading.Thread):
    """Runs :meth:`AlertEvaluator.run_once` every ``alerts.check_interval``, while this
    process leads the duty (``leadership``; None: always, as on one node)."""

    def __init__(self, evaluator: AlertEvaluator, leadership: Leadership | None = None) -> None:
        super().__init__(name="alerts", daemon=True)
        self.evaluator = evaluator
        self.leadership = leadership
        self._led = True  # the evaluator's state is current (it was built just now)

    def leads(self) -> bool:
        """Whether this process is the alert leader now; on becoming it after another
        node led, the evaluator's incidents are rebuilt first (:meth:`take_over`)."""
        if self.leadership is None:
            return True
        if not self.leadership.check():
            self._led = False
            return False
        if not self._led:
            self.evaluator.take_over()
            self._led = True
        return True

    def run(self) -> None:
        """Alerts every ``alerts.check_interval``; event notifications (detect, send)
        every ``notifications.check_interval`` when any is enabled, else at the
        alerts' pace (to send what an earlier configuration left in the outbox)."""
        evaluator = self.evaluator
        stop = evaluator.stop
        last_check = time.monotonic()
        while not stop.wait(self._tick()):
            config = evaluator.get_config()
            try:
                if not self.leads():
                    continue  # another node alerts; ask again next round
            except Exception:
                log.exception("cannot tell whether this node leads the alerts")
                continue
            if time.monotonic() - last_check >= config.alerts.check_interval - 0.01:
                last_check = time.monotonic()
                try:
                    evaluator.run_once()
                except Exception:  # a broken check must not end alerting for good
                    log.exception("alert check failed; trying again next interval")
            try:
                evaluator.notifier.run_once()
            except Exception:
                log.exception("event notifications failed; trying again next interval")

    def _tick(self) -> float:
        config = self.evaluator.get_config()
        if config.notifications.any_enabled():
            return min(config.alerts.check_interval, config.notifications.check_interval)
        return config.alerts.check_interval

    def stop(self, timeout: float = 10.0) -> None:
        self.evaluator.stop.set()
        if self.is_alive():
            self.join(timeout)
        if self.leadership is not None:
            self.leadership.release()  # another node takes over at its next round


def start_alerts(ctx: Any) -> AlertThread:
    """Start the alert thread over an ``api.AppContext`` (its config may be replaced
    by a hot reload; the thread reads it at every check); it alerts while this node
    leads the duty ``alerts``."""
    evaluator = AlertEvaluator(lambda: ctx.config, ctx.engine, ctx.reader, ctx.store.root)
    thread = AlertThread(evaluator, Leadership(ctx.engine, "alerts"))
    thread.start()
    return thread


def _parse_iso(text: Any) -> float | None:
    if not isinstance(text, str):
        return None
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()
    except ValueError:
        return None


def _days(seconds: float) -> str:
    days = seconds / 86400
    return f"{days:.0f} day(s)" if days >= 1 else f"{seconds / 3600:.1f} hour(s)"


def _human(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{size:.1f} TiB"
