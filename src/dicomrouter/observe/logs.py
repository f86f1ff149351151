"""Logging set-up shared by the node and its child processes."""

from __future__ import annotations

import logging
import sys


def configure_logging(level: str, process: str = "MainProcess") -> None:
    """One format for every process; ``process`` names the process in each line
    (the node is ``MainProcess``, its children ``dispatch`` and ``http``)."""
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s %(levelname)-7s {process} %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    # pynetdicom only encodes and decodes association PDUs for us; its DEBUG output
    # (every PDU dumped) is never what an operator wants.
    logging.getLogger("pynetdicom").setLevel(max(logging.WARNING, logging.getLogger().level))
