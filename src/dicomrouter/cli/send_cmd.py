"""``send``: push files to a DICOM destination with a progress bar and a summary."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from .common import console, err_console, fail, parse_target
from .rules_cmd import _expand


def send_command(
    paths: Annotated[list[Path], typer.Argument(help="DICOM files or folders.")],
    to: Annotated[str, typer.Option("--to", help="Destination as AE@HOST:PORT.")],
    calling_ae: Annotated[str, typer.Option("--calling-ae", help="Our AE title.")] = "DICOMROUTER",
    timeout: Annotated[float, typer.Option(help="DIMSE timeout in seconds.")] = 60.0,
) -> None:
    """Send DICOM files (C-STORE) over one reused association.

    Files that are not DICOM instances are skipped and listed; the exit code is 1
    only if an instance was not delivered (or there was nothing to send)."""
    # Imported here, not at the top: see cli/__init__.py.
    from dicomrouter.destinations import DestinationUnavailable, DicomSender, OutgoingInstance
    from dicomrouter.store import InstanceHeader, read_header

    dest = parse_target(to, dimse_timeout=timeout)
    batch: list[OutgoingInstance] = []
    unreadable: list[tuple[Path, str]] = []
    for index, file in enumerate(_expand(paths)):
        try:
            header = InstanceHeader.from_dataset(read_header(file))
        except Exception as exc:
            unreadable.append((file, str(exc)))
            continue
        batch.append(
            OutgoingInstance(
                index,
                file,
                header.sop_class_uid,
                header.sop_instance_uid,
                header.transfer_syntax_uid,
            )
        )
    for file, reason in unreadable:
        err_console.print(f"[yellow]skipped {file}: {reason}[/]", highlight=False)
    if not batch:
        fail(f"nothing to send: none of the {len(unreadable)} file(s) is a DICOM instance")
    names = {item.key: item.path for item in batch}
    counts = {"success": 0, "warning": 0, "transient": 0, "permanent": 0}
    failures: list[tuple[Path, str]] = []
    with Progress(
        TextColumn("[bold]sending"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    ) as progress:
        task = progress.add_task("send", total=len(batch))

        def on_result(result) -> None:  # type: ignore[no-untyped-def]
            counts[result.outcome.value] += 1
            if result.outcome.value in ("transient", "permanent"):
                failures.append((names[result.key], result.message))
            progress.advance(task)

        try:
            DicomSender(dest, calling_ae).send(batch, on_result=on_result)
        except DestinationUnavailable as exc:
            fail(f"cannot reach {to}: {exc}")
    table = Table(title=f"sent to {to}")
    for column in ("delivered", "with warning", "failed", "skipped"):
        table.add_column(column, justify="right")
    failed = counts["transient"] + counts["permanent"]
    table.add_row(str(counts["success"]), str(counts["warning"]), str(failed), str(len(unreadable)))
    console.print(table)
    for file, reason in failures[:20]:
        err_console.print(f"[red]failed {file}: {reason}[/]", highlight=False)
    if unreadable:
        # Not a failure: a folder of DICOM files often holds a DICOMDIR reader's
        # notes, thumbnails or a README. Said, and the exit code stays 0.
        console.print(
            f"skipped {len(unreadable)} file(s) that are not DICOM instances (listed above)",
            highlight=False,
        )
    if failed:
        raise typer.Exit(1)
