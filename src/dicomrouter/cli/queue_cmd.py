"""``queue list|show|retry|cancel``: the durable queue, read from the index and acted on
through ``control.jobs`` (audited with the local user as actor)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.table import Table

from dicomrouter.config import RouterConfig

from .common import ConfigOption, console, fail, load, local_user, print_json

queue_app = typer.Typer(help="Inspect and act on delivery jobs.", no_args_is_help=True)

JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def _engine(config: Path | None):  # type: ignore[no-untyped-def]
    return _context(config).engine


@dataclass
class LocalContext:
    """What the control plane reads from a request's context, for this process: the
    configuration and the index (one engine reads and writes)."""

    config: RouterConfig
    engine: Any
    reader: Any


def _context(config: Path | None) -> LocalContext:
    # Imported here, not at the top: see cli/__init__.py.
    from dicomrouter.store import create_index_engine, missing_index_file

    settings = load(config)
    index_file = missing_index_file(settings.database_url)
    if index_file is not None:
        fail(f"no index at {index_file}: has the router run with this configuration?")
    engine = create_index_engine(settings.database_url)
    return LocalContext(settings, engine, engine)


def when(ts: float | None) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else ""


def duration(seconds: float | None) -> str:
    """``3d 4h``, ``5m 12s``: two units, as the dashboard writes an age."""
    if seconds is None:
        return "—"
    s = int(max(0, seconds))
    parts = [(s // 86400, "d"), (s % 86400 // 3600, "h"), (s % 3600 // 60, "m"), (s % 60, "s")]
    return " ".join([f"{n}{u}" for n, u in parts if n][:2]) or "0s"


def _next_attempt(job: dict[str, Any], now: float) -> str:
    if job["state"] not in ("pending", "scheduled"):
        return ""
    wait = (job["next_attempt_at"] or 0) - now
    return "now" if wait <= 0 else f"in {duration(wait)}"


def _table(title: str, *columns: str, fold: tuple[str, ...] = ()) -> Table:
    """A table that stays readable at 80 columns: headers and short values are never
    cut (they may span two lines: write ``"delivery\nattempts"``), long free text
    (``fold``) wraps instead of being truncated."""
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, title_justify="left")
    for column in columns:
        folded = column in fold
        widest = max(len(line) for line in column.split("\n"))
        table.add_column(
            column,
            overflow="fold",
            no_wrap=not folded,
            min_width=None if folded else widest,
            ratio=1 if folded else None,
        )
    return table


@queue_app.command("list")
def list_command(
    config: ConfigOption = None,
    state: Annotated[str | None, typer.Option(help="Only jobs in this state.")] = None,
    destination: Annotated[str | None, typer.Option(help="Only this destination.")] = None,
    study: Annotated[str | None, typer.Option(help="Only this StudyInstanceUID.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many jobs, newest first.")] = 50,
    json_output: JsonOption = False,
) -> None:
    """List jobs, newest first, with the state and queue of every destination.

    --json prints the API's objects: {"destinations": [as GET /api/v1/destinations],
    "total", "jobs": [as GET /api/v1/jobs "items"], "orphaned"}.
    """
    # Imported here, not at the top: see cli/__init__.py.
    from dicomrouter.control.destinations import destination_summaries
    from dicomrouter.control.errors import ControlError
    from dicomrouter.control.jobs import JobFilter, search_jobs
    from dicomrouter.queue import states

    if state and state not in states.JOB_STATES:
        fail(f"unknown state {state!r}: one of {', '.join(states.JOB_STATES)}")
    ctx = _context(config)
    try:
        total, rows = search_jobs(
            ctx.reader,
            JobFilter(state=state, destination=destination, study_uid=study),
            limit=limit,
        )
    except ControlError as exc:
        fail(str(exc))
    dests = destination_summaries(ctx)
    orphaned = _orphaned(ctx.engine, ctx.config)
    if json_output:
        print_json({"destinations": dests, "total": total, "jobs": rows, "orphaned": orphaned})
        return
    summary = _table(
        "destinations",
        "destination",
        "state",
        "scheduled",
        "pending",
        "in\nprogress",
        "failed",
        "oldest\npending",
        fold=("destination",),
    )
    for d in dests:
        queue = d["queue"]
        summary.add_row(
            d["name"],
            str(d["state"]),
            *(str(queue.get(s, 0)) for s in (*states.OPEN_STATES, states.FAILED)),
            duration(d["oldest_pending_age_s"]) if d["oldest_pending_age_s"] is not None else "",
        )
    console.print(summary)
    for entry in orphaned:
        console.print(
            f"[bold red]orphaned:[/] {entry['total']} open job(s) for {entry['destination']!r}, "
            "which is no longer configured; nothing sends them. Move them with "
            f"'dicomrouter queue move --from {entry['destination']} --to DESTINATION' "
            f"or cancel them with 'dicomrouter queue cancel --destination {entry['destination']}'.",
            highlight=False,
            soft_wrap=False,
        )
    shown = f"newest {len(rows)} of {total}" if total > len(rows) else f"{total}"
    table = _table(
        f"jobs ({shown})",
        "id",
        "destination",
        "state",
        "sent",
        "delivery\nattempts",
        "connection\nfailures",
        "next\nattempt",
        fold=("destination",),
    )
    now = time.time()
    for job in rows:
        table.add_row(
            str(job["id"]),
            job["destination"] + (f" (via {job['via_group']})" if job.get("via_group") else ""),
            job["state"],
            f"{job['delivered']}/{job['total']}",
            str(job["attempts"]),
            str(job["connection_failures"]),
            _next_attempt(job, now),
        )
    console.print(table)
    errors = [job for job in rows if job["last_error"]]
    for job in errors[:10]:
        console.print(
            f"job {job['id']}: {job['last_error']}", highlight=False, markup=False, soft_wrap=False
        )
    if len(errors) > 10:
        console.print(f"... and {len(errors) - 10} more with an error: 'queue show ID'")
    if any(job["connection_failures"] for job in rows):
        console.print(_CONNECTION_FAILURES, style="dim", highlight=False, soft_wrap=False)


#: What a person needs to read next to the two counts.
_CONNECTION_FAILURES = (
    "connection failures: times the destination could not be reached at all; "
    "they do not use up retry.max_attempts (the destination is probed, DICOM "
    "with C-ECHO, until it answers)."
)


def _orphaned(engine, settings: RouterConfig) -> list[dict[str, object]]:  # type: ignore[no-untyped-def]
    from dataclasses import asdict

    from dicomrouter.control.jobs import orphaned_queues

    return [asdict(q) for q in orphaned_queues(engine, settings.destinations)]


@queue_app.command("move")
def move_command(
    source: Annotated[str, typer.Option("--from", help="Destination whose open jobs move.")],
    target: Annotated[str, typer.Option("--to", help="A configured destination.")],
    config: ConfigOption = None,
    json_output: JsonOption = False,
) -> None:
    """Send the open jobs of a destination (e.g. one removed from the configuration) to
    another; what the target already has is not sent twice. Audited."""
    from dataclasses import asdict

    from dicomrouter.control.errors import ControlError
    from dicomrouter.control.jobs import move_jobs

    engine = _engine(config)
    try:
        result = move_jobs(
            engine, load(config).destinations, source, target, actor=local_user(), source="cli"
        )
    except ControlError as exc:
        fail(str(exc))
    if json_output:
        print_json(asdict(result))
    else:
        left = f"; {result.left} held by a worker: move them again later" if result.left else ""
        console.print(f"moved {result.moved} job(s) from {source} to {target}{left}")
    if result.moved == 0:
        raise typer.Exit(1)


@queue_app.command("show")
def show_command(
    job_id: Annotated[int, typer.Argument(help="Job id.")],
    config: ConfigOption = None,
    json_output: JsonOption = False,
) -> None:
    """One job: its counts, its instances' delivery states and every attempt.

    --json prints the API's object (GET /api/v1/jobs/ID)."""
    # Imported here, not at the top: see cli/__init__.py.
    from dicomrouter.control.jobs import job_detail

    ctx = _context(config)
    detail = job_detail(ctx.reader, job_id)
    if detail is None:
        fail(f"no job {job_id}")
    if json_output:
        print_json(detail)
        return
    dest = ctx.config.destinations.get(detail["destination"])
    of_max = f" of {dest.retry.max_attempts} (retry.max_attempts)" if dest else ""
    console.print(
        f"[bold]job {job_id}[/] {detail['level']} -> {detail['destination']}"
        + (f" via group {detail['via_group']}" if detail.get("via_group") else "")
        + f": [bold]{detail['state']}[/]",
        highlight=False,
    )
    lines = [
        ("resource", detail["resource_uid"]),
        ("routes", ", ".join(detail["routes"])),
        ("route transform", detail.get("transform") or ""),
        (
            "delivered",
            f"{detail['delivered']} of {detail['total']} instance(s), {detail['failed']} failed",
        ),
        ("delivery attempts", f"{detail['attempt_count']}{of_max}"),
        (
            "connection failures",
            f"{detail['connection_failures']} (do not use up retry.max_attempts)",
        ),
        ("next attempt", _next_attempt(detail, time.time())),
        ("last error", detail["last_error"] or ""),
    ]
    for label, value in lines:
        if value:
            console.print(
                f"{label + ':':<21}{value}", highlight=False, markup=False, soft_wrap=False
            )
    table = _table(
        "instances",
        "SOPInstanceUID",
        "state",
        "status",
        "message",
        "sent as",
        fold=("SOPInstanceUID", "message", "sent as"),
    )
    for item in detail["instances"]:
        status = f"0x{item['status']:04X}" if item["status"] is not None else ""
        sent_as = item.get("sent_as") or ""
        if item.get("sent_uid"):
            sent_as += f" (as {item['sent_uid']})"
        state = item["state"]
        if item.get("commitment"):
            state += f" (commitment {item['commitment']})"
        table.add_row(item["sop_instance_uid"], state, status, item["message"] or "", sent_as)
    console.print(table)
    attempts = _table(
        "attempts", "started", "took", "outcome", "sent", "failed", "message", fold=("message",)
    )
    for a in detail["attempts"]:
        took = a["ended_at"] - a["started_at"] if a["ended_at"] else None
        attempts.add_row(
            when(a["started_at"]),
            f"{took:.1f}s" if took is not None else "",
            a["outcome"] or "",
            str(a["sent"]),
            str(a["failed"]),
            a["message"] or "",
        )
    if not detail["attempts"]:
        attempts.add_row("no attempt yet", "", "", "", "", "")
    console.print(attempts)


