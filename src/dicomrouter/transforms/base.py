"""What every transform step is, and what it may read besides the data set.

A step changes a pydicom ``Dataset`` in place. It never sees the file: the pipeline
(:mod:`.pipeline`) reads the stored file's header, runs the steps, and
:mod:`.output` writes the result next to the untouched original, copying the pixel
data through without decoding it unless a step says it ``touches_pixels``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import ClassVar

from pydicom.dataset import Dataset


class TransformRefused(Exception):
    """This object must not go through this pipeline (pixels that may show identity,
    a ``map`` miss with ``missing: fail``...). Its delivery fails permanently with
    this message as the reason; other objects are not affected."""


class TransformUnavailable(Exception):
    """The pipeline cannot run at all right now (its secret is not in the
    environment, its lookup file is missing): deliveries through it wait and are
    retried, with this message, instead of failing."""


@dataclass(frozen=True)
class MappingRecord:
    """One entry of the re-identification mapping, sealed by the step that made it
    (:mod:`.mapping`): the original is encrypted, the pseudonym is in clear. The
    dispatch side stores it (``store.pseudonyms``); nothing here writes the index."""

    pipeline: str
    kind: str
    """``patient``, ``date_offset``, ``study``, ``series`` or ``instance``."""
    lookup: str
    """HMAC-SHA256 (hex) of the original under the mapping key: finds the row from
    the original without decrypting every row, and makes recording idempotent."""
    pseudonym: str
    sealed: str
    """The original (JSON), AES-256-GCM encrypted, base64."""
    key_id: str
    """Names the key it was sealed with (derived from it, not the key)."""


@dataclass(frozen=True)
class ObjectContext:
    """How the object arrived: the pseudo-keys templates and rules may read; and,
    while a delivery's copy is made, where mappings to keep are reported."""

    calling_ae: str = ""
    called_ae: str = ""
    source_address: str = ""
    received_at: datetime | None = None
    pipeline: str = ""
    """The pipeline running (set by :meth:`CompiledPipeline.apply`)."""
    record: Callable[[MappingRecord], None] | None = None
    """Where a step reports what it mapped for re-identification (``deidentify``
    with ``mapping``). None (dry runs, ``test-rule``): nothing is kept. The dispatch
    worker commits what was reported before the copy is sent."""


class Step(ABC):
    """One configured step, compiled (regexes compiled, files opened lazily)."""

    kind: ClassVar[str]
    """The step's key in the configuration (``set``, ``deidentify``...)."""
    keyed: bool = False
    """True if what the step writes depends on a secret (pseudonyms, per-patient
    date offsets): previewing it shows real pseudonyms, which only an admin may see."""
    sees_every_element: bool = False
    """True if the step must see every element of the object (de-identification,
    removing private data): the copy is then made from the whole file whenever
    reading only the header would hide elements from it (after the pixel data)."""
    touches_pixels: ClassVar[bool] = False
    """True if the step reads or changes Pixel Data: the pipeline then reads the
    whole file, not only its header."""

    def needs_whole_file(self) -> bool:
        """True if this step must see elements that are otherwise copied as raw bytes
        (group 7FE0: Pixel Data and its companions). A step that ``touches_pixels``
        does; a ``remove: [PixelData]`` does too."""
        return self.touches_pixels

    @abstractmethod
    def apply(self, dataset: Dataset, context: ObjectContext) -> None:
        """Change ``dataset`` in place, or raise :class:`TransformRefused`."""
