"""What a folder destination writes besides each instance's file: previews
(``render``), the documents of encapsulated PDF and CDA objects
(``extract_documents``) and a DICOMDIR per study (``dicomdir``).

All of it is made from the file as written (after transforms and transcoding), and
written whole through the sender's ``put`` (temporary file, fsync, rename). An extra
that cannot be made never undoes the delivery of the DICOM file: the instance is
delivered with a remark (``Outcome.WARNING``) and the reason is on its delivery.

**File-sets** (``dicomdir: true``): where each file goes and the ``DICOMDIR`` are
:mod:`.dicomdir`'s. Here: after each batch the DICOMDIR of each study written to is
rebuilt; the results of its instances are reported only then, and stay pending
(``TRANSIENT``) when it could not be written. One lock per study (``flock``) keeps
workers from interleaving. Records of files read before are kept per sender (up to
:data:`_KNOWN_FILES`).
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from pydicom import dcmread
from pydicom.dataset import Dataset

from dicomrouter.config.models import FolderDestinationConfig

from .dicomdir import FILESET_DIR, Records, file_id, write_dicomdir
from .outgoing import InstanceResult, error_text
from .status import Outcome

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)

__all__ = [
    "DOCUMENT_SUFFIXES",
    "ExtraError",
    "FolderExtras",
    "encapsulated_document",
    "extra_path",
    "render_preview",
]

#: Encapsulated documents extracted, by SOP Class, with the suffix they get.
DOCUMENT_SUFFIXES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.104.1": ".pdf",  # Encapsulated PDF Storage
    "1.2.840.10008.5.1.4.1.1.104.2": ".xml",  # Encapsulated CDA Storage
}
_PREVIEW_SUFFIX = {"png": ".png", "jpeg": ".jpg"}
_JPEG_QUALITY = 90
_MAX_PROBES = 64
_STALE_LOCK = 3600.0  # seconds after which a study's lock file is removed
#: Files whose DICOMDIR records a sender keeps between batches (about 5 KB each),
#: the most recently written studies first.
_KNOWN_FILES = 5000
_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
#: Decoded as RGB by pydicom (YBR_FULL and YBR_FULL_422 are converted; JPEG 2000's
#: ICT and RCT come out of the decoder as RGB).
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT")


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
        raise ExtraError(f"cannot read {path.name}: {error_text(exc)}") from None
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
        raise ExtraError(f"cannot render the image: {error_text(exc)}") from None


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
        raise ExtraError(f"cannot read {path.name}: {error_text(exc)}") from None
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
        self._known: OrderedDict[Path, dict[Path, Records]] = OrderedDict()
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

    def _known_of(self, study: Path) -> dict[Path, Records]:
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
                    known = self._known_of(study.folder)
                    missing = write_dicomdir(study.folder, self._put, known, _KNOWN_FILES)
            except Exception as exc:  # never lose the results held for it
                text = (
                    exc.strerror if isinstance(exc, OSError) and exc.strerror else error_text(exc)
                )
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
