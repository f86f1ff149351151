"""Logging set-up shared by the node and its child processes."""

from __future__ import annotations

import logging
import sys


def configure_logging(level: str, process: str = "MainProcess", dicom: bool = True) -> None:
    """One format for every process; ``process`` names the process in each line
    (the node is ``MainProcess``, its children ``dispatch`` and ``http``). ``dicom``
    False leaves pynetdicom unloaded (the HTTP process loads it only for an echo)."""
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s %(levelname)-7s {process} %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    if level != "DEBUG":
        # A refused connection is logged by pynetdicom as two ERROR lines, on every
        # retry and every C-ECHO probe of a destination that is down; the dispatcher
        # already reports it once, with the destination's name.
        logging.getLogger("pynetdicom.transport").setLevel(logging.CRITICAL)
    if level != "DEBUG" and dicom:
        # pynetdicom's default handlers format every PDU and DIMSE message for the
        # log even when nothing is logged: about 10% of the receive path's CPU.
        from pynetdicom import _config

        _config.LOG_HANDLER_LEVEL = "none"
