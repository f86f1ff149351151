"""Keys of a ``when:`` mapping: where each one reads its values from an instance.

A field turns :class:`InstanceFacts` into a short list of normalized values. An
empty list means *missing*: the element is absent, empty, or could not be
decoded. Operators then test each value (ANY semantics), so they never need to
know about pydicom, padding or multi-values.
"""

from __future__ import annotations

import difflib
import ipaddress
from abc import ABC, abstractmethod
from collections.abc import Sequence
from datetime import datetime
from enum import Enum
from functools import cache
from typing import Any

from pydicom.datadict import DicomDictionary, dictionary_VM, dictionary_VR, tag_for_keyword
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag, Tag
from pydicom.valuerep import PersonName

from .errors import RuleError
from .facts import InstanceFacts


class Kind(Enum):
    """How values of a field are compared (decides the operators and value parsing)."""

    TEXT = "text"
    NUMBER = "number"
    DATE = "date"
    TIME = "time"
    DATETIME = "datetime"
    BINARY = "binary"
    ADDRESS = "address"
    MOMENT = "moment"


_NUMERIC_VRS = {"IS", "DS", "US", "SS", "UL", "SL", "FL", "FD", "UV", "SV"}
_BINARY_VRS = {"OB", "OW", "OF", "OD", "OL", "OV", "UN", "AT"}
_DATE_KINDS = {"DA": Kind.DATE, "TM": Kind.TIME, "DT": Kind.DATETIME}
#: VRs whose leading spaces are insignificant too (PS3.5 6.2); others keep them.
_STRIP_LEADING_VRS = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "PN", "SH", "TM", "UI"}

PSEUDO_KEYS = ("CallingAETitle", "CalledAETitle", "SourceAddress", "ReceivedAt")


class Field(ABC):
    """One ``when`` key bound to the way it reads an instance."""

    __slots__ = ("name", "kind", "keyword", "single_valued")

    def __init__(self, name: str, kind: Kind, keyword: str | None, single_valued: bool) -> None:
        self.name = name
        self.kind = kind
        #: The DICOM keyword, or None for a pseudo-key.
        self.keyword = keyword
        #: True when the element holds at most one value (VM 1), which lets the
        #: linter prove that two different ``equals`` can never hold together.
        self.single_valued = single_valued

    @abstractmethod
    def values(self, facts: InstanceFacts) -> Sequence[Any]:
        """The normalized non-empty values; empty when missing."""

    def describe_kind(self) -> str:
        return self.kind.value


class DicomField(Field):
    """A DICOM element of the dataset, addressed by its tag (looked up once)."""

    __slots__ = ("tag", "vr", "_strip_leading")

    def __init__(self, keyword: str, tag: BaseTag, vr: str, vm: str) -> None:
        if vr in _NUMERIC_VRS:
            kind = Kind.NUMBER
        elif vr in _BINARY_VRS:
            kind = Kind.BINARY
        else:
            kind = _DATE_KINDS.get(vr, Kind.TEXT)
        super().__init__(keyword, kind, keyword, vm == "1")
        self.tag = tag
        self.vr = vr
        self._strip_leading = vr in _STRIP_LEADING_VRS

    def values(self, facts: InstanceFacts) -> Sequence[Any]:
        try:
            element = facts.dataset.get(self.tag)
            if element is None:
                return ()
            raw = element.value
        except Exception:  # an element that cannot be decoded counts as missing
            return ()
        if isinstance(raw, str):  # the common case: one plain string
            text = raw.strip(" \0") if self._strip_leading else raw.rstrip(" \0")
            return (text,) if text else ()
        items = raw if isinstance(raw, MultiValue | list | tuple) else (raw,)
        values = [self._normalize(item) for item in items]
        return [value for value in values if value is not None and value != ""]

    def _normalize(self, item: Any) -> Any:
        if item is None or isinstance(item, int | float):
            return item
        if isinstance(item, bytes):
            if self.kind is Kind.BINARY:
                return item or None
            item = item.decode("latin-1")
        elif isinstance(item, PersonName) or not isinstance(item, str):
            item = str(item)
        return item.strip(" \0") if self._strip_leading else item.rstrip(" \0")

    def describe_kind(self) -> str:
        return f"VR {self.vr}"


class AETitleField(Field):
    """``CallingAETitle`` / ``CalledAETitle`` from the association (case-sensitive)."""

    __slots__ = ("attribute",)

    def __init__(self, name: str, attribute: str) -> None:
        super().__init__(name, Kind.TEXT, None, True)
        self.attribute = attribute

    def values(self, facts: InstanceFacts) -> Sequence[Any]:
        value = str(getattr(facts, self.attribute) or "").strip(" \0")
        return (value,) if value else ()

    def describe_kind(self) -> str:
        return "AE title"


class AddressField(Field):
    """``SourceAddress``: the sender's IP; IPv4-mapped IPv6 addresses count as IPv4."""

    __slots__ = ()

    def __init__(self) -> None:
        super().__init__("SourceAddress", Kind.ADDRESS, None, True)

    def values(self, facts: InstanceFacts) -> Sequence[Any]:
        try:
            address = ipaddress.ip_address(facts.source_address.strip().split("%")[0])
        except ValueError:
            return ()
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            return (address.ipv4_mapped,)
        return (address,)

    def describe_kind(self) -> str:
        return "IP address"


class MomentField(Field):
    """``ReceivedAt``: the reception time, as local wall-clock time."""

    __slots__ = ()

    def __init__(self) -> None:
        super().__init__("ReceivedAt", Kind.MOMENT, None, True)

    def values(self, facts: InstanceFacts) -> Sequence[Any]:
        moment: datetime | None = facts.received_at
        if moment is None:
            return ()
        return (moment.astimezone() if moment.tzinfo else moment,)

    def describe_kind(self) -> str:
        return "reception time"


def resolve_field(key: Any, path: str) -> Field:
    """The field for a ``when`` key, or a RuleError naming close matches."""
    if not isinstance(key, str):
        raise RuleError(path, f"keys must be DICOM keywords, got {key!r}")
    if key in ("CallingAETitle", "CalledAETitle"):
        return AETitleField(key, "calling_ae" if key == "CallingAETitle" else "called_ae")
    if key == "SourceAddress":
        return AddressField()
    if key == "ReceivedAt":
        return MomentField()
    tag = tag_for_keyword(key)
    if tag is None:
        raise RuleError(path, f"unknown DICOM keyword {key!r}{_suggest(key)}")
    vr = dictionary_VR(tag).split(" or ")[0]
    if vr == "SQ":
        raise RuleError(
            path, f"{key} is a sequence (SQ): matching inside sequences is not supported"
        )
    return DicomField(key, Tag(tag), vr, dictionary_VM(tag))


@cache
def _known_names() -> tuple[str, ...]:
    keywords = (entry[4] for entry in DicomDictionary.values() if entry[4])
    return (*PSEUDO_KEYS, "all", "any", "not", *sorted(set(keywords)))


def suggest_keyword(key: str) -> str:
    """`` (did you mean 'InstitutionName'?)`` for a misspelt keyword, or "": the hint
    every unknown-keyword message of ours ends with (rules, transforms)."""
    return _suggest(key)


def _suggest(key: str) -> str:
    names = _known_names()
    folded = [name for name in names if name.lower() == key.lower()]
    close = folded or difflib.get_close_matches(key, names, n=3, cutoff=0.8)
    if not close:
        return ""
    return " (did you mean " + " or ".join(repr(name) for name in close) + "?)"
