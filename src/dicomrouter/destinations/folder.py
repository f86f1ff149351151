"""Deliver stored instances as Part-10 files under a folder (``type: folder``).

* **Where**: ``layout`` is a path of templates over the instance's tags (the
  transforms' :class:`~dicomrouter.transforms.templates.Template`, format specs
  included), rendered on the copy that goes out (after its transforms). Every folder
  and file name is made safe by :func:`safe_component`, so no value can lead out of
  ``path``; the final path is checked to be inside ``path`` once symbolic links are
  resolved.
* **Whole files only**: each file is written to ``<path>/.tmp/``, synced, then
  renamed into place and its folder synced (a folder on another filesystem than
  ``path`` gets its temporary file beside the target instead). A reader never sees
  a partial file; a crash leaves at most a temporary file, removed after an hour.
* **Outcomes**: written is ``SUCCESS``. A folder that cannot take anything (a full
  disk, a read-only or vanished share, permissions) raises
  :class:`~.sender.DestinationUnavailable` when nothing was written yet in this
  batch, else the rest of the batch is ``TRANSIENT``: the dispatcher pauses the
  destination and probes it (:meth:`FolderSender.probe`: a test write) until it can
  be written again. A name the filesystem refuses, or a layout value that does not
  fit its format spec, is ``PERMANENT`` for that instance.
* **Extras** (previews, encapsulated documents, a file-set with a DICOMDIR per
  study): :mod:`.folder_extras`, called after each file is written and after each
  batch.
"""

from __future__ import annotations

import errno
import filecmp
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID

from dicomrouter.config.models import FolderDestinationConfig

from .folder_extras import ExtraError, FolderExtras
from .layout import MAX_COMPONENT_BYTES, Layout, LayoutError, safe_component
from .outgoing import InstanceResult, OutgoingInstance, annotate, prepared
from .recode import TranscodeError, transcoded, uid_label
from .sender import DestinationUnavailable, OnResult, ShouldStop
from .status import Outcome

log = logging.getLogger(__name__)

__all__ = ["MAX_COMPONENT_BYTES", "TMP_DIR", "FolderSender", "safe_component"]

#: Temporary files, under ``path`` (never a name :func:`safe_component` makes).
TMP_DIR = ".tmp"
_STALE_TMP = 3600.0  # seconds after which a temporary file is a crash's leftover
_MAX_VERSIONS = 1000
_COPY_BLOCK = 1024 * 1024

#: errno values that say the folder cannot take anything now: pause and probe.
_UNAVAILABLE = frozenset(
    {
        errno.ENOSPC,
        errno.EDQUOT,
        errno.EROFS,
        errno.EACCES,
        errno.EPERM,
        errno.EIO,
        errno.ENOENT,
        errno.ESTALE,
        errno.ETIMEDOUT,
        errno.ENOTCONN,
        errno.EHOSTDOWN,
    }
)
#: errno values that say this one name cannot be made: fail the instance.
_BAD_NAME = frozenset(
    {errno.ENAMETOOLONG, errno.EINVAL, errno.EILSEQ, errno.ENOTDIR, errno.EISDIR, errno.EEXIST}
)


class _BadName(Exception):
    """This instance's file cannot be named or placed: a permanent failure."""


class _Unavailable(Exception):
    """The folder cannot take anything now (full, read-only, gone)."""


