"""Receive stage: the DICOM C-STORE/C-ECHO service (pynetdicom SCP)."""

from .scp import Receiver

__all__ = ["Receiver"]
