"""``nodes [list]|forget NAME``: the nodes sharing the index, and forgetting one taken
out for good (audited with the local user as actor)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from .common import ConfigOption, console, fail, local_user, print_json
from .queue_cmd import JsonOption, _engine, duration

nodes_app = typer.Typer(
    help="The nodes sharing this index: up or down, release, configuration version.",
    invoke_without_command=True,
)


@nodes_app.callback()
def nodes_command(
    ctx: typer.Context, config: ConfigOption = None, json_output: JsonOption = False
) -> None:
    """Without a command: the list."""
    if ctx.invoked_subcommand is None:
        list_command(config, json_output)


@nodes_app.command("list")
def list_command(config: ConfigOption = None, json_output: JsonOption = False) -> None:
    """Every node with a heartbeat in the index; down ones are flagged."""
    # Imported here, not at the top: see cli/__init__.py.
    from dicomrouter.control import nodes

    found = nodes.list_nodes(_engine(config))
    if json_output:
        print_json(found.as_dict())
        return
    table = Table(title=f"nodes (newest configuration version: {found.newest_config_version})")
    for column in ("node", "state", "release", "config", "last heartbeat", "associations"):
        table.add_column(column)
    table.add_column("processes")
    for node in found.nodes:
        version = "—" if node.config_version is None else str(node.config_version)
        table.add_row(
            node.name,
            node.state.upper() if node.state == nodes.DOWN else node.state,
            node.software_version,
            version + (" (behind)" if node.behind else ""),
            f"{duration(node.last_heartbeat_age_s)} ago",
            str(node.open_associations),
            ", ".join(f"{p.role} pid {p.pid}{'' if p.ok else ' (not ok)'}" for p in node.processes),
        )
    console.print(table)


@nodes_app.command("forget")
def forget_command(
    name: Annotated[str, typer.Argument(help="The node's name (node.name).")],
    config: ConfigOption = None,
    json_output: JsonOption = False,
) -> None:
    """Forget a node taken out for good: it is no longer shown or alerted as down.
    Refused while the node is up."""
    # Imported here, not at the top: see cli/__init__.py.
    from dicomrouter.control import nodes
    from dicomrouter.control.errors import ControlError

    try:
        node = nodes.forget(_engine(config), name, actor=local_user(), source="cli")
    except ControlError as exc:
        fail(str(exc))
    if json_output:
        print_json(node.as_dict())
        return
    console.print(
        f"node {name} forgotten (last heartbeat {duration(node.last_heartbeat_age_s)} ago)"
    )
