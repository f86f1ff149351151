"""An audit row's ``detail`` as sentences a person reads, not Python lists and booleans.

The audit table keeps ``detail`` as JSON for scripts (``/api/v1/audit`` returns it as
it is). The page says it in words: one function per kind of action that knows its
keys (``config.apply``: "Changed: dicom.port, routes."), and for anything else, or
keys a function does not know, a "key: value" line each with the value in words.
Plain text only: the template escapes it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .common import size, when

#: At most this many items of a list are named; the rest is "and N more".
SHOWN = 8

Detail = Mapping[str, Any]
Describer = Callable[[Detail], list[str]]


def plural(n: int, word: str, many: str | None = None) -> str:
    return f"{n} {word if n == 1 else (many or word + 's')}"


def words(value: Any) -> str:
    """One value in words: yes/no, "none", lists joined by commas, mappings as
    "key: value" pairs, whole floats without ".0"."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else f"{value:g}"
    if isinstance(value, Mapping):
        if not value:
            return "none"
        return "; ".join(f"{label(k)}: {words(v)}" for k, v in value.items())
    if isinstance(value, list | tuple | set):
        return listing(value)
    return str(value)


def listing(values: Iterable[Any], total: int | None = None) -> str:
    items = [words(v) for v in values]
    if not items:
        return "none"
    count = len(items) if total is None else max(total, len(items))
    shown = ", ".join(items[:SHOWN])
    more = count - min(len(items), SHOWN)
    return f"{shown} and {more} more" if more > 0 else shown


def label(key: str) -> str:
    return str(key).replace("_", " ")


def generic(detail: Detail, skip: Iterable[str] = ()) -> list[str]:
    """What no describer took: "key: value", one line each."""
    left = set(detail) - set(skip)
    return [f"{label(k)}: {words(detail[k])}" for k in detail if k in left]


def _ids(detail: Detail, noun: str = "job") -> str:
    ids = detail.get("ids")
    if not ids:
        return ""
    return f" ({noun}{'s' if len(ids) != 1 else ''} {listing(ids)})"


def job_action(detail: Detail) -> list[str]:
    requested = int(detail.get("requested", len(detail.get("ids") or [])))
    changed = int(detail.get("changed", 0))
    return [
        f"{changed} of {plural(requested, 'job')} changed{_ids(detail)}.",
        *generic(detail, ("ids", "requested", "changed")),
    ]


def job_filter(value: Mapping[str, Any]) -> str:
    parts = []
    for key, item in value.items():
        if key in ("since", "until") and isinstance(item, int | float):
            item = when(item)
        parts.append(f"{label(key)} {words(item)}")
    return "; ".join(parts) or "every job"


def job_bulk(detail: Detail) -> list[str]:
    matched = int(detail.get("matched", 0))
    changed = int(detail.get("changed", 0))
    return [
        f"{plural(matched, 'job')} matched ({job_filter(detail.get('filter') or {})}), "
        f"{changed} changed.",
        *generic(detail, ("filter", "matched", "changed")),
    ]


def job_priority(detail: Detail) -> list[str]:
    return [
        f"Priority set to {words(detail.get('priority'))} (was {words(detail.get('previous'))}).",
        *generic(detail, ("priority", "previous")),
    ]


def job_move(detail: Detail) -> list[str]:
    moved, left = int(detail.get("moved", 0)), int(detail.get("left", 0))
    lines = [
        f"{plural(moved, 'job')} moved from {words(detail.get('from'))} "
        f"to {words(detail.get('to'))}; {left} left behind."
    ]
    if detail.get("ids"):
        lines.append(f"Moved: {listing(detail['ids'])}.")
    if detail.get("target_jobs"):
        lines.append(f"Now in: {listing(detail['target_jobs'])}.")
    return lines + generic(detail, ("from", "to", "moved", "left", "ids", "target_jobs"))


