"""The tag steps: ``set``, ``remove``, ``remove_private``, ``copy``, ``replace``, ``map``.

Each is built from its configuration model once (names resolved, regexes compiled,
literal values checked against their VR) and then applied to one data set at a time.
They work on the top level of the data set, except ``remove_private``, which also
cleans nested sequences (private data hides there too). ``where`` is the step's key
path (``transforms.fix-ct1[2].replace``): every refusal names it.
"""

from __future__ import annotations

import copy as copying
import re
from collections.abc import Iterable

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag

from dicomrouter.config.transforms import (
    CopyStep,
    MapStep,
    PrivateTag,
    RemovePrivateStep,
    RemoveStep,
    ReplaceStep,
    SetStep,
)

from .base import ObjectContext, Step, TransformRefused
from .lookup import LookupTable
from .tags import (
    PIXEL_GROUP,
    TagAddress,
    TagError,
    creator_text,
    describe_tag,
    dictionary_vr,
    fixed_tag,
    parse_address,
)
from .templates import Template
from .values import TEXT_VRS, Value, ValueProblem, check_value, text_values, write_value


class StepConfigError(ValueError):
    """A step whose configuration cannot work; ``key`` is the sub-key at fault
    (``InstitutonName``), the message says why."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(message)


def _tag(key: str) -> BaseTag:
    try:
        return fixed_tag(key)
    except TagError as exc:
        raise StepConfigError(key, str(exc)) from None


def _in_pixel_group(tags: Iterable[int]) -> bool:
    return any(tag >= PIXEL_GROUP for tag in tags)


class SetValues(Step):
    """``set``: write values; text values are templates (:mod:`.templates`)."""

    kind = "set"

    def __init__(self, config: SetStep, where: str):
        self.where = where
        self.items: list[tuple[BaseTag, list[Template] | Template | None, bool]] = []
        for key, value in config.set.items():
            tag = _tag(key)
            templates: list[Template] | Template | None
            try:
                if value is None:
                    templates = None
                elif isinstance(value, list):
                    templates = [Template(str(v)) for v in value]
                else:
                    templates = Template(str(value))
            except TagError as exc:
                raise StepConfigError(key, str(exc)) from None
            parts = templates if isinstance(templates, list) else [templates] if templates else []
            literal = all(t.is_literal for t in parts)
            vr = dictionary_vr(tag)
            if literal and vr is not None:
                try:  # a literal that cannot fit is a configuration error, not a refusal
                    check_value(tag, vr, self._literal(value, parts))
                except ValueProblem as exc:
                    raise StepConfigError(key, str(exc)) from None
            self.items.append((tag, templates, isinstance(value, int | float)))

    @staticmethod
    def _literal(value: object, parts: list[Template]) -> Value:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return value
        texts: list[str | int | float] = [t.literal() for t in parts]
        return texts if isinstance(value, list) else (texts[0] if texts else None)

    def needs_whole_file(self) -> bool:
        return _in_pixel_group(tag for tag, _, _ in self.items)

    def apply(self, dataset: Dataset, context: ObjectContext) -> None:
        # Templates read the data set as it was before this step: set {A: "{B}", B: x}
        # copies the old B, whatever the order of the keys.
        rendered = []
        for tag, templates, numeric in self.items:
            value: str | int | float | list[str | int | float] | None
            if templates is None:
                value = None
            elif isinstance(templates, list):
                value = [t.render(dataset, context, self.where) for t in templates]
            else:
                text = templates.render(dataset, context, self.where)
                value = _number_or_text(text) if numeric else text
            rendered.append((tag, value))
        for tag, value in rendered:
            write_value(dataset, tag, value, self.where)


def _number_or_text(text: str) -> str | int | float:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return text


class RemoveElements(Step):
    """``remove``: delete elements at the top level (see :mod:`.tags` for names)."""

    kind = "remove"

    def __init__(self, config: RemoveStep, where: str):
        self.where = where
        self.addresses: list[TagAddress] = []
        for item in config.remove:
            text, creator = (
                (item.tag, item.creator) if isinstance(item, PrivateTag) else (item, None)
            )
            try:
                self.addresses.append(parse_address(text, creator))
            except TagError as exc:
                raise StepConfigError(text, str(exc)) from None
        # An element after the pixel data (group above 7FE0) may sit in a tail the
        # header-only copy does not parse.
        self.sees_every_element = any(
            (a.tag.group if a.tag is not None else a.group) > PIXEL_GROUP >> 16
            for a in self.addresses
        )

    def needs_whole_file(self) -> bool:
        return _in_pixel_group(a.tag for a in self.addresses if a.tag is not None)

    def apply(self, dataset: Dataset, context: ObjectContext) -> None:
        for address in self.addresses:
            for tag in address.tags_in(dataset):
                if tag in dataset:
                    del dataset[tag]


class RemovePrivate(Step):
    """``remove_private``: delete every private element, at any depth, except the
    blocks whose creator is kept (and those blocks' creator elements, without which
    the kept elements could not be read)."""

    kind = "remove_private"
    sees_every_element = True

    def __init__(self, config: RemovePrivateStep, where: str):
        self.where = where
        self.keep = frozenset(creator.strip() for creator in config.remove_private.keep_creators)

    def apply(self, dataset: Dataset, context: ObjectContext) -> None:
        self._clean(dataset)

    def _clean(self, dataset: Dataset) -> None:
        kept_blocks: set[tuple[int, int]] = set()
        doomed: list[BaseTag] = []
        for element in dataset:  # in tag order: creators come before their blocks
            tag = element.tag
            if tag.group % 2 == 0:
                if element.VR == "SQ":
                    for item in element.value or ():
                        self._clean(item)
                continue
            if 0x0010 <= tag.element <= 0x00FF:
                if creator_text(element.value) in self.keep:
                    kept_blocks.add((tag.group, tag.element))
                    continue
            elif tag.element >= 0x1000 and (tag.group, tag.element >> 8) in kept_blocks:
                if element.VR == "SQ":
                    for item in element.value or ():
                        self._clean(item)
                continue
            doomed.append(tag)
        for tag in doomed:
            del dataset[tag]


class CopyValues(Step):
    """``copy``: ``{target: source}``, the source's value into the target element
    (with the target's VR). A source that is absent leaves the target unchanged."""

    kind = "copy"

    def __init__(self, config: CopyStep, where: str):
        self.where = where
        self.pairs = [(_tag(target), _tag(source)) for target, source in config.copy_.items()]

    def needs_whole_file(self) -> bool:
        return _in_pixel_group(tag for pair in self.pairs for tag in pair)

    def apply(self, dataset: Dataset, context: ObjectContext) -> None:
        values = [(target, dataset.get(source)) for target, source in self.pairs]
        for target, source in values:
            if source is None:
                continue
            target_vr = dictionary_vr(target) or source.VR
            if source.VR == "SQ" or target_vr == "SQ" or target_vr == source.VR:
                if target_vr != source.VR:
                    raise TransformRefused(
                        f"{self.where}: cannot copy {describe_tag(source.tag)} (VR {source.VR}) "
                        f"into {describe_tag(target)} (VR {target_vr})"
                    )
                dataset[target] = DataElement(target, target_vr, copying.deepcopy(source.value))
                continue
            texts = text_values(source.value)
            value = texts if len(texts) > 1 else (texts[0] if texts else None)
            write_value(dataset, target, value, self.where)


def _text_tag(key: str) -> tuple[BaseTag, str]:
    tag = _tag(key)
    vr = dictionary_vr(tag)
    if vr is not None and vr not in TEXT_VRS:
        raise StepConfigError(key, f"{describe_tag(tag)} has VR {vr}, which is not text")
    return tag, vr or ""


class ReplaceText(Step):
    """``replace``: a regular expression substituted in each value of a text element
    (every match, ``re.sub``). An empty result leaves an empty value."""

    kind = "replace"

    def __init__(self, config: ReplaceStep, where: str):
        self.where = where
        self.items = [
            (*_text_tag(key), re.compile(r.pattern), r.with_) for key, r in config.replace.items()
        ]

    def apply(self, dataset: Dataset, context: ObjectContext) -> None:
        for tag, _, pattern, replacement in self.items:
            element = dataset.get(tag)
            if element is None or element.VR not in TEXT_VRS:
                continue
            values = text_values(element.value)
            if not values:
                continue
            try:
                new = [pattern.sub(replacement, value) for value in values]
            except (re.error, IndexError) as exc:
                raise TransformRefused(f"{self.where}: {describe_tag(tag)}: {exc}") from None
            if new != values:
                write_value(dataset, tag, new if len(new) > 1 else new[0], self.where)


class MapValues(Step):
    """``map``: each value of the element looked up in a CSV table (:mod:`.lookup`).
    A value the table does not list is kept, removed, refused (``fail``), or replaced
    by the ``missing`` text."""

    kind = "map"

    def __init__(self, config: MapStep, where: str):
        self.where = where
        self.items = [
            (*_text_tag(key), LookupTable(lookup.file), lookup.missing)
            for key, lookup in config.map.items()
        ]

    def apply(self, dataset: Dataset, context: ObjectContext) -> None:
        for tag, _, table, missing in self.items:
            element = dataset.get(tag)
            if element is None:
                continue
            values = [value.strip(" \0") for value in text_values(element.value)]
            if not values:
                continue
            new: list[str] = []
            for value in values:
                found = table.get(value)
                if found is not None:
                    new.append(found)
                elif missing == "keep":
                    new.append(value)
                elif missing == "remove":
                    del dataset[tag]
                    break
                elif missing == "fail":
                    raise TransformRefused(
                        f"{self.where}: {describe_tag(tag)} {value!r} is not in {table.path}"
                    )
                else:
                    new.append(missing)
            else:
                if new != values:
                    write_value(dataset, tag, new if len(new) > 1 else new[0], self.where)
