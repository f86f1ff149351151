"""``check`` (validate + lint) and ``test-rule`` (dry run on files)."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from .common import console, err_console, fail, load, print_json


def check_command(
    config: Annotated[Path, typer.Option("--config", "-c", help="YAML configuration file.")],
    strict: Annotated[bool, typer.Option(help="Exit non-zero on warnings too.")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Validate the configuration and lint its rules."""
    from dicomrouter.config.lint import lint

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
    from dicomrouter.queue import compile_routes
    from dicomrouter.rules import InstanceFacts
    from dicomrouter.store import read_header

    settings = load(config)
    routes = compile_routes(settings)
    files = _expand(paths)
    if not files:
        fail("no files found")
    report: list[dict[str, Any]] = []
    for file in files:
        try:
            dataset = read_header(file)
        except Exception as exc:
            report.append({"file": str(file), "error": f"not a readable DICOM file: {exc}"})
            continue
        facts = InstanceFacts(
            dataset=dataset,
            calling_ae=calling_ae,
            called_ae=called_ae or settings.ae_title,
            source_address=source,
            received_at=datetime.now(),
        )
        matches: list[dict[str, Any]] = []
        for route in routes:
            matched = route.condition is None or route.condition.evaluate(facts)
            matches.append(
                {
                    "route": route.name,
                    "matched": matched,
                    "trigger": route.config.trigger,
                    "forward": route.config.forward_level,
                    "to": route.config.to if matched else [],
                    "why": "no conditions"
                    if route.condition is None
                    else route.condition.explain(facts),
                }
            )
        destinations = sorted({d for m in matches for d in m["to"]})
        report.append({"file": str(file), "destinations": destinations, "routes": matches})
    if json_output:
        print_json(report)
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
                    m["route"],
                    "[green]yes[/]" if m["matched"] else "[dim]no[/]",
                    f"{m['trigger']}/{m['forward']}",
                    ", ".join(m["to"]),
                    m["why"],
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
