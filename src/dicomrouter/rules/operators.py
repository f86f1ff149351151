"""Value tests: one operator applied to ONE normalized value.

Everything expensive (regex compilation, date parsing of the rule side, CIDR
parsing) happens in the constructors, at config load; ``__call__`` runs for
every value of every received instance and stays a couple of comparisons.
"""

from __future__ import annotations

import ipaddress
import operator
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

from dicomrouter.units import TimeWindow

from .values import quoted, token

Parser = Callable[[Any], Any]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ValueTest(ABC):
    """An operator bound to its rule value."""

    op: str = ""

    @abstractmethod
    def __call__(self, value: Any) -> bool:
        """True when this single value satisfies the operator."""

    @abstractmethod
    def describe(self) -> str:
        """Rule text after the key, e.g. ``= CT`` or ``contains 'HEAD'``."""

    @abstractmethod
    def phrase(self, matched: bool) -> str:
        """Explanation after the value, e.g. ``equals 'CT'`` / ``does not equal 'CT'``."""

    def literals(self) -> frozenset[Any] | None:
        """The only values that can match, when that set is known (used by the linter)."""
        return None

    def never(self) -> str | None:
        """Why this test can never match any value, if that is visible statically."""
        return None


class Equals(ValueTest):
    """Exact equality after parsing the instance value like the rule value."""

    op = "equals"

    def __init__(self, expected: Any, shown: Any, parse: Parser | None = None) -> None:
        self.expected, self.shown, self.parse = expected, shown, parse

    def __call__(self, value: Any) -> bool:
        parse = self.parse
        return (parse(value) if parse else value) == self.expected

    def describe(self) -> str:
        return f"= {token(self.shown)}"

    def phrase(self, matched: bool) -> str:
        return ("equals " if matched else "does not equal ") + quoted(self.shown)

    def literals(self) -> frozenset[Any] | None:
        return frozenset((self.expected,))


class Wildcard(ValueTest):
    """DICOM ``*``/``?`` matching on the string form of the value (case-sensitive)."""

    op = "equals"

    def __init__(self, pattern: str, regex: re.Pattern[str]) -> None:
        self.pattern, self.regex = pattern, regex

    def __call__(self, value: Any) -> bool:
        return self.regex.fullmatch(str(value)) is not None

    def describe(self) -> str:
        return f"= {token(self.pattern)}"

    def phrase(self, matched: bool) -> str:
        return ("matches " if matched else "does not match ") + quoted(self.pattern)


class In(ValueTest):
    """Equals any of a list: a set lookup for literals, then the wildcard patterns."""

    op = "in"

    def __init__(
        self,
        expected: frozenset[Any],
        patterns: Sequence[re.Pattern[str]],
        shown: Sequence[Any],
        parse: Parser | None = None,
    ) -> None:
        self.expected, self.patterns, self.shown, self.parse = expected, patterns, shown, parse

    def __call__(self, value: Any) -> bool:
        parse = self.parse
        if (parse(value) if parse else value) in self.expected:
            return True
        return any(p.fullmatch(str(value)) for p in self.patterns)

    def describe(self) -> str:
        return "in [" + ", ".join(token(v) for v in self.shown) + "]"

    def phrase(self, matched: bool) -> str:
        return ("is in " if matched else "is not in ") + self.describe()[3:]

    def literals(self) -> frozenset[Any] | None:
        return None if self.patterns else self.expected

    def never(self) -> str | None:
        return "'in' list is empty" if not self.shown else None


class Contains(ValueTest):
    op = "contains"

    def __init__(self, needle: str) -> None:
        self.needle = needle

    def __call__(self, value: Any) -> bool:
        return self.needle in str(value)

    def describe(self) -> str:
        return f"contains {quoted(self.needle)}"

    def phrase(self, matched: bool) -> str:
        return ("contains " if matched else "does not contain ") + quoted(self.needle)


