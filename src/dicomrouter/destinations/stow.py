"""The two halves of a STOW-RS request that need no network (PS3.18 10.5): the
``multipart/related`` body, streamed from files, and the server's answer, read.

* :class:`MultipartBody` yields the body in blocks of at most 1 MiB, opening each
  file only while its part is sent, and knows its length beforehand (so the request
  has a ``Content-Length`` and no chunked encoding, which some servers refuse). It
  can be iterated again (a retried request starts over). Memory stays flat whatever
  the size of the files.
* :func:`parse_response` reads the Store Instances Response Module (PS3.18 Table
  10.5.3-1) in either encoding a server may choose, ``application/dicom+json`` or
  ``application/dicom+xml``: which SOP instances the server stored (Referenced SOP
  Sequence, with a Warning Reason) and which it did not (Failed SOP Sequence, with a
  Failure Reason).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["BodyChanged", "MultipartBody", "Part", "StowResponse", "parse_response"]

BLOCK = 1024 * 1024
_REFERENCED = "00081199"  # ReferencedSOPSequence
_FAILED = "00081198"  # FailedSOPSequence
_SOP_INSTANCE = "00081155"  # ReferencedSOPInstanceUID
_WARNING = "00081196"  # WarningReason
_FAILURE = "00081197"  # FailureReason
_TAG = re.compile(r"[0-9A-Fa-f]{8}")


class BodyChanged(OSError):
    """A file changed size while its request was being sent."""


@dataclass(frozen=True)
class Part:
    """One instance of a request: a file on disk (sent in blocks) or, for a copy
    transcoded in memory, its bytes."""

    source: Path | bytes

    @property
    def size(self) -> int:
        if isinstance(self.source, bytes):
            return len(self.source)
        return os.stat(self.source).st_size


class MultipartBody:
    """A ``multipart/related; type="application/dicom"`` body over ``parts``
    (PS3.18 8.6.1.2): each part is ``--boundary``, a ``Content-Type:
    application/dicom`` header, and the Part-10 file byte for byte."""

    def __init__(self, parts: Sequence[Part], sizes: Sequence[int] | None = None) -> None:
        self.parts = list(parts)
        self.sizes = list(sizes) if sizes is not None else [part.size for part in self.parts]
        self.boundary = "dicomrouter-" + secrets.token_hex(16)
        self._head = f"--{self.boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        self._tail = f"\r\n--{self.boundary}--\r\n".encode()

    @property
    def content_type(self) -> str:
        return f'multipart/related; type="application/dicom"; boundary={self.boundary}'

    def __len__(self) -> int:
        separators = len(self._head) * len(self.parts) + 2 * max(0, len(self.parts) - 1)
        return sum(self.sizes) + separators + len(self._tail)

    def __iter__(self) -> Iterator[bytes]:
        for index, (part, size) in enumerate(zip(self.parts, self.sizes, strict=True)):
            yield (b"\r\n" if index else b"") + self._head
            if isinstance(part.source, bytes):
                yield part.source
                continue
            with open(part.source, "rb") as fh:
                left = size
                while left > 0:
                    block = fh.read(min(BLOCK, left))
                    if not block:
                        raise BodyChanged(f"{part.source} shrank while being sent")
                    left -= len(block)
                    yield block
        yield self._tail


@dataclass
class StowResponse:
    """What a Store Instances Response said, by SOP Instance UID."""

    stored: dict[str, int | None] = field(default_factory=dict)
    """Stored instances, with their Warning Reason (None: none)."""
    failed: dict[str, int | None] = field(default_factory=dict)
    """Instances not stored, with their Failure Reason (None: none given)."""
    texts: dict[str, str] = field(default_factory=dict)
    """A Warning or Failure Reason given as text that is not a number, as given, by
    SOP Instance UID (its code above is None): one odd value leaves the rest of the
    response readable."""
    readable: bool = False
    """The body was a response data set (either sequence may still be absent)."""


def parse_response(content_type: str, body: bytes) -> StowResponse:
    """The Store Instances Response in ``body`` (JSON or XML, by ``content_type``,
    else whichever parses). An empty or unreadable body gives an empty, not
    ``readable`` response: the HTTP status is all the server said."""
    media = content_type.split(";", 1)[0].strip().lower()
    text = body.strip()
    if not text:
        return StowResponse()
    readers = (_from_xml, _from_json) if media.endswith("xml") else (_from_json, _from_xml)
    for reader in readers:
        try:
            return reader(text)
        except (ValueError, TypeError, KeyError, AttributeError, ET.ParseError):
            continue
    return StowResponse()


def _from_json(body: bytes) -> StowResponse:
    data = json.loads(body)
    if isinstance(data, list):  # the DICOM JSON model: an array of data sets
        data = data[0] if data else {}
    if not isinstance(data, dict) or not all(_TAG.fullmatch(str(key)) for key in data):
        raise ValueError("not a DICOM JSON data set")  # keys are tags: {"ok": true} is not
    response = StowResponse(readable=True)
    for tag, target, reason_tag in (
        (_REFERENCED, response.stored, _WARNING),
        (_FAILED, response.failed, _FAILURE),
    ):
        for item in (data.get(tag) or {}).get("Value") or []:
            uid = _json_value(item, _SOP_INSTANCE)
            if isinstance(uid, str) and uid:
                _note(response, target, uid.strip(), _json_value(item, reason_tag))
    return response


def _json_value(item: dict[str, object], tag: str) -> object:
    element = item.get(tag)
    values = element.get("Value") if isinstance(element, dict) else None
    return values[0] if isinstance(values, list) and values else None


def _from_xml(body: bytes) -> StowResponse:
    root = ET.fromstring(body)  # noqa: S314 - expat limits entity expansion; no DTDs fetched
    if _local(root.tag) != "NativeDicomModel":
        raise ValueError("not a Native DICOM Model document")
    response = StowResponse(readable=True)
    for attribute in root:
        tag = (attribute.get("tag") or "").upper()
        if tag == _REFERENCED:
            target, reason_tag = response.stored, _WARNING
        elif tag == _FAILED:
            target, reason_tag = response.failed, _FAILURE
        else:
            continue
        for item in attribute:
            if _local(item.tag) != "Item":
                continue
            uid = _xml_value(item, _SOP_INSTANCE)
            if uid:
                _note(response, target, uid, _xml_value(item, reason_tag))
    return response


def _xml_value(item: ET.Element, tag: str) -> str | None:
    for attribute in item:
        if (attribute.get("tag") or "").upper() == tag:
            for value in attribute:
                if _local(value.tag) == "Value":
                    return (value.text or "").strip()
    return None


def _note(response: StowResponse, target: dict[str, int | None], uid: str, reason: object) -> None:
    """Record ``uid`` in ``target`` with its reason's code, keeping a reason that is
    not a number as text."""
    code = target[uid] = _code(reason)
    if code is None and reason is not None and str(reason).strip():
        response.texts[uid] = " ".join(str(reason).split())


def _code(value: object) -> int | None:
    """A Warning or Failure Reason (US): a number, or text in decimal (PS3.18 F.2)
    or, from some servers, hexadecimal; None when absent or not a number."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip():
        text = value.strip()
        for base in (10, 16):
            try:
                return int(text, base)
            except ValueError:
                continue
    return None


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]
