"""Where a C-STORE data set goes while it arrives: a temporary file under
``<storage>/tmp``, preceded by the preamble and the File Meta built from the
command, and also kept in memory when small (the receiver then parses its header
without reading the file back). The network layer sees only the
:class:`~dicomrouter.dicomnet.Sink` interface.
"""

from __future__ import annotations

import errno
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from dicomrouter.dicomnet import Status
from dicomrouter.store.part10 import PREAMBLE

log = logging.getLogger("dicomrouter.receive")

#: Objects up to this size are gathered in memory before they are written.
IN_MEMORY_LIMIT = 1024 * 1024


class Spool:
    """An object being received into its temporary file.

    Objects up to ``IN_MEMORY_LIMIT`` are gathered in memory and written with one
    call at the end; larger ones stream to the file as they arrive, so memory stays
    flat whatever the size. A failed write keeps the data set flowing in (the peer
    is owed a response) and records the status to answer with.
    """

    def __init__(self, tmp_dir: Path, meta: bytes):
        self.fd: int | None
        self.fd, name = tempfile.mkstemp(dir=tmp_dir, suffix=".part")
        self.path: Path | None = Path(name)
        self.content: bytearray | None = bytearray(PREAMBLE)
        self.content += meta
        self.write: Callable[[memoryview], object] = self._gather
        self.status: tuple[int, str | None] | None = None

    def _gather(self, piece: memoryview) -> None:
        content = self.content
        if content is None:  # a caller holding this bound method after the switch
            self.write(piece)
            return
        content += piece
        if len(content) > IN_MEMORY_LIMIT:
            self.content = None
            self.write = self._stream
            self._write_all(content)

    def _stream(self, piece: memoryview) -> None:
        self._write_all(piece)

    def _write_all(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self.fd, view) :]  # type: ignore[arg-type]
        except OSError as exc:
            # Keep reading the data set (the peer is owed a response), drop it.
            log.error("cannot write a received object: %s", exc)
            full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
            self.status = (Status.OUT_OF_RESOURCES, "storage is full" if full else "storage error")
            self.discard()

    def finish(self) -> bytearray | None:
        """Write what is still in memory and close the file; returns the whole
        object when it was gathered in memory."""
        content = self.content
        self.content = None
        if content is not None:
            self._write_all(content)
        self._close()
        return content if content is not None and self.status is None else None

    def _close(self) -> None:
        fd, self.fd = self.fd, None
        self.write = _discard
        if fd is not None:
            os.close(fd)

    def discard(self) -> None:
        self.content = None
        try:
            self._close()
        except OSError:
            pass
        if self.path is not None:
            try:
                os.unlink(self.path)
            except OSError:
                pass
            self.path = None


def _discard(_piece: memoryview) -> None:
    return None
