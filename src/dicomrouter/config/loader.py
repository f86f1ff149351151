"""Load the YAML file, apply environment overrides, and report errors by key path."""

from __future__ import annotations

import difflib
import os
import types
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from .models import DESTINATION_MODELS, ConfigProblems, RouterConfig, reference_problems
from .transforms import STEP_KINDS

ENV_PREFIX = "DICOMROUTER_"
#: Top-level sections that environment variables may override (the node settings).
NODE_KEYS = {"ae_title", "node", "dicom", "storage", "database", "log_level", "dispatch", "http"}


#: The largest YAML text parsed at all (the HTTP service bounds uploads lower, with
#: ``http.max_config_size``). A configuration is tens of kilobytes.
MAX_YAML_BYTES = 8 * 1024 * 1024
#: Nodes the document may hold once every alias is expanded. Aliases are shared
#: when parsed, but validating, redacting and comparing walk the expanded tree, so
#: a few hundred bytes of nested aliases ("billion laughs") would cost minutes.
MAX_YAML_NODES = 200_000
#: Deepest nesting of mappings and sequences (a configuration needs about ten).
MAX_YAML_DEPTH = 64


@dataclass(frozen=True)
class ConfigIssue:
    """One problem: the key path it is about (empty: the document as a whole, e.g. a
    YAML syntax error, whose message gives the line) and what is wrong."""

    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.key}: {self.message}" if self.key else self.message

    def as_dict(self) -> dict[str, str]:
        return {"key": self.key, "message": self.message}


