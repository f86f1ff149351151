"""The study trace as an operator reads it: one sentence per event.

:func:`dicomrouter.control.studies.study_trace` returns raw events (the API serves
them as they are); this turns them into what the page shows: consecutive receptions
of one series from one sender folded into one line, counts and totals worked out,
and the few facts that answer "where did this study go?" picked out. The template
(``trace.html``) writes the sentences; nothing here changes the API's shape.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from dicomrouter.control.studies import EVENT_ORDER, group_job_events

#: A run of more consecutive per-instance receptions than this, from one series and
#: sender, is shown as one line ("12 instances of series …"); shorter runs are listed.
FOLD_RECEPTIONS_ABOVE = 3

#: With more jobs than this, the timeline says per destination and outcome what the
#: jobs did ("40 jobs to pacs: delivered"), not three lines per job; the deliveries
#: section lists them per series and destination, instance by instance on demand.
FOLD_JOBS_ABOVE = 6
_JOB_KINDS = ("queued", "attempt", "delivered", "failed", "canceled")

_SENDER = ("series_instance_uid", "modality", "calling_ae", "called_ae", "source_address")


def short_uid(uid: str | None, head: int = 12, tail: int = 6) -> str:
    """``1.2.826.0.1.…562693`` for a long UID (the full one goes in a title)."""
    if not uid:
        return ""
    if len(uid) <= head + tail + 1:
        return uid
    return f"{uid[:head]}…{uid[-tail:]}"


def plural(count: int | None, word: str) -> str:
    n = count or 0
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def timeline(trace: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The trace's events as display items, oldest first: each is the event's own
    fields plus ``view`` (what the sentence needs: counts, the job it belongs to,
    folded receptions)."""
    jobs = {d["job_id"]: d for d in trace.get("deliveries", [])}
    events = list(trace.get("events", []))
    if len(jobs) > FOLD_JOBS_ABOVE:
        per_job = [e for e in events if e["kind"] in _JOB_KINDS and "job_id" in e]
        if per_job:
            events = [e for e in events if not (e["kind"] in _JOB_KINDS and "job_id" in e)]
            events += group_job_events(per_job)
            events.sort(key=lambda e: (e["at"], EVENT_ORDER[e["kind"]]))
    items: list[dict[str, Any]] = []
    for run in _runs(events):
        first = run[0]
        if first["kind"] == "received" and len(run) > FOLD_RECEPTIONS_ABOVE:
            items.append(_folded(run))
            continue
        for event in run:
            items.append({**event, "view": _view(event, jobs)})
    return items


def _runs(events: Iterable[Mapping[str, Any]]) -> list[list[Mapping[str, Any]]]:
    """Consecutive per-instance receptions from one series and sender together;
    every other event alone."""
    runs: list[list[Mapping[str, Any]]] = []
    for event in events:
        previous = runs[-1][-1] if runs else None
        if (
            previous is not None
            and event["kind"] == previous["kind"] == "received"
            and "sop_instance_uid" in event
            and "sop_instance_uid" in previous
            and all(event.get(k) == previous.get(k) for k in _SENDER)
        ):
            runs[-1].append(event)
        else:
            runs.append([event])
    return runs


def _folded(run: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    first, last = run[0], run[-1]
    return {
        **{k: first.get(k) for k in _SENDER},
        "at": first["at"],
        "kind": "received",
        "view": {
            "instances": len(run),
            "bytes": sum(e.get("size") or 0 for e in run),
            "until": _later(first["at"], last["at"]),
            "sop_uids": [e["sop_instance_uid"] for e in run],
        },
    }


def _view(event: Mapping[str, Any], jobs: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    kind = event["kind"]
    if kind == "received":
        grouped = "instances" in event  # the control plane grouped a big study
        return {
            "instances": event["instances"] if grouped else 1,
            "bytes": event.get("bytes") if grouped else event.get("size"),
            "until": _later(event.get("first_at"), event.get("last_at")) if grouped else None,
            "sop_uids": [] if grouped else [event.get("sop_instance_uid")],
        }
    if kind in ("matched", "purged"):
        return {"until": _later(event.get("first_at"), event.get("last_at"))}
    view: dict[str, Any] = {"jobs": event.get("jobs"), "job_ids": event.get("job_ids", [])}
    job = jobs.get(event.get("job_id", -1))
    if job is not None:
        view["job"] = job
        view["total"] = job["instances"]
        view["routes"] = job["routes"]
        view["level"] = job["level"]
    else:  # a group of jobs (big study): sums over the group
        view["total"] = event.get("instances")
        view["routes"] = event.get("routes") or []
        view["level"] = event.get("level")
        view["until"] = _later(event.get("first_at"), event.get("last_at"))
    if kind == "attempt" and event.get("ended_at") and job is not None:
        took = event["ended_at"] - event["at"]
        if took >= 0.5:  # worth saying only when it was slow
            view["took"] = took
    return view


def _later(first: float | None, last: float | None) -> float | None:
    """``last`` when it is a different moment from ``first`` (a span worth showing)."""
    if first is None or last is None or last - first < 1:
        return None
    return last
