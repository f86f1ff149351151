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


#: The largest YAML text parsed at all (the HTTP service bounds uploads lower, with
#: ``http.max_config_size``). A configuration is tens of kilobytes.
MAX_YAML_BYTES = 8 * 1024 * 1024
#: Nodes the document may hold once every alias is expanded. Aliases are shared
#: when parsed, but validating, redacting and comparing walk the expanded tree, so
#: a few hundred bytes of nested aliases ("billion laughs") would cost minutes.
MAX_YAML_NODES = 200_000
#: Deepest nesting of mappings and sequences (a configuration needs about ten).
MAX_YAML_DEPTH = 64


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


class YamlLimitError(ConfigError):
    """The text is too large or too complex to parse (size, aliases, nesting, cycles)."""


def _check_yaml_limits(text: str, source: str) -> None:
    """Refuse, from the parser's events alone (libyaml, C: milliseconds even for a
    bomb), a text that is too large, nests too deep, whose aliases expand to too
    many nodes, or where an alias names a collection that encloses it (a cycle).
    Nothing is built before these checks pass."""
    size = len(text.encode("utf-8", errors="replace"))
    if size > MAX_YAML_BYTES:
        raise YamlLimitError(
            source, [f"the YAML text is {size} bytes, over the limit of {MAX_YAML_BYTES}"]
        )
    anchors: dict[str, int] = {}
    stack: list[list[Any]] = []  # [anchor, expanded nodes so far] per open collection
    try:
        for event in yaml.parse(text, Loader=_Loader):
            if isinstance(event, yaml.CollectionStartEvent):
                stack.append([event.anchor, 1])
                if len(stack) > MAX_YAML_DEPTH:
                    raise YamlLimitError(
                        source,
                        [f"{_where(event)}YAML nests deeper than {MAX_YAML_DEPTH} levels"],
                    )
                continue
            if isinstance(event, yaml.CollectionEndEvent):
                anchor, nodes = stack.pop()
            elif isinstance(event, yaml.AliasEvent):
                if any(entry[0] == event.anchor for entry in stack):
                    # The anchor's collection is still open: the alias would make
                    # it contain itself, a cycle that later walks never leave.
                    raise YamlLimitError(
                        source,
                        [
                            f"{_where(event)}alias *{event.anchor} refers to its own "
                            "enclosing node (a cycle): refused"
                        ],
                    )
                anchor, nodes = None, anchors.get(event.anchor or "", 1)
            elif isinstance(event, yaml.ScalarEvent):
                anchor, nodes = event.anchor, 1
            else:
                continue
            if anchor is not None:
                anchors[anchor] = nodes
            if stack:
                stack[-1][1] += nodes
                nodes = stack[-1][1]
            if nodes > MAX_YAML_NODES:
                raise YamlLimitError(
                    source,
                    [
                        f"{_where(event)}the YAML expands to more than {MAX_YAML_NODES} "
                        "values (aliases repeating aliases?): refused"
                    ],
                )
    except yaml.YAMLError as exc:
        raise _syntax_error(source, exc) from None


def _where(event: Any) -> str:
    mark = getattr(event, "start_mark", None)
    return f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""


def _syntax_error(source: str, exc: yaml.YAMLError) -> ConfigError:
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    problem = getattr(exc, "problem", None) or str(exc)
    return ConfigError(source, [f"{where}YAML syntax error: {problem}"])


_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_yaml(text: str, source: str = "<yaml>") -> Any:
    """``yaml.safe_load`` within :data:`MAX_YAML_BYTES`, :data:`MAX_YAML_NODES` and
    :data:`MAX_YAML_DEPTH`: every YAML text the router reads goes through here.
    Raises :class:`YamlLimitError` or ``ConfigError`` (syntax) with the line."""
    _check_yaml_limits(text, source)
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a safe loader
    except yaml.YAMLError as exc:
        raise _syntax_error(source, exc) from None


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


def env_override_applies(name: str) -> bool:
    """The environment variable ``name`` overrides a configuration key."""
    if not name.startswith(ENV_PREFIX) or name == ENV_PREFIX + "CONFIG":
        return False
    return name[len(ENV_PREFIX) :].split("__")[0].lower() in NODE_KEYS


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """``DICOMROUTER_DICOM__PORT=104`` becomes ``{"dicom": {"port": "104"}}``."""
    overrides: dict[str, Any] = {}
    for name, value in environ.items():
        if not env_override_applies(name):
            continue
        path = [part.lower() for part in name[len(ENV_PREFIX) :].split("__")]
        node = overrides
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = load_yaml(value, name) if value else value
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
    data: Any,
    source: str = "<config>",
    environ: Mapping[str, str] | None = None,
    base_dir: Path | None = None,
) -> RouterConfig:
    """Validate ``data`` (with the environment overrides). Files the configuration
    names (TLS certificates and keys) are made absolute against ``base_dir`` (default:
    the current directory) and must exist and be readable."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, ["the file must be a YAML mapping of keys to values"])
    data = _merge(data, env_overrides(os.environ if environ is None else environ))
    try:
        return RouterConfig.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as exc:
        raise ConfigError(source, format_validation_error(exc)) from None


def load_config(path: str | Path | None, environ: Mapping[str, str] | None = None) -> RouterConfig:
    """Load ``path`` (or the embedded defaults when ``None``), relative paths resolved
    against the file's folder so that ``storage.path: ./data`` means next to the file
    (and ``http.tls.certificate: tls/server.crt`` a file beside it)."""
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
    data = load_yaml(text, source)
    config = parse_config(data, source, environ, base_dir)
    if not config.storage.path.is_absolute():
        config.storage.path = (base_dir / config.storage.path).resolve()
    return config
