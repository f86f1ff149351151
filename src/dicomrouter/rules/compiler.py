"""Compile a ``when:`` mapping into a :class:`Condition` tree, validating as we go.

All checks happen here, once, at config load: every error carries the key path
inside ``when`` so the admin sees ``when.all[1].Modality: ...`` instead of a
routing failure at 3 a.m.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from collections.abc import Callable, Mapping
from typing import Any

from dicomrouter.units import TimeWindow

from . import operators as ops
from .conditions import AllOf, Always, AnyOf, Condition, Exists, Match, Not
from .errors import RuleError
from .fields import Field, Kind, resolve_field
from .values import parse_date, parse_datetime, parse_time, to_number, wildcard_regex

OPERATORS = (
    "equals",
    "in",
    "contains",
    "startswith",
    "regex",
    "exists",
    "lt",
    "le",
    "gt",
    "ge",
    "between",
    "not",
)
_KIND_OPERATORS = {
    Kind.ADDRESS: ("equals", "in", "exists", "not"),
    Kind.MOMENT: ("equals", "in", "between", "exists", "not"),
    Kind.BINARY: ("exists", "not"),
}
_PARSERS: dict[Kind, Callable[[Any], Any]] = {
    Kind.DATE: parse_date,
    Kind.TIME: parse_time,
    Kind.DATETIME: parse_datetime,
    Kind.NUMBER: to_number,
    Kind.TEXT: to_number,  # ordering a text element only makes sense for numeric strings
}
_EXAMPLES = {Kind.DATE: "20240131", Kind.TIME: "083000", Kind.DATETIME: "20240131083000"}
_YAML_HINT = "quote it in YAML"

ALWAYS = Always()


def compile_condition(spec: Mapping[str, Any] | None) -> Condition:
    """Compile a ``when:`` mapping; ``None`` (or an empty mapping) always matches."""
    if spec is None:
        return ALWAYS
    if not isinstance(spec, Mapping):
        raise RuleError("", f"expected a mapping of keywords to conditions, got {_kind(spec)}")
    return _compile_mapping(spec, "") if spec else ALWAYS


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return f"a list of {len(value)} item{'' if len(value) == 1 else 's'}"
    return repr(value)


def _compile_mapping(spec: Mapping[str, Any], path: str) -> Condition:
    parts: list[Condition] = []
    for key, value in spec.items():
        key_path = _join(path, key)
        if key in ("all", "any"):
            if not isinstance(value, list | tuple):
                raise RuleError(key_path, f"'{key}' needs a list of conditions, got {_kind(value)}")
            if not value:
                raise RuleError(key_path, f"'{key}' needs at least one condition")
            children = [_compile_nested(item, f"{key_path}[{i}]") for i, item in enumerate(value)]
            parts.append(AllOf(children) if key == "all" else AnyOf(children))
        elif key == "not":
            parts.append(Not(_compile_nested(value, key_path)))
        else:
            parts.append(_compile_field(resolve_field(key, key_path), value, key_path))
    return parts[0] if len(parts) == 1 else AllOf(parts)


def _compile_nested(spec: Any, path: str) -> Condition:
    if not isinstance(spec, Mapping):
        raise RuleError(path, f"expected a mapping of conditions, got {_kind(spec)}")
    if not spec:
        raise RuleError(path, "empty condition")
    return _compile_mapping(spec, path)


def _compile_field(field: Field, spec: Any, path: str) -> Condition:
    """A key's value: a scalar (equals), a list (in) or a mapping of operators (AND)."""
    if isinstance(spec, Mapping):
        if not spec:
            raise RuleError(path, "no operator given; valid: " + ", ".join(_valid(field)))
        parts = [_compile_operator(field, op, arg, _join(path, op)) for op, arg in spec.items()]
        return parts[0] if len(parts) == 1 else AllOf(parts)
    if isinstance(spec, list | tuple):
        return _compile_operator(field, "in", spec, path)
    return _compile_operator(field, "equals", spec, path)


