"""The condition tree that a compiled ``when:`` mapping becomes.

Leaves (:class:`Match`, :class:`Exists`) read one field; :class:`AllOf`,
:class:`AnyOf` and :class:`Not` compose them. Trees are immutable and hold
only precompiled tests, so one tree is shared by every evaluation.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from .facts import InstanceFacts
from .fields import Field, Kind
from .operators import ValueTest
from .values import format_number


class Condition(ABC):
    """A compiled rule that can be evaluated against one instance."""

    __slots__ = ()

    @abstractmethod
    def evaluate(self, facts: InstanceFacts) -> bool:
        """True when the instance matches."""

    @abstractmethod
    def explain(self, facts: InstanceFacts) -> str:
        """Short human text stating the facts that decided the result."""

    @abstractmethod
    def describe(self) -> str:
        """The rule as readable text, e.g. ``Modality = CT and ...``."""

    @abstractmethod
    def keywords(self) -> set[str]:
        """DICOM keywords the rule reads (pseudo-keys excluded)."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"


class Always(Condition):
    """An absent ``when:``: every instance matches."""

    __slots__ = ()

    def evaluate(self, facts: InstanceFacts) -> bool:
        return True

    def explain(self, facts: InstanceFacts) -> str:
        return "no condition: always matches"

    def describe(self) -> str:
        return "always"

    def keywords(self) -> set[str]:
        return set()


def show_values(values: Sequence[Any]) -> str:
    """Instance values for ``explain()``; multi-values joined with DICOM's backslash."""
    if len(values) == 1 and isinstance(values[0], int | float):
        return format_number(values[0])
    if len(values) == 1 and isinstance(values[0], datetime):
        return values[0].strftime("%a %Y-%m-%d %H:%M")
    texts = [format_number(v) if isinstance(v, int | float) else str(v) for v in values]
    return "'" + "\\".join(texts) + "'"


class Match(Condition):
    """One operator on one field; true if ANY value of the field passes."""

    __slots__ = ("field", "test")

    def __init__(self, field: Field, test: ValueTest) -> None:
        self.field, self.test = field, test

    def evaluate(self, facts: InstanceFacts) -> bool:
        test = self.test
        # A plain loop: cheaper than any() with a generator on this hot path.
        for value in self.field.values(facts):  # noqa: SIM110
            if test(value):
                return True
        return False

    def explain(self, facts: InstanceFacts) -> str:
        values = self.field.values(facts)
        if not values:
            return f"{self.field.name} is missing"
        matched = any(self.test(value) for value in values)
        return f"{self.field.name} {show_values(values)} {self.test.phrase(matched)}"

    def describe(self) -> str:
        return f"{self.field.name} {self.test.describe()}"

    def keywords(self) -> set[str]:
        return {self.field.keyword} if self.field.keyword else set()


class Exists(Condition):
    """``exists: true``: present with a non-empty value; ``exists: false``: the opposite."""

    __slots__ = ("field", "present")

    def __init__(self, field: Field, present: bool) -> None:
        self.field, self.present = field, present

    def evaluate(self, facts: InstanceFacts) -> bool:
        return bool(self.field.values(facts)) is self.present

    def explain(self, facts: InstanceFacts) -> str:
        values = self.field.values(facts)
        if not values:
            return f"{self.field.name} is missing"
        if self.field.kind is Kind.BINARY:
            return f"{self.field.name} is present"
        return f"{self.field.name} is present ({show_values(values)})"

    def describe(self) -> str:
        return f"{self.field.name} {'exists' if self.present else 'does not exist'}"

    def keywords(self) -> set[str]:
        return {self.field.keyword} if self.field.keyword else set()


class AllOf(Condition):
    """AND: several keys of one mapping, several operators of one key, or ``all:``."""

    __slots__ = ("children",)

    def __init__(self, children: Sequence[Condition]) -> None:
        self.children = tuple(children)

    def evaluate(self, facts: InstanceFacts) -> bool:
        return all(child.evaluate(facts) for child in self.children)

    def explain(self, facts: InstanceFacts) -> str:
        return "; ".join(_wrap(child, child.explain(facts)) for child in self.children)

    def describe(self) -> str:
        return " and ".join(_wrap(child, child.describe(), AnyOf) for child in self.children)

    def keywords(self) -> set[str]:
        return set().union(*(child.keywords() for child in self.children))


class AnyOf(Condition):
    """OR: ``any:``. Explains the alternatives that matched, or all of them when none did."""

    __slots__ = ("children",)

    def __init__(self, children: Sequence[Condition]) -> None:
        self.children = tuple(children)

    def evaluate(self, facts: InstanceFacts) -> bool:
        return any(child.evaluate(facts) for child in self.children)

    def explain(self, facts: InstanceFacts) -> str:
        matching = [child for child in self.children if child.evaluate(facts)]
        shown = matching or self.children
        text = " or ".join(_wrap(child, child.explain(facts)) for child in shown)
        return text if matching else f"none of: {text}"

    def describe(self) -> str:
        return " or ".join(_wrap(child, child.describe(), AllOf) for child in self.children)

    def keywords(self) -> set[str]:
        return set().union(*(child.keywords() for child in self.children))


class Not(Condition):
    """Negation of the whole inner condition (so a missing element makes it true)."""

    __slots__ = ("child",)

    def __init__(self, child: Condition) -> None:
        self.child = child

    def evaluate(self, facts: InstanceFacts) -> bool:
        return not self.child.evaluate(facts)

    def explain(self, facts: InstanceFacts) -> str:
        # The inner explanation states facts ("Modality 'MR' does not equal 'CT'"),
        # which is already the reason for the negated result.
        return self.child.explain(facts)

    def describe(self) -> str:
        inner = self.child.describe()
        return f"not ({inner})" if isinstance(self.child, AllOf | AnyOf) else f"not {inner}"

    def keywords(self) -> set[str]:
        return self.child.keywords()


def _wrap(child: Condition, text: str, kind: type | tuple[type, ...] = (AllOf, AnyOf)) -> str:
    return f"({text})" if isinstance(child, kind) else text
