"""Configuration versions: validate, apply, record, diff and roll back the YAML file.

The YAML file is the active configuration (what ``serve --config`` reads and what an
administrator edits); ``config_versions`` keeps every version that was ever applied,
so any of them can be shown, diffed and rolled back. Applying goes one way only:
validate first (exactly as the file is loaded at start-up, env overrides included),
then write the file atomically, then record the version, then tell the node to
reload. An invalid candidate is refused before anything is touched, so it can never
replace a valid configuration.

A few keys are bound at start-up (listening sockets, the storage folder, the index):
they are recorded and written with the rest, but the running processes keep their
old values until a restart (:func:`effective`), and the result says so.

Who sees what (:func:`redact`): only an admin sees the exact text. Everyone else sees
:func:`redacted_yaml`: the text parsed, its secrets (password and token hashes,
webhook headers, the password in ``database``) replaced by ``<redacted>``, and dumped
again, so comments and formatting are not shown. Diffs for them are computed between
such dumps. Masking the parsed structure, not the text, is what makes quoting,
anchors, tags or block scalars unable to hide a secret from the mask.

Texts are normalized to ``\n`` line ends (browsers send a textarea with ``\r\n``)
before they are validated, hashed, diffed or written.

Several nodes on one index share the versions: whichever node records one (its API,
its SIGHUP), every node runs it within seconds. Recording a version announces its id
on PostgreSQL's ``NOTIFY`` channel :data:`CHANNEL`; each node's supervisor listens,
and polls :func:`newest_id` every few seconds as well (the only way on SQLite), then
runs the newest version and writes it to its own file (:func:`write_newest`), so
that the file stays the active configuration on every node. A node records its
file (at start-up, or on SIGHUP) only if the file's text was never recorded
(:func:`file_is_history`): a file holding an older version, such as the one a
node was started with before another node changed the configuration, is history,
and the node runs the newest version instead of reverting everyone.

No HTTP here: the REST API, the dashboard and the CLI are thin edges over this; they
call :func:`apply_config` / :func:`rollback_config`, which raise ``control.errors``.
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import yaml
from sqlalchemy import Connection, Engine, func, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from dicomrouter.config import (
    ConfigError,
    RouterConfig,
    YamlLimitError,
    load_config_text,
    load_yaml,
)
from dicomrouter.config.lint import lint
from dicomrouter.security import Principal, Role
from dicomrouter.store import audit
from dicomrouter.store.dialect import notify
from dicomrouter.store.schema import config_versions
from dicomrouter.transforms.lint import lint_pipelines

from .errors import Conflict, Invalid, NotFound

log = logging.getLogger("dicomrouter.config")

SOURCES = ("startup", "api", "sighup", "rollback", "import")
#: PostgreSQL NOTIFY channel announcing each new version's id to every node.
CHANNEL = "dicomrouter_config"

#: Keys read once at start-up: a change is recorded but takes effect at the next
#: restart (the sockets are bound, the index and storage are open in three processes).
RESTART_KEYS = (
    "node",  # its name is the node's identity: never taken from another node's version
    "dicom.port",
    "dicom.bind",
    "dicom.tls",  # and every key under it (a SIGHUP reloads the same files)
    "dicom.processes",
    "storage.path",
    "database",
    "http.enabled",
    "http.port",
    "http.bind",
    "http.session_lifetime",
    "http.tls",
)

REDACTED = "<redacted>"
#: What a non-admin is told about the text they see (API responses, the dashboard).
REDACTION_NOTE = (
    "secrets (password and token hashes, webhook headers, the database password) are "
    "shown as <redacted>; the text is re-serialized from the parsed YAML, so comments "
    "and formatting are not shown"
)
#: Shown to a non-admin instead of a text that is not valid YAML: its secrets cannot be
#: found, so none of it is shown.
UNPARSEABLE = (
    "# not shown: this text is not a valid YAML mapping, so its secrets cannot be\n"
    "# redacted; only an administrator may see it\n"
)

_apply_lock = threading.Lock()
_T = TypeVar("_T")


class NoConfigFile(Conflict):
    """The node runs on embedded defaults: there is no file to write a new version to."""

    def __init__(self) -> None:
        super().__init__(
            "started without a configuration file; run `dicomrouter init` / start with --config"
        )


@dataclass(frozen=True)
class Version:
    id: int
    applied_at: float
    author: str
    source: str
    sha256: str
    comment: str
    yaml: str | None = None  # left out of listings

    def as_dict(self) -> dict[str, Any]:
        data = {
            "id": self.id,
            "applied_at": self.applied_at,
            "author": self.author,
            "source": self.source,
            "sha256": self.sha256,
            "comment": self.comment,
        }
        if self.yaml is not None:
            data["yaml"] = self.yaml
        return data


@dataclass(frozen=True)
class Validation:
    """A candidate checked against the active configuration; nothing was changed."""

    valid: bool
    errors: list[str]  # "key.path: reason", the same as at start-up
    warnings: list[str]  # lint findings ("warning: where: message")
    diff: str  # unified diff from the active YAML to the candidate
    changed: list[str] = field(default_factory=list)
    restart_required: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "valid": self.valid,
            "errors": self.errors,
            "warnings": self.warnings,
            "diff": self.diff,
            "changed": self.changed,
            "restart_required": self.restart_required,
        }


@dataclass(frozen=True)
class ApplyResult:
    """What an apply did. ``config`` is the effective configuration (restart-bound keys
    keep their running values) that the processes now run on."""

    version_id: int
    created: bool  # False: identical to the newest version, nothing new recorded
    changed: list[str]
    live: list[str]
    restart_required: list[str]
    diff: str
    config: RouterConfig

    def as_dict(self) -> dict[str, Any]:
        return {
            "version": self.version_id,
            "created": self.created,
            "changed": self.changed,
            "applied_live": self.live,
            "restart_required": self.restart_required,
            "diff": self.diff,
        }


class InvalidConfig(Invalid):
    """A candidate that does not validate; ``errors`` are the key-path errors."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("invalid configuration; nothing was changed")
        self.errors = errors


