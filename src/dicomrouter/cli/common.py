"""Shared CLI plumbing: config loading with clean errors, AE@HOST:PORT parsing, output."""

from __future__ import annotations

import getpass
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.console import Console

from dicomrouter.config import ConfigError, DicomDestinationConfig, RouterConfig, load_config

#: The file ``dicomrouter init`` writes and ``dicomrouter serve`` picks up by default.
DEFAULT_CONFIG = "dicomrouter.yaml"

console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)

_TARGET_RE = re.compile(r"^(?P<ae>[^@]{1,16})@(?P<host>\[[^\]]+\]|[^:]+):(?P<port>\d{1,5})$")


def local_user() -> str:
    """Who runs the command, for the audit log (the account, as ``whoami`` says); CLI
    actions are audited with this actor and the source ``cli``."""
    try:
        return getpass.getuser()
    except Exception:  # no name for this uid (a container): still say who
        return f"uid {os.getuid()}"


def fail(message: str, code: int = 1) -> NoReturn:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def load(path: Path | None) -> RouterConfig:
    try:
        return load_config(path)
    except ConfigError as exc:
        err_console.print(f"[bold red]{exc}[/]", highlight=False)
        raise typer.Exit(2) from None


def parse_target(text: str, **overrides: Any) -> DicomDestinationConfig:
    """``PACS@10.0.0.5:104`` -> a destination config (timeouts may be overridden)."""
    match = _TARGET_RE.match(text.strip())
    if not match:
        fail(f"invalid target {text!r}: expected AE@HOST:PORT, e.g. PACS@127.0.0.1:104")
    try:
        return DicomDestinationConfig(
            ae_title=match["ae"],
            host=match["host"].strip("[]"),
            port=int(match["port"]),
            **overrides,
        )
    except Exception as exc:
        fail(f"invalid target {text!r}: {exc}")


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
