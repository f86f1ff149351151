"""PS3.8 framing: reading PDUs without holding a whole one in memory, the fixed PDUs,
and the one P-DATA-TF fragmenter (PS3.8 9.3, annex E).

The variable A-ASSOCIATE-RQ/AC items are in :mod:`.negotiation`.
"""

from __future__ import annotations

import socket
import ssl
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from .constants import AbortReason, AbortSource, PduType, PdvControl

HEADER = struct.Struct(">BxL")
PDV_HEADER = struct.Struct(">LBB")
_P_DATA_HEADER = struct.Struct(">BxLLBB")  # a P-DATA-TF with one PDV: both headers
#: Bytes a PDV adds to its value inside a P-DATA-TF PDU (item length and 2 header
#: bytes); the peer's maximum PDU length counts them (PS3.8 D.1).
PDV_OVERHEAD = 6

#: Fragment size when the peer accepts PDUs of any length (bounded, so memory is).
UNLIMITED_FRAGMENT = 1024 * 1024
#: Bytes of a file read and sent per system call.
SEND_BLOCK = 256 * 1024
#: PDVs per ``sendmsg``: two buffers each, under Linux's IOV_MAX of 1024.
MAX_PDVS_PER_SEND = 500

Buffer = bytes | bytearray | memoryview


class ProtocolError(Exception):
    """The peer broke the Upper Layer protocol: the association is aborted with
    ``reason`` (an A-ABORT provider reason)."""

    def __init__(self, message: str, reason: int = AbortReason.INVALID_PDU_PARAMETER):
        super().__init__(message)
        self.reason = reason


class PeerClosed(Exception):
    """The connection ended (the peer closed it, or it broke)."""


class Reader(Protocol):
    """What the state machine reads from: exact reads of small values, and a copy of
    large ones to a sink in pieces (a data set never has to fit in memory)."""

    def read(self, length: int) -> bytes: ...

    def copy(self, length: int, sink: Callable[[memoryview], object]) -> None: ...


class SocketReader:
    """Buffered, bounded reads from a blocking socket (plain or TLS).

    Small PDUs usually arrive in one ``recv``; the buffer lets several of them be
    parsed without a system call each. ``copy`` passes large values through the
    buffer in pieces, so a PDU of any size never needs to fit in memory.
    """

    def __init__(self, sock: socket.socket, size: int = 256 * 1024):
        self.sock = sock
        self._buffer = bytearray(size)
        self._view = memoryview(self._buffer)
        self._start = 0
        self._end = 0

    def _fill(self) -> None:
        if self._start == self._end:
            self._start = self._end = 0
        elif self._end == len(self._buffer):  # keep the unread tail, make room after it
            unread = self._end - self._start
            self._buffer[:unread] = self._view[self._start : self._end]
            self._start, self._end = 0, unread
        try:
            received = self.sock.recv_into(self._view[self._end :])
        except TimeoutError:
            raise
        except OSError as exc:  # ssl.SSLError is one
            raise PeerClosed(str(exc)) from exc
        if received == 0:
            raise PeerClosed("connection closed by the peer")
        self._end += received

    @property
    def buffered(self) -> int:
        """Bytes received and not read yet."""
        return self._end - self._start

    def read(self, length: int) -> bytes:
        """Exactly ``length`` bytes (at most the buffer size: use :meth:`copy`)."""
        if length > len(self._buffer):
            raise ProtocolError(f"a value of {length} bytes where a short one is expected")
        while self._end - self._start < length:
            self._fill()
        data = bytes(self._view[self._start : self._start + length])
        self._start += length
        return data

    def copy(self, length: int, sink: Callable[[memoryview], object]) -> None:
        """Pass the next ``length`` bytes to ``sink`` in one or more pieces."""
        while length:
            if self._start == self._end:
                self._fill()
            piece = min(length, self._end - self._start)
            sink(self._view[self._start : self._start + piece])
            self._start += piece
            length -= piece


class BytesReader:
    """A :class:`Reader` over bytes held in memory: for tests of the state machine
    without sockets, and for PDUs already read whole."""

    def __init__(self, data: Buffer = b""):
        self._data = bytearray(data)
        self._start = 0

    @property
    def buffered(self) -> int:
        return len(self._data) - self._start

    def read(self, length: int) -> bytes:
        if self.buffered < length:
            raise PeerClosed("connection closed by the peer")
        data = bytes(self._data[self._start : self._start + length])
        self._start += length
        return data

    def copy(self, length: int, sink: Callable[[memoryview], object]) -> None:
        sink(memoryview(self.read(length)))


def skip(reader: Reader, length: int) -> None:
    reader.copy(length, lambda _piece: None)


def read_header(reader: Reader) -> tuple[int, int]:
    """(type, length) of the next PDU."""
    pdu_type, length = HEADER.unpack(reader.read(HEADER.size))
    return int(pdu_type), int(length)


def read_pdv_header(reader: Reader) -> tuple[int, int, int]:
    """(value length, presentation context ID, control header) of the next PDV."""
    item_length, context_id, control = PDV_HEADER.unpack(reader.read(PDV_HEADER.size))
    if item_length < 2:
        raise ProtocolError(f"PDV item length {item_length} is below 2")
    return int(item_length) - 2, int(context_id), int(control)


