"""Static lint: find rules that can provably never match, before any study is lost.

The analysis is deliberately conservative: it only reports what holds for every
possible instance, so a ``None`` does not promise the rule can match.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from .conditions import AllOf, Always, AnyOf, Condition, Exists, Match, Not
from .operators import Between, Compare


def never_matches(cond: Condition) -> str | None:
    """A human reason if ``cond`` can never match any instance, else None."""
    return _never(cond)


def _never(cond: Condition) -> str | None:
    if isinstance(cond, Match):
        reason = cond.test.never()
        return f"{cond.field.name}: {reason}" if reason else None
    if isinstance(cond, Not):
        if _always(cond.child):
            return f"'not' of a condition that always matches ({cond.child.describe()})"
        return None
    if isinstance(cond, AnyOf):
        reasons = [_never(child) for child in cond.children]
        if all(reasons):
            return "no alternative of 'any' can match: " + "; ".join(r or "" for r in reasons)
        return None
    if isinstance(cond, AllOf):
        for child in cond.children:
            reason = _never(child)
            if reason:
                return reason
        return _conflict(list(_flatten(cond)))
    return None


def _always(cond: Condition) -> bool:
    if isinstance(cond, Always):
        return True
    if isinstance(cond, AllOf):
        return all(_always(child) for child in cond.children)
    if isinstance(cond, AnyOf):
        return any(_always(child) for child in cond.children) or _excluded_middle(cond)
    if isinstance(cond, Not):
        return _never(cond.child) is not None
    return False


def _flatten(cond: AllOf) -> Iterator[Condition]:
    for child in cond.children:
        if isinstance(child, AllOf):
            yield from _flatten(child)
        else:
            yield child


def _conflict(conjuncts: list[Condition]) -> str | None:
    """Contradictions between the members of one AND."""
    described = {c.describe() for c in conjuncts if not isinstance(c, Not)}
    for cond in conjuncts:
        if isinstance(cond, Not) and cond.child.describe() in described:
            return f"'{cond.child.describe()}' and '{cond.describe()}' cannot both hold"

    absent = {c.field.name for c in conjuncts if isinstance(c, Exists) and not c.present}
    for cond in conjuncts:
        if isinstance(cond, Exists) and not cond.present:
            continue
        if isinstance(cond, Match | Exists) and cond.field.name in absent:
            return (
                f"{cond.field.name}: 'exists: false' cannot hold together with "
                f"'{cond.describe()}' (a missing element matches nothing)"
            )

    # A single-valued element has one value, so it must lie in every literal set;
    # multi-valued ones (ImageType...) can satisfy each test with another value.
    allowed: dict[str, tuple[frozenset[Any], list[Match]]] = {}
    for cond in conjuncts:
        if not isinstance(cond, Match) or not cond.field.single_valued:
            continue
        literals = cond.test.literals()
        if literals is None:
            continue
        name = cond.field.name
        previous, sources = allowed.get(name, (literals, []))
        remaining = previous & literals
        sources = [*sources, cond]
        if not remaining:
            texts = " and ".join(f"'{source.describe()}'" for source in sources)
            return f"{name} has a single value: {texts} cannot all hold"
        allowed[name] = (remaining, sources)
    return _empty_range(conjuncts)


def _empty_range(conjuncts: list[Condition]) -> str | None:
    """Comparisons on one single-valued element whose ranges do not meet, e.g.
    ``{gt: 10, lt: 5}`` or ``ge`` a date after the ``le`` one."""
    by_field: dict[str, list[Match]] = {}
    for cond in conjuncts:
        if (
            isinstance(cond, Match)
            and cond.field.single_valued
            and isinstance(cond.test, Compare | Between)
        ):
            by_field.setdefault(cond.field.name, []).append(cond)
    for name, conds in by_field.items():
        if len(conds) < 2:
            continue
        low: tuple[Any, bool] | None = None  # (bound, inclusive)
        high: tuple[Any, bool] | None = None
        try:
            for cond in conds:
                test = cond.test
                if isinstance(test, Between):
                    lows, highs = [(test.low, True)], [(test.high, True)]
                elif not isinstance(test, Compare):
                    continue
                elif test.op in ("gt", "ge"):
                    lows, highs = [(test.bound, test.op == "ge")], []
                else:
                    lows, highs = [], [(test.bound, test.op == "le")]
                for bound in lows:
                    if low is None or bound[0] > low[0] or (bound[0] == low[0] and not bound[1]):
                        low = bound
                for bound in highs:
                    if high is None or bound[0] < high[0] or (bound[0] == high[0] and not bound[1]):
                        high = bound
            empty = (
                low is not None
                and high is not None
                and (low[0] > high[0] or (low[0] == high[0] and not (low[1] and high[1])))
            )
        except TypeError:  # bounds of kinds that do not compare: say nothing
            continue
        if empty:
            texts = " and ".join(f"'{cond.describe()}'" for cond in conds)
            return f"{name} has a single value: {texts} cannot all hold"
    return None


def _excluded_middle(cond: AnyOf) -> bool:
    """``X or not X`` (including ``exists: true`` or ``exists: false``) always holds."""
    texts = {child.describe() for child in cond.children}
    for child in cond.children:
        if isinstance(child, Not) and child.child.describe() in texts:
            return True
        if (
            isinstance(child, Exists)
            and child.present
            and f"{child.field.name} does not exist" in texts
        ):
            return True
    return False
