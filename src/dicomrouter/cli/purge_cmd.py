"""``purge [--dry-run]``: run retention now, through control/ and audited as the local user."""

from __future__ import annotations

import getpass
from typing import Annotated

import typer

from .common import ConfigOption, console, fail, load, print_json


def _size(value: int) -> str:
    size = float(value)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{value} B"


def purge_command(
    config: ConfigOption = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Say what would be deleted; delete nothing.")
    ] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Delete what the retention policy says may go, now (the sweeper does it every
    retention.interval): delivered and unrouted objects past their time, evictions
    below free_space_target, orphaned files, old history and audit rows."""
    # Imported here, not at the top: see cli/__init__.py.
    from dicomrouter.control.retention import purge
    from dicomrouter.retention import PurgeBusy
    from dicomrouter.store import ObjectStore, create_index_engine, missing_index_file

    settings = load(config)
    index_file = missing_index_file(settings.database_url)
    if index_file is not None:
        fail(f"no index at {index_file}: has the router run with this configuration?")
    engine = create_index_engine(settings.database_url)
    store = ObjectStore(settings.storage.path, settings.node.name)
    try:
        report = purge(
            settings, engine, store, actor=getpass.getuser(), source="cli", dry_run=dry_run
        )
    except PurgeBusy as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        # The purge checked what it had already moved before letting this through.
        fail("interrupted; the files already moved were checked, the next purge finishes", 130)
    except OSError as exc:  # the storage folder not ours (another user), a full disk...
        fail(f"cannot purge {settings.storage.path}: {exc}")
    if json_output:
        print_json(report.as_dict())
        return
    verb = "would delete" if dry_run else "deleted"
    kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(report.by_kind.items())) or "nothing"
    console.print(f"{verb} {report.purged} object(s), {_size(report.purged_bytes)} ({kinds})")
    if report.evicted:
        console.print(f"of which {report.evicted} evicted early for free space")
    console.print(f"orphaned files {'found' if dry_run else 'removed'}: {report.orphans}")
    if not dry_run:
        console.print(
            f"history rows pruned: {report.history_rows}; audit rows pruned: {report.audit_rows}"
        )
    console.print(
        f"kept because undelivered: {report.undelivered} object(s), "
        f"{_size(report.undelivered_bytes)}"
    )
