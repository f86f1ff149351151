"""Receive stage: the DICOM C-STORE/C-ECHO service (our association acceptor)."""

from .scp import Receiver

__all__ = ["Receiver"]