class StartsWith(ValueTest):
    op = "startswith"

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def __call__(self, value: Any) -> bool:
        return str(value).startswith(self.prefix)

    def describe(self) -> str:
        return f"starts with {quoted(self.prefix)}"

    def phrase(self, matched: bool) -> str:
        return ("starts with " if matched else "does not start with ") + quoted(self.prefix)


class Regex(ValueTest):
    """``re.search`` (not fullmatch): anchor with ``^``/``$`` when needed."""

    op = "regex"

    def __init__(self, regex: re.Pattern[str]) -> None:
        self.regex = regex

    def __call__(self, value: Any) -> bool:
        return self.regex.search(str(value)) is not None

    def describe(self) -> str:
        return f"matches /{self.regex.pattern}/"

    def phrase(self, matched: bool) -> str:
        return ("matches " if matched else "does not match ") + f"/{self.regex.pattern}/"


_COMPARISONS: dict[str, tuple[str, Callable[[Any, Any], bool]]] = {
    "lt": ("<", operator.lt),
    "le": ("<=", operator.le),
    "gt": (">", operator.gt),
    "ge": (">=", operator.ge),
}


class Compare(ValueTest):
    """``lt``/``le``/``gt``/``ge`` on parsed numbers, dates or times."""

    def __init__(self, op: str, bound: Any, shown: Any, parse: Parser) -> None:
        self.op = op
        self.symbol, self.compare = _COMPARISONS[op]
        self.bound, self.shown, self.parse = bound, shown, parse

    def __call__(self, value: Any) -> bool:
        parsed = self.parse(value)
        return parsed is not None and self.compare(parsed, self.bound)

    def describe(self) -> str:
        return f"{self.symbol} {token(self.shown)}"

    def phrase(self, matched: bool) -> str:
        return ("is " if matched else "is not ") + self.describe()


class Between(ValueTest):
    """Inclusive range ``[low, high]`` on parsed numbers, dates or times."""

    op = "between"

    def __init__(self, low: Any, high: Any, shown: tuple[Any, Any], parse: Parser) -> None:
        self.low, self.high, self.shown, self.parse = low, high, shown, parse

    def __call__(self, value: Any) -> bool:
        parsed = self.parse(value)
        return parsed is not None and self.low <= parsed <= self.high

    def describe(self) -> str:
        return f"between {token(self.shown[0])} and {token(self.shown[1])}"

    def phrase(self, matched: bool) -> str:
        return ("is " if matched else "is not ") + self.describe()

    def never(self) -> str | None:
        if self.low > self.high:
            low, high = (quoted(v) for v in self.shown)
            return f"'between' lower bound {low} is above upper bound {high}"
        return None


class InNetworks(ValueTest):
    """Source address inside one of the IP networks (a bare IP is a /32 or /128)."""

    def __init__(self, op: str, networks: Sequence[Network]) -> None:
        self.op, self.networks = op, tuple(networks)

    def __call__(self, value: Any) -> bool:
        return any(value in network for network in self.networks)

    def _shown(self) -> str:
        texts = [str(n.network_address) if n.num_addresses == 1 else str(n) for n in self.networks]
        return texts[0] if self.op == "equals" else "[" + ", ".join(texts) + "]"

    def describe(self) -> str:
        return ("= " if self.op == "equals" else "in ") + self._shown()

    def phrase(self, matched: bool) -> str:
        return ("is in " if matched else "is not in ") + self._shown()

    def never(self) -> str | None:
        return "'in' list is empty" if not self.networks else None


class InWindows(ValueTest):
    """Reception time inside one of the weekday/time-of-day windows."""

    def __init__(self, op: str, windows: Sequence[TimeWindow]) -> None:
        self.op, self.windows = op, tuple(windows)

    def __call__(self, value: Any) -> bool:
        return any(window.contains(value) for window in self.windows)

    def _shown(self) -> str:
        return " or ".join(quoted(window.text) for window in self.windows) or "[]"

    def describe(self) -> str:
        return f"within {self._shown()}"

    def phrase(self, matched: bool) -> str:
        return ("is within " if matched else "is outside ") + self._shown()

    def never(self) -> str | None:
        return "'in' list is empty" if not self.windows else None
