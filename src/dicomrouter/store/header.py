"""Read just the header of a stored object: enough to index and route it.

Pixel data is never parsed: ``read_partial`` stops at the first element of group
0x7FE0 or later, so a 40 MB encapsulated image costs the same as an 8 KB one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pydicom.dataset import Dataset
from pydicom.filereader import read_partial
from pydicom.tag import BaseTag

from .uids import validate_uid

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


def _text(dataset: Dataset, keyword: str) -> str:
    value = dataset.get(keyword)
    if value is None:
        return ""
    return str(value).strip("\x00 ")


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
        return cls(
            sop_instance_uid=validate_uid(dataset.get("SOPInstanceUID"), "SOPInstanceUID"),
            sop_class_uid=validate_uid(
                dataset.get("SOPClassUID") or meta.get("MediaStorageSOPClassUID"), "SOPClassUID"
            ),
            transfer_syntax_uid=validate_uid(meta.get("TransferSyntaxUID"), "TransferSyntaxUID"),
            study_instance_uid=validate_uid(dataset.get("StudyInstanceUID"), "StudyInstanceUID"),
            series_instance_uid=validate_uid(dataset.get("SeriesInstanceUID"), "SeriesInstanceUID"),
            patient_id=_text(dataset, "PatientID"),
            patient_name=_text(dataset, "PatientName"),
            accession_number=_text(dataset, "AccessionNumber"),
            study_date=_text(dataset, "StudyDate"),
            study_description=_text(dataset, "StudyDescription"),
            modality=_text(dataset, "Modality"),
        )