def _valid(field: Field) -> tuple[str, ...]:
    return _KIND_OPERATORS.get(field.kind, OPERATORS)


def _compile_operator(field: Field, op: Any, arg: Any, path: str) -> Condition:
    if op not in OPERATORS:
        close = difflib.get_close_matches(str(op), OPERATORS, n=1, cutoff=0.7)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise RuleError(path, f"unknown operator {op!r}{hint}; valid: {', '.join(OPERATORS)}")
    if op not in _valid(field):
        raise RuleError(
            path,
            f"operator '{op}' is not supported for {field.name} ({field.describe_kind()}); "
            f"valid: {', '.join(_valid(field))}",
        )
    if op == "not":
        return Not(_compile_field(field, arg, path))
    if op == "exists":
        if not isinstance(arg, bool):
            raise RuleError(path, f"'exists' needs true or false, got {_kind(arg)}")
        return Exists(field, arg)
    return Match(field, _compile_test(field, op, arg, path))


def _compile_test(field: Field, op: str, arg: Any, path: str) -> ops.ValueTest:
    if op == "equals":
        if isinstance(arg, list | tuple | Mapping):
            raise RuleError(
                path, f"'equals' takes one value, got {_kind(arg)}; use 'in' for a list"
            )
        return _equals(field, arg, path)
    if op == "in":
        if not isinstance(arg, list | tuple):
            raise RuleError(path, f"'in' needs a list, got {_kind(arg)}")
        return _in(field, arg, path)
    if op in ("contains", "startswith", "regex"):
        text = _text(op, arg, path)
        if op == "contains":
            return ops.Contains(text)
        if op == "startswith":
            return ops.StartsWith(text)
        try:
            return ops.Regex(re.compile(text))
        except re.error as exc:
            raise RuleError(path, f"invalid regular expression {text!r}: {exc}") from exc
    if field.kind is Kind.MOMENT:  # between
        return ops.InWindows("between", [_window_between(arg, path)])
    parse = _PARSERS[field.kind]
    if op == "between":
        if not isinstance(arg, list | tuple) or len(arg) != 2:
            raise RuleError(path, f"'between' needs a list [low, high], got {_kind(arg)}")
        low = _bound(field, "between", arg[0], f"{path}[0]")
        high = _bound(field, "between", arg[1], f"{path}[1]")
        return ops.Between(low, high, (arg[0], arg[1]), parse)
    return ops.Compare(op, _bound(field, op, arg, path), arg, parse)


def _text(op: str, arg: Any, path: str) -> str:
    if isinstance(arg, str):
        return arg
    if isinstance(arg, int | float) and not isinstance(arg, bool):
        return str(arg)
    raise RuleError(path, f"'{op}' needs a string, got {_kind(arg)}")


def _equals(field: Field, arg: Any, path: str) -> ops.ValueTest:
    if field.kind is Kind.ADDRESS:
        return ops.InNetworks("equals", [_network(arg, path)])
    if field.kind is Kind.MOMENT:
        return ops.InWindows("equals", [_window(arg, path)])
    value, pattern = _literal(field, arg, path)
    if pattern is not None:
        return ops.Wildcard(str(arg).strip(" \0"), pattern)
    return ops.Equals(value, arg, _instance_parser(field))


def _in(field: Field, items: list[Any] | tuple[Any, ...], path: str) -> ops.ValueTest:
    if field.kind is Kind.ADDRESS:
        return ops.InNetworks("in", [_network(v, f"{path}[{i}]") for i, v in enumerate(items)])
    if field.kind is Kind.MOMENT:
        return ops.InWindows("in", [_window(v, f"{path}[{i}]") for i, v in enumerate(items)])
    literals, patterns = set(), []
    for index, item in enumerate(items):
        if isinstance(item, list | tuple | Mapping):
            raise RuleError(f"{path}[{index}]", f"expected a single value, got {_kind(item)}")
        value, pattern = _literal(field, item, f"{path}[{index}]")
        if pattern is None:
            literals.add(value)
        else:
            patterns.append(pattern)
    return ops.In(frozenset(literals), patterns, list(items), _instance_parser(field))


