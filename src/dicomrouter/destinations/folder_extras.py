"""What a folder destination writes besides each instance's file: previews
(``render``), the documents of encapsulated PDF and CDA objects
(``extract_documents``) and a DICOMDIR per study (``dicomdir``).

All of it is made from the file as written (after transforms and transcoding), and
written whole through the sender's ``put`` (temporary file, fsync, rename). An extra
that cannot be made never undoes the delivery of the DICOM file: the instance is
delivered with a remark (``Outcome.WARNING``) and the reason is on its delivery.

**File-sets** (``dicomdir: true``). A DICOMDIR lists files by File IDs of at most 8
names of at most 8 characters ``A-Z 0-9 _`` (PS3.10 8.2, 8.5), which no useful
layout renders. So each study's folder (``dicomdir_folder``) holds
``DICOM/<series>/<instance>``, names made from hashes of the UIDs: a resend, or
another worker, lands on the same name without asking anyone. Two instances whose
hashes meet get the next name (the file's own SOP Instance UID is read to tell).
After each batch the study's ``DICOMDIR`` is rebuilt from the files in its folder,
so a crash or an earlier failure is repaired by the next batch; the results of its
instances are reported only then, and stay pending (``TRANSIENT``) when it could not
be written. One lock per study (``flock``) keeps workers from interleaving.

The records come from pydicom (``FileSet._recordify``: the record types and Type 1
keys of PS3.3 F.5); the encoding, with its byte offsets, is done here. pydicom's own
``FileSet.write`` would copy every file to names of its choosing, in place and
non-atomically, and ``FileSet.add`` costs O(n) per instance. Records of files read
before are kept per sender (by inode, size, modification time; up to
:data:`_KNOWN_FILES`), so a study that comes in many batches is read once.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import itertools
import logging
import os
import re
import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

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

from dicomrouter.config.models import FolderDestinationConfig

from .outgoing import InstanceResult
from .status import Outcome

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)

__all__ = [
    "DOCUMENT_SUFFIXES",
    "FILESET_DIR",
    "ExtraError",
    "FolderExtras",
    "encapsulated_document",
    "extra_path",
    "file_id",
    "render_preview",
    "write_dicomdir",
]

#: The folder under a study's folder that holds its files (``dicomdir: true``).
FILESET_DIR = "DICOM"
#: Encapsulated documents extracted, by SOP Class, with the suffix they get.
DOCUMENT_SUFFIXES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.104.1": ".pdf",  # Encapsulated PDF Storage
    "1.2.840.10008.5.1.4.1.1.104.2": ".xml",  # Encapsulated CDA Storage
}
_PREVIEW_SUFFIX = {"png": ".png", "jpeg": ".jpg"}
_JPEG_QUALITY = 90
_FILE_ID = re.compile(r"^[A-Z0-9_]{1,8}$")
_MAX_PROBES = 64
_STALE_LOCK = 3600.0  # seconds after which a study's lock file is removed
#: Files whose DICOMDIR records a sender keeps between batches (about 5 KB each),
#: the most recently written studies first.
_KNOWN_FILES = 5000
#: A file's records, and what they were made from (inode, size, modification time).
_Records = tuple[tuple[int, int, int], str, list[Dataset]]
_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
#: Decoded as RGB by pydicom (YBR_FULL and YBR_FULL_422 are converted; JPEG 2000's
#: ICT and RCT come out of the decoder as RGB).
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT")
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


class ExtraError(Exception):
    """An extra cannot be made from this object (the reason, for its delivery)."""


def extra_path(written: Path, suffix: str) -> Path:
    """Where the extra of ``written`` goes: beside it, its name without ``.dcm`` plus
    ``suffix``. A safe name stays safe (only 4 characters are added)."""
    name = written.name
    if name.lower().endswith(".dcm"):
        name = name[:-4]
    return written.with_name(name + suffix)


# -- previews ---------------------------------------------------------------------


def render_preview(path: Path, kind: str) -> bytes | None:
    """A preview of the image in the Part-10 file ``path``, encoded as ``kind``
    (``png`` or ``jpeg``), 8 bits; None when it holds no pixel data.

    Grey images go through the Modality LUT, then their first VOI LUT or window
    (``apply_voi_lut``), scaled from that output's range to 0-255; without either,
    from the frame's minimum to its maximum. MONOCHROME1 is inverted (white is 0).
    Colour images are written as they are (PALETTE COLOR through its palette), 16-bit
    colour scaled down. A multi-frame image shows its middle frame, frame
    ``(n + 1) // 2`` counting from 1: only that frame is decoded.

    numpy and imagecodecs are imported here, not with the module: the HTTP process,
    which makes senders only for an operator's echo, cannot import numpy.
    """
    import imagecodecs
    from pydicom.pixels import pixel_array

    try:
        ds = dcmread(path, defer_size="4 KB")
    except Exception as exc:
        raise ExtraError(f"cannot read {path.name}: {_detail(exc)}") from None
    if "PixelData" not in ds:
        return None
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if photometric not in (*_MONOCHROME, *_COLOUR, "PALETTE COLOR"):
        raise ExtraError(f"photometric interpretation {photometric or '(none)'} is not rendered")
    try:
        frames = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        frames = 1
    try:
        arr = pixel_array(path, index=(max(frames, 1) - 1) // 2)
        image = _to_8bit(arr, ds, photometric)
        if kind == "png":
            return bytes(imagecodecs.png_encode(image))
        return bytes(imagecodecs.jpeg8_encode(image, level=_JPEG_QUALITY))
    except ExtraError:
        raise
    except Exception as exc:  # a codec missing, damaged pixel data, odd attributes
        raise ExtraError(f"cannot render the image: {_detail(exc)}") from None


def _to_8bit(arr: np.ndarray, ds: Dataset, photometric: str) -> np.ndarray:
    import numpy as np
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(arr, ds)
        return _colour(rgb >> 8 if rgb.dtype.itemsize > 1 else rgb, photometric)
    if photometric in _COLOUR:
        if arr.dtype.itemsize > 1:
            arr = arr >> max(min(int(ds.get("BitsStored") or 16), 16) - 8, 0)
        return _colour(arr, photometric)
    if arr.ndim != 2:
        raise ExtraError(f"{photometric} pixel data of shape {arr.shape} is not one frame")
    values = np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
    if _no_voi(ds):
        out, low, high = values, float(values.min()), float(values.max())
    else:
        source = values if _is_window(ds) else np.rint(values).astype(np.int64)
        out = np.asarray(apply_voi_lut(source, ds, index=0), dtype=np.float64)
        low, high = _voi_range(ds)
    if high > low:
        scaled = (np.clip(out, low, high) - low) * (255.0 / (high - low))
    else:
        scaled = np.zeros_like(out)
    image = np.rint(scaled).astype(np.uint8)
    if photometric == "MONOCHROME1":
        image = 255 - image
    return np.ascontiguousarray(image)


def _colour(arr: np.ndarray, photometric: str) -> np.ndarray:
    import numpy as np

    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ExtraError(f"{photometric} pixel data of shape {arr.shape} is not one image")
    return np.ascontiguousarray(np.clip(arr, 0, 255).astype(np.uint8))


def _is_window(ds: Dataset) -> bool:
    return not ds.get("VOILUTSequence") and "WindowCenter" in ds and "WindowWidth" in ds


def _no_voi(ds: Dataset) -> bool:
    return not ds.get("VOILUTSequence") and not ("WindowCenter" in ds and "WindowWidth" in ds)


def _voi_range(ds: Dataset) -> tuple[float, float]:
    """The output range of the VOI transform: what it gives far below and far above
    anything stored (the window's ``y_min``/``y_max``, a LUT's first and last entry)."""
    import numpy as np
    from pydicom.pixels import apply_voi_lut

    if _is_window(ds):
        probe: np.ndarray = np.array([-1e12, 1e12], dtype=np.float64)
    else:
        probe = np.array([-(2**40), 2**40], dtype=np.int64)
    with np.errstate(over="ignore"):
        ends = np.asarray(apply_voi_lut(probe, ds, index=0), dtype=np.float64)
    low, high = float(ends.min()), float(ends.max())
    return low, high


# -- encapsulated documents -------------------------------------------------------


def encapsulated_document(path: Path) -> tuple[bytes, str] | None:
    """The document of an Encapsulated PDF or CDA object and its suffix; None for
    any other object.

    The value of Encapsulated Document (0042,0011), an OB, is padded to an even
    length with one 00H byte (PS3.5 6.2). When Encapsulated Document Length
    (0042,0015) says how long the document is, it is cut there; without it, one
    trailing 00H is taken for that pad (a PDF ends with ``%%EOF`` and a line end, a
    CDA with its closing tag and maybe white space: neither with 00H).
    """
    try:
        ds = dcmread(path, stop_before_pixels=True)  # (0042,0011) comes before pixels
    except Exception as exc:
        raise ExtraError(f"cannot read {path.name}: {_detail(exc)}") from None
    suffix = DOCUMENT_SUFFIXES.get(str(ds.get("SOPClassUID", "")))
    if suffix is None:
        return None
    data = ds.get("EncapsulatedDocument")
    if not isinstance(data, bytes) or not data:
        raise ExtraError("the object holds no Encapsulated Document (0042,0011)")
    length = ds.get("EncapsulatedDocumentLength")
    if isinstance(length, int) and 0 < length <= len(data):
        return data[:length], suffix
    if data.endswith(b"\x00"):
        data = data[:-1]
    return data, suffix


# -- file-sets --------------------------------------------------------------------


def file_id(uid: str, attempt: int = 0) -> str:
    """A File ID name for ``uid`` (8 characters ``A-Z 2-7``, 40 bits of its hash);
    ``attempt`` > 0 gives the next names, for two UIDs whose names meet."""
    text = uid if not attempt else f"{uid}#{attempt}"
    digest = hashlib.sha256(text.encode("ascii", "replace")).digest()
    return base64.b32encode(digest[:5]).decode("ascii")


@dataclass
class _Study:
    folder: Path
    files: dict[int, Path] = field(default_factory=dict)  # instance key -> its file
    results: list[InstanceResult] = field(default_factory=list)


class FolderExtras:
    """The extras of one :class:`~.folder.FolderSender` (one per worker thread).

    ``put(target, data)`` writes a file whole, replacing one already there; its
    :class:`OSError` is the caller's to classify.
    """

    def __init__(self, config: FolderDestinationConfig, put: Callable[[Path, bytes], None]) -> None:
        self.config = config
        self.root = Path(config.path)
        self._put = put
        self._studies: dict[Path, _Study] = {}
        self._held: dict[int, _Study] = {}  # instance key -> its study
        self._known: OrderedDict[Path, dict[Path, _Records]] = OrderedDict()
        self._locks_swept = False

    # -- per instance ----------------------------------------------------------------

    def file_in_set(self, study: Path, header: Dataset) -> Path:
        """Where ``header``'s instance goes in the file-set of ``study``: its own file
        if it is there already, else the first free name of its hash sequence."""
        series = file_id(str(header.get("SeriesInstanceUID", "")))
        uid = str(header.get("SOPInstanceUID", ""))
        folder = study / FILESET_DIR / series
        for attempt in range(_MAX_PROBES):
            candidate = folder / file_id(uid, attempt)
            if not candidate.exists() or _sop_instance_uid(candidate) == uid:
                return candidate
        raise ExtraError(f"{_MAX_PROBES} names taken in {folder}")  # never, with 40 bits

    @contextmanager
    def locked(self, study: Path) -> Iterator[None]:
        """Hold the study's lock, across threads and processes of this host: a file
        in ``<path>/.tmp/locks/`` (a folder the temporary-file sweep leaves alone),
        ``flock``-ed. Lock files of studies not written for an hour are removed
        (:func:`_sweep_locks`), so the one locked is checked to be still in place."""
        locks = self.root / ".tmp" / "locks"
        if not self._locks_swept:
            locks.mkdir(parents=True, exist_ok=True)
            self._locks_swept = True
            _sweep_locks(locks)
        path = locks / hashlib.sha256(os.fsencode(study)).hexdigest()[:32]
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                if os.fstat(fd).st_ino == os.stat(path).st_ino:
                    break
            except FileNotFoundError:
                pass  # removed by a sweep while we waited: lock the new one
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        try:
            os.utime(fd)
            yield
        finally:
            os.close(fd)  # releases the lock

    def after_write(self, key: int, written: Path, study: Path | None) -> list[str]:
        """Make the extras of the file just written; what could not be made."""
        problems: list[str] = []
        if self.config.render:
            problems += self._extra(written, "preview", lambda: self._preview(written))
        if self.config.extract_documents:
            problems += self._extra(written, "document", lambda: self._document(written))
        if study is not None:
            held = self._studies.setdefault(study, _Study(study))
            held.files[key] = written
            self._held[key] = held
        return problems

    def _extra(self, written: Path, what: str, make: Callable[[], None]) -> list[str]:
        try:
            make()
        except (ExtraError, OSError) as exc:
            text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            log.warning("no %s for %s: %s", what, written, text)
            return [f"no {what}: {text}"]
        return []

    def _preview(self, written: Path) -> None:
        kind = self.config.render or "png"
        data = render_preview(written, kind)
        if data is not None:
            self._write_extra(extra_path(written, _PREVIEW_SUFFIX[kind]), data)

    def _document(self, written: Path) -> None:
        found = encapsulated_document(written)
        if found is not None:
            data, suffix = found
            self._write_extra(extra_path(written, suffix), data)

    def _write_extra(self, target: Path, data: bytes) -> None:
        """Write an extra whole; never over a DICOM file (a value of another instance
        may have rendered to this name)."""
        if _is_part10(target):
            raise ExtraError(f"{target.name} is a DICOM file: not replaced")
        self._put(target, data)

    # -- per batch --------------------------------------------------------------------

    def hold(self, result: InstanceResult) -> bool:
        """True when ``result`` waits for its study's DICOMDIR (see :meth:`finish`)."""
        study = self._held.get(result.key)
        if study is None or not result.outcome.delivered:
            return False
        study.results.append(result)
        return True

    def _known_of(self, study: Path) -> dict[Path, _Records]:
        """The records read for ``study`` before (a study usually comes in several
        batches, one after the other), within :data:`_KNOWN_FILES` for all studies:
        the studies written longest ago are forgotten first."""
        known = self._known.pop(study, {})
        while self._known and sum(map(len, self._known.values())) + len(known) > _KNOWN_FILES:
            self._known.popitem(last=False)
        self._known[study] = known
        return known

    def finish(self) -> list[InstanceResult]:
        """Write the DICOMDIR of every study of this batch and return the results
        held for them: as they were, or ``TRANSIENT`` when it could not be written
        (the instances are written again later, and the DICOMDIR with them)."""
        out: list[InstanceResult] = []
        studies, self._studies, self._held = self._studies, {}, {}
        for study in studies.values():
            try:
                with self.locked(study.folder):
                    missing = write_dicomdir(study.folder, self._put, self._known_of(study.folder))
            except Exception as exc:  # never lose the results held for it
                text = exc.strerror if isinstance(exc, OSError) and exc.strerror else _detail(exc)
                log.warning("DICOMDIR of %s not written: %s", study.folder, text)
                out += [
                    InstanceResult(r.key, Outcome.TRANSIENT, None, f"DICOMDIR not written: {text}")
                    for r in study.results
                ]
                continue
            for result in study.results:
                reason = missing.get(study.files[result.key])
                out.append(result if reason is None else _with_remark(result, reason))
        return out


