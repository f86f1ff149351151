"""``reidentify PSEUDONYM`` (or ``--original ID``): what a pseudonym stands for, from
the re-identification mapping, through ``control.reidentify``.

Whoever can run this with the configuration and the index at hand can read the
index anyway, so the command acts as an admin; it is still audited, with the local
user as actor and the source ``cli``, like every CLI action. The mapping key is read
from this shell's environment (the variable the pipeline's ``mapping.key_env``
names).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

import typer

from .common import ConfigOption, console, fail, load, local_user, print_json


@dataclass
class _LocalContext:
    config: Any
    engine: Any
    reader: Any


def reidentify_command(
    pseudonym: Annotated[
        str | None,
        typer.Argument(help="A pseudonymous Patient ID or UID made by a deidentify step."),
    ] = None,
    original: Annotated[
        str | None,
        typer.Option(
            "--original",
            help="Look up by original Patient ID or UID instead (not audited by value).",
        ),
    ] = None,
    issuer: Annotated[
        str, typer.Option("--issuer", help="With --original: the Issuer of Patient ID.")
    ] = "",
    config: ConfigOption = None,
    json_output: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Show the originals recorded for a pseudonym by a deidentify step with
    mapping (admin-equivalent; audited). Needs the mapping key in the environment."""
    # Imported here, not at the top: see cli/__init__.py.
    from dicomrouter.control import reidentify as control
    from dicomrouter.control.errors import ControlError
    from dicomrouter.security import Principal, Role
    from dicomrouter.store import create_index_engine, missing_index_file

    if (pseudonym is None) == (original is None):
        fail("give a PSEUDONYM, or --original ID (not both)", 2)
    settings = load(config)
    index_file = missing_index_file(settings.database_url)
    if index_file is not None:
        fail(f"no index at {index_file}: has the router run with this configuration?")
    engine = create_index_engine(settings.database_url)
    ctx = _LocalContext(settings, engine, engine)
    principal = Principal(local_user(), Role.admin, "local")
    try:
        if pseudonym is not None:
            result = control.reidentify(ctx, principal, pseudonym, source="cli")
        else:
            assert original is not None
            result = control.reidentify_original(
                ctx, principal, original, issuer=issuer, source="cli"
            )
    except ControlError as exc:
        fail(str(exc))
    if json_output:
        print_json(result)
        return
    for entry in result["entries"]:
        shown = ", ".join(f"{k}={v!r}" for k, v in sorted(entry["original"].items()) if v != "")
        console.print(
            f"{entry['pipeline']}  {entry['kind']:<11}  {entry['pseudonym']}  <-  {shown}",
            highlight=False,
        )
