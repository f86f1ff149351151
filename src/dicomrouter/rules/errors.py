"""The one exception the rules package raises, carrying the key path of the problem."""

from __future__ import annotations


class RuleError(Exception):
    """An invalid ``when:`` specification.

    ``path`` is the dotted key path *inside* ``when`` (``"StudyDescription.contains"``,
    ``"all[1].Modality"``; empty for the mapping itself) so the config loader can
    prefix it with the route's own location and the admin lands on the right line.
    """

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}" if path else message)