def _instance_parser(field: Field) -> Callable[[Any], Any] | None:
    """How instance values are parsed for equality: text is compared as-is."""
    return None if field.kind is Kind.TEXT else _PARSERS[field.kind]


def _literal(field: Field, arg: Any, path: str) -> tuple[Any, re.Pattern[str] | None]:
    """An equality value parsed like the field's values, or a wildcard pattern."""
    if arg is None or isinstance(arg, bool):
        hint = "; use 'exists' to test presence" if arg is None else f" ({_YAML_HINT})"
        raise RuleError(path, f"expected a value for {field.name}, got {_kind(arg)}{hint}")
    text = str(arg).strip(" \0")
    if not text:
        raise RuleError(path, "an empty value never matches; use 'exists: false' for empty")
    pattern = wildcard_regex(text) if isinstance(arg, str) else None
    if pattern is not None or field.kind is Kind.TEXT:
        return text, pattern
    if field.kind is Kind.BINARY:  # pragma: no cover - excluded by _valid()
        raise RuleError(path, f"{field.name} is binary")
    value = _PARSERS[field.kind](arg)
    if value is None:
        raise RuleError(path, "expected " + _bad_value(field, arg))
    return value, None


def _bound(field: Field, op: str, arg: Any, path: str) -> Any:
    """A bound of lt/le/gt/ge/between: a number, or a date/time for DA/TM/DT elements."""
    if field.kind is Kind.TEXT:
        value = None if isinstance(arg, bool) else to_number(arg)
        if value is None:
            raise RuleError(
                path,
                f"'{op}' compares numbers, dates and times: {_kind(arg)} is not a number "
                f"and {field.name} ({field.describe_kind()}) is not a date or time",
            )
        return value
    if arg is None or isinstance(arg, bool | list | tuple | Mapping):
        value = None
    else:
        value = _PARSERS[field.kind](arg)
    if value is None:
        raise RuleError(path, f"'{op}' needs " + _bad_value(field, arg))
    return value


def _bad_value(field: Field, arg: Any) -> str:
    """``a number for Rows (VR US), got 'abc'``: completes "expected ..." / "'lt' needs ..."."""
    if field.kind is Kind.NUMBER:
        return f"a number for {field.name} ({field.describe_kind()}), got {_kind(arg)}"
    hint = f" ({_YAML_HINT}: YAML drops leading zeros)" if isinstance(arg, int) else ""
    return (
        f"a {field.kind.value} such as '{_EXAMPLES[field.kind]}' for {field.name} "
        f"({field.describe_kind()}), got {_kind(arg)}{hint}"
    )


def _network(arg: Any, path: str) -> ops.Network:
    if not isinstance(arg, str):
        raise RuleError(path, f"expected an IP address or CIDR network, got {_kind(arg)}")
    try:
        return ipaddress.ip_network(arg.strip(), strict=False)
    except ValueError as exc:
        raise RuleError(path, f"invalid IP address or CIDR network {arg!r}") from exc


def _window(arg: Any, path: str) -> TimeWindow:
    if not isinstance(arg, str):
        raise RuleError(
            path,
            f"expected a time window such as 'Mon-Fri 08:00-18:00', got {_kind(arg)} "
            "(quote times in YAML: unquoted 19:00 is read as a number)",
        )
    try:
        return TimeWindow.parse(arg)
    except ValueError as exc:
        raise RuleError(path, str(exc)) from exc


def _window_between(arg: Any, path: str) -> TimeWindow:
    if not isinstance(arg, list | tuple) or len(arg) != 2:
        raise RuleError(path, f"'between' needs a list [start, end], got {_kind(arg)}")
    for index, item in enumerate(arg):
        if not isinstance(item, str):
            raise RuleError(
                f"{path}[{index}]",
                f"expected a time such as '19:00', got {_kind(item)} "
                "(quote times in YAML: unquoted 19:00 is read as a number)",
            )
    return _window(f"{arg[0]}-{arg[1]}", path)
