"""Shared CLI plumbing: config loading with clean errors, AE@HOST:PORT parsing, output."""

from __future__ import annotations

import getpass
import json
import os
import re
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console

from dicomrouter.config import ConfigError, DicomDestinationConfig, RouterConfig, load_config

#: The file ``dicomrouter init`` writes and every command picks up by default.
DEFAULT_CONFIG = "dicomrouter.yaml"
#: Names the configuration file when ``--config`` is not given.
CONFIG_ENV = "DICOMROUTER_CONFIG"

#: ``--config`` for every command that reads the configuration: one definition, so
#: that all of them find the file the same way (see :func:`config_path`).
ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help=f"YAML configuration file. Default: ${CONFIG_ENV} if set, else "
        f"./{DEFAULT_CONFIG} if it exists (as 'dicomrouter init' writes it).",
        envvar=CONFIG_ENV,
        show_envvar=False,  # said in the help text
    ),
]

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


def config_path(path: Path | None, *, required: bool = False) -> Path | None:
    """The file a command reads: ``--config``, else ``$DICOMROUTER_CONFIG`` (typer
    passes it as the option), else ``./dicomrouter.yaml`` if it exists, else None: the
    embedded defaults, or exit 2 with what to do when the command needs a file."""
    if path is not None:
        return path
    if Path(DEFAULT_CONFIG).is_file():
        return Path(DEFAULT_CONFIG)
    if required:
        fail(
            f"no configuration file: give --config FILE, set {CONFIG_ENV}, or run where "
            f"./{DEFAULT_CONFIG} is ('dicomrouter init' writes one)",
            2,
        )
    return None


def load(path: Path | None, *, required: bool = False) -> RouterConfig:
    """The configuration :func:`config_path` finds, or exit 2 printing every error."""
    try:
        return load_config(config_path(path, required=required))
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