class Runtime(Protocol):
    """What :func:`apply_config` needs from a process (the API's ``AppContext``):
    ``config`` is the configuration it runs on, replaced under the apply lock."""

    config: RouterConfig
    engine: Engine
    config_path: Path | None
    reload_node: Callable[[], None] | None


# -- text and comparisons ------------------------------------------------------------
def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def normalize(text: str) -> str:
    """``\r\n`` and lone ``\r`` line ends as ``\n`` (a browser's textarea sends
    ``\r\n``): the same configuration is then the same text, hash and file."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


# -- who sees what ---------------------------------------------------------------------
def sees_secrets(principal: Principal) -> bool:
    return principal.may(Role.admin)


def redact(text: str, principal: Principal) -> str:
    """The exact text for an admin, :func:`redacted_yaml` for everyone else."""
    return text if sees_secrets(principal) else redacted_yaml(text)


def redacted_yaml(text: str) -> str:
    """``text`` parsed, its secrets masked with ``<redacted>``, dumped again.

    Masked: ``auth.users.*.password_hash``, ``auth.tokens.*.token_hash`` (and any
    ``password_hash``/``token_hash`` key anywhere, in case the file is malformed),
    every value of ``alerts.webhooks.*.headers``, the password in ``database`` (as
    ``***``); and
    any other string equal to one of those secrets (a YAML alias of it). A text that
    does not parse to a mapping is not shown at all (:data:`UNPARSEABLE`).
    """
    try:
        data = load_yaml(normalize(text))
    except ConfigError:
        return UNPARSEABLE
    if data is None:
        return ""
    if not isinstance(data, dict):
        return UNPARSEABLE
    secrets: set[str] = set()
    _mask_hashes(data, secrets)
    alerts = data.get("alerts")
    webhooks = alerts.get("webhooks") if isinstance(alerts, dict) else None
    if isinstance(webhooks, dict):
        for hook in webhooks.values():
            if isinstance(hook, dict) and "headers" in hook:
                headers = hook["headers"]
                if isinstance(headers, dict):
                    for name in list(headers):
                        secrets.update(_strings(headers[name]))
                        headers[name] = REDACTED
                else:
                    secrets.update(_strings(headers))
                    hook["headers"] = REDACTED
    if "database" in data and data["database"] is not None:
        data["database"] = _hide_password(data["database"], secrets)
    secrets.discard(REDACTED)
    secrets.discard("")
    data = _mask_copies(data, secrets, {})
    try:
        return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    except yaml.YAMLError:  # pragma: no cover - safe_load output always dumps
        return UNPARSEABLE


def _strings(value: Any, seen: set[int] | None = None) -> list[str]:
    """Every scalar in ``value``, as text (aliases may make it recursive)."""
    seen = set() if seen is None else seen
    if isinstance(value, (dict, list)):
        if id(value) in seen:
            return []
        seen.add(id(value))
        items = value.values() if isinstance(value, dict) else value
        return [s for item in items for s in _strings(item, seen)]
    return [] if value is None else [value if isinstance(value, str) else str(value)]


def _mask_hashes(node: Any, secrets: set[str], seen: set[int] | None = None) -> None:
    seen = set() if seen is None else seen
    if not isinstance(node, (dict, list)) or id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, list):
        for item in node:
            _mask_hashes(item, secrets, seen)
        return
    for key in list(node):
        if key in ("password_hash", "token_hash"):
            secrets.update(_strings(node[key]))
            node[key] = REDACTED
        else:
            _mask_hashes(node[key], secrets, seen)


def _hide_password(value: Any, secrets: set[str]) -> Any:
    """A database URL with its password masked; anything that is not a URL whole."""
    if not isinstance(value, str):
        secrets.update(_strings(value))
        return REDACTED
    try:
        url = make_url(value)
    except (ArgumentError, ValueError):
        secrets.add(value)
        return REDACTED
    if url.password is None:
        return value
    secrets.add(str(url.password))
    return url.render_as_string(hide_password=True)  # user:***@host


def _mask_copies(node: Any, secrets: set[str], seen: dict[int, Any]) -> Any:
    """Strings equal to a secret replaced anywhere (keys too): a YAML alias of a
    masked value must not show it elsewhere. Shared nodes stay shared."""
    if isinstance(node, str):
        return REDACTED if node in secrets else node
    if id(node) in seen:
        return seen[id(node)]
    if isinstance(node, dict):
        seen[id(node)] = node
        for key in list(node):
            value = _mask_copies(node.pop(key), secrets, seen)
            new_key = REDACTED if isinstance(key, str) and key in secrets else key
            node[new_key] = value
        return node
    if isinstance(node, list):
        seen[id(node)] = node
        node[:] = [_mask_copies(item, secrets, seen) for item in node]
        return node
    return node


def parse_yaml(
    text: str, base_dir: Path, source: str = "<candidate>", environ: Mapping[str, str] | None = None
) -> RouterConfig:
    """Validate ``text`` exactly as the file would be loaded; raises ``ConfigError``."""
    return load_config_text(text, source, base_dir, environ)


def diff(
    old: str,
    new: str,
    old_name: str = "active",
    new_name: str = "candidate",
    *,
    redacted: bool = False,
) -> str:
    """A unified diff (``difflib``), empty when the texts are equal. ``redacted``: between
    the :func:`redacted_yaml` dumps of both (what a non-admin may see)."""
    old, new = normalize(old), normalize(new)
    if redacted:
        old, new = redacted_yaml(old), redacted_yaml(new)
    return "".join(
        difflib.unified_diff(
            _with_newline(old).splitlines(keepends=True),
            _with_newline(new).splitlines(keepends=True),
            fromfile=old_name,
            tofile=new_name,
        )
    )


def _with_newline(text: str) -> str:
    return text if not text or text.endswith("\n") else text + "\n"


def changed_keys(old: RouterConfig, new: RouterConfig) -> list[str]:
    """Key paths whose values differ, e.g. ``dicom.allowed_callers``,
    ``destinations.pacs.port``, ``routes.ct-to-pacs`` (routes compared by name)."""
    found: list[str] = []
    _compare(old.model_dump(mode="json"), new.model_dump(mode="json"), "", found)
    return found


def _compare(old: Any, new: Any, path: str, found: list[str]) -> None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new), key=str):
            _compare(old.get(key), new.get(key), f"{path}.{key}" if path else str(key), found)
    elif _named_list(old) and _named_list(new):
        before = {item["name"]: item for item in old}
        after = {item["name"]: item for item in new}
        for name in sorted(set(before) | set(after)):
            if before.get(name) != after.get(name):
                found.append(f"{path}.{name}")
        if [i["name"] for i in old] != [i["name"] for i in new] and set(before) == set(after):
            found.append(f"{path} (order)")
    elif old != new:
        found.append(path)


def _named_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(i, dict) and "name" in i for i in value)


def restart_required(changed: list[str]) -> list[str]:
    """The keys of ``changed`` that are, or are under, one of ``RESTART_KEYS``."""
    return [
        key
        for key in changed
        if any(key == bound or key.startswith(bound + ".") for bound in RESTART_KEYS)
    ]


def effective(new: RouterConfig, running: RouterConfig) -> RouterConfig:
    """``new`` with the start-up-bound keys (``RESTART_KEYS``) kept at their running
    values: what the processes actually run on until a restart."""
    result = new.model_copy(deep=True)
    result.node = running.node
    result.dicom.port, result.dicom.bind = running.dicom.port, running.dicom.bind
    result.dicom.tls = running.dicom.tls
    result.dicom.processes = running.dicom.processes
    result.storage.path = running.storage.path
    result.database = running.database
    result.http.enabled = running.http.enabled
    result.http.port, result.http.bind = running.http.port, running.http.bind
    result.http.session_lifetime = running.http.session_lifetime
    result.http.tls = running.http.tls
    return result


def has_admin(config: RouterConfig) -> bool:
    """Someone can administer the router: a user or token with the admin role, or
    no authentication at all (everyone is admin)."""
    auth = config.auth
    if not auth.enabled:
        return True
    roles = [user.role for user in auth.users.values()]
    roles += [token.role for token in auth.tokens.values()]
    return "admin" in roles


def lockout(candidate: RouterConfig, running: RouterConfig | None) -> str | None:
    """Why ``candidate`` may not replace ``running``: it would leave no admin where
    there was one (nobody could change the configuration back, including whoever
    applied it). None when it may. A running configuration without an admin (a new
    installation) does not make a change refused."""
    if has_admin(candidate) or (running is not None and not has_admin(running)):
        return None
    return (
        "auth: this configuration leaves no admin (no user or token with role admin, "
        "while auth.enabled is true), so nobody could change it back: refused. Keep "
        "at least one admin user or token"
    )


def access_warning(candidate: RouterConfig, running: RouterConfig | None) -> str | None:
    """What :func:`lockout` lets through but an admin should hear before applying:
    ``candidate`` locks out every user (authentication on, no user or token at all),
    or leaves no admin where there was none already. None when someone can
    administer it, or when :func:`lockout` refuses it (an error, not a warning)."""
    if has_admin(candidate) or lockout(candidate, running) is not None:
        return None
    if not candidate.auth.users and not candidate.auth.tokens:
        return (
            "warning: auth: this configuration would lock out every user: auth.enabled "
            "is true and there is no user or token, so nobody can log in to the "
            "dashboard or the API. Add an admin: dicomrouter hash-password NAME --role admin"
        )
    return (
        "warning: auth: no user or token has role admin, so nobody can change the "
        "configuration from the dashboard or the API (only by editing the file)"
    )


def findings(config: RouterConfig) -> list[str]:
    return [str(finding) for finding in lint(config) + lint_pipelines(config, os.environ)]


def validate(
    text: str,
    active_text: str,
    base_dir: Path,
    running: RouterConfig | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    redacted: bool = False,
) -> Validation:
    """Check a candidate: errors (it would be refused), lint warnings, diff, and which
    changed keys would need a restart. ``redacted``: the diff as a non-admin sees it."""
    text = normalize(text)
    try:
        candidate = parse_yaml(text, base_dir, environ=environ)
    except YamlLimitError as exc:
        # Not shown as a diff either: diffing (and redacting) it is what would cost.
        raise InvalidConfig(list(exc.errors)) from None
    except ConfigError as exc:
        return Validation(False, list(exc.errors), [], diff(active_text, text, redacted=redacted))
    change = diff(active_text, text, redacted=redacted)
    changed = changed_keys(running, candidate) if running is not None else []
    refusal = lockout(candidate, running)
    access = access_warning(candidate, running)
    return Validation(
        refusal is None,
        [refusal] if refusal else [],
        ([access] if access else []) + findings(candidate),
        change,
        changed,
        restart_required(changed),
    )


# -- the table -------------------------------------------------------------------------
def _version(row: Any, with_yaml: bool) -> Version:
    return Version(
        id=row.id,
        applied_at=row.applied_at,
        author=row.author,
        source=row.source,
        sha256=row.sha256,
        comment=row.comment or "",
        yaml=row.yaml if with_yaml else None,
    )


def record_version(
    engine: Engine, text: str, *, author: str, source: str, comment: str = ""
) -> int:
    """Append a version unconditionally; returns its id."""
    with engine.begin() as conn:
        return _insert_version(conn, text, author, source, comment)


def _insert_version(conn: Connection, text: str, author: str, source: str, comment: str) -> int:
    if source not in SOURCES:
        raise ValueError(f"unknown version source {source!r}")
    result = conn.execute(
        config_versions.insert().values(
            applied_at=time.time(),
            author=author[:128],
            source=source,
            sha256=sha256(text),
            yaml=text,
            comment=comment,
        )
    )
    version_id = int(result.inserted_primary_key[0])  # type: ignore[index]
    notify(conn, CHANNEL, str(version_id))  # delivered at commit, to every node
    return version_id


def _newest(conn: Connection) -> Any:
    """The newest version's id and sha256 (a row), or None."""
    return conn.execute(
        select(config_versions.c.id, config_versions.c.sha256)
        .order_by(config_versions.c.id.desc())
        .limit(1)
    ).first()


