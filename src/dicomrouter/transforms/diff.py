"""The tag-level difference between an object before and after a transform.

For dry runs (``test-rule --transform``, the API and the dashboard's rule tester): one
row per element added, removed or changed, in tag order, nested sequences included
with a path such as ``ReferencedSeriesSequence[0].SeriesInstanceUID``. Binary values
(Pixel Data, OB/OW/UN blobs) are shown by length and a short SHA-256, never dumped;
long text is cut for display.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from typing import Literal

from pydicom.datadict import dictionary_has_tag, keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

_BINARY_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "UN"}
#: Longest text value shown in a row.
SHOWN = 120

Change = Literal["added", "removed", "changed"]


@dataclass(frozen=True)
class DiffRow:
    """One element that differs. ``before``/``after`` are display text (None: absent)."""

    path: str
    tag: str
    vr: str
    change: Change
    before: str | None
    after: str | None

    def as_dict(self) -> dict[str, str | None]:
        return asdict(self)


def diff_datasets(before: Dataset, after: Dataset) -> list[DiffRow]:
    """The differences from ``before`` to ``after`` (File Meta is not compared)."""
    rows: list[DiffRow] = []
    _diff(before, after, "", rows)
    return rows


def _name(tag: int) -> str:
    return str(keyword_for_tag(tag)) if dictionary_has_tag(tag) else ""


def _diff(before: Dataset, after: Dataset, prefix: str, rows: list[DiffRow]) -> None:
    for tag in sorted(set(before.keys()) | set(after.keys())):
        old = before.get(tag) if tag in before else None
        new = after.get(tag) if tag in after else None
        tag_text = f"({tag >> 16:04X},{tag & 0xFFFF:04X})"
        path = prefix + (_name(tag) or tag_text)
        if old is None and new is None:
            continue
        if old is None or new is None:
            element = new if old is None else old
            assert element is not None
            rows.append(
                DiffRow(
                    path,
                    tag_text,
                    str(element.VR),
                    "added" if old is None else "removed",
                    None if old is None else show(old),
                    None if new is None else show(new),
                )
            )
            continue
        if old.VR == "SQ" and new.VR == "SQ":
            _diff_sequence(old, new, path, tag_text, rows)
            continue
        if old.VR != new.VR or _comparable(old) != _comparable(new):
            rows.append(DiffRow(path, tag_text, str(new.VR), "changed", show(old), show(new)))


def _diff_sequence(
    old: DataElement, new: DataElement, path: str, tag_text: str, rows: list[DiffRow]
) -> None:
    old_items, new_items = list(old.value or ()), list(new.value or ())
    for index in range(max(len(old_items), len(new_items))):
        item_path = f"{path}[{index}]"
        if index >= len(old_items):
            rows.append(DiffRow(item_path, tag_text, "SQ", "added", None, "(item)"))
        elif index >= len(new_items):
            rows.append(DiffRow(item_path, tag_text, "SQ", "removed", "(item)", None))
        else:
            _diff(old_items[index], new_items[index], item_path + ".", rows)


def _comparable(element: DataElement) -> object:
    value = element.value
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if isinstance(value, MultiValue | list | tuple):
        return [str(v) for v in value]
    return str(value) if value is not None else ""


def show(element: DataElement) -> str:
    """An element's value as one line of display text."""
    value = element.value
    if element.VR in _BINARY_VRS or isinstance(value, bytes | bytearray):
        data = bytes(value or b"")
        return f"<{len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()[:12]}>"
    if element.VR == "SQ":
        return f"<{len(value or ())} item(s)>"
    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        text = "\\".join(str(v) for v in value)
    else:
        text = str(value)
    return text if len(text) <= SHOWN else text[: SHOWN - 1] + "…"
