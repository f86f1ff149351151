"""``loops list|release``: instances a loop guard held, and letting them go."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import typer
from rich.table import Table

from .common import ConfigOption, console, fail, local_user, print_json
from .queue_cmd import JsonOption, _engine

loops_app = typer.Typer(
    help="Instances held because they came back from a destination (routing loops).",
    no_args_is_help=True,
)


def _when(ts: float | None) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else ""


@loops_app.command("list")
def list_command(
    config: ConfigOption = None,
    released: Annotated[bool, typer.Option("--released", help="Released ones too.")] = False,
    limit: Annotated[int, typer.Option(help="At most this many, newest first.")] = 100,
    json_output: JsonOption = False,
) -> None:
    """Held instances, newest first."""
    # Imported here, not at the top: see cli/__init__.py.
    from dicomrouter.control import loops

    events = loops.held(_engine(config), include_released=released, limit=limit)
    if json_output:
        print_json({"held": [event.as_dict() for event in events]})
        return
    table = Table(title="held instances")
    for column in ("id", "held at", "from", "SOP Instance UID", "released", "reason"):
        table.add_column(column)
    for event in events:
        table.add_row(
            str(event.id),
            _when(event.at),
            event.destination,
            event.sop_instance_uid,
            f"{_when(event.released_at)} by {event.released_by}" if event.released_at else "",
            event.reason,
        )
    console.print(table)


@loops_app.command("release")
def release_command(
    ids: Annotated[list[int] | None, typer.Argument(help="Ids from 'loops list'.")] = None,
    all_held: Annotated[bool, typer.Option("--all", help="Every held instance.")] = False,
    config: ConfigOption = None,
    json_output: JsonOption = False,
) -> None:
    """Route held instances after all (once the loop is fixed, or it was none)."""
    # Imported here, not at the top: see cli/__init__.py.
    from dicomrouter.control import loops

    if not ids and not all_held:
        fail("name the holds to release (ids from 'dicomrouter loops list'), or --all")
    released = loops.release(
        _engine(config), None if all_held else ids, actor=local_user(), source="cli"
    )
    if json_output:
        print_json({"released": [event.as_dict() for event in released]})
        return
    console.print(f"released {len(released)} held instance(s); they are routed again")
