"""Where a file-like destination puts an instance: ``layout``, a path of templates
over its tags, rendered into safe names.

Shared by ``type: folder`` (a path under ``path``) and ``type: s3`` (a key under
``prefix``), so both name an instance the same way and no tag value can lead out of
where it is put. The templates are the transforms'
:class:`~dicomrouter.transforms.templates.Template` (format specs included), checked
when the configuration is loaded (``config.models._check_layout``).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

from pydicom.dataset import Dataset

from dicomrouter.transforms import TransformRefused
from dicomrouter.transforms.base import ObjectContext
from dicomrouter.transforms.templates import Template

__all__ = ["MAX_COMPONENT_BYTES", "Layout", "LayoutError", "safe_component"]

#: The longest folder or file name written, in UTF-8 bytes (filesystems allow 255;
#: shares and archivers that add to a name need room).
MAX_COMPONENT_BYTES = 100

#: Characters never written in a name: path separators, and what Windows and SMB
#: shares refuse (a research share is often one).
_UNSAFE = re.compile(r'[/\\:*?"<>|]')
_RESERVED = frozenset(
    {"CON", "PRN", "AUX", "NUL"}
    | {f"COM{n}" for n in range(1, 10)}
    | {f"LPT{n}" for n in range(1, 10)}
)


def safe_component(text: str, limit: int = MAX_COMPONENT_BYTES) -> str:
    """``text`` as one folder or file name that stays where it is put.

    Separators (``/``, ``\\``), control and format characters (NUL, newlines,
    right-to-left overrides...) and what Windows refuses (``:*?"<>|``) become ``_``;
    a leading dot becomes ``_`` (no hidden files, no ``.`` or ``..``), trailing dots
    and surrounding spaces go; a reserved device name (``CON``, ``NUL``, ``COM1``...)
    gets a ``_`` in front; empty is ``_``. Over ``limit`` UTF-8 bytes, the name is
    shortened and gets a hash of the whole value (two long values that share a
    beginning stay two files), keeping a short extension.
    """
    text = unicodedata.normalize("NFC", text)
    text = text.encode("utf-8", "replace").decode("utf-8")  # lone surrogates
    text = "".join(
        "_" if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp", "Cs") else ch for ch in text
    )
    text = _UNSAFE.sub("_", text).strip(" ").rstrip(". ")
    if text.startswith("."):
        text = "_" + text[1:]
    if not text:
        return "_"
    if text.split(".", 1)[0].upper().rstrip(" ") in _RESERVED:
        text = "_" + text
    if len(text.encode("utf-8")) <= limit:
        return text
    stem, dot, ext = text.rpartition(".")
    if not dot or not stem or len(ext.encode("utf-8")) > 16:
        stem, ext = text, ""
    else:
        ext = "." + ext
    mark = "~" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:10]
    budget = limit - len(mark.encode("utf-8")) - len(ext.encode("utf-8"))
    cut = stem.encode("utf-8")[:budget].decode("utf-8", "ignore").rstrip(" .")
    return (cut or "_") + mark + ext


class LayoutError(Exception):
    """A value of this instance does not fit its format spec (``{PatientID:03d}`` on
    text): the instance cannot be named, for good."""


class Layout:
    """A compiled ``layout``: one template per folder or file name."""

    def __init__(self, text: str) -> None:
        self.text = text
        self._parts = [Template(part) for part in text.split("/")]
        self._context = ObjectContext()

    def render(self, header: Dataset) -> list[str]:
        """The safe names (folders, then the file) of the instance whose data set
        (pixel data not needed) is ``header``; :class:`LayoutError` when a value does
        not fit its format spec."""
        names = []
        for template in self._parts:
            try:
                text = template.render(header, self._context, "layout")
            except TransformRefused as exc:
                raise LayoutError(str(exc)) from None
            names.append(safe_component(text))
        return names
