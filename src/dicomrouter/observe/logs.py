"""Logging set-up shared by the node and its child processes.

Log messages often quote what a peer sent (a calling AE title, a file name, a user
name at login). A control character in it (a newline above all) could forge a log
line that looks like the router's own, so :class:`EscapingFormatter` writes every C0
control character (and DEL) of the message as an escape (``\\n``, ``\\x1b``). One
place, so no call site has to remember. A traceback keeps its line breaks: it is
ours, not the peer's.
"""

from __future__ import annotations

import logging
import re
import sys

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def find_control(text: str) -> str | None:
    """The first C0 control character (or DEL) in ``text``, or None."""
    match = _CONTROL.search(text)
    return match.group() if match else None


def escape_controls(text: str) -> str:
    """``text`` with C0 control characters and DEL written as escapes."""
    return _CONTROL.sub(lambda m: _NAMED.get(m.group(), f"\\x{ord(m.group()):02x}"), text)


class EscapingFormatter(logging.Formatter):
    """A Formatter whose messages cannot span lines (see the module's description)."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging API
        record.message = escape_controls(record.message)
        return super().formatMessage(record)


def configure_logging(level: str, process: str = "MainProcess") -> None:
    """One format for every process; ``process`` names the process in each line
    (the node is ``MainProcess``, its children ``dispatch`` and ``http``)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        EscapingFormatter(f"%(asctime)s %(levelname)-7s {process} %(name)s: %(message)s")
    )
    logging.basicConfig(level=level, handlers=[handler], force=True)
    # pynetdicom only encodes and decodes association PDUs for us; its DEBUG output
    # (every PDU dumped) is never what an operator wants.
    logging.getLogger("pynetdicom").setLevel(max(logging.WARNING, logging.getLogger().level))