def record_if_new(
    engine: Engine, text: str, *, author: str, source: str, comment: str = ""
) -> tuple[int, bool]:
    """Record ``text`` unless the newest version is the same text.
    Returns (version id, whether it was recorded now). Check and insert are one
    write transaction, so the node and the HTTP process recording the same file at
    once make one version, not two."""
    with engine.begin() as conn:
        newest = _newest(conn)
        if newest is not None and newest.sha256 == sha256(text):
            return int(newest.id), False
        return _insert_version(conn, text, author, source, comment), True


def newest_id(engine: Engine) -> int | None:
    """The newest version's id (what each node polls for: one indexed read)."""
    with engine.connect() as conn:
        found = conn.execute(select(func.max(config_versions.c.id))).scalar()
    return None if found is None else int(found)


def file_is_history(engine: Engine, text: str) -> Version | None:
    """Whether a node's file must not be recorded: its text is an older version than
    the newest (this node ran it before another node changed the configuration, or
    it is an old copy). Returns that older version, or None when the text is new
    (an edit: it is recorded) or is the newest version already."""
    digest = sha256(text)
    with engine.connect() as conn:
        newest = _newest(conn)
        if newest is None or newest.sha256 == digest:
            return None
        older = conn.execute(
            select(config_versions)
            .where(config_versions.c.sha256 == digest)
            .order_by(config_versions.c.id.desc())
            .limit(1)
        ).first()
    return None if older is None else _version(older, False)


