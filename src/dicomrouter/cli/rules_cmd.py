"""``check`` (validate + lint) and ``test-rule`` (dry run on files)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from .common import (
    CONFIG_ENV,
    DEFAULT_CONFIG,
    ConfigOption,
    config_path,
    console,
    err_console,
    fail,
    load,
    print_json,
)


def check_command(
    config: ConfigOption = None,
    strict: Annotated[bool, typer.Option(help="Exit non-zero on warnings too.")] = False,
    json_output: Annotated[
        bool,
        typer.Option(
            "--json",
            help='Print {"valid", "file", "errors", "warnings"} on stdout, each error and '
            'warning as {"key", "message"}.',
        ),
    ] = False,
) -> None:
    """Validate the configuration and lint its rules, reporting every error at once.

    Exit status: 0 valid; 1 lint errors (or warnings with --strict); 2 not loadable.
    """
    from dicomrouter.config import ConfigError, load_config
    from dicomrouter.config.lint import lint  # loads pydicom: see cli/__init__.py
    from dicomrouter.transforms.lint import lint_pipelines

    path = config_path(config)
    if path is None:
        message = (
            f"no configuration file: give --config FILE, set {CONFIG_ENV}, or run where "
            f"./{DEFAULT_CONFIG} is ('dicomrouter init' writes one)"
        )
        _report_check(None, [{"key": "", "message": message}], [], json_output)
        raise typer.Exit(2)
    try:
        settings = load_config(path)
    except ConfigError as exc:
        _report_check(str(path), [i.as_dict() for i in exc.issues], [], json_output)
        raise typer.Exit(2) from None
    findings = lint(settings) + lint_pipelines(settings, os.environ)
    errors = [{"key": f.where, "message": f.message} for f in findings if f.severity == "error"]
    warnings = [{"key": f.where, "message": f.message} for f in findings if f.severity != "error"]
    summary = (
        f"{len(settings.routes)} route(s), {len(settings.destinations)} destination(s), "
        + (f"{len(settings.transforms)} transform(s), " if settings.transforms else "")
        + f"{len(errors)} error(s), {len(warnings)} warning(s)"
    )
    _report_check(str(path), errors, warnings, json_output, summary)
    if errors or (strict and warnings):
        raise typer.Exit(1)


def _report_check(
    path: str | None,
    errors: list[dict[str, str]],
    warnings: list[dict[str, str]],
    json_output: bool,
    summary: str = "",
) -> None:
    if json_output:
        print_json({"valid": not errors, "file": path, "errors": errors, "warnings": warnings})
        return
    for severity, items, color in (("error", errors, "red"), ("warning", warnings, "yellow")):
        for item in items:
            where = f"{item['key']}: " if item["key"] else ""
            err_console.print(f"[{color}]{severity}: {where}{item['message']}[/]", highlight=False)
    summary = summary or f"{len(errors)} error(s)"
    prefix = "[green]OK[/] " if not errors else "[red]INVALID[/] "
    console.print(prefix + (f"{path}: " if path else "") + summary, highlight=False)


def test_rule_command(
    paths: Annotated[list[Path], typer.Argument(help="DICOM files or folders.")],
    config: ConfigOption = None,
    calling_ae: Annotated[str, typer.Option("--calling-ae", help="Pretend sender AE.")] = "",
    called_ae: Annotated[str | None, typer.Option("--called-ae", help="Pretend called AE.")] = None,
    source: Annotated[str, typer.Option("--source", help="Pretend sender IP.")] = "127.0.0.1",
    json_output: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    transform: Annotated[
        str | None,
        typer.Option(
            "--transform",
            metavar="NAME",
            help="Also run the pipeline NAME of `transforms:` on each file and show the "
            "tag-level diff (nothing is written beside a temporary copy).",
        ),
    ] = None,
) -> None:
    """Dry run: which routes and destinations each file would go to. Sends nothing."""
    # Imported here, not at the top: see cli/__init__.py.
    from dicomrouter.control.errors import ControlError
    from dicomrouter.control.routes import Pretend, dry_run_files

    settings = load(config, required=True)
    files = _expand(paths)
    if not files:
        fail("no files found")
    pretend = Pretend(calling_ae=calling_ae, called_ae=called_ae, source_address=source)
    # The control plane's entries as they are: the same field names as the API's
    # POST /api/v1/routes/test ({file, destinations, routes: [{name, matched, trigger,
    # forward, destinations, explanation}]}, or {file, error}).
    try:
        report = dry_run_files(settings, files, pretend, transform)
    except ControlError as exc:
        fail(str(exc))
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
            if "transform" in entry:
                _print_transform(entry["transform"])
    if any("error" in entry or (entry.get("transform") or {}).get("error") for entry in report):
        raise typer.Exit(1)


def _print_transform(preview: dict[str, Any]) -> None:
    title = f"transform {preview['pipeline']} @ {preview['version']}"
    if preview["error"]:
        err_console.print(f"[red]{title}: {preview['error']}[/]", highlight=False)
        return
    if not preview["diff"]:
        console.print(f"{title}: no change", highlight=False)
        return
    table = Table(title=title)
    for column in ("element", "tag", "VR", "change", "before", "after"):
        table.add_column(column, overflow="fold")
    colors = {"added": "green", "removed": "red", "changed": "yellow"}
    for row in preview["diff"]:
        table.add_row(
            row["path"],
            row["tag"],
            row["vr"],
            f"[{colors[row['change']]}]{row['change']}[/]",
            "" if row["before"] is None else row["before"],
            "" if row["after"] is None else row["after"],
        )
    console.print(table)


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
