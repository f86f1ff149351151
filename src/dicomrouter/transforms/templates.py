"""Values of ``set`` that depend on the object: ``"{CallingAETitle}"``,
``"GH-{PatientID}"``, ``"{SeriesNumber:03d}"``.

Python's format syntax (``str.format``), with fields that are DICOM keywords, tags
(``{0008,0080}``) or the pseudo-keys of the rules (``CallingAETitle``,
``CalledAETitle``, ``SourceAddress``, ``ReceivedAt``). ``{{`` and ``}}`` are literal
braces. A field whose element is absent or empty renders as the empty text (its format
spec is then not applied). Numbers (IS, DS, US...) stay numbers for the format spec;
``ReceivedAt`` is a datetime (``{ReceivedAt:%Y%m%d}``).

Field names are checked when the pipeline is compiled; a format spec that does not fit
the value of one object (``{PatientID:03d}`` on text) refuses that object.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.tag import BaseTag

from .base import ObjectContext, TransformRefused
from .tags import TagError, fixed_tag
from .values import as_template_value

_PSEUDO = {
    "CallingAETitle": "calling_ae",
    "CalledAETitle": "called_ae",
    "SourceAddress": "source_address",
    "ReceivedAt": "received_at",
}


@dataclass(frozen=True)
class _Field:
    name: str
    tag: BaseTag | None  # None: a pseudo-key
    spec: str


class Template:
    """A compiled template: literal parts and fields, resolved once."""

    def __init__(self, text: str):
        self.text = text
        self.parts: list[str | _Field] = []
        try:
            parsed = list(string.Formatter().parse(text))
        except ValueError as exc:
            raise TagError(f"template {text!r}: {exc} (write {{{{ and }}}} for braces)") from None
        for literal, name, spec, conversion in parsed:
            if literal:
                self.parts.append(literal)
            if name is None:
                continue
            if conversion:
                raise TagError(f"template {text!r}: conversions (!{conversion}) are not supported")
            if not name:
                raise TagError(f"template {text!r}: empty field {{}}; name an element")
            if spec and "{" in spec:
                raise TagError(f"template {text!r}: nested fields in a format spec")
            tag = None if name in _PSEUDO else fixed_tag(name)
            self.parts.append(_Field(name, tag, spec or ""))

    @property
    def is_literal(self) -> bool:
        return all(isinstance(part, str) for part in self.parts)

    def literal(self) -> str:
        """The text of a template without fields (braces unescaped)."""
        return "".join(part for part in self.parts if isinstance(part, str))

    def render(self, dataset: Dataset, context: ObjectContext, where: str) -> str:
        out: list[str] = []
        for part in self.parts:
            if isinstance(part, str):
                out.append(part)
                continue
            value = self._value(part, dataset, context)
            if value == "" or value is None:
                continue
            try:
                out.append(format(value, part.spec))
            except (TypeError, ValueError) as exc:
                raise TransformRefused(
                    f"{where}: template {self.text!r}: {{{part.name}:{part.spec}}} does not fit "
                    f"the value {value!r} ({exc})"
                ) from None
        return "".join(out)

    @staticmethod
    def _value(field: _Field, dataset: Dataset, context: ObjectContext) -> object:
        if field.tag is None:
            value = getattr(context, _PSEUDO[field.name])
            return value if value is not None else ""
        element = dataset.get(field.tag)
        if element is None:
            return ""
        return as_template_value(element.value)