def latest_version(engine: Engine, with_yaml: bool = True) -> Version | None:
    with engine.connect() as conn:
        row = conn.execute(
            select(config_versions).order_by(config_versions.c.id.desc()).limit(1)
        ).first()
    return None if row is None else _version(row, with_yaml)


def get_version(engine: Engine, version_id: int) -> Version | None:
    with engine.connect() as conn:
        row = conn.execute(
            select(config_versions).where(config_versions.c.id == version_id)
        ).first()
    return None if row is None else _version(row, True)


def list_versions(engine: Engine, limit: int = 50, offset: int = 0) -> tuple[int, list[Version]]:
    """Newest first, without the YAML texts."""
    columns = [c for c in config_versions.c if c.name != "yaml"]
    with engine.connect() as conn:
        total = conn.execute(select(func.count()).select_from(config_versions)).scalar_one()
        rows = conn.execute(
            select(*columns).order_by(config_versions.c.id.desc()).limit(limit).offset(offset)
        ).all()
    return int(total), [_version(row, False) for row in rows]


def diff_versions(engine: Engine, a: int, b: int, *, redacted: bool = False) -> str | None:
    """Unified diff from version ``a`` to version ``b``; None if either is unknown."""
    first, second = get_version(engine, a), get_version(engine, b)
    if first is None or second is None:
        return None
    return diff(
        first.yaml or "", second.yaml or "", f"version {a}", f"version {b}", redacted=redacted
    )


