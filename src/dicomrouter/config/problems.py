"""How validators report several problems at once, each at its own key path."""

from __future__ import annotations

from typing import Any

#: A key path inside the model that raised (``("routes", 1, "to")``; a string part may
#: hold dots, as a rule's own path does).
KeyPath = tuple[str | int, ...]


class ConfigProblems(ValueError):
    """Several problems found by one validator, so that the loader reports them all
    at once, each with its key path relative to the model that raised."""

    def __init__(self, problems: list[tuple[KeyPath, str]]):
        self.problems = problems
        super().__init__("; ".join(message for _, message in problems))


def checked_rule(when: dict[str, Any] | None) -> dict[str, Any] | None:
    """A ``when`` rule as written, once it compiles; else ConfigProblems at the rule's
    own key path. For field validators (``routes[].when``, a transform step's
    ``when``): a typo elsewhere in the same mapping does not hide an error in it."""
    if when is None:
        return None
    # Imported here, not at the top: the rules load pydicom (and numpy with it),
    # which `dicomrouter serve` must keep out until it has excluded numpy.
    from dicomrouter.rules import RuleError, compile_condition

    try:
        compile_condition(when)
    except RuleError as exc:
        raise ConfigProblems([((exc.path,) if exc.path else (), exc.message)]) from None
    return when
