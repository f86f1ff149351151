"""``check`` findings about pipelines (``transforms:``).

Errors, because the pipeline cannot work as written: an unknown keyword or tag in a
step (with a "did you mean"), a ``replace`` or ``map`` on an element that is not text, a
literal ``set`` value too long for its VR, a ``map`` table that is missing, unreadable
or malformed (deliveries through it would wait forever).

Warnings, because it may be fine where the service runs or is only suspicious: a
``secret_env`` or a re-identification ``mapping.key_env`` that is not set (or too
short) in *this* environment (``check`` often runs in a shell,
the service has its own environment), a ``replace`` whose pattern only ever matches
the empty string and replaces it with nothing, a pipeline nothing uses, a step kind
this build cannot run.

Every finding names the key path (``transforms.research[0].deidentify.secret_env``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from dicomrouter.config import RouterConfig
from dicomrouter.config.lint import Finding
from dicomrouter.config.transforms import MapStep, ReplaceStep

from .base import TransformUnavailable
from .lookup import TableError, read_table
from .mapping import MappingKey
from .pipeline import PipelineError, compile_pipeline

#: Values a pattern is tried on to tell whether it matches anything but "".
_SAMPLES = ("A", "a", "0", "0123", " ", "-", ".", "^", "Doe^John", "ABC DEF", "x" * 24)


def lint_pipelines(config: RouterConfig, environ: Mapping[str, str]) -> list[Finding]:
    findings: list[Finding] = []
    for name, steps in config.transforms.items():
        try:
            compile_pipeline(name, steps, environ)
        except PipelineError as exc:
            findings += [Finding("error", where, message) for where, message in exc.problems]
        for index, step in enumerate(steps):
            where = f"transforms.{name}[{index}].{step.kind}"
            findings += _step_findings(step, where, environ)
    used = {route.transform for route in config.routes if route.transform}
    used |= {dest.transform for dest in config.destinations.values() if dest.transform}
    for name in sorted(set(config.transforms) - used):
        findings.append(
            Finding("warning", f"transforms.{name}", "is not used by any route or destination")
        )
    return findings


def _step_findings(step: Any, where: str, environ: Mapping[str, str]) -> list[Finding]:
    findings: list[Finding] = []
    secret_env = getattr(getattr(step, step.kind, None), "secret_env", None)
    if secret_env and not environ.get(secret_env):
        findings.append(
            Finding(
                "warning",
                f"{where}.secret_env",
                f"the environment variable {secret_env} is not set here; if the service "
                "does not have it either, deliveries through this pipeline wait until it "
                "is set",
            )
        )
    mapping = getattr(getattr(step, step.kind, None), "mapping", None)
    if mapping is not None:
        try:
            MappingKey.from_environ(mapping.key_env, environ)
        except TransformUnavailable as exc:
            findings.append(
                Finding(
                    "warning",
                    f"{where}.mapping.key_env",
                    f"{exc}; if the service does not have it either, deliveries through "
                    "this pipeline wait until it is set",
                )
            )
    if isinstance(step, ReplaceStep):
        for key, replacement in step.replace.items():
            if not replacement.with_ and _only_matches_empty(replacement.pattern):
                findings.append(
                    Finding(
                        "warning",
                        f"{where}.{key}.pattern",
                        f"{replacement.pattern!r} only ever matches the empty text and "
                        "`with` is empty: this replace changes nothing",
                    )
                )
    if isinstance(step, MapStep):
        for key, lookup in step.map.items():
            try:
                read_table(lookup.file)
            except TableError as exc:
                findings.append(Finding("error", f"{where}.{key}.file", str(exc)))
    return findings


def _only_matches_empty(pattern: str) -> bool:
    compiled = re.compile(pattern)
    return all(match.group() == "" for sample in _SAMPLES for match in compiled.finditer(sample))
