"""``dicomrouter check``: findings about a configuration that loads but is probably wrong.

Validation (models.py) refuses what cannot work; the lint flags what works but is
likely a mistake: dead routes, double deliveries, unused destinations, loops,
certificates that expire soon.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC
from typing import Any, Literal

from dicomrouter.rules import compile_condition, never_matches
from dicomrouter.rules.conditions import AllOf, AnyOf
from dicomrouter.tls import TlsError, certificate_not_after

from . import hosts
from .models import DicomDestinationConfig, DicomwebDestinationConfig, RouterConfig


@dataclass(frozen=True)
class Finding:
    severity: Literal["error", "warning"]
    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.severity}: {self.where}: {self.message}"


def lint(config: RouterConfig, environ: Mapping[str, str] | None = None) -> list[Finding]:
    findings: list[Finding] = []
    findings += _secrets(config, os.environ if environ is None else environ)
    used: set[str] = set()
    for index, route in enumerate(config.routes):
        where = f"routes[{index}] ({route.name})"
        used.update(route.to)
        if route.when is not None:
            reason = never_matches(compile_condition(route.when))
            if reason:
                findings.append(Finding("warning", where, f"can never match: {reason}"))
        if len(set(route.to)) != len(route.to):
            findings.append(Finding("warning", where, "lists the same destination twice"))
        if route.trigger != "instance" and route.forward == "instance":
            findings.append(
                Finding(
                    "warning",
                    where,
                    "forward: instance with a series/study trigger sends "
                    "only the matching instances; write forward: matched to say so",
                )
            )
        if not route.enabled:
            findings.append(Finding("warning", where, "is disabled"))

    findings += _overlaps(config)
    findings += _certificates(config)
    for group in [config.groups[name] for name in sorted(used) if name in config.groups]:
        used.update(group.members)  # a member used through a group is used
    for name in sorted(set(config.destinations) - used):
        findings.append(Finding("warning", f"destinations.{name}", "is not used by any route"))
    for name, dest in config.destinations.items():
        if not isinstance(dest, DicomDestinationConfig):
            continue  # only a DICOM destination can be this router
        if dest.port not in config.dicom.ports:
            continue  # another port is never this router (no lookup needed)
        host = hosts.check_host(dest.host)
        if config.is_self(dest):
            findings.append(Finding("error", f"destinations.{name}", "routing loop: this router"))
        elif host.local:
            findings.append(
                Finding(
                    "warning",
                    f"destinations.{name}",
                    f"points at this host's DICOM port {dest.port}: probably a routing loop",
                )
            )
        elif host.unresolved:
            findings.append(
                Finding(
                    "warning",
                    f"destinations.{name}",
                    f"host {dest.host!r} did not resolve within {hosts.RESOLVE_TIMEOUT:g}s: "
                    "cannot tell whether it is this machine (a routing loop)",
                )
            )
    return findings


def _overlaps(config: RouterConfig) -> list[Finding]:
    """Two enabled routes with the same conditions and the same destination send the
    same data twice (the queue delivers it once, but the rules say it twice)."""
    findings = []
    routes = [r for r in config.routes if r.enabled]
    for i, first in enumerate(routes):
        for second in routes[i + 1 :]:
            shared = sorted(set(first.to) & set(second.to))
            if not shared:
                continue
            same_when = _canonical(first.when) == _canonical(second.when)
            if same_when and first.forward_level == second.forward_level:
                findings.append(
                    Finding(
                        "warning",
                        f"routes {first.name!r} and {second.name!r}",
                        f"send the same data to {', '.join(shared)}",
                    )
                )
            elif first.when is None or second.when is None:
                catch_all = first if first.when is None else second
                other = second if catch_all is first else first
                findings.append(
                    Finding(
                        "warning",
                        f"routes {first.name!r} and {second.name!r}",
                        f"{catch_all.name!r} already sends everything to "
                        f"{', '.join(shared)}; {other.name!r} adds nothing there "
                        "(each instance is delivered once)",
                    )
                )
    return findings


def _canonical(when: dict[str, Any] | None) -> str:
    """One text per meaning of a ``when``: ``Modality: CT`` and ``Modality: {equals:
    CT}`` compile to the same condition, and the order of ANDed or ORed terms does
    not matter, so such routes are recognised as the same."""
    if when is None:
        return "always"

    def text(cond: Any) -> str:
        if isinstance(cond, AllOf | AnyOf):
            joiner = " and " if isinstance(cond, AllOf) else " or "
            parts = sorted({text(child) for child in _members(cond, type(cond))})
            return "(" + joiner.join(parts) + ")" if len(parts) > 1 else parts[0]
        return str(cond.describe())

    return text(compile_condition(when))


def _members(cond: Any, kind: type) -> list[Any]:
    """The terms of nested ANDs (or ORs) as one list: (A and (B and C)) is A, B, C."""
    out: list[Any] = []
    for child in cond.children:
        out.extend(_members(child, kind) if isinstance(child, kind) else [child])
    return out


def _certificates(config: RouterConfig) -> list[Finding]:
    """Certificate files that have expired (error) or expire within the alert's
    ``before`` (warning)."""
    findings = []
    before = config.alerts.events.certificate_expiry.before
    for key, path in config.certificate_files().items():
        try:
            not_after = certificate_not_after(path)
        except TlsError as exc:
            findings.append(Finding("error", key, str(exc)))
            continue
        left = not_after.timestamp() - time.time()
        when = not_after.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")
        if left <= 0:
            findings.append(Finding("error", key, f"the certificate in {path} expired on {when}"))
        elif left < before:
            findings.append(Finding("warning", key, f"the certificate in {path} expires on {when}"))
    return findings


def _secrets(config: RouterConfig, environ: Mapping[str, str]) -> list[Finding]:
    """A DICOMweb destination whose password or token variable is not set here: a
    warning, as ``check`` often runs in a shell and the service has its own
    environment (where it is unset, the destination pauses with this reason)."""
    findings = []
    for name, dest in config.destinations.items():
        if not isinstance(dest, DicomwebDestinationConfig) or dest.auth is None:
            continue
        if not environ.get(dest.auth.secret_env):
            findings.append(
                Finding(
                    "warning",
                    f"destinations.{name}.auth.{dest.auth.secret_key}",
                    f"the environment variable {dest.auth.secret_env} is not set here; "
                    "if the service does not have it either, nothing is sent to "
                    f"{name} (it is paused with this reason)",
                )
            )
    return findings
