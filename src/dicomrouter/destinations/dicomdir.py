"""A DICOM file-set per study for folder destinations (``dicomdir: true``): where
each file goes, and the ``DICOMDIR`` that lists them (PS3.10, PS3.3 annex F).

**Names.** A DICOMDIR lists files by File IDs of at most 8 names of at most 8
characters ``A-Z 0-9 _`` (PS3.10 8.2, 8.5), which no useful layout renders. So a
study's folder holds ``DICOM/<series>/<instance>``, names made from hashes of the
UIDs (:func:`file_id`): a resend, or another worker, lands on the same name without
asking anyone, and no tag value reaches a File ID. Two instances whose hashes meet
get the next name of their sequence (the caller reads the file's SOP Instance UID).

**The DICOMDIR** is rebuilt from the files in the folder (:func:`write_dicomdir`),
so a crash or an earlier failure is repaired by the next rebuild. The records come
from pydicom (``FileSet._recordify``: the record types and Type 1 keys of PS3.3
F.5); the encoding, with its byte offsets, is done here: pydicom's own
``FileSet.write`` would copy every file to names of its choosing, in place and
non-atomically, and ``FileSet.add`` costs O(n) per instance (10.5 s for 1000).
The caller may keep the records of files already read (by inode, size, modification
time), so a study that comes in many batches is read once.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import logging
import re
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.fileset import FileSet
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRLittleEndian,
    MediaStorageDirectoryStorage,
    generate_uid,
)

from .outgoing import error_text

log = logging.getLogger(__name__)

__all__ = ["FILESET_DIR", "Records", "file_id", "write_dicomdir"]

#: The folder under a study's folder that holds its files.
FILESET_DIR = "DICOM"
_FILE_ID = re.compile(r"^[A-Z0-9_]{1,8}$")
#: A file's records, and what they were made from (inode, size, modification time).
Records = tuple[tuple[int, int, int], str, list[Dataset]]
#: What a DICOMDIR record must hold (PS3.3 F.5, Type 1) and the header may lack (it is
#: Type 2 in most IODs): what the record says instead. The files are not changed.
_INVENTED: dict[str, Any] = {
    "PatientID": "UNKNOWN",
    "StudyDate": "19000101",
    "StudyTime": "000000",
    "StudyID": "1",
    "Modality": "OT",
    "SeriesNumber": 0,
}


def file_id(uid: str, attempt: int = 0) -> str:
    """A File ID name for ``uid`` (8 characters ``A-Z 2-7``, 40 bits of its hash);
    ``attempt`` > 0 gives the next names, for two UIDs whose names meet."""
    text = uid if not attempt else f"{uid}#{attempt}"
    digest = hashlib.sha256(text.encode("ascii", "replace")).digest()
    return base64.b32encode(digest[:5]).decode("ascii")


def write_dicomdir(
    study: Path,
    put: Callable[[Path, bytes], None],
    known: dict[Path, Records] | None = None,
    keep: int = 0,
) -> dict[Path, str]:
    """Rebuild ``study``'s DICOMDIR from the files under its ``DICOM/`` folder; the
    files left out, with why (no record can be made of them). ``known`` holds the
    records of files read before (kept by the caller between batches): a file whose
    inode, size and modification time are unchanged is not read again."""
    maker = FileSet()
    tree = _Node(Dataset())
    known = {} if known is None else known
    seen: dict[Path, Records] = {}
    left_out: dict[Path, str] = {}
    for path in sorted(_fileset_files(study / FILESET_DIR)):
        try:
            stat = path.stat()
            stamp = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
            cached = known.get(path)
            if cached is not None and cached[0] == stamp:
                _, uid, records = cached
            else:
                header = dcmread(path, stop_before_pixels=True)
                uid = str(header.SOPInstanceUID)
                # pydicom's records for one instance, highest level first (PS3.3
                # F.5); FileSet.add makes the same, but costs O(n) per instance.
                records = list(maker._recordify(_record_source(header)))
                records[-1].ReferencedFileID = list(path.relative_to(study).parts)
                for record in records:
                    _encode(record)  # a value that cannot be encoded leaves this file out
        except Exception as exc:
            left_out[path] = f"not in the DICOMDIR: {error_text(exc)}"
            log.warning("%s left out of the DICOMDIR: %s", path, error_text(exc))
            continue
        seen[path] = (stamp, uid, tree.place(records, uid))
    put(study / "DICOMDIR", _encode_dicomdir(tree))
    known.clear()
    known.update(itertools.islice(seen.items(), keep))
    return left_out


@dataclass
class _Node:
    """A directory record and the records of the level below it."""

    record: Dataset
    children: dict[str, _Node] = field(default_factory=dict)

    def place(self, records: list[Dataset], uid: str) -> list[Dataset]:
        """Add one instance's records; the records now in the tree for it (the
        levels above are shared by all the instances of a series, study, patient)."""
        node, placed = self, []
        for depth, record in enumerate(records):
            last = depth == len(records) - 1
            key = uid if last else str(record.get(_LEVEL_KEYS.get(depth, ""), "")) or "_"
            node = node.children.setdefault(key, _Node(record))
            if last:
                node.record = record  # a resend with the same UID: the latest file
            placed.append(node.record)
        return placed

    def ordered(self) -> list[_Node]:
        """The records of the level below: series by Series Number, instances by
        Instance Number (as a viewer lists them), else as found."""
        return sorted(self.children.values(), key=_number)

    def walk(self) -> Iterator[_Node]:
        """The records below, depth first, each before the level it references."""
        for child in self.ordered():
            yield child
            yield from child.walk()


def _number(node: _Node) -> int:
    for keyword in ("InstanceNumber", "SeriesNumber"):
        try:
            return int(node.record.get(keyword) or 0)
        except (TypeError, ValueError):
            continue
    return 0


#: What tells records of one level apart: patient, study, series (then SOP Instance).
_LEVEL_KEYS = {0: "PatientID", 1: "StudyInstanceUID", 2: "SeriesInstanceUID"}
_ITEM_HEADER = 8  # (FFFE,E000) and a 4-byte length
_SEQ_HEADER = 12  # explicit VR: tag, "SQ", 2 reserved bytes, 4-byte length


def _encode_dicomdir(tree: _Node) -> bytes:
    """The DICOMDIR of ``tree`` as a Part-10 file (Explicit VR Little Endian, PS3.10
    8.6): records in one sequence, each linked to its next sibling and its first
    child by byte offsets from the start of the file (PS3.3 F.3.2.1). Offsets are
    fixed-size (UL), so each record's length is known before they are filled in."""
    nodes = list(tree.walk())
    for node in nodes:
        node.record.OffsetOfTheNextDirectoryRecord = 0
        node.record.OffsetOfReferencedLowerLevelDirectoryEntity = 0
    ds = Dataset()
    ds.FileSetID = None
    ds.OffsetOfTheFirstDirectoryRecordOfTheRootDirectoryEntity = 0
    ds.OffsetOfTheLastDirectoryRecordOfTheRootDirectoryEntity = 0
    ds.FileSetConsistencyFlag = 0
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MediaStorageDirectoryStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    head = DicomBytesIO()
    head.is_little_endian, head.is_implicit_VR = True, False
    head.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(head, meta, enforce_standard=True)
    prefix = head.getvalue()
    position = len(prefix) + len(_encode(ds)) + _SEQ_HEADER
    offsets: dict[int, int] = {}
    for node in nodes:
        offsets[id(node)] = position
        position += _ITEM_HEADER + len(_encode(node.record))
    for parent in [tree, *nodes]:
        children = parent.ordered()
        if children and parent is not tree:
            parent.record.OffsetOfReferencedLowerLevelDirectoryEntity = offsets[id(children[0])]
        for current, following in zip(children, children[1:], strict=False):
            current.record.OffsetOfTheNextDirectoryRecord = offsets[id(following)]
    roots = tree.ordered()
    if roots:
        ds.OffsetOfTheFirstDirectoryRecordOfTheRootDirectoryEntity = offsets[id(roots[0])]
        ds.OffsetOfTheLastDirectoryRecordOfTheRootDirectoryEntity = offsets[id(roots[-1])]
    items = b"".join(
        b"\xfe\xff\x00\xe0" + struct.pack("<I", len(body)) + body
        for body in (_encode(node.record) for node in nodes)
    )
    sequence = b"\x04\x00\x20\x12SQ\x00\x00" + struct.pack("<I", len(items))
    return prefix + _encode(ds) + sequence + items


def _encode(record: Dataset) -> bytes:
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, record)
    return buffer.getvalue()


def _fileset_files(base: Path) -> Iterator[Path]:
    if not base.is_dir():
        return
    for series in base.iterdir():
        if not (series.is_dir() and _FILE_ID.match(series.name)):
            continue
        for path in series.iterdir():
            if _FILE_ID.match(path.name) and path.is_file():
                yield path


def _record_source(header: Dataset) -> Dataset:
    """What pydicom makes the records from: the header (changed in place), with the
    Type 1 values of the records it lacks invented (:data:`_INVENTED`)."""
    for keyword, value in _INVENTED.items():
        if keyword not in header or header[keyword].VM == 0:
            setattr(header, keyword, value)
    if "InstanceNumber" not in header or header["InstanceNumber"].VM == 0:
        header.InstanceNumber = 1
    if "EncapsulatedDocument" in header and not header.get("MIMETypeOfEncapsulatedDocument"):
        header.MIMETypeOfEncapsulatedDocument = (
            "application/pdf" if UID(header.SOPClassUID).endswith(".104.1") else "text/XML"
        )
    return header
