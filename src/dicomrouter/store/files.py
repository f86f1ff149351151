"""The object store: where files live and how they become durable.

Layout: ``<root>/objects/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm``. UIDs are
validated (digits and dots) before they become path components, and the final
path is checked to be inside the root as a second line of defence.

Durability: a file is written in ``<root>/tmp/<node>`` (same filesystem), fsynced,
then atomically renamed into place and its directory fsynced. Only then is it
indexed, and only then is success answered. A crash at any step leaves either
nothing visible or a complete file (orphans in tmp are swept at start-up).

Several nodes (``node.name``) may share one folder: ``objects/`` is shared, so any
node can send any object, but each node has its own ``tmp/<node>/`` and
``outgoing/<node>/``, so the start-up sweep of one never deletes another's transfers
in progress. The lock is per node (:meth:`ObjectStore.lock`). ``trash/`` is shared:
only a purge and its recovery use it, both under the folder-wide purge lock.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path
from typing import IO

from .private import PRIVATE_DIR, private_dir
from .uids import validate_uid

_DURABLE_CACHE = 10_000  # series folders remembered as durable


class StorageError(OSError):
    """The store could not keep an object (disk full, permissions...)."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ObjectStore:
    def __init__(self, root: Path, node: str):
        self.root = Path(root).resolve()
        self.node = node
        self.objects = self.root / "objects"
        # This node's partial files, and its transforms' outgoing copies.
        self.tmp = self.root / "tmp" / node
        self.outgoing = self.root / "outgoing" / node
        # Files a purge is deleting (same filesystem: a rename); see store/retention.
        self.trash = self.root / "trash"
        self._objects_prefix = str(self.objects) + os.sep
        # Series folders whose names are known to be on disk (see _ensure_durable_dir).
        self._durable: set[Path] = set()
        self._durable_lock = threading.Lock()
        self._lock_handles: list[IO[str]] = []

    def prepare(self) -> None:
        """Create the folders private (0700), or tighten them (see ``private``)."""
        folders = (self.root, self.objects, self.tmp.parent, self.tmp, self.outgoing.parent)
        for folder in (*folders, self.outgoing, self.trash):
            private_dir(folder)

    def lock(self) -> None:
        """Take the storage folder for this node, for the life of the process: a
        shared ``flock`` on ``<root>/.lock`` (which a release from before several
        nodes held exclusively, owning the whole folder: one of those and a node of
        this release refuse each other), then an exclusive one on
        ``<root>/nodes/<node>.lock``. A second process with the same node name would
        sweep the first one's transfers in progress and take over its jobs; a node
        of another name shares the folder."""
        import fcntl

        shared = self._open_lock(self.root / ".lock")
        try:
            fcntl.flock(shared, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            shared.close()
            raise StorageError(
                f"storage folder {self.root} is in use by another dicomrouter process "
                "of a release that owns the whole folder (before node.name); stop it first"
            ) from None
        private_dir(self.root / "nodes")
        own = self._open_lock(self.root / "nodes" / f"{self.node}.lock")
        try:
            fcntl.flock(own, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = own.read().strip()
            own.close()
            shared.close()
            raise StorageError(
                f"storage folder {self.root} is in use by another dicomrouter process "
                f"with node.name {self.node!r}{f' (pid {holder})' if holder else ''}: "
                "each node sharing a folder needs its own node.name"
            ) from None
        own.truncate(0)
        own.write(f"{os.getpid()}\n")
        own.flush()
        self._lock_handles = [shared, own]

    @staticmethod
    def _open_lock(path: Path) -> IO[str]:
        handle = open(path, "a+")  # noqa: SIM115 - held until exit
        handle.seek(0)
        return handle

    def sweep_tmp(self, older_than: float = 0.0) -> int:
        """Delete this node's temporary files left by aborted transfers or a crash,
        and loose files directly in ``tmp/`` and ``outgoing/``: the layout of a
        release from before several nodes, which cannot be running beside this one
        (see :meth:`lock`), so its leftovers go at the first start after an upgrade."""
        legacy = _sweep(self.tmp.parent, older_than) + _sweep(self.outgoing.parent, older_than)
        return _sweep(self.tmp, older_than) + legacy

    def sweep_every_tmp(self, older_than: float) -> int:
        """Delete temporary files of every node untouched for ``older_than``
        seconds: a node removed for good leaves its partial files behind, and a file
        being received is written to continuously. For the purge's orphan scan."""
        removed = _sweep(self.tmp.parent, older_than)
        for folder in self.tmp.parent.iterdir():
            if folder.is_dir():
                removed += _sweep(folder, older_than)
        return removed

    def relative_path(self, study_uid: str, series_uid: str, sop_uid: str) -> str:
        parts = [
            validate_uid(study_uid, "StudyInstanceUID"),
            validate_uid(series_uid, "SeriesInstanceUID"),
            validate_uid(sop_uid, "SOPInstanceUID") + ".dcm",
        ]
        return "/".join(parts)

    def absolute(self, relative: str) -> Path:
        # normpath, not resolve(): no symlink walk on the hot path. UIDs are already
        # digits and dots; this is the second line of defence. Plain strings: the
        # pathlib version was 5% of the receiver's CPU samples.
        path = os.path.normpath(os.path.join(self._objects_prefix, relative))
        if not path.startswith(self._objects_prefix):
            raise StorageError(f"path {relative!r} escapes the storage folder")
        return Path(path)

    def commit(
        self, temp_path: Path, relative: str, fsync_file: bool = True, replace: bool = True
    ) -> Path | None:
        """Make ``temp_path`` durable at ``relative``; returns the final path.

        With ``replace=False`` an existing file is kept: the new one is linked into
        place only if none exists (atomically, so two concurrent copies cannot both
        win), and None is returned when one already did.
        """
        final = self.absolute(relative)
        try:
            if fsync_file:
                fd = os.open(temp_path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            self._ensure_durable_dir(final.parent)
            try:
                placed = self._place(temp_path, final, replace)
            except FileNotFoundError:
                if not temp_path.exists():
                    raise
                # The series folder was removed as empty by retention after this
                # process had seen it: make it again (rare; never on the common path).
                with self._durable_lock:
                    self._durable.discard(final.parent)
                self._ensure_durable_dir(final.parent)
                placed = self._place(temp_path, final, replace)
            if not placed:
                return None
            _fsync_dir(final.parent)
        except OSError as exc:
            raise StorageError(exc.errno, f"cannot store object: {exc.strerror}") from exc
        return final

    @staticmethod
    def _place(temp_path: Path, final: Path, replace: bool) -> bool:
        if replace:
            os.replace(temp_path, final)
            return True
        try:
            os.link(temp_path, final)
        except FileExistsError:
            return False
        os.unlink(temp_path)
        return True

    def _ensure_durable_dir(self, folder: Path) -> None:
        """Create ``folder`` if needed and make sure its name is on disk.

        A directory is only known durable once its parents were fsynced after it was
        created. Another association may have just created it and not yet fsynced
        its parents, so a thread that finds a directory it does not know to be
        durable fsyncs the chain up to ``objects`` itself before relying on it.
        """
        if folder in self._durable:
            return
        folder.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
        probe = folder
        while probe != self.objects:
            _fsync_dir(probe.parent)
            probe = probe.parent
        with self._durable_lock:
            if len(self._durable) >= _DURABLE_CACHE:
                self._durable.clear()  # forgetting only costs a few extra fsyncs
            self._durable.add(folder)

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free


def _sweep(folder: Path, older_than: float) -> int:
    """Delete the files (not folders) directly in ``folder`` not modified for
    ``older_than`` seconds."""
    removed = 0
    cutoff = time.time() - older_than
    try:
        entries = list(folder.iterdir())
    except FileNotFoundError:
        return 0
    for entry in entries:
        try:
            if entry.is_file() and entry.stat().st_mtime <= cutoff:
                entry.unlink()
                removed += 1
        except FileNotFoundError:
            continue
    return removed
