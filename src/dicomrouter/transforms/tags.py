"""How a step names an element: a keyword, a tag, or a private tag by its block.

- ``InstitutionName``: a keyword of the DICOM dictionary (pydicom's);
- ``"0008,0080"`` (also ``"(0008,0080)"`` or ``"00080080"``): a tag, public or private;
- ``"0009,xx10"``: a *private* element by its offset (``10``) in group ``0009``, in
  every private block of that group whatever its creator, because the block number a
  modality uses (``0009,10xx``, ``0009,11xx``...) varies between files while the
  creator and the offset do not;
- ``{creator: "ACME 1.1", tag: "0009,xx10"}`` (``remove`` only): the same, but only in
  the blocks reserved by that private creator.

Names are resolved once, when the pipeline is compiled, so a misspelt keyword is a
configuration error with a "did you mean" and never a runtime surprise.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pydicom.datadict import dictionary_has_tag, dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag, Tag

from dicomrouter.rules import PSEUDO_KEYS, suggest_keyword

_TAG_RE = re.compile(r"^\(?\s*([0-9A-Fa-f]{4})\s*,?\s*([0-9A-Fa-f]{4})\s*\)?$")
_PRIVATE_RE = re.compile(r"^\(?\s*([0-9A-Fa-f]{4})\s*,\s*[xX]{2}([0-9A-Fa-f]{2})\s*\)?$")

#: Where group 7FE0 (Pixel Data and its companions) starts: elements from here on
#: are copied as raw bytes unless a step needs them (see :mod:`.output`).
PIXEL_GROUP = 0x7FE00000


class TagError(ValueError):
    """A name that is not an element (the message says why, with a suggestion)."""


@dataclass(frozen=True)
class TagAddress:
    """An element named in a step: one fixed ``tag``, or private elements at
    ``offset`` of the blocks of ``group`` (all blocks, or only ``creator``'s)."""

    text: str
    tag: BaseTag | None = None
    group: int = 0
    offset: int = 0
    creator: str | None = None

    @property
    def is_block_relative(self) -> bool:
        return self.tag is None

    def tags_in(self, dataset: Dataset) -> list[BaseTag]:
        """The tags of ``dataset`` (top level) this address names, present or not
        for a fixed tag; only the present ones for a block-relative address."""
        if self.tag is not None:
            return [self.tag]
        return [
            Tag(self.group, (block << 8) | self.offset)
            for block, creator in private_blocks(dataset, self.group)
            if self.creator is None or creator == self.creator
        ]

    def __str__(self) -> str:
        return self.text


def describe_tag(tag: int) -> str:
    """``(0008,0080) InstitutionName``: how messages and diffs name an element."""
    keyword = keyword_for_tag(tag) if dictionary_has_tag(tag) else ""
    text = f"({tag >> 16:04X},{tag & 0xFFFF:04X})"
    return f"{text} {keyword}" if keyword else text


def fixed_tag(text: str) -> BaseTag:
    """The one element a keyword or ``gggg,eeee`` names (``set``, ``copy``...)."""
    address = parse_address(text)
    if address.tag is None:
        raise TagError(
            f"{text!r} names private elements in any block: {address.group:04X},xx.. is "
            "accepted by `remove` only; give the full tag (e.g. 0009,1010)"
        )
    return address.tag


def parse_address(text: str, creator: str | None = None) -> TagAddress:
    """A keyword, ``gggg,eeee`` or ``gggg,xxee`` (with an optional private
    ``creator``), or :class:`TagError`."""
    if not isinstance(text, str) or not text.strip():
        raise TagError(f"expected a DICOM keyword or a tag such as 0008,0080, got {text!r}")
    text = text.strip()
    private = _PRIVATE_RE.match(text)
    if private:
        group, offset = int(private[1], 16), int(private[2], 16)
        if group % 2 == 0:
            raise TagError(f"{text!r}: private tags have an odd group, {group:04X} is even")
        return TagAddress(text, group=group, offset=offset, creator=creator)
    if creator is not None:
        raise TagError(
            f"{text!r}: with a private creator, write the tag as gggg,xxee (e.g. 0009,xx10)"
        )
    fixed = _TAG_RE.match(text)
    if fixed:
        return TagAddress(text, Tag(int(fixed[1], 16), int(fixed[2], 16)))
    if text in PSEUDO_KEYS:
        raise TagError(f"{text} is not an element of the data set (only templates may read it)")
    tag = tag_for_keyword(text)
    if tag is None:
        raise TagError(f"unknown DICOM keyword {text!r}{suggest_keyword(text)}")
    return TagAddress(text, Tag(tag))


def dictionary_vr(tag: int) -> str | None:
    """The element's VR from the dictionary (the first of ``US or SS``), or None for
    a tag the dictionary does not know (most private tags)."""
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        return None
    return str(vr).split(" or ")[0]


def private_blocks(dataset: Dataset, group: int) -> list[tuple[int, str]]:
    """``(block, creator)`` of each private block reserved in ``group`` (PS3.5 7.8.1):
    the creator elements ``(gggg,0010)``...``(gggg,00FF)`` and their values."""
    blocks = []
    for tag in range(Tag(group, 0x0010), Tag(group, 0x0100)):
        element = dataset.get(tag)
        if element is not None:
            blocks.append((tag & 0xFF, creator_text(element.value)))
    return blocks


def creator_text(value: object) -> str:
    """A private creator's value as compared with the configuration's names."""
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    return str(value or "").strip(" \0")