def _with_remark(result: InstanceResult, remark: str) -> InstanceResult:
    return replace(result, outcome=Outcome.WARNING, message=f"{result.message} ({remark})")


def write_dicomdir(
    study: Path, put: Callable[[Path, bytes], None], known: dict[Path, _Records] | None = None
) -> dict[Path, str]:
    """Rebuild ``study``'s DICOMDIR from the files under its ``DICOM/`` folder; the
    files left out, with why (no record can be made of them). ``known`` holds the
    records of files read before (kept by the caller between batches): a file whose
    inode, size and modification time are unchanged is not read again."""
    maker = FileSet()
    tree = _Node(Dataset())
    known = {} if known is None else known
    seen: dict[Path, _Records] = {}
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
            left_out[path] = f"not in the DICOMDIR: {_detail(exc)}"
            log.warning("%s left out of the DICOMDIR: %s", path, _detail(exc))
            continue
        seen[path] = (stamp, uid, tree.place(records, uid))
    put(study / "DICOMDIR", _encode_dicomdir(tree))
    known.clear()
    known.update(itertools.islice(seen.items(), _KNOWN_FILES))
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


def _sweep_locks(locks: Path) -> None:
    """Remove the lock files of studies not written for an hour (one each, else).
    Only a lock taken at once is removed, while it is held."""
    cutoff = time.time() - _STALE_LOCK
    try:
        entries = list(os.scandir(locks))
    except OSError as exc:
        log.info("cannot clean %s: %s", locks, exc)
        return
    for entry in entries:
        try:
            if not entry.is_file(follow_symlinks=False) or entry.stat().st_mtime >= cutoff:
                continue
            fd = os.open(entry.path, os.O_RDWR)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.unlink(entry.path)
        except OSError:
            pass  # in use, or gone
        finally:
            os.close(fd)


def _sop_instance_uid(path: Path) -> str | None:
    try:
        ds = dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
    except Exception:
        return None
    value = ds.get("SOPInstanceUID")
    return str(value) if value else None


def _is_part10(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def _detail(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
