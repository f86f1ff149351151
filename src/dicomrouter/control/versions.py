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

No HTTP here: the REST API, the dashboard and the CLI are thin edges over this.
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
from typing import Any

from sqlalchemy import Engine, func, select

from dicomrouter.config import ConfigError, RouterConfig, load_config_text
from dicomrouter.store.schema import config_versions

from . import audit

log = logging.getLogger("dicomrouter.config")

SOURCES = ("startup", "api", "sighup", "rollback", "import")

#: Keys read once at start-up: a change is recorded but takes effect at the next
#: restart (the sockets are bound, the index and storage are open in three processes).
RESTART_KEYS = (
    "dicom.port",
    "dicom.bind",
    "storage.path",
    "database",
    "http.enabled",
    "http.port",
    "http.bind",
    "http.session_lifetime",
)

_apply_lock = threading.Lock()


class NoConfigFile(Exception):
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


# -- text and comparisons ------------------------------------------------------------
def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def parse_yaml(
    text: str, base_dir: Path, source: str = "<candidate>", environ: Mapping[str, str] | None = None
) -> RouterConfig:
    """Validate ``text`` exactly as the file would be loaded; raises ``ConfigError``."""
    return load_config_text(text, source, base_dir, environ)


def diff(old: str, new: str, old_name: str = "active", new_name: str = "candidate") -> str:
    """A unified diff (``difflib``), empty when the texts are equal."""
    return "".join(
        difflib.unified_diff(
            old.splitlines(keepends=True),
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
    return [key for key in changed if key in RESTART_KEYS]


def effective(new: RouterConfig, running: RouterConfig) -> RouterConfig:
    """``new`` with the start-up-bound keys (``RESTART_KEYS``) kept at their running
    values: what the processes actually run on until a restart."""
    result = new.model_copy(deep=True)
    result.dicom.port, result.dicom.bind = running.dicom.port, running.dicom.bind
    result.storage.path = running.storage.path
    result.database = running.database
    result.http.enabled = running.http.enabled
    result.http.port, result.http.bind = running.http.port, running.http.bind
    result.http.session_lifetime = running.http.session_lifetime
    return result


def findings(config: RouterConfig) -> list[str]:
    from dicomrouter.config.lint import lint

    return [str(finding) for finding in lint(config)]


def validate(
    text: str,
    active_text: str,
    base_dir: Path,
    running: RouterConfig | None = None,
    environ: Mapping[str, str] | None = None,
) -> Validation:
    """Check a candidate: errors (it would be refused), lint warnings, diff, and which
    changed keys would need a restart."""
    change = diff(active_text, text)
    try:
        candidate = parse_yaml(text, base_dir, environ=environ)
    except ConfigError as exc:
        return Validation(False, list(exc.errors), [], change)
    changed = changed_keys(running, candidate) if running is not None else []
    return Validation(True, [], findings(candidate), change, changed, restart_required(changed))


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
    if source not in SOURCES:
        raise ValueError(f"unknown version source {source!r}")
    with engine.begin() as conn:
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
        return int(result.inserted_primary_key[0])  # type: ignore[index]


def record_if_new(
    engine: Engine, text: str, *, author: str, source: str, comment: str = ""
) -> tuple[int, bool]:
    """Record ``text`` unless the newest version is the same text.
    Returns (version id, whether it was recorded now)."""
    newest = latest_version(engine, with_yaml=False)
    if newest is not None and newest.sha256 == sha256(text):
        return newest.id, False
    return record_version(engine, text, author=author, source=source, comment=comment), True


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


def diff_versions(engine: Engine, a: int, b: int) -> str | None:
    """Unified diff from version ``a`` to version ``b``; None if either is unknown."""
    first, second = get_version(engine, a), get_version(engine, b)
    if first is None or second is None:
        return None
    return diff(first.yaml or "", second.yaml or "", f"version {a}", f"version {b}")


# -- the file --------------------------------------------------------------------------
def read_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return ""


def write_atomically(path: Path, text: str) -> None:
    """Write ``path`` so that a crash leaves the old or the new file, never half of one:
    a temporary file in the same folder, fsynced, renamed over it, folder fsynced.
    The file keeps its mode (it may be 0600: it holds password hashes)."""
    try:
        mode = path.stat().st_mode & 0o7777
    except FileNotFoundError:
        mode = 0o600
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
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
    running: RouterConfig,
    *,
    author: str,
    source: str = "api",
    address: str = "",
    comment: str = "",
    notify: Callable[[], None] | None = None,
    environ: Mapping[str, str] | None = None,
) -> ApplyResult:
    """Validate ``text``; if valid, write it to ``config_path``, record it as a version,
    audit it and call ``notify`` (the HTTP process sends SIGHUP to the node).

    Raises ``NoConfigFile`` (nothing to write to) or ``ConfigError`` (invalid: the
    file, the versions and the running configuration are left untouched). Both are
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
    text = _with_newline(text)
    try:
        candidate = parse_yaml(text, config_path.parent, environ=environ)
    except ConfigError as exc:
        audit.record(
            engine,
            author,
            action,
            str(config_path),
            outcome="failed",
            source=address,
            detail={"errors": exc.errors[:50]},
        )
        raise
    with _apply_lock:
        change = diff(read_file(config_path), text, str(config_path), "new")
        write_atomically(config_path, text)
        version_id, created = record_if_new(
            engine, text, author=author, source=source, comment=comment
        )
    changed = changed_keys(running, candidate)
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
    return ApplyResult(
        version_id, created, changed, live, restart, change, effective(candidate, running)
    )


def rollback(
    engine: Engine,
    config_path: Path | None,
    version_id: int,
    running: RouterConfig,
    *,
    author: str,
    address: str = "",
    notify: Callable[[], None] | None = None,
    environ: Mapping[str, str] | None = None,
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
    )


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