def _act(
    action: str, job_ids: list[int], state: str | None, config: Path | None, json_output: bool
) -> None:
    """Through ``control.jobs``, as the API and the dashboard act: the same checks,
    and an audit row with the local user as actor (source ``cli``)."""
    # Imported here, not at the top: see cli/__init__.py.
    from dicomrouter.control import jobs as control
    from dicomrouter.control.errors import ControlError

    engine = _engine(config)
    ids = list(job_ids)
    if state:
        try:
            ids += control.matching_ids(engine, control.JobFilter(state=state))
        except ControlError as exc:
            fail(str(exc))
    ids = list(dict.fromkeys(ids))
    if not ids:
        fail("name job ids, or --state to select jobs")
    verb: control.Action = "retry" if action == "retry" else "cancel"
    # Why a job will not change (no such job, already completed, held by a worker):
    # one job gets the API's error; several get one line each.
    refused = control.refusals(engine, verb, ids) if len(ids) > 1 else {}
    try:
        act = control.retry if verb == "retry" else control.cancel
        changed = act(engine, ids, actor=local_user(), source="cli")
    except ControlError as exc:
        fail(str(exc))
    if json_output:
        print_json(
            {
                "action": action,
                "requested": len(ids),
                "changed": changed,
                "unchanged": [{"id": i, "reason": r} for i, r in refused.items()],
            }
        )
    else:
        console.print(f"{action}: {changed} of {len(ids)} job(s) changed", highlight=False)
        for reason in list(refused.values())[:20]:
            console.print(f"  not changed: {reason}", highlight=False, markup=False)
        if len(refused) > 20:
            console.print(f"  ... and {len(refused) - 20} more not changed", highlight=False)
    if changed == 0:
        raise typer.Exit(1)