def config_change(detail: Detail) -> list[str]:
    """``config.apply``, ``config.rollback``, ``config.reload`` (and their refusals)."""
    lines = []
    if "errors" in detail:
        errors = detail["errors"] or []
        lines.append(f"Refused, {plural(len(errors), 'error')}:")
        lines += [f"– {words(e)}" for e in errors]
    if "version" in detail:
        created = detail.get("created")
        how = "" if created is None else (" (new)" if created else " (same text as before)")
        lines.append(f"Version {words(detail['version'])}{how}.")
    if "changed" in detail:
        changed = detail["changed"] or []
        lines.append(f"Changed: {listing(changed)}." if changed else "Nothing changed.")
    if detail.get("restart_required"):
        lines.append(f"Needs a restart: {listing(detail['restart_required'])}.")
    if "lines_added" in detail or "lines_removed" in detail:
        lines.append(
            f"{plural(int(detail.get('lines_added', 0)), 'line')} added, "
            f"{int(detail.get('lines_removed', 0))} removed."
        )
    if detail.get("comment"):
        lines.append(f"Comment: {words(detail['comment'])}")
    if detail.get("sha256"):
        lines.append(f"SHA-256 {str(detail['sha256'])[:12]}…")
    known = ("errors", "version", "created", "changed", "restart_required")
    return lines + generic(detail, (*known, "lines_added", "lines_removed", "comment", "sha256"))


def destination_resume(detail: Detail) -> list[str]:
    jobs = int(detail.get("jobs", 0))
    return [f"{plural(jobs, 'waiting job')} sent now.", *generic(detail, ("jobs",))]


def destination_echo(detail: Detail) -> list[str]:
    ms = words(detail.get("ms"))
    if detail.get("ok"):
        line = f"Answered in {ms} ms."
        if detail.get("error"):
            line += f" {detail['error']}"
    else:
        line = f"No answer: {words(detail.get('error') or 'unknown error')}."
    return [line, *generic(detail, ("ok", "ms", "error"))]


def login_refused(detail: Detail) -> list[str]:
    path = f" (on {detail['path']})" if detail.get("path") else ""
    return [f"{words(detail.get('reason', 'refused'))}{path}", *generic(detail, ("reason", "path"))]


def lockout(detail: Detail) -> list[str]:
    path = f" (on {detail['path']})" if detail.get("path") else ""
    return [
        f"Locked out for {words(detail.get('seconds'))} s{path}.",
        *generic(detail, ("seconds", "path")),
    ]


def association_rejected(detail: Detail) -> list[str]:
    count = int(detail.get("count", 1))
    times = f" ({count} times)" if count > 1 else ""
    return [f"{words(detail.get('reason', ''))}{times}", *generic(detail, ("reason", "count"))]


def alert(detail: Detail) -> list[str]:
    payload = detail.get("payload") or {}
    lines = []
    if isinstance(payload, Mapping) and payload.get("summary"):
        lines.append(f"{payload['summary']}.")
    attempts = int(detail.get("attempts") or 0)
    status = detail.get("http_status")
    where = f"webhook {words(detail.get('webhook'))}"
    if status is not None and not detail.get("error"):
        lines.append(f"Sent to {where}: HTTP {status} ({plural(attempts, 'attempt')}).")
    else:
        answer = f", HTTP {status}" if status is not None else ""
        lines.append(
            f"Not sent to {where} ({plural(attempts, 'attempt')}{answer}): "
            f"{words(detail.get('error'))}."
        )
    return lines + generic(detail, ("payload", "attempts", "http_status", "webhook", "error"))


def route_test(detail: Detail) -> list[str]:
    files = detail.get("files") or []
    return [f"Files: {listing(files)}.", *generic(detail, ("files",))]


def route_backtest(detail: Detail) -> list[str]:
    matched = int(detail.get("matched_studies", 0))
    more = " or more (the list was cut short)" if detail.get("truncated") else ""
    lines = [
        f"Over the last {words(detail.get('days'))} days, "
        f"{plural(matched, 'study', 'studies')}{more} would have matched."
    ]
    route = detail.get("route")
    if isinstance(route, Mapping):
        lines.append(f"Candidate rule: {words(route)}.")
    return lines + generic(detail, ("matched_studies", "truncated", "days", "route"))