# -- fixed PDUs ------------------------------------------------------------------------


def associate_rj(result: int, source: int, reason: int) -> bytes:
    return struct.pack(">BxLxBBB", PduType.A_ASSOCIATE_RJ, 4, result, source, reason)


def release_rq() -> bytes:
    return struct.pack(">BxL4x", PduType.A_RELEASE_RQ, 4)


def release_rp() -> bytes:
    return struct.pack(">BxL4x", PduType.A_RELEASE_RP, 4)


def abort(
    source: int = AbortSource.SERVICE_PROVIDER, reason: int = AbortReason.NOT_SPECIFIED
) -> bytes:
    return struct.pack(">BxL2xBB", PduType.A_ABORT, 4, source, reason)


def p_data(context_id: int, control: int, data: Buffer) -> bytes:
    """One P-DATA-TF PDU with one PDV (PS3.8 9.3.5); the same bytes as pynetdicom's
    ``P_DATA_TF`` for one value. Callers keep it within the peer's limit."""
    return _p_data_header(context_id, control, len(data)) + bytes(data)


def _p_data_header(context_id: int, control: int, length: int) -> bytes:
    return _P_DATA_HEADER.pack(PduType.P_DATA_TF, length + 6, length + 2, context_id, control)


# -- the fragmenter ----------------------------------------------------------------------


def fragment_size(limit: int, length: int) -> int:
    """Value bytes per PDV for a peer whose maximum PDU length is ``limit`` (0: no
    limit), sending ``length`` bytes: within the limit, and never above
    ``UNLIMITED_FRAGMENT``, so that memory stays bounded even for a peer that
    announces a limit of gigabytes."""
    if limit == 0:
        return min(max(length, 1), UNLIMITED_FRAGMENT)
    return max(1, min(limit - PDV_OVERHEAD, UNLIMITED_FRAGMENT))


def fragments(
    context_id: int, data: Buffer, size: int, command: bool, last_of_message: bool = True
) -> list[Buffer]:
    """``data`` as P-DATA-TF PDUs of one PDV each carrying at most ``size`` bytes:
    alternating headers and slices of ``data`` (nothing copied), ready for
    ``sendmsg``. The last fragment carries the "last" bit when ``last_of_message``."""
    view = memoryview(data)
    base = PdvControl.COMMAND if command else 0
    buffers: list[Buffer] = []
    for start in range(0, max(len(view), 1), size):
        piece = view[start : start + size]
        last = last_of_message and start + size >= len(view)
        buffers += (
            _p_data_header(context_id, base | (PdvControl.LAST if last else 0), len(piece)),
            piece,
        )
    return buffers


def message(context_id: int, command: bytes, data: Buffer | None, limit: int) -> list[Buffer]:
    """A whole DIMSE message (command set, then its data set if any) as P-DATA-TF
    PDUs within the peer's ``limit``."""
    buffers = fragments(context_id, command, fragment_size(limit, len(command)), command=True)
    if data is not None:
        buffers += fragments(context_id, data, fragment_size(limit, len(data)), command=False)
    return buffers


# -- sending -------------------------------------------------------------------------------


def send_buffers(sock: socket.socket, buffers: Sequence[Buffer]) -> None:
    """Send all of ``buffers``: one ``sendmsg`` (gather, no copy) on a plain socket;
    joined into one write on a TLS socket, which has no ``sendmsg``."""
    if isinstance(sock, ssl.SSLSocket):
        sock.sendall(b"".join(buffers))
        return
    views = [memoryview(b) for b in buffers if len(b)]
    while views:
        sent = sock.sendmsg(views)
        while views and sent >= len(views[0]):
            sent -= len(views[0])
            views.pop(0)
        if views and sent:
            views[0] = views[0][sent:]


def send_file_message(
    sock: socket.socket, context_id: int, command: bytes, path: str | Path, offset: int, limit: int
) -> None:
    """Send a DIMSE ``command`` and the data set read from ``path`` at ``offset``, as
    P-DATA-TF PDUs within the peer's ``limit`` (0: unlimited).

    The file is read in blocks of about ``SEND_BLOCK`` bytes and each block goes out
    with one ``sendmsg`` of PDU headers and slices of the block: with a 16 KB peer
    limit a 525 KB image is ~17 system calls instead of ~66, and nothing is copied
    into a PDU first.
    """
    buffers = fragments(context_id, command, fragment_size(limit, len(command)), command=True)
    with open(path, "rb", buffering=0) as handle:
        length = handle.seek(0, 2) - handle.seek(offset)
        size = fragment_size(limit, length)
        per_block = max(1, min(SEND_BLOCK // size, MAX_PDVS_PER_SEND))
        remaining = length
        while True:
            want = min(per_block * size, remaining)
            block = handle.read(want)
            if len(block) != want:
                raise OSError(f"{path} changed while it was being sent")
            remaining -= want
            buffers += fragments(
                context_id, block, size, command=False, last_of_message=not remaining
            )
            send_buffers(sock, buffers)
            buffers = []
            if remaining <= 0:
                return
