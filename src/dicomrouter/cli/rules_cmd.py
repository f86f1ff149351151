"""``check`` (validate + lint) and ``test-rule`` (dry run on files)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from .common import console, err_console, fail, load, print_json


def check_command(
    config: Annotated[Path, typer.Option("--config", "-c", help="YAML configuration file.")],
    strict: Annotated[bool, typer.Option(help="Exit non-zero on warnings too.")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Validate the configuration and lint its rules."""
    from dicomrouter.config.lint import lint  # loads pydicom: see cli/__init__.py

    settings = load(config)
    findings = lint(settings)
    errors = [f for f in findings if f.severity == "error"]
    if json_output:
        print_json({"valid": not errors, "findings": [f.__dict__ for f in findings]})
    else:
        for finding in findings:
            color = "red" if finding.severity == "error" else "yellow"
            err_console.print(f"[{color}]{finding}[/]", highlight=False)
        summary = (
            f"{config}: {len(settings.routes)} route(s), {len(settings.destinations)} "
            f"destination(s), {len(errors)} error(s), {len(findings) - len(errors)} warning(s)"
        )
        console.print(("[green]OK[/] " if not errors else "[red]INVALID[/] ") + summary)
    if errors or (strict and findings):
        raise typer.Exit(1)


def test_rule_command(
    paths: Annotated[list[Path], typer.Argument(help="DICOM files or folders.")],
    config: Annotated[Path, typer.Option("--config", "-c", help="YAML configuration file.")],
    calling_ae: Annotated[str, typer.Option("--calling-ae", help="Pretend sender AE.")] = "",
    called_ae: Annotated[str | None, typer.Option("--called-ae", help="Pretend called AE.")] = None,
    source: Annotated[str, typer.Option("--source", help="Pretend sender IP.")] = "127.0.0.1",
    json_output: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Dry run: which routes and destinations each file would go to. Sends nothing."""
    # Imported here, not at the top: see cli/__init__.py.
    from dicomrouter.control.routes import Pretend, dry_run_files

    settings = load(config)
    files = _expand(paths)
    if not files:
        fail("no files found")
    pretend = Pretend(calling_ae=calling_ae, called_ae=called_ae, source_address=source)
    # The control plane's entries as they are: the same field names as the API's
    # POST /api/v1/routes/test ({file, destinations, routes: [{name, matched, trigger,
    # forward, destinations, explanation}]}, or {file, error}).
    report = dry_run_files(settings, files, pretend)
    if json_output:
        print_json({"files": report})
    else:
        for entry in report:
            if "error" in entry:
                err_console.print(f"[red]{entry['file']}: {entry['error']}[/]")
                continue
            table = Table(
                title=f"{entry['file']} -> {', '.join(entry['destinations']) or 'nowhere'}"
            )
            for column in ("route", "matched", "trigger/forward", "to", "why"):
                table.add_column(column)
            for m in entry["routes"]:
                table.add_row(
                    m["name"],
                    "[green]yes[/]" if m["matched"] else "[dim]no[/]",
                    f"{m['trigger']}/{m['forward']}",
                    ", ".join(m["destinations"]),
                    m["explanation"],
                )
            console.print(table)
    if any("error" in entry for entry in report):
        raise typer.Exit(1)


def _expand(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file()))
        elif path.is_file():
            files.append(path)
        else:
            fail(f"{path}: no such file or folder")
    return files