def purge(detail: Detail) -> list[str]:
    d = dict(detail)
    verb = "would be deleted (a dry run: nothing was)" if d.get("dry_run") else "deleted"
    lines = [
        f"{plural(int(d.get('purged', 0)), 'file')} {verb} "
        f"({size(int(d.get('purged_bytes', 0)))}), "
        f"{int(d.get('evicted', 0))} of them early to free space."
    ]
    if d.get("by_kind"):
        lines.append(f"By kind: {words(d['by_kind'])}.")
    tidy = [
        (int(d.get("orphans", 0)), "orphan file"),
        (int(d.get("recovered", 0)), "half-written file"),
        (int(d.get("history_rows", 0)), "history row"),
        (int(d.get("audit_rows", 0)), "audit row"),
    ]
    if any(n for n, _ in tidy):
        lines.append("Also removed: " + ", ".join(plural(n, w) for n, w in tidy if n) + ".")
    stored = f"{plural(int(d.get('stored', 0)), 'file')} ({size(d.get('stored_bytes', 0))})"
    lines.append(f"Kept: {stored}, {int(d.get('undelivered', 0))} of them not delivered yet.")
    if d.get("free_bytes") is not None:
        lines.append(f"Free space: {size(int(d['free_bytes']))}.")
    known = {
        "purged",
        "purged_bytes",
        "evicted",
        "by_kind",
        "orphans",
        "recovered",
        "history_rows",
        "audit_rows",
        "stored",
        "stored_bytes",
        "undelivered",
        "undelivered_bytes",
        "free_bytes",
        "dry_run",
        "started_at",
        "ended_at",
        "eligible",
        "eligible_bytes",
    }
    if d.get("eligible"):
        lines.append(
            f"{plural(int(d['eligible']), 'file')} ({size(int(d.get('eligible_bytes', 0)))}) "
            "may go."
        )
    return lines + generic(d, known)


def loop_release(detail: Detail) -> list[str]:
    uids = detail.get("instances") or []
    return [
        f"{plural(len(uids), 'instance')} released: {listing(uids)}.",
        *generic(detail, ("instances",)),
    ]


def replan(detail: Detail) -> list[str]:
    ids = detail.get("ids")
    which = "every set-aside instance" if ids is None else f"instances {listing(ids)}"
    return [
        f"{plural(int(detail.get('changed', 0)), 'instance')} planned again ({which}).",
        *generic(detail, ("ids", "changed")),
    ]


#: Action (exact, or a prefix ending in ".") -> its describer.
DESCRIBERS: dict[str, Describer] = {
    "job.retry": job_action,
    "job.cancel": job_action,
    "job.bulk_": job_bulk,
    "job.priority": job_priority,
    "job.move": job_move,
    "config.": config_change,
    "destination.resume": destination_resume,
    "destination.echo": destination_echo,
    "auth.login": login_refused,
    "auth.lockout": lockout,
    "dicom.association.rejected": association_rejected,
    "alert.": alert,
    "route.test": route_test,
    "route.backtest": route_backtest,
    "retention.purge": purge,
    "retention.purge.": purge,
    "loop.release": loop_release,
    "instance.replan": replan,
}


def describer(action: str) -> Describer:
    if action in DESCRIBERS:
        return DESCRIBERS[action]
    for prefix, function in DESCRIBERS.items():
        if prefix.endswith((".", "_")) and action.startswith(prefix):
            return function
    return generic


def describe(action: str, detail: Any) -> list[str]:
    """The lines to show for one audit row (none for an empty detail). A describer
    that trips over an unexpected value falls back to "key: value" lines."""
    if not detail:
        return []
    if not isinstance(detail, Mapping):
        return [words(detail)]
    try:
        return describer(action)(detail)
    except (TypeError, ValueError, AttributeError):
        return generic(detail)
