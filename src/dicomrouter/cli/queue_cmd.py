"""``queue list|show|retry|cancel``: the durable queue, read from the index and acted on
through ``control.jobs`` (audited with the local user as actor)."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from .common import ConfigOption, console, fail, load, local_user, print_json

queue_app = typer.Typer(help="Inspect and act on delivery jobs.", no_args_is_help=True)

JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def _engine(config: Path | None):  # type: ignore[no-untyped-def]
    # Imported here, not at the top: see cli/__init__.py.
    from dicomrouter.store import create_index_engine

    settings = load(config)
    index_file = settings.storage.path / "index.sqlite"
    if settings.database is None and not index_file.exists():
        fail(f"no index at {index_file}: has the router run with this configuration?")
    return create_index_engine(settings.database_url)


def _when(ts: float | None) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else ""


@queue_app.command("list")
def list_command(
    config: ConfigOption = None,
    state: Annotated[str | None, typer.Option(help="Only jobs in this state.")] = None,
    destination: Annotated[str | None, typer.Option(help="Only this destination.")] = None,
    study: Annotated[str | None, typer.Option(help="Only this StudyInstanceUID.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many jobs, newest first.")] = 50,
    json_output: JsonOption = False,
) -> None:
    """List jobs, newest first, with a per-destination summary."""
    # Imported here, not at the top: see cli/__init__.py.
    from dicomrouter.queue import states
    from dicomrouter.queue.views import list_jobs, queue_summary

    if state and state not in states.JOB_STATES:
        fail(f"unknown state {state!r}: one of {', '.join(states.JOB_STATES)}")
    engine = _engine(config)
    rows = list_jobs(engine, state=state, destination=destination, study_uid=study, limit=limit)
    orphaned = _orphaned(engine, config)
    if json_output:
        print_json({"summary": queue_summary(engine), "jobs": rows, "orphaned": orphaned})
        return
    summary = Table(title="destinations")
    for column in ("destination", "health", *states.JOB_STATES):
        summary.add_column(column, justify="right")
    for entry in queue_summary(engine):
        summary.add_row(
            entry["destination"],
            entry.get("health", "?"),
            *(str(entry["jobs"].get(s, 0)) for s in states.JOB_STATES),
        )
    console.print(summary)
    for entry in orphaned:
        console.print(
            f"[bold red]orphaned:[/] {entry['total']} open job(s) for {entry['destination']!r}, "
            "which is no longer configured; nothing sends them. Move them with "
            f"'dicomrouter queue move --from {entry['destination']} --to DESTINATION' "
            f"or cancel them with 'dicomrouter queue cancel --destination {entry['destination']}'.",
            highlight=False,
        )
    table = Table(title="jobs")
    for column in (
        "id",
        "destination",
        "level",
        "resource",
        "routes",
        "state",
        "sent",
        "attempts",
        "next attempt",
        "last error",
    ):
        table.add_column(column)
    for job in rows:
        table.add_row(
            str(job["id"]),
            job["destination"],
            job["level"],
            job["resource_uid"],
            ",".join(job["routes"]),
            job["state"],
            f"{job['delivered'] or 0}/{job['total'] or 0}",
            str(job["attempts"]),
            _when(job["next_attempt_at"]) if job["state"] in ("pending", "scheduled") else "",
            (job["last_error"] or "")[:60],
        )
    console.print(table)


def _orphaned(engine, config: Path | None) -> list[dict[str, object]]:  # type: ignore[no-untyped-def]
    from dataclasses import asdict

    from dicomrouter.control.jobs import orphaned_queues

    return [asdict(q) for q in orphaned_queues(engine, load(config).destinations)]


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
    """One job: its instances' delivery states and every attempt."""
    # Imported here, not at the top: see cli/__init__.py.
    from dicomrouter.queue.views import job_detail

    detail = job_detail(_engine(config), job_id)
    if detail is None:
        fail(f"no job {job_id}")
    if json_output:
        print_json(detail)
        return
    console.print(
        f"[bold]job {job_id}[/] {detail['level']} {detail['resource_uid']} -> "
        f"{detail['destination']}: [bold]{detail['state']}[/] "
        f"(routes {', '.join(detail['routes'])}; attempts {detail['attempts']})"
    )
    if detail["last_error"]:
        console.print(f"last error: {detail['last_error']}")
    table = Table(title="instances")
    for column in ("SOPInstanceUID", "state", "status", "message"):
        table.add_column(column)
    for item in detail["instances"]:
        status = f"0x{item['status']:04X}" if item["status"] is not None else ""
        table.add_row(item["sop_instance_uid"], item["state"], status, item["message"] or "")
    console.print(table)
    attempts = Table(title="attempts")
    for column in ("started", "ended", "outcome", "sent", "failed", "message"):
        attempts.add_column(column)
    for a in detail["attempts"]:
        attempts.add_row(
            _when(a["started_at"]),
            _when(a["ended_at"]),
            a["outcome"] or "",
            str(a["sent"]),
            str(a["failed"]),
            a["message"] or "",
        )
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
    try:
        act = control.retry if action == "retry" else control.cancel
        changed = act(engine, ids, actor=local_user(), source="cli")
    except ControlError as exc:
        fail(str(exc))
    if json_output:
        print_json({"action": action, "requested": len(ids), "changed": changed})
    else:
        console.print(f"{action}: {changed} of {len(ids)} job(s) changed")
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
