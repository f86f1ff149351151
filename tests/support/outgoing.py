"""Stored files as a sender is handed them, for tests and benches that drive a
sender directly (no queue): one copy of what every kind's sender tests need."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydicom import dcmread

from dicomrouter.destinations import OutgoingInstance


def outgoing(files: list[Path]) -> list[OutgoingInstance]:
    """``files`` as a batch, keyed by position, UIDs read from each header."""
    out = []
    for key, path in enumerate(files):
        ds = dcmread(path, stop_before_pixels=True)
        out.append(
            OutgoingInstance(
                key,
                path,
                str(ds.SOPClassUID),
                str(ds.SOPInstanceUID),
                str(ds.file_meta.TransferSyntaxUID),
            )
        )
    return out


def retag(path: Path, **values: Any) -> Path:
    """Set elements of the file at ``path`` by keyword, in place."""
    ds = dcmread(path)
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    ds.save_as(path, enforce_file_format=True)
    return path
