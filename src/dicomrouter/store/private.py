"""Keep what the router stores to itself: folders 0700, files 0600.

The storage folder holds patient data (objects, names in the index), the audit log,
the configuration's password and token hashes (in recorded versions) and the key
that signs dashboard sessions. Nothing there is for other local users, whatever the
umask: new folders and files are created private, and existing ones found readable
by others are tightened at start-up (and the change logged).
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

log = logging.getLogger("dicomrouter.store")

PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600


def tighten(path: Path, private: int) -> bool:
    """Make ``path`` (if it exists) no more open than ``private``; whether it was
    changed. A path we cannot change (not ours) is logged, not fatal."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return False
    if not mode & 0o077:
        return False
    try:
        path.chmod(mode & private)
    except OSError as exc:
        log.warning("%s has mode %04o and cannot be made private: %s", path, mode, exc)
        return False
    log.warning("%s had mode %04o: made private (%04o)", path, mode, mode & private)
    return True


def private_dir(path: Path) -> None:
    """Create ``path`` (and missing parents) with mode 0700, or tighten it."""
    path.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
    tighten(path, PRIVATE_DIR)


def private_file(path: Path) -> None:
    """Create ``path`` empty with mode 0600 if missing, or tighten it."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE))
    except FileExistsError:
        tighten(path, PRIVATE_FILE)
    except FileNotFoundError:
        pass  # no folder: whoever opens the file next reports that