@queue_app.command("retry")
def retry_command(
    job_ids: Annotated[list[int] | None, typer.Argument(help="Job ids.")] = None,
    state: Annotated[str | None, typer.Option(help="Retry every job in this state.")] = None,
    config: ConfigOption = None,
    json_output: JsonOption = False,
) -> None:
    """Send again what did not arrive (failed or canceled instances); resets attempts."""
    _act("retry", job_ids or [], state, config, json_output)


@queue_app.command("cancel")
def cancel_command(
    job_ids: Annotated[list[int] | None, typer.Argument(help="Job ids.")] = None,
    state: Annotated[str | None, typer.Option(help="Cancel every job in this state.")] = None,
    destination: Annotated[
        str | None,
        typer.Option(help="Cancel every open job of this destination (e.g. one removed)."),
    ] = None,
    config: ConfigOption = None,
    json_output: JsonOption = False,
) -> None:
    """Cancel waiting or running jobs; instances not yet sent are not sent."""
    if destination is not None:
        _cancel_destination(destination, config, json_output)
        return
    _act("cancel", job_ids or [], state, config, json_output)


def _cancel_destination(destination: str, config: Path | None, json_output: bool) -> None:
    """Every open job of one destination, through the control plane (audited)."""
    # Imported here, not at the top: see cli/__init__.py.
    from dicomrouter.control.jobs import JobFilter, bulk_action
    from dicomrouter.queue import states

    f = JobFilter(destination=destination, state=list(states.OPEN_STATES))
    changed = bulk_action(_engine(config), f, "cancel", actor=local_user(), source="cli")
    if json_output:
        print_json({"action": "cancel", "destination": destination, "changed": changed})
    else:
        console.print(f"cancel: {changed} open job(s) of {destination} changed")
    if changed == 0:
        raise typer.Exit(1)
