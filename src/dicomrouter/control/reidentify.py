"""Re-identification: what a pseudonym stands for, from the mapping that
de-identifying pipelines with ``mapping`` record (``store.pseudonyms``).

Admin only, whatever the edge: the check is here, so the API, the dashboard and the
CLI cannot disagree. Every read is audited (``pseudonym.reidentify``: who, which
pseudonym, how many entries), refused ones too (outcome ``denied``) and failed ones
(``failed``: no key, another key). The audit never holds a decrypted value; a look-up
by original does not even name the original it was given.

The originals are decrypted with the keys the running configuration's mappings name
(``transforms.<name>[i].deidentify.mapping.key_env``), read from this process's
environment: a row recorded under a key no configured mapping has any more cannot
be read, and the answer says so.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Protocol

from sqlalchemy import Engine

from dicomrouter.config import RouterConfig
from dicomrouter.security import Principal, Role
from dicomrouter.store import audit
from dicomrouter.store import pseudonyms as rows
from dicomrouter.transforms import TransformUnavailable
from dicomrouter.transforms.mapping import KINDS, MappingKey, MappingKeyError
from dicomrouter.transforms.pseudonyms import PatientKey

from .errors import Forbidden, NotFound, Unavailable

ACTION = "pseudonym.reidentify"
_UID_KINDS = ("study", "series", "instance")
_PATIENT_KINDS = ("patient", "date_offset")


class Context(Protocol):
    """What is read here: the running configuration, a writer (audit) and a reader."""

    @property
    def config(self) -> RouterConfig: ...
    @property
    def engine(self) -> Engine: ...
    @property
    def reader(self) -> Engine: ...


def mapping_key_envs(config: RouterConfig) -> list[str]:
    """The environment variables the configured mappings take their keys from."""
    names: dict[str, None] = {}
    for steps in config.transforms.values():
        for step in steps:
            mapping = getattr(getattr(step, step.kind, None), "mapping", None)
            if mapping is not None:
                names[mapping.key_env] = None
    return list(names)


def _keys(
    config: RouterConfig, environ: Mapping[str, str]
) -> tuple[dict[str, MappingKey], list[str]]:
    """The usable keys by key id, and why the others are not usable."""
    keys: dict[str, MappingKey] = {}
    problems: list[str] = []
    for name in mapping_key_envs(config):
        try:
            key = MappingKey.from_environ(name, environ)
        except TransformUnavailable as exc:
            problems.append(str(exc))
            continue
        keys[key.key_id] = key
    return keys, problems


def _check_role(ctx: Context, principal: Principal, target: str, source: str) -> None:
    if not principal.may(Role.admin):
        audit.record(ctx.engine, principal.name, ACTION, target, outcome="denied", source=source)
        raise Forbidden(
            f"re-identification needs the admin role; {principal.name} is {principal.role.name}"
        )


def _open(
    ctx: Context,
    principal: Principal,
    found: list[dict[str, Any]],
    keys: dict[str, MappingKey],
    problems: list[str],
    target: str,
    source: str,
) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = []
    for row in found:
        key = keys.get(row["key_id"])
        try:
            if key is None:
                known = ", ".join(sorted(keys)) or "none"
                raise Unavailable(
                    f"the mapping of {row['pipeline']!r} was recorded under key id "
                    f"{row['key_id']}, and no configured mapping key here has it (usable "
                    f"key ids: {known}"
                    + (f"; {'; '.join(problems)}" if problems else "")
                    + "): set the key it was recorded with"
                )
            original = key.open(row["pipeline"], row["kind"], row["pseudonym"], row["sealed"])
        except (Unavailable, MappingKeyError) as exc:
            audit.record(
                ctx.engine,
                principal.name,
                ACTION,
                target,
                outcome="failed",
                source=source,
                detail={"error": str(exc)},
            )
            if isinstance(exc, Unavailable):
                raise
            raise Unavailable(f"key id {row['key_id']}: {exc}") from None
        entries.append(
            {
                "pipeline": row["pipeline"],
                "kind": row["kind"],
                "pseudonym": row["pseudonym"],
                "original": original,
                "recorded_at": row["recorded_at"],
            }
        )
    entries.sort(key=lambda e: KINDS.index(e["kind"]) if e["kind"] in KINDS else 99)
    audit.record(
        ctx.engine,
        principal.name,
        ACTION,
        target,
        source=source,
        detail={
            "results": len(entries),
            "kinds": sorted({e["kind"] for e in entries}),
            "pipelines": sorted({e["pipeline"] for e in entries}),
        },
    )
    return entries


def reidentify(
    ctx: Context,
    principal: Principal,
    pseudonym: str,
    *,
    source: str = "",
    environ: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """What ``pseudonym`` (a pseudonymous Patient ID or UID) stands for: every entry
    recorded under it, decrypted. Forbidden below admin, NotFound when nothing is
    recorded under it, Unavailable when its key is not here."""
    pseudonym = pseudonym.strip()
    _check_role(ctx, principal, pseudonym, source)
    found = rows.by_pseudonym(ctx.reader, pseudonym)
    if not found:
        audit.record(
            ctx.engine, principal.name, ACTION, pseudonym, source=source, detail={"results": 0}
        )
        raise NotFound(f"no re-identification mapping is recorded for {pseudonym!r}")
    keys, problems = _keys(ctx.config, environ if environ is not None else os.environ)
    entries = _open(ctx, principal, found, keys, problems, pseudonym, source)
    return {"pseudonym": pseudonym, "count": len(entries), "entries": entries}


def reidentify_original(
    ctx: Context,
    principal: Principal,
    original: str,
    *,
    issuer: str = "",
    source: str = "",
    environ: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The pseudonyms recorded for an original Patient ID (within ``issuer``) or an
    original study, series or instance UID. The audit names neither the original
    nor the issuer (``target`` is ``by original``)."""
    target = "by original"
    original = original.strip()
    _check_role(ctx, principal, target, source)
    keys, problems = _keys(ctx.config, environ if environ is not None else os.environ)
    if not keys:
        message = "no re-identification mapping key is usable here" + (
            f": {'; '.join(problems)}" if problems else " (no pipeline has a mapping)"
        )
        audit.record(
            ctx.engine,
            principal.name,
            ACTION,
            target,
            outcome="failed",
            source=source,
            detail={"error": message},
        )
        raise Unavailable(message)
    patient = PatientKey(patient_id=original, issuer=issuer.strip()).material()
    uid = original.encode("ascii", "replace")
    lookups = [
        key.lookup(kind, patient if kind in _PATIENT_KINDS else uid)
        for key in keys.values()
        for kind in (*_PATIENT_KINDS, *_UID_KINDS)
    ]
    found = rows.by_lookup(ctx.reader, lookups)
    if not found:
        audit.record(
            ctx.engine, principal.name, ACTION, target, source=source, detail={"results": 0}
        )
        raise NotFound("no re-identification mapping is recorded for that original")
    entries = _open(ctx, principal, found, keys, problems, target, source)
    return {"count": len(entries), "entries": entries}