class FolderSender:
    """The :class:`~.sender.Sender` of ``type: folder``. Stateless between batches:
    any number of them may write to the same folder."""

    def __init__(self, config: FolderDestinationConfig) -> None:
        self.config = config
        self.root = Path(config.path)
        self._layout = Layout(config.layout)
        self._target = config.transfer_syntax_uid
        self._swept = False
        self._extras = FolderExtras(config, self._put)
        self._study = Layout(config.dicomdir_folder) if config.dicomdir else None

    # -- the Sender interface ------------------------------------------------------

    def send(
        self,
        batch: Sequence[OutgoingInstance],
        on_result: OnResult | None = None,
        should_stop: ShouldStop | None = None,
    ) -> list[InstanceResult]:
        results: list[InstanceResult] = []

        def emit(result: InstanceResult) -> None:
            if self._extras.hold(result):
                return  # reported with its study's DICOMDIR (finish)
            results.append(result)
            if on_result is not None:
                on_result(result)

        if not batch:
            return results
        self._check_root()
        try:
            self._send(batch, emit, should_stop)
        finally:
            for held in self._extras.finish():
                results.append(held)
                if on_result is not None:
                    on_result(held)
        return results

    def _send(
        self,
        batch: Sequence[OutgoingInstance],
        emit: Callable[[InstanceResult], None],
        should_stop: ShouldStop | None,
    ) -> None:
        written = 0
        for position, inst in enumerate(batch):
            if should_stop is not None and should_stop():
                return
            with prepared(inst) as ready:
                if isinstance(ready, InstanceResult):
                    emit(ready)
                    continue
                try:
                    result = self._write_one(ready)
                except _Unavailable as exc:
                    if not written:
                        raise DestinationUnavailable(str(exc)) from None
                    log.warning("writing to %s: %s", self.root, exc)
                    for rest in batch[position:]:
                        emit(InstanceResult(rest.key, Outcome.TRANSIENT, None, str(exc)))
                    return
                annotate(result, inst, ready)
                if result.outcome.delivered:
                    written += 1
                emit(result)

    def probe(self) -> None:
        """The folder exists and a file can be written, synced and removed in it."""
        self._check_root()
        try:
            tmp = self._tmp_dir()
            fd, name = tempfile.mkstemp(prefix="probe-", dir=tmp)
            try:
                os.write(fd, b"\0")
                os.fsync(fd)
            finally:
                os.close(fd)
                os.unlink(name)
        except OSError as exc:
            raise DestinationUnavailable(f"folder {self.root} cannot be written: {exc}") from None

    def close(self) -> None:
        """Nothing is kept between batches."""

    def close_if_idle(self) -> None:
        """Nothing is kept between batches."""

    def abort(self) -> None:
        """A write is never blocked on a peer; the stop between instances is enough."""

    # -- one instance ----------------------------------------------------------------

    def _check_root(self) -> None:
        if not self.root.is_dir():
            raise DestinationUnavailable(f"folder {self.root} does not exist (or is not a folder)")

    def _write_one(self, inst: OutgoingInstance) -> InstanceResult:
        notes: list[str] = []
        write: Callable[[BinaryIO], None]
        sent_ts, sent_uid = inst.transfer_syntax_uid, inst.sop_instance_uid
        try:
            header: Dataset = dcmread(inst.path, stop_before_pixels=True)
        except Exception as exc:
            detail = " ".join(str(exc).split()) or type(exc).__name__
            return InstanceResult(
                inst.key, Outcome.PERMANENT, None, f"cannot read stored file {inst.path}: {detail}"
            )
        write = _copier(inst.path)
        if self._target and UID(self._target) != UID(inst.transfer_syntax_uid):
            try:
                data, header = transcoded(inst, self._target, self.config.allow_lossy)
            except TranscodeError as exc:
                log.info("%s not written in %s: %s", inst.sop_instance_uid, self._target, exc)
                notes.append(f"not written in {uid_label(self._target)}: {exc}")
            else:
                sent_ts, sent_uid = self._target, str(header.SOPInstanceUID)
                write = _bytes_writer(data)
        study: Path | None = None
        try:
            if self._study is None:
                how, final = self._store(self._place(header), write)
            else:
                study = self._place(header, self._study)
                try:
                    with self._extras.locked(study):
                        how, final = self._store(self._extras.file_in_set(study, header), write)
                except OSError as exc:  # the lock (_store classifies its own)
                    raise self._classify(exc, study) from None
        except (_BadName, ExtraError) as exc:
            return InstanceResult(inst.key, Outcome.PERMANENT, None, str(exc))
        extras = self._extras.after_write(inst.key, final, study)
        message = how + (f" ({'; '.join(notes + extras)})" if notes or extras else "")
        return InstanceResult(
            inst.key,
            Outcome.WARNING if extras else Outcome.SUCCESS,
            None,
            message,
            sent_uid=sent_uid if sent_uid != inst.sop_instance_uid else None,
            sent_transfer_syntax_uid=sent_ts,
        )

    def _place(self, header: Dataset, layout: Layout | None = None) -> Path:
        """The file's path under the folder, from ``layout`` (or another layout: a
        study's file-set folder); :class:`_BadName` when a value does not fit its
        format spec or the path would leave the folder."""
        try:
            names = (layout or self._layout).render(header)
        except LayoutError as exc:
            raise _BadName(f"cannot name the file: {exc}") from None
        root = self.root.resolve()
        target = root.joinpath(*names)
        if not target.resolve().is_relative_to(root) or target == root:
            raise _BadName(f"{'/'.join(names)} would be outside {root}")  # a symbolic link
        return target

    def _store(self, target: Path, write: Callable[[BinaryIO], None]) -> tuple[str, Path]:
        """Write ``target`` whole (temporary file, fsync, rename, fsync folder) as
        ``on_exists`` says; return what was done and the file's path."""
        try:
            self._makedirs(target.parent)
            tmp = self._write_tmp(target.parent, write)
            try:
                how = self._commit(tmp, target)
            finally:
                tmp.unlink(missing_ok=True)
            _fsync_dir(target.parent)
            return how
        except OSError as exc:
            raise self._classify(exc, target) from None

    def _commit(self, tmp: Path, target: Path) -> tuple[str, Path]:
        mode = self.config.on_exists
        relative = target.relative_to(self.root.resolve())
        if mode == "overwrite":
            os.replace(tmp, target)
            return f"written to {relative}", target
        if mode == "skip":
            if _link_new(tmp, target):
                return f"written to {relative}", target
            return f"kept the file already at {relative} (on_exists: skip)", target
        for n in range(1, _MAX_VERSIONS + 1):
            candidate = target if n == 1 else target.with_name(f"{target.stem}_{n}{target.suffix}")
            if _link_new(tmp, candidate):
                return f"written to {candidate.relative_to(self.root.resolve())}", candidate
            if candidate.is_file() and filecmp.cmp(tmp, candidate, shallow=False):
                name = candidate.relative_to(self.root.resolve())
                return f"the same file is already at {name} (on_exists: version)", candidate
        raise _BadName(f"{relative}: {_MAX_VERSIONS} versions already (on_exists: version)")

    def _put(self, target: Path, data: bytes) -> None:
        """Write an extra (a preview, a document, a DICOMDIR) whole, replacing the
        file there."""
        self._makedirs(target.parent)
        tmp = self._write_tmp(target.parent, _bytes_writer(data))
        try:
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(target.parent)

    def _write_tmp(self, folder: Path, write: Callable[[BinaryIO], None]) -> Path:
        tmp_dir = self._tmp_dir()
        if os.stat(tmp_dir).st_dev != os.stat(folder).st_dev:
            tmp_dir = folder  # another filesystem mounted inside: a rename cannot cross
        fd, name = tempfile.mkstemp(prefix=".", suffix=".part", dir=tmp_dir)
        try:
            with os.fdopen(fd, "wb") as fh:
                write(fh)
                fh.flush()
                os.fsync(fh.fileno())
        except BaseException:
            Path(name).unlink(missing_ok=True)
            raise
        return Path(name)

    def _tmp_dir(self) -> Path:
        tmp = self.root / TMP_DIR
        if not tmp.is_dir():
            tmp.mkdir(exist_ok=True)
            _fsync_dir(self.root)
        if not self._swept:
            self._swept = True
            _sweep(tmp)
        return tmp

    def _makedirs(self, folder: Path) -> None:
        """Create ``folder`` and what is missing above it (under the root), syncing
        each parent so the new names survive a power loss."""
        missing: list[Path] = []
        current = folder
        while not current.is_dir():
            missing.append(current)
            current = current.parent
        for path in reversed(missing):
            try:
                path.mkdir()
            except FileExistsError:
                if not path.is_dir():
                    raise
            _fsync_dir(path.parent)

    def _classify(self, exc: OSError, target: Path) -> Exception:
        detail = f"{exc.strerror or exc} ({target})"
        if exc.errno in _BAD_NAME:
            return _BadName(f"cannot write the file: {detail}")
        if exc.errno in _UNAVAILABLE or not self.root.is_dir():
            return _Unavailable(f"folder {self.root} cannot be written: {detail}")
        return _Unavailable(f"writing to folder {self.root} failed: {detail}")


def _copier(source: Path) -> Callable[[BinaryIO], None]:
    def write(fh: BinaryIO) -> None:
        with open(source, "rb") as src:
            shutil.copyfileobj(src, fh, _COPY_BLOCK)

    return write


def _bytes_writer(data: bytes) -> Callable[[BinaryIO], None]:
    def write(fh: BinaryIO) -> None:
        fh.write(data)

    return write


def _link_new(tmp: Path, target: Path) -> bool:
    """Put ``tmp`` at ``target`` only if nothing is there (atomically: a hard link);
    False when something is. A filesystem without hard links gets a check, then a
    rename."""
    try:
        os.link(tmp, target)
        return True
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise
    if target.exists():
        return False
    os.replace(tmp, target)
    return True


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sweep(tmp: Path) -> None:
    """Remove temporary files a crash left (older than an hour: never a live one)."""
    cutoff = time.time() - _STALE_TMP
    try:
        for entry in os.scandir(tmp):
            if entry.is_file(follow_symlinks=False) and entry.stat().st_mtime < cutoff:
                Path(entry.path).unlink(missing_ok=True)
    except OSError as exc:
        log.info("cannot clean %s: %s", tmp, exc)
