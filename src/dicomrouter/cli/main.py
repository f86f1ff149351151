"""``dicomrouter``: the command line. Every command exits non-zero with a clear message."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from dicomrouter import __version__
from dicomrouter.config.loader import env_override_applies
from dicomrouter.config.models import DicomDestinationConfig
from dicomrouter.config.reference import env_overrides_text, render_reference

from .common import (
    DEFAULT_CONFIG,
    ConfigOption,
    config_path,
    console,
    err_console,
    fail,
    load,
    local_user,
    parse_target,
)
from .loops_cmd import loops_app
from .nodes_cmd import nodes_app
from .purge_cmd import purge_command
from .queue_cmd import queue_app
from .reidentify_cmd import reidentify_command
from .rules_cmd import check_command, test_rule_command
from .security_cmd import hash_password_command, init_command, token_command
from .send_cmd import send_command

app = typer.Typer(
    name="dicomrouter",
    help="Store-and-forward DICOM router: receive durably, route by rules, deliver with retries.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(queue_app, name="queue")
app.add_typer(loops_app, name="loops")
app.add_typer(nodes_app, name="nodes")
app.command("check")(check_command)
app.command("test-rule")(test_rule_command)
app.command("send")(send_command)
app.command("purge")(purge_command)
app.command("reidentify")(reidentify_command)
app.command("init")(init_command)
app.command("hash-password")(hash_password_command)
app.command("token")(token_command)


_SERVE_EPILOG = (
    env_overrides_text().replace("`", "")
    + " Every key: docs/configuration.md, or 'dicomrouter config-docs'."
)


@app.command(epilog=_SERVE_EPILOG)
def serve(config: ConfigOption = None) -> None:
    """Run the router in the foreground until SIGTERM or Ctrl-C (SIGHUP reloads the file).

    Listens for DICOM on dicom.port (11112) and serves the dashboard, REST API and
    metrics on http.port (8080). Without --config, $DICOMROUTER_CONFIG or
    ./dicomrouter.yaml, it runs on the embedded defaults.
    """
    import logging
    import os
    import signal

    # SIGHUP's default action kills: a reload sent while we start must not (the node
    # installs its handler in serve_forever).
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # Imported here, not at the top: see cli/__init__.py.
    from dicomrouter.children import exclude_pixel_libraries

    exclude_pixel_libraries()  # this process receives: it never decodes pixel data
    # Imported here, not at the top: see cli/__init__.py.
    from dicomrouter.node import Node
    from dicomrouter.observe.logs import configure_logging
    from dicomrouter.store import StorageError

    config = config_path(config)  # None: the embedded defaults
    settings = load(config)
    configure_logging(settings.log_level)
    log = logging.getLogger("dicomrouter")
    if config is not None:
        log.info("configuration: %s", config.resolve())
    else:
        log.info(
            "configuration: the embedded defaults (no --config, no ./%s; "
            "'dicomrouter init' writes one)",
            DEFAULT_CONFIG,
        )
    overrides = sorted(name for name in os.environ if env_override_applies(name))
    if overrides:  # names only: a value may hold a password (DICOMROUTER_DATABASE)
        log.info("overridden by the environment: %s", ", ".join(overrides))
    if settings.http.enabled and settings.auth.enabled and not settings.auth.users:
        log.warning("%s", no_users_message(config and config.resolve(), settings.http.port))
    try:
        node = Node(settings, config.resolve() if config else None)
    except StorageError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"cannot open storage {settings.storage.path}: {exc}")
    try:
        node.serve_forever()
    except OSError as exc:
        where = " and ".join(f"{settings.dicom.bind}:{port}" for port in settings.dicom.ports)
        fail(f"cannot listen on {where}: {exc}")
    except RuntimeError as exc:
        fail(str(exc))


def no_users_message(config: Path | None, port: int) -> str:
    """What ``serve`` logs when nobody can log in: how to create the first user."""
    if config is None:
        how = (
            f"stop, run 'dicomrouter init' (it writes ./{DEFAULT_CONFIG} with an admin "
            "user and prints the password) and start again"
        )
    else:
        how = (
            f"'dicomrouter hash-password admin --role admin --write --config {config}' "
            "adds one (without --write it prints the entry to add under auth.users); "
            "then reload (SIGHUP, or 'systemctl reload dicomrouter')"
        )
    return (
        f"no users (auth.users is empty): nobody can log in to the dashboard on port "
        f"{port}. To create the first admin: {how}."
    )


@app.command()
def echo(
    target: Annotated[
        str, typer.Argument(help="A configured destination's name, or AE@HOST:PORT.")
    ],
    config: ConfigOption = None,
    calling_ae: Annotated[
        str | None,
        typer.Option("--calling-ae", help="Our AE title for AE@HOST:PORT (default DICOMROUTER)."),
    ] = None,
    timeout: Annotated[
        float | None,
        typer.Option(help="Seconds for connect and response, for AE@HOST:PORT (default 10)."),
    ] = None,
) -> None:
    """Send a C-ECHO (DICOM ping) and report the round trip.

    A destination's name echoes it as deliveries reach it (its address, calling AE
    title, timeouts and TLS from the configuration), audited when the router's
    index exists; AE@HOST:PORT echoes any peer. A destination of another kind gets
    the probe of a paused destination instead (a folder: a test write). Exits 1 if
    the peer does not answer.
    """
    if "@" in target:
        _echo_address(target, calling_ae or "DICOMROUTER", 10.0 if timeout is None else timeout)
        return
    if calling_ae is not None or timeout is not None:
        fail(
            "--calling-ae and --timeout apply to AE@HOST:PORT; a destination uses its configuration"
        )
    # Imported here, not at the top: see cli/__init__.py.
    from dicomrouter.control import destinations as control
    from dicomrouter.control.errors import ControlError
    from dicomrouter.store import create_index_engine, missing_index_file

    path = config_path(config)  # --config, $DICOMROUTER_CONFIG, ./dicomrouter.yaml
    settings = load(path)
    try:
        if missing_index_file(settings.database_url) is not None:
            result = control.echo_destination(settings, target)  # nothing to audit into yet
        else:
            engine = create_index_engine(settings.database_url)
            ctx = _EchoContext(settings, engine)
            result = control.echo(ctx, target, actor=local_user(), source="cli")
    except ControlError as exc:
        where = (
            ""
            if path is not None
            else " (no configuration file: no --config, $DICOMROUTER_CONFIG or "
            f"./{DEFAULT_CONFIG}; the embedded defaults have no destinations)"
        )
        fail(f"{exc}{where}; to echo any peer, give it as AE@HOST:PORT, e.g. PACS@127.0.0.1:104")
    dest = settings.destinations[target]
    peer = f"{target} ({dest.address})"
    check = "C-ECHO to" if isinstance(dest, DicomDestinationConfig) else "Probe of"
    if not result["ok"]:
        fail(f"{check} {peer} failed after {result['ms']:.0f} ms: {result['error']}")
    note = f" ({result['error']})" if result["error"] else ""
    console.print(
        f"[green]{check} {peer} succeeded[/] in {result['ms']:.0f} ms{note}", highlight=False
    )


class _EchoContext:
    """What ``control.destinations.echo`` reads: the configuration and the index."""

    def __init__(self, config: object, engine: object) -> None:
        self.config = config
        self.engine = engine


def _echo_address(target: str, calling_ae: str, timeout: float) -> None:
    import time

    from dicomrouter.destinations import SenderOptions, create_sender

    dest = parse_target(
        target, connect_timeout=timeout, acse_timeout=timeout, dimse_timeout=timeout
    )
    started = time.perf_counter()
    try:
        create_sender(dest, SenderOptions(calling_ae=calling_ae)).probe()
    except Exception as exc:
        fail(f"C-ECHO to {target} failed: {exc}")
    console.print(
        f"[green]C-ECHO to {target} succeeded[/] in {(time.perf_counter() - started) * 1000:.0f} ms"
    )


@app.command("config-docs")
def config_docs(
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write to this file.")
    ] = None,
) -> None:
    """Print the configuration reference generated from the models (docs/configuration.md)."""
    text = render_reference()
    if output:
        output.write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)


@app.command()
def version() -> None:
    """Print the version."""
    console.print(f"dicomrouter {__version__}")


__all__ = ["app", "err_console"]
