"""How validators report several problems at once, each at its own key path."""

from __future__ import annotations

#: A key path inside the model that raised (``("routes", 1, "to")``; a string part may
#: hold dots, as a rule's own path does).
KeyPath = tuple[str | int, ...]


class ConfigProblems(ValueError):
    """Several problems found by one validator, so that the loader reports them all
    at once, each with its key path relative to the model that raised."""

    def __init__(self, problems: list[tuple[KeyPath, str]]):
        self.problems = problems
        super().__init__("; ".join(message for _, message in problems))
