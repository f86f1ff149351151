"""``init``, ``hash-password`` and ``token``: first admin, users and API tokens.

The configuration file holds only hashes; these commands print the secret once.
"""

from __future__ import annotations

import getpass
from pathlib import Path
from typing import Annotated

import typer
import yaml

from dicomrouter.security import hash_password, hash_token, new_password, new_token

from .common import DEFAULT_CONFIG, console, fail

_ROLES = ("viewer", "operator", "admin")


def init_command(
    config: Annotated[Path, typer.Option("--config", "-c", help="File to write.")] = Path(
        DEFAULT_CONFIG
    ),
    admin: Annotated[str, typer.Option("--admin", help="Login name of the first admin.")] = "admin",
    storage: Annotated[
        str, typer.Option("--storage", help="storage.path to write (relative to the file).")
    ] = "./data",
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
) -> None:
    """Write a starter configuration with a first admin user, and print how to log in."""
    if config.exists() and not force:
        fail(f"{config} exists; add users with 'dicomrouter hash-password', or use --force")
    password = new_password()
    document = {
        "ae_title": "DICOMROUTER",
        "dicom": {"port": 11112},
        "storage": {"path": storage},
        "http": {"port": 8080},
        "auth": {"users": {admin: {"password_hash": hash_password(password), "role": "admin"}}},
    }
    header = (
        "# dicomrouter configuration (written by 'dicomrouter init').\n"
        "# Every key: docs/configuration.md. Rules: docs/rules.md.\n"
    )
    # No empty destinations:/routes: keys: the README's quick start appends them.
    footer = (
        "# Add destinations: and routes: below (examples/dicomrouter.yaml shows both);\n"
        "# more users: dicomrouter hash-password NAME --role operator\n"
    )
    try:
        config.write_text(
            header + yaml.safe_dump(document, sort_keys=False, width=1000) + footer,
            encoding="utf-8",
        )
        config.chmod(0o600)
    except OSError as exc:
        fail(f"cannot write {config}: {exc.strerror}")
    console.print(f"[green]wrote {config}[/] with the admin user [bold]{admin}[/].")
    console.print(f"  password: [bold]{password}[/]  (shown once; only its hash is stored)")
    start = "" if config == Path(DEFAULT_CONFIG) else f" --config {config}"
    console.print(f"Start:   dicomrouter serve{start}")
    console.print(f"Log in:  http://localhost:8080/  as {admin}")
    console.print(f"API:     curl -u {admin}:<password> http://localhost:8080/api/v1/status")


def hash_password_command(
    user: Annotated[str, typer.Argument(help="Login name, used in the printed snippet.")],
    role: Annotated[str, typer.Option(help="viewer, operator or admin.")] = "viewer",
    password: Annotated[
        str | None,
        typer.Option(help="The password; default: asked for (not echoed), or generated if empty."),
    ] = None,
) -> None:
    """Print an `auth.users` entry with a hashed password, to paste into the file."""
    if role not in _ROLES:
        fail(f"invalid role {role!r}: one of {', '.join(_ROLES)}")
    generated = False
    if password is None:
        password = getpass.getpass("password (empty: generate one): ")
    if not password:
        password, generated = new_password(), True
    snippet = {"auth": {"users": {user: {"password_hash": hash_password(password), "role": role}}}}
    typer.echo(yaml.safe_dump(snippet, sort_keys=False, width=1000), nl=False)
    if generated:
        typer.echo(f"# generated password for {user}: {password}", err=True)


def token_command(
    name: Annotated[str, typer.Argument(help="A name for the token (shown in the audit log).")],
    role: Annotated[str, typer.Option(help="viewer, operator or admin.")] = "viewer",
) -> None:
    """Create an API token: prints the `auth.tokens` entry and, once, the token itself."""
    if role not in _ROLES:
        fail(f"invalid role {role!r}: one of {', '.join(_ROLES)}")
    token = new_token()
    snippet = {"auth": {"tokens": {name: {"token_hash": hash_token(token), "role": role}}}}
    typer.echo(yaml.safe_dump(snippet, sort_keys=False, width=1000), nl=False)
    typer.echo(f"# token (shown once): {token}", err=True)
