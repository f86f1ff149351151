"""Load the YAML file, apply environment overrides, and report errors by key path."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .models import RouterConfig

ENV_PREFIX = "DICOMROUTER_"
#: Top-level sections that environment variables may override (the node settings).
NODE_KEYS = {"ae_title", "dicom", "storage", "database", "log_level", "dispatch", "http"}


class ConfigError(Exception):
    """A configuration problem; ``errors`` holds one ``"key.path: reason"`` per problem."""

    def __init__(self, source: str, errors: list[str]):
        self.source = source
        self.errors = errors
        super().__init__(f"{source}: " + "; ".join(errors))

    def __str__(self) -> str:
        lines = [f"invalid configuration in {self.source}:"]
        lines += [f"  - {error}" for error in self.errors]
        return "\n".join(lines)


def _format_location(loc: tuple[Any, ...]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += ("." if text else "") + str(part)
    return text


def format_validation_error(exc: ValidationError) -> list[str]:
    messages = []
    for error in exc.errors():
        loc = tuple(p for p in error["loc"] if p not in ("function-after", "function-before"))
        message = error["msg"].removeprefix("Value error, ")
        where = _format_location(loc)
        if error["type"] == "extra_forbidden":
            message = "unknown key"
        elif error["type"] == "missing":
            message = "required key is missing"
        # Cross-field messages already start with their own key path.
        if where and not message.startswith(where.split(".")[0] + "["):
            messages.append(f"{where}: {message}")
        else:
            messages.append(message)
    return messages


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """``DICOMROUTER_DICOM__PORT=104`` becomes ``{"dicom": {"port": "104"}}``."""
    overrides: dict[str, Any] = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or name == ENV_PREFIX + "CONFIG":
            continue
        path = [part.lower() for part in name[len(ENV_PREFIX) :].split("__")]
        if path[0] not in NODE_KEYS:
            continue
        node = overrides
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = yaml.safe_load(value) if value else value
    return overrides


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def parse_config(
    data: Any, source: str = "<config>", environ: Mapping[str, str] | None = None
) -> RouterConfig:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, ["the file must be a YAML mapping of keys to values"])
    data = _merge(data, env_overrides(os.environ if environ is None else environ))
    try:
        return RouterConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, format_validation_error(exc)) from None


def load_config(path: str | Path | None, environ: Mapping[str, str] | None = None) -> RouterConfig:
    """Load ``path`` (or the embedded defaults when ``None``), relative paths resolved
    against the file's folder so that ``storage.path: ./data`` means next to the file."""
    if path is None:
        config = parse_config({}, "<defaults>", environ)
        return config
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(path), [f"cannot read file: {exc.strerror}"]) from None
    return load_config_text(text, str(path), path.parent, environ)


def load_config_text(
    text: str, source: str, base_dir: Path, environ: Mapping[str, str] | None = None
) -> RouterConfig:
    """What ``load_config`` does with the file's text: a candidate from the API or a
    stored version is checked exactly as the file would be (same errors, same env
    overrides, ``storage.path`` relative to ``base_dir``)."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(source, [f"{where}YAML syntax error: {problem}"]) from None
    config = parse_config(data, source, environ)
    if not config.storage.path.is_absolute():
        config.storage.path = (base_dir / config.storage.path).resolve()
    return config