# -- the file --------------------------------------------------------------------------
def read_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return ""


def active_text(config_path: Path | None, config: RouterConfig) -> str:
    """The configuration file's text; without a file, the running configuration dumped."""
    if config_path is not None:
        return read_file(config_path)
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def write_newest(
    engine: Engine, config_path: Path, version: Version, node_name: str | None = None
) -> bool:
    """Make a node's file hold ``version`` (the newest, recorded by any node), so the
    file stays the active configuration. A file holding a text never recorded (an
    edit not applied yet, or refused as invalid) is left for its author, and logged.
    Returns whether it was written; a file that cannot be written is logged, and the
    node runs the version anyway.

    A version that names another node (``node.name``, recorded from that node's own
    file) is not written into this node's file either: this node would start under
    the other's name at its next start and take its leases. (``node.name`` is read
    at start only; name each node in its environment, ``DICOMROUTER_NODE__NAME``,
    and share one file.)"""
    text = version.yaml or ""
    named = _node_name_in(text)
    if node_name is not None and named is not None and named != node_name:
        log.warning(
            "configuration version %d names node %r: not written to %s, which stays this "
            "node's (%r) own; set node.name in the environment (DICOMROUTER_NODE__NAME) "
            "rather than in a file shared by several nodes",
            version.id,
            named,
            config_path,
            node_name,
        )
        return False
    current = normalize(read_file(config_path))
    if current == text:
        return False
    with engine.connect() as conn:
        recorded = conn.execute(
            select(config_versions.c.id).where(config_versions.c.sha256 == sha256(current)).limit(1)
        ).first()
    if current.strip() and recorded is None:
        log.warning(
            "%s holds changes never applied: left as it is, although this node runs "
            "version %d (SIGHUP this node to apply them)",
            config_path,
            version.id,
        )
        return False
    try:
        write_atomically(config_path, text)
    except OSError as exc:
        log.warning("cannot write configuration version %d to %s: %s", version.id, config_path, exc)
        return False
    log.info("configuration version %d written to %s", version.id, config_path)
    return True


