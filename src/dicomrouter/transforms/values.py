"""Writing a value into an element, by the rules of its VR (PS3.5 6.2).

The VR comes from the element already in the data set, else from the dictionary. A
value that does not fit (longer than the VR allows, not a number where one is
needed) is never truncated or coerced silently: a literal from the configuration is
refused when the pipeline is compiled (:func:`check_literal`), a value computed per
object (a template, a copy, a lookup) refuses that object with
:class:`~.base.TransformRefused`, naming the element and the limit.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag
from pydicom.valuerep import PersonName

from .base import TransformRefused
from .tags import describe_tag, dictionary_vr

#: Largest length of one value, in characters, per VR (PS3.5 table 6.2-1); PN is
#: per component group. VRs not listed (UC, UR, UT, binary) have no practical limit.
MAX_LENGTH = {
    "AE": 16,
    "AS": 4,
    "CS": 16,
    "DA": 8,
    "DS": 16,
    "DT": 26,
    "IS": 12,
    "LO": 64,
    "LT": 10240,
    "PN": 64,
    "SH": 16,
    "ST": 1024,
    "TM": 14,
    "UI": 64,
}
#: VRs whose values are text: ``replace`` and ``map`` work on these only.
TEXT_VRS = frozenset({*MAX_LENGTH, "UC", "UR", "UT"})
_INT_VRS = frozenset({"US", "SS", "UL", "SL", "UV", "SV"})
_FLOAT_VRS = frozenset({"FL", "FD"})
#: VRs ``set`` can write from configuration text or numbers.
SETTABLE_VRS = TEXT_VRS | _INT_VRS | _FLOAT_VRS
_SINGLE_TEXT_VRS = frozenset({"LT", "ST", "UT", "UR"})  # no backslash multi-values

Scalar = str | int | float
Value = Scalar | Sequence[Scalar] | None


class ValueProblem(ValueError):
    """A value that does not fit its element; the message names both."""


def element_vr(dataset: Dataset, tag: BaseTag) -> str | None:
    """The VR a value written at ``tag`` gets: the present element's (unless UN),
    else the dictionary's."""
    element = dataset.get(tag)
    if element is not None and element.VR not in ("UN", None):
        return str(element.VR)
    return dictionary_vr(tag)


def check_value(tag: BaseTag, vr: str, value: Value) -> Value:
    """``value`` made ready for an element of ``vr`` (numbers parsed for binary
    numeric VRs), or :class:`ValueProblem`."""
    if value is None or value == "":
        return None
    items: Sequence[Scalar] = [value] if isinstance(value, str | int | float) else value
    if vr not in SETTABLE_VRS:
        raise ValueProblem(f"{describe_tag(tag)} has VR {vr}: set writes text and numbers only")
    if len(items) > 1 and vr in _SINGLE_TEXT_VRS:
        raise ValueProblem(f"{describe_tag(tag)} has VR {vr}, which holds a single value")
    checked: list[Scalar] = []
    for item in items:
        if vr in _INT_VRS:
            checked.append(_number(tag, vr, item, int))
        elif vr in _FLOAT_VRS:
            checked.append(_number(tag, vr, item, float))
        else:
            text = str(item)
            limit = MAX_LENGTH.get(vr)
            longest = max((len(part) for part in text.split("^")), default=0)
            size = longest if vr == "PN" else len(text)
            if limit is not None and size > limit:
                raise ValueProblem(
                    f"{text!r} is {size} characters, longer than the {limit} that "
                    f"{describe_tag(tag)} (VR {vr}) allows"
                )
            if "\\" in text and vr not in _SINGLE_TEXT_VRS:
                raise ValueProblem(
                    f"{text!r} contains a backslash, which separates values: write a list "
                    f"to set several values of {describe_tag(tag)}"
                )
            checked.append(text)
    return checked if isinstance(value, list) else checked[0]


def _number(tag: BaseTag, vr: str, item: Scalar, kind: type[int] | type[float]) -> int | float:
    try:
        return kind(item)
    except (TypeError, ValueError):
        raise ValueProblem(
            f"{item!r} is not a number, and {describe_tag(tag)} has VR {vr}"
        ) from None


def write_value(dataset: Dataset, tag: BaseTag, value: Value, where: str) -> None:
    """Set ``tag`` to ``value`` (replacing the element or adding it), or refuse the
    object with the reason."""
    vr = element_vr(dataset, tag)
    if vr is None:
        raise TransformRefused(
            f"{where}: cannot write {describe_tag(tag)}: the dictionary does not know its VR "
            "and the object does not have it"
        )
    try:
        checked = check_value(tag, vr, value)
    except ValueProblem as exc:
        raise TransformRefused(f"{where}: {exc}") from None
    dataset[tag] = DataElement(tag, vr, checked)


def text_values(value: object) -> list[str]:
    """The values of a text element as strings (a multi-valued one gives several)."""
    if value is None or value == "":
        return []
    items = value if isinstance(value, MultiValue | list | tuple) else [value]
    out = []
    for item in items:
        if isinstance(item, bytes):
            item = item.decode("latin-1")
        elif isinstance(item, PersonName):
            item = str(item)
        out.append("" if item is None else str(item))
    return out


def as_template_value(value: object) -> object:
    """An element value as a template sees it: numbers stay numbers (so that
    ``{SeriesNumber:03d}`` works), several values are joined with a backslash."""
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(str(v) for v in value)
    if isinstance(value, bytes):
        return value.decode("latin-1").rstrip(" \0")
    if isinstance(value, int | float):
        return value
    if isinstance(value, str):
        return value.rstrip(" \0")
    return "" if value is None else str(value)