class ConfigError(Exception):
    """A configuration problem; ``errors`` holds one ``"key.path: reason"`` per problem
    (``issues``: the same as :class:`ConfigIssue`, key and message apart)."""

    def __init__(self, source: str, errors: list[str] | list[ConfigIssue]):
        self.source = source
        self.issues = [e if isinstance(e, ConfigIssue) else ConfigIssue("", e) for e in errors]
        self.errors = [str(issue) for issue in self.issues]
        super().__init__(f"{source}: " + "; ".join(self.errors))

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
    :data:`MAX_YAML_DEPTH`, refusing duplicate keys: every YAML text the router reads
    goes through here. Raises :class:`YamlLimitError` or ``ConfigError`` (syntax,
    duplicate keys) with the line."""
    _check_yaml_limits(text, source)
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        duplicates = _duplicate_keys(loader, node)
        if duplicates:
            raise ConfigError(source, duplicates)
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise _syntax_error(source, exc) from None
    finally:
        loader.dispose()


def _duplicate_keys(loader: Any, root: yaml.Node) -> list[ConfigIssue]:
    """Every key written twice in the same mapping (YAML keeps the last one silently:
    a second ``auth:`` block pasted below the first would replace it). A key that
    overrides one brought in by a merge (``<<: *defaults``) is not a duplicate."""
    found: list[ConfigIssue] = []
    seen: set[int] = set()  # an aliased node is checked once, where it is defined
    stack: list[tuple[yaml.Node, tuple[str | int, ...]]] = [(root, ())]
    while stack:
        node, path = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            stack += [(child, (*path, i)) for i, child in reversed(list(enumerate(node.value)))]
        elif isinstance(node, yaml.MappingNode):
            first: dict[Any, int] = {}
            children = []
            for key_node, value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = _key(loader, key_node)
                line = key_node.start_mark.line + 1
                if key is not None and key in first:
                    where = _format_location((*path, str(key)))
                    found.append(
                        ConfigIssue(
                            where,
                            f"duplicate key {str(key)!r} at line {line} "
                            f"(first at line {first[key]}); YAML would keep only the last",
                        )
                    )
                elif key is not None:
                    first[key] = line
                children.append((value_node, (*path, str(key))))
            stack += reversed(children)
    return found


def _key(loader: Any, node: yaml.Node) -> Any:
    """A mapping key as YAML reads it (``1`` and ``"1"`` differ, ``yes`` is ``True``);
    None for a key that is not a plain value."""
    if not isinstance(node, yaml.ScalarNode):
        return None
    try:
        key = loader.construct_object(node)
        hash(key)
    except (yaml.YAMLError, TypeError, ValueError):
        return None
    return key


def _format_location(loc: tuple[Any, ...], data: Any = None) -> str:
    """``("routes", 1, "trigger")`` as ``routes[1].trigger``; with the document's
    ``data``, a list item that has a ``name`` says it: ``routes[1] (ct-to-pacs).trigger``."""
    text = ""
    node = data
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
            node = node[part] if isinstance(node, list) and 0 <= part < len(node) else None
            name = node.get("name") if isinstance(node, dict) else None
            if isinstance(name, str) and name:
                text += f" ({name})"
        else:
            text += ("." if text else "") + str(part)
            node = node.get(part) if isinstance(node, dict) else None
    return text


def _unwrap(annotation: Any) -> Any:
    """The type under ``Annotated[...]`` and ``X | None``."""
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation = get_args(annotation)[0]
        elif origin in (Union, types.UnionType):
            args = [a for a in get_args(annotation) if a is not type(None)]
            models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
            annotation = (models or args)[0]
        else:
            return annotation


def known_keys(loc: tuple[Any, ...], model: type[BaseModel] = RouterConfig) -> list[str]:
    """The keys the model accepts at ``loc`` (``("dicom",)``: the ``dicom`` section's),
    aliases included; empty when ``loc`` is not a section of the model."""
    annotation: Any = model
    for part in loc:
        annotation = _unwrap(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            field = annotation.model_fields.get(part) if isinstance(part, str) else None
            if field is None:
                return []
            annotation = field.annotation
        elif get_origin(annotation) is dict:
            annotation = get_args(annotation)[1]
        elif get_origin(annotation) is list:
            annotation = get_args(annotation)[0]
        else:
            return []
    annotation = _unwrap(annotation)
    if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
        return []
    names: list[str] = []
    for name, field in annotation.model_fields.items():
        names += [name] + [a for a in (field.alias, field.validation_alias) if isinstance(a, str)]
    return names


def _did_you_mean(loc: tuple[Any, ...], model: type[BaseModel], data: Any = None) -> str:
    if not loc or not isinstance(loc[-1], str):
        return ""
    keys = known_keys(loc[:-1], model)
    if len(loc) == 3 and loc[0] == "destinations" and model is RouterConfig:
        # A destination's keys are its kind's (the tag is gone from ``loc``).
        node = data.get("destinations") if isinstance(data, dict) else None
        node = node.get(loc[1]) if isinstance(node, dict) else None
        kind = node.get("type", "dicom") if isinstance(node, dict) else "dicom"
        if kind in DESTINATION_MODELS:
            keys = list(DESTINATION_MODELS[kind].model_fields)
    close = difflib.get_close_matches(loc[-1], keys, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _without_union_tag(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """A transform step is a union told apart by its key, and pydantic puts that tag
    in the path (``transforms.x[1].replace.replace.pattern``): drop it. The same for a
    destination's ``type`` (``destinations.x.folder.path``)."""
    if len(loc) > 3 and loc[0] == "transforms" and isinstance(loc[2], int) and loc[3] in STEP_KINDS:
        return loc[:3] + loc[4:]
    if len(loc) > 2 and loc[0] == "destinations" and loc[2] in DESTINATION_MODELS:
        return loc[:2] + loc[3:]
    return loc


def _destination_type_error(loc: tuple[Any, ...], data: Any) -> tuple[tuple[Any, ...], str]:
    """Where and why a destination's kind could not be told (``destinations.x``)."""
    known = ", ".join(DESTINATION_MODELS)
    node = data
    for part in loc:
        node = node.get(part) if isinstance(node, dict) else None
    if not isinstance(node, dict):
        return loc, f"a destination is a mapping of its keys (with a type: {known})"
    return (*loc, "type"), f"unknown destination type {node.get('type')!r}; known: {known}"


def validation_issues(
    exc: ValidationError, data: Any = None, model: type[BaseModel] = RouterConfig
) -> list[ConfigIssue]:
    """Every error pydantic found, each with its key path (route names added from
    ``data``, the document validated), unknown keys with the nearest known one."""
    issues = []
    for error in exc.errors():
        loc = _without_union_tag(
            tuple(p for p in error["loc"] if p not in ("function-after", "function-before"))
        )
        cause = (error.get("ctx") or {}).get("error")
        if isinstance(cause, ConfigProblems):
            issues += [
                ConfigIssue(_format_location((*loc, *sub), data), message)
                for sub, message in cause.problems
            ]
            continue
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "destination_type":
            loc, message = _destination_type_error(loc, data)
        elif error["type"] == "extra_forbidden":
            message = "unknown key" + _did_you_mean(loc, model, data)
        elif error["type"] == "missing":
            message = "required key is missing"
        issues.append(ConfigIssue(_format_location(loc, data), message))
    return issues


def format_validation_error(
    exc: ValidationError, data: Any = None, model: type[BaseModel] = RouterConfig
) -> list[str]:
    """:func:`validation_issues` as ``"key.path: reason"`` texts."""
    return [str(issue) for issue in validation_issues(exc, data, model)]


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
        issues = validation_issues(exc, data)
        if not any(error["loc"] == () for error in exc.errors()):
            # An error in a section stops the whole-file cross-checks: report the
            # routes' references from the raw data, so one run lists every error.
            issues += [
                ConfigIssue(_format_location(loc, data), message)
                for loc, message in reference_problems(
                    data.get("routes"), data.get("destinations"), data.get("transforms")
                )
            ]
        raise ConfigError(source, issues) from None


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
