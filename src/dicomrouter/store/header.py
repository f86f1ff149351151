"""Read just the header of a stored object: enough to index and route it.

Pixel data is never parsed: ``read_partial`` stops at the first element of group
0x7FE0 or later, so a 40 MB encapsulated image costs the same as an 8 KB one.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import read_dataset, read_partial
from pydicom.tag import BaseTag
from pydicom.uid import UID

from .part10 import parse_file_meta
from .uids import validate_uid

_validation_off = False


def install_no_value_validation() -> None:
    """Stop pydicom checking every element value it reads or writes. Idempotent.

    pydicom's default for both reading and writing is ``WARN``: each value is
    matched against its VR's length and character rules and a bad one only emits
    a warning, so nothing is ever refused because of it. On our hot paths that is
    pure cost (about 150 us of CPU per small instance when pynetdicom decoded every
    command set through pydicom, measured). What we must refuse we check ourselves:
    UIDs that become paths are validated by :func:`dicomrouter.store.uids.validate_uid`.
    """
    global _validation_off
    if _validation_off:
        return
    from pydicom import config as pydicom_config

    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    pydicom_config.settings.writing_validation_mode = pydicom_config.IGNORE
    _validation_off = True


_PIXEL_GROUP_START = 0x7FE00000
_DEFER_SIZE = 64 * 1024  # large private blobs stay on disk


_LAST_INDEXED_TAG = 0x0020000E  # SeriesInstanceUID: every indexed element comes before it


def _stop_at_pixels(tag: BaseTag, vr: str | None, length: int) -> bool:
    return tag >= _PIXEL_GROUP_START


def _stop_after_identity(tag: BaseTag, vr: str | None, length: int) -> bool:
    return tag > _LAST_INDEXED_TAG


def read_header(source: str | Path | BinaryIO, identity_only: bool = False) -> Dataset:
    """Parse a Part-10 file up to (not including) pixel data.

    ``identity_only`` stops after SeriesInstanceUID: enough for :class:`InstanceHeader`
    and about half the cost, which matters on the receive path.
    """
    stop = _stop_after_identity if identity_only else _stop_at_pixels
    if isinstance(source, str | Path):
        with open(source, "rb") as handle:
            return read_partial(handle, stop_when=stop, defer_size=_DEFER_SIZE)
    return read_partial(source, stop_when=stop, defer_size=_DEFER_SIZE)


def read_identity(content: bytes | bytearray) -> Dataset:
    """``read_header(BytesIO(content), identity_only=True)`` for a whole Part-10
    file held in memory (what the receiver has for small objects), cheaper: a File
    Meta in the plain layout is read with ``struct``
    (:func:`.part10.parse_file_meta`) and pydicom parses only the data set.
    pydicom's File Meta reading was about 40% of the header step in a profile of the
    receiver. Deflated, private or unusual syntaxes and File Metas go the whole way
    through pydicom."""
    meta = parse_file_meta(content)
    if meta is not None:
        sop_class, sop_instance, syntax, offset = meta
        uid = UID(syntax)
        try:
            plain = uid.is_transfer_syntax and not uid.is_deflated
            implicit, little = uid.is_implicit_VR, uid.is_little_endian
        except ValueError:  # a private transfer syntax: pydicom decides
            plain = False
        if plain:
            dataset = read_dataset(
                io.BytesIO(memoryview(content)[offset:]),
                implicit,
                little,
                stop_when=_stop_after_identity,
                defer_size=_DEFER_SIZE,
            )
            file_meta = FileMetaDataset()
            file_meta.MediaStorageSOPClassUID = UID(sop_class)
            file_meta.MediaStorageSOPInstanceUID = UID(sop_instance)
            file_meta.TransferSyntaxUID = uid
            dataset.file_meta = file_meta
            return dataset
    return read_header(io.BytesIO(content), identity_only=True)


def _text(dataset: Dataset, keyword: str) -> str:
    value = dataset.get(keyword)
    if value is None:
        return ""
    return str(value).strip("\x00 ")


# Tags and VRs of the indexed elements. The receive path reads them from the raw
# bytes instead of through ``Dataset.get``: pydicom's keyword lookup, character-set
# resolution and value conversion cost more than parsing the file (profiled: about
# 200 us of the 400 us header step per instance).
_UID_TAGS = {
    "SOPInstanceUID": 0x00080018,
    "SOPClassUID": 0x00080016,
    "StudyInstanceUID": 0x0020000D,
    "SeriesInstanceUID": 0x0020000E,
}
_TEXT_TAGS = {
    "PatientID": (0x00100020, "LO"),
    "PatientName": (0x00100010, "PN"),
    "AccessionNumber": (0x00080050, "SH"),
    "StudyDate": (0x00080020, "DA"),
    "StudyDescription": (0x00081030, "LO"),
    "Modality": (0x00080060, "CS"),
}
# Byte values after which a raw text value can decode differently from plain ASCII
# (ISO 2022 escapes), be multi-valued, or (PN) hold several component groups.
_NOT_PLAIN = (b"\x1b", b"\\", b"=")


def _raw_bytes(dataset: Dataset, tag: int, vr: str) -> bytes | None:
    """The undecoded value of ``tag`` when it is still a raw element with the
    expected VR (or none: implicit VR), else None (use pydicom's conversion)."""
    elem = dataset.get_item(tag, keep_deferred=True)
    if (
        isinstance(elem, RawDataElement)
        and isinstance(elem.value, bytes)
        and elem.VR in (None, vr, "UN")
    ):
        return elem.value
    return None


def _uid(dataset: Dataset, keyword: str) -> object:
    """A UID element's value as text (validated by the caller), or None if absent."""
    raw = _raw_bytes(dataset, _UID_TAGS[keyword], "UI")
    if raw is not None:
        # pydicom decodes UI with its default encoding (latin-1), drops trailing NUL
        # and spaces, then (pydicom.uid.UID) surrounding whitespace: the same here.
        return raw.decode("latin-1").rstrip("\0 ").strip()
    return dataset.get(keyword)


def _fast_text(dataset: Dataset, keyword: str) -> str:
    """``_text`` without pydicom's conversion for plain ASCII values, which decode
    the same in every character set DICOM allows; anything else goes through
    pydicom so that character sets and multiple values are handled as before."""
    tag, vr = _TEXT_TAGS[keyword]
    raw = _raw_bytes(dataset, tag, vr)
    if raw is not None and raw.isascii() and not any(b in raw for b in _NOT_PLAIN):
        return raw.decode("ascii").strip("\x00 ")
    return _text(dataset, keyword)


IDENTITY_KEYWORDS = ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


def missing_identity(dataset: Dataset) -> list[str]:
    """Identity elements absent from ``dataset``. Parsing stops quietly at garbage or
    at a truncation, so an absent element means "could not read", which is a
    different failure (0xC000) from a present but invalid UID (0xC001)."""
    return [keyword for keyword in IDENTITY_KEYWORDS if keyword not in dataset]


@dataclass(frozen=True)
class InstanceHeader:
    """The indexed identity of one instance, validated."""

    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    study_instance_uid: str
    series_instance_uid: str
    patient_id: str
    patient_name: str
    accession_number: str
    study_date: str
    study_description: str
    modality: str

    @classmethod
    def from_dataset(cls, dataset: Dataset) -> InstanceHeader:
        meta = getattr(dataset, "file_meta", None) or Dataset()
        sop_class = _uid(dataset, "SOPClassUID")
        if not (str(sop_class).strip("\x00 ") if sop_class is not None else ""):
            sop_class = meta.get("MediaStorageSOPClassUID")
        return cls(
            sop_instance_uid=validate_uid(_uid(dataset, "SOPInstanceUID"), "SOPInstanceUID"),
            sop_class_uid=validate_uid(sop_class, "SOPClassUID"),
            transfer_syntax_uid=validate_uid(meta.get("TransferSyntaxUID"), "TransferSyntaxUID"),
            study_instance_uid=validate_uid(_uid(dataset, "StudyInstanceUID"), "StudyInstanceUID"),
            series_instance_uid=validate_uid(
                _uid(dataset, "SeriesInstanceUID"), "SeriesInstanceUID"
            ),
            patient_id=_fast_text(dataset, "PatientID"),
            patient_name=_fast_text(dataset, "PatientName"),
            accession_number=_fast_text(dataset, "AccessionNumber"),
            study_date=_fast_text(dataset, "StudyDate"),
            study_description=_fast_text(dataset, "StudyDescription"),
            modality=_fast_text(dataset, "Modality"),
        )
