"""``init``, ``hash-password`` and ``token``: first admin, users and API tokens.

The configuration file holds only hashes; these commands print the secret once.
"""

from __future__ import annotations

import getpass
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from dicomrouter.security import hash_password, hash_token, new_password, new_token

from .common import CONFIG_ENV, DEFAULT_CONFIG, ConfigOption, config_path, console, fail

_ROLES = ("viewer", "operator", "admin")
WriteOption = Annotated[
    bool,
    typer.Option(
        "--write",
        help="Add the entry to the configuration file (--config, $DICOMROUTER_CONFIG or "
        "./dicomrouter.yaml), keeping its comments, instead of printing it.",
    ),
]


def init_command(
    config: Annotated[
        Path,
        typer.Option(
            "--config",
            "-c",
            help=f"File to write. Default: ${CONFIG_ENV} if set, else ./{DEFAULT_CONFIG}.",
            envvar=CONFIG_ENV,
        ),
    ] = Path(DEFAULT_CONFIG),
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
    config: ConfigOption = None,
    write: WriteOption = False,
) -> None:
    """Print an `auth.users` entry with a hashed password, to paste under `users:` in
    the file; with --write, add it to the configuration file instead."""
    if role not in _ROLES:
        fail(f"invalid role {role!r}: one of {', '.join(_ROLES)}")
    generated = False
    if password is None:
        password = getpass.getpass("password (empty: generate one): ")
    if not password:
        password, generated = new_password(), True
    entry = {"password_hash": hash_password(password), "role": role}
    _add_or_print("users", user, entry, config, write)
    if generated:
        typer.echo(f"# generated password for {user}: {password}", err=True)


def token_command(
    name: Annotated[str, typer.Argument(help="A name for the token (shown in the audit log).")],
    role: Annotated[str, typer.Option(help="viewer, operator or admin.")] = "viewer",
    config: ConfigOption = None,
    write: WriteOption = False,
) -> None:
    """Create an API token: prints the `auth.tokens` entry (or, with --write, adds it to
    the configuration file) and, once, the token itself."""
    if role not in _ROLES:
        fail(f"invalid role {role!r}: one of {', '.join(_ROLES)}")
    token = new_token()
    _add_or_print("tokens", name, {"token_hash": hash_token(token), "role": role}, config, write)
    typer.echo(f"# token (shown once): {token}", err=True)


def _add_or_print(
    section: str, name: str, entry: dict[str, str], config: Path | None, write: bool
) -> None:
    """Without ``write``: the entry alone, indented as under ``auth.<section>:`` in a
    file ``init`` wrote, so that it is pasted into the existing section (a second
    ``auth:`` block would be a duplicate key). With it: added to the file found as
    every command finds it, which is checked before and after, and written atomically."""
    if not write:
        typer.echo(
            f"# Paste under '{section}:' in the 'auth:' section of the configuration file,\n"
            f"# indented like the {section} already there (no 'auth:' or '{section}:' line yet?\n"
            f"# add them above it). Or let 'dicomrouter {_COMMANDS[section]} --write' do it."
        )
        typer.echo(_indent(_entry_yaml(name, entry), "    "), nl=False)
        return
    from dicomrouter.config import ConfigError, load_yaml
    from dicomrouter.control.versions import write_atomically

    path = config_path(config, required=True)
    assert path is not None
    try:
        text = path.read_text(encoding="utf-8")
        merged = merge_auth_entry(text, section, name, entry, str(path))
        data = load_yaml(merged, str(path))
    except OSError as exc:
        fail(f"cannot read {path}: {exc.strerror}")
    except (ConfigError, ValueError) as exc:
        fail(
            f"{exc}; nothing was written. Edit the file by hand (without --write the "
            "command prints the entry to paste)"
        )
    if data["auth"][section][name] != entry:  # pragma: no cover - merge_auth_entry's promise
        fail(f"could not add auth.{section}.{name} to {path}; nothing was written")
    try:
        write_atomically(path, merged)
    except OSError as exc:
        fail(f"cannot write {path}: {exc.strerror}")
    typer.echo(
        f"added auth.{section}.{name} (role {entry['role']}) to {path}; a running router "
        "picks it up on reload (SIGHUP) or restart",
        err=True,
    )


_COMMANDS = {"users": "hash-password NAME", "tokens": "token NAME"}


def _entry_yaml(name: str, entry: dict[str, str]) -> str:
    return yaml.safe_dump({name: entry}, sort_keys=False, width=1000)


def _indent(text: str, prefix: str) -> str:
    return "".join(prefix + line if line.strip() else line for line in text.splitlines(True))


def merge_auth_entry(
    text: str, section: str, name: str, entry: dict[str, str], source: str = "<config>"
) -> str:
    """``text`` with ``auth.<section>.<name>: entry`` added, the rest of it (comments,
    order) unchanged: appended at the end of the block ``auth.<section>`` mapping (or
    of ``auth``, or of the file, when they are missing). ValueError when the name is
    taken or the sections are not plain block mappings (then a person edits it)."""
    from dicomrouter.config import load_yaml

    data = load_yaml(text, source)  # duplicate keys, syntax: refused first
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{source}: the file is not a YAML mapping")
    auth = data.get("auth")
    if auth is not None and not isinstance(auth, dict):
        raise ValueError(f"{source}: auth is not a mapping")
    existing = (auth or {}).get(section)
    if existing is not None and not isinstance(existing, dict):
        raise ValueError(f"{source}: auth.{section} is not a mapping")
    if name in (existing or {}):
        raise ValueError(f"{source}: auth.{section}.{name} exists already")
    root = yaml.compose(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    auth_node = _value(root, "auth")
    if auth_node is None:
        if "auth" in data:
            raise ValueError(f"{source}: auth is empty")
        block = _indent(_entry_yaml(name, entry), "    ")
        return _insert(text, len(text), f"auth:\n  {section}:\n{block}")
    section_node = _value(auth_node, section)
    if section_node is None:
        if section in (auth or {}) or not _block(auth_node):
            raise ValueError(f"{source}: auth.{section} is empty or written in flow style")
        indent = " " * auth_node.value[0][0].start_mark.column
        block = _indent(_entry_yaml(name, entry), indent + "  ")
        return _insert(text, _end(text, auth_node), f"{indent}{section}:\n{block}")
    if not _block(section_node):
        raise ValueError(f"{source}: auth.{section} is empty or written in flow style")
    indent = " " * section_node.value[0][0].start_mark.column
    return _insert(text, _end(text, section_node), _indent(_entry_yaml(name, entry), indent))


def _value(node: Any, key: str) -> Any:
    if not isinstance(node, yaml.MappingNode):
        return None
    for key_node, value_node in node.value:
        if isinstance(key_node, yaml.ScalarNode) and key_node.value == key:
            return value_node if isinstance(value_node, yaml.MappingNode) else None
    return None


def _block(node: Any) -> bool:
    return isinstance(node, yaml.MappingNode) and not node.flow_style and bool(node.value)


def _end(text: str, node: Any) -> int:
    """Where a block mapping's last entry ends: the start of the line holding the next
    token (a block mapping ends where the next, less indented, key starts)."""
    mark = node.end_mark
    line_start = mark.index - mark.column
    return line_start if not text[line_start : mark.index].strip() else mark.index


def _insert(text: str, at: int, block: str) -> str:
    before = text[:at]
    if before and not before.endswith("\n"):
        before += "\n"
    return before + block + text[at:]