def _node_name_in(text: str) -> str | None:
    """The ``node.name`` a configuration text sets, if it sets one."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return None
    node = data.get("node") if isinstance(data, dict) else None
    name = node.get("name") if isinstance(node, dict) else None
    return str(name) if name is not None else None


def write_atomically(path: Path, text: str) -> None:
    """Write ``path`` so that a crash leaves the old or the new file, never half of one:
    a temporary file in the same folder, fsynced, renamed over it, folder fsynced.
    The file keeps its mode (it may be 0600: it holds password hashes) and, when root
    writes it (``hash-password --write`` run with sudo), its owner: the service user
    must still be able to read it at the next reload."""
    try:
        status = path.stat()
    except FileNotFoundError:
        status = None
    mode = status.st_mode & 0o7777 if status is not None else 0o600
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            if status is not None and os.geteuid() == 0:
                os.fchown(handle.fileno(), status.st_uid, status.st_gid)
            os.fchmod(handle.fileno(), mode)
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


# -- applying --------------------------------------------------------------------------
def apply_yaml(
    engine: Engine,
    config_path: Path | None,
    text: str,
    running: RouterConfig | Callable[[], RouterConfig],
    *,
    author: str,
    source: str = "api",
    address: str = "",
    comment: str = "",
    notify: Callable[[], None] | None = None,
    environ: Mapping[str, str] | None = None,
    install: Callable[[RouterConfig], None] | None = None,
) -> ApplyResult:
    """Validate ``text``; if valid, write it to ``config_path``, record it as a version,
    audit it and call ``notify`` (the HTTP process sends SIGHUP to the node).

    Validating, writing, recording and installing are one critical section: ``running``
    (the configuration, or a function giving it, read inside it) is what the changes
    are computed against, and ``install`` receives the effective configuration inside
    it, so two concurrent applies cannot leave the process on one version while the
    file and the newest version are the other.

    Raises ``NoConfigFile`` (nothing to write to) or ``ConfigError`` (invalid, or it
    would leave no admin, see :func:`lockout`: the file, the versions and the running
    configuration are left untouched). Both are
    audited as failed attempts, like the success.
    """
    action = "config.apply" if source == "api" else f"config.{source}"
    if config_path is None:
        audit.record(
            engine,
            author,
            action,
            outcome="failed",
            source=address,
            detail={"reason": "no configuration file"},
        )
        raise NoConfigFile()
    text = _with_newline(normalize(text))
    refused: ConfigError | None = None
    with _apply_lock:
        current = running() if callable(running) else running
        try:
            candidate = parse_yaml(text, config_path.parent, environ=environ)
            refusal = lockout(candidate, current)
            if refusal is not None:
                raise ConfigError(str(config_path), [refusal])
        except ConfigError as exc:
            refused = exc
        else:
            change = diff(read_file(config_path), text, str(config_path), "new")
            write_atomically(config_path, text)
            version_id, created = record_if_new(
                engine, text, author=author, source=source, comment=comment
            )
            config = effective(candidate, current)
            changed = changed_keys(current, candidate)
            if install is not None:
                install(config)
    if refused is not None:
        audit.record(
            engine,
            author,
            action,
            str(config_path),
            outcome="failed",
            source=address,
            detail={"errors": refused.errors[:50]},
        )
        raise refused
    restart = restart_required(changed)
    live = [key for key in changed if key not in restart]
    added = sum(1 for line in change.splitlines() if line.startswith("+") and line[:3] != "+++")
    removed = sum(1 for line in change.splitlines() if line.startswith("-") and line[:3] != "---")
    audit.record(
        engine,
        author,
        action,
        f"version {version_id}",
        source=address,
        detail={
            "version": version_id,
            "created": created,
            "sha256": sha256(text),
            "comment": comment,
            "changed": changed[:100],
            "restart_required": restart,
            "lines_added": added,
            "lines_removed": removed,
        },
    )
    log.info(
        "configuration version %s applied by %s (%s): %s",
        version_id,
        author,
        source,
        ", ".join(changed) or "no changes",
    )
    if notify is not None:
        notify()
    return ApplyResult(version_id, created, changed, live, restart, change, config)


def rollback(
    engine: Engine,
    config_path: Path | None,
    version_id: int,
    running: RouterConfig | Callable[[], RouterConfig],
    *,
    author: str,
    address: str = "",
    notify: Callable[[], None] | None = None,
    environ: Mapping[str, str] | None = None,
    install: Callable[[RouterConfig], None] | None = None,
) -> ApplyResult | None:
    """Apply an old version's YAML as a new version (source ``rollback``); None if
    there is no such version. Raises like ``apply_yaml`` (an old version may no
    longer be valid, e.g. after an environment change)."""
    old = get_version(engine, version_id)
    if old is None:
        return None
    return apply_yaml(
        engine,
        config_path,
        old.yaml or "",
        running,
        author=author,
        source="rollback",
        address=address,
        comment=f"rollback to version {version_id}",
        notify=notify,
        environ=environ,
        install=install,
    )


# -- for the edges (API, dashboard) ----------------------------------------------------
def apply_config(
    runtime: Runtime,
    text: str,
    principal: Principal,
    address: str,
    source: str = "api",
    comment: str = "",
) -> ApplyResult:
    """Apply a candidate for the API and the dashboard: the file and a new version,
    ``runtime.config`` replaced in the same critical section, the node (and so the
    dispatcher) told by ``runtime.reload_node``.
    Raises ``Conflict`` (``NoConfigFile``) or ``InvalidConfig`` (with the errors)."""
    return _applied(
        lambda: apply_yaml(
            runtime.engine,
            runtime.config_path,
            text,
            lambda: runtime.config,
            author=principal.name,
            source=source,
            address=address,
            comment=comment,
            notify=runtime.reload_node,
            install=lambda config: setattr(runtime, "config", config),
        )
    )


def rollback_config(
    runtime: Runtime, version_id: int, principal: Principal, address: str
) -> ApplyResult:
    """:func:`apply_config` of an old version (source ``rollback``); ``NotFound`` if
    there is no such version."""
    result = _applied(
        lambda: rollback(
            runtime.engine,
            runtime.config_path,
            version_id,
            lambda: runtime.config,
            author=principal.name,
            address=address,
            notify=runtime.reload_node,
            install=lambda config: setattr(runtime, "config", config),
        )
    )
    if result is None:
        raise NotFound(f"no configuration version {version_id}")
    return result


def _applied(call: Callable[[], _T]) -> _T:
    try:
        return call()
    except ConfigError as exc:
        raise InvalidConfig(list(exc.errors)) from None


def install_newest(
    engine: Engine,
    config_path: Path,
    running: Callable[[], RouterConfig],
    install: Callable[[RouterConfig], None],
) -> Version | None:
    """:func:`load_newest` and ``install`` it, inside the same critical section as
    :func:`apply_yaml`, so a SIGHUP reload and an API apply in one process cannot
    interleave and leave it on an older version than the newest recorded one."""
    with _apply_lock:
        loaded = load_newest(engine, config_path, running())
        if loaded is None:
            return None
        version, config = loaded
        install(config)
        return version


def load_newest(
    engine: Engine, config_path: Path, running: RouterConfig
) -> tuple[Version, RouterConfig] | None:
    """For the dispatch and HTTP processes on a reload: the newest recorded version
    (the node records it only after validating it), as the effective configuration.
    None when there is none or it cannot be parsed here (logged)."""
    newest = latest_version(engine)
    if newest is None:
        return None
    try:
        config = parse_yaml(newest.yaml or "", config_path.parent, str(config_path))
    except ConfigError as exc:
        log.error("%s\nkeeping the running configuration", exc)
        return None
    return newest, effective(config, running)
