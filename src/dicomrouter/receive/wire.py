"""The bytes of the DICOM Upper Layer and of DIMSE command sets that the acceptor
reads and writes (PS3.8 section 9, PS3.7 section 6.3 and annex E).

Only what a C-STORE/C-ECHO SCP needs is here: framing of PDUs read from a socket
without holding a whole PDU in memory, the small fixed PDUs (A-ASSOCIATE-RJ,
A-RELEASE-RP, A-ABORT, P-DATA-TF) and the Implicit VR Little Endian command set.
The variable A-ASSOCIATE-RQ/AC items are decoded and encoded by pynetdicom's PDU
classes (see :mod:`dicomrouter.receive.acceptor`).
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable

from dicomrouter.net import command_element, decode_command_set, encode_p_data

# PDU types (PS3.8 9.3.1)
A_ASSOCIATE_RQ = 0x01
A_ASSOCIATE_AC = 0x02
A_ASSOCIATE_RJ = 0x03
P_DATA_TF = 0x04
A_RELEASE_RQ = 0x05
A_RELEASE_RP = 0x06
A_ABORT = 0x07

# A-ABORT source and provider reasons (PS3.8 9.3.8)
ABORT_SERVICE_USER = 0x00
ABORT_SERVICE_PROVIDER = 0x02
REASON_NOT_SPECIFIED = 0x00
REASON_UNRECOGNIZED_PDU = 0x01
REASON_UNEXPECTED_PDU = 0x02
REASON_INVALID_PARAMETER = 0x06

# Message control header bits of a PDV (PS3.8 E.2)
CONTROL_COMMAND = 0x01
CONTROL_LAST = 0x02

_HEADER = struct.Struct(">BxL")
_PDV_HEADER = struct.Struct(">LBB")


class ProtocolError(Exception):
    """The peer broke the Upper Layer protocol; the association is aborted with
    ``reason`` (an A-ABORT provider reason)."""

    def __init__(self, message: str, reason: int = REASON_INVALID_PARAMETER):
        super().__init__(message)
        self.reason = reason


class PeerClosed(Exception):
    """The connection ended (the peer closed it, or it broke)."""


class SocketReader:
    """Buffered, bounded reads from a blocking socket.

    Small PDUs (a command, a 10 KB data set) usually arrive in one ``recv``; the
    buffer lets several of them be parsed from it without a system call each.
    Large values are copied through the buffer in pieces (``copy``), so a PDU of any
    size never needs to fit in memory.
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
        except OSError as exc:
            raise PeerClosed(str(exc)) from exc
        if received == 0:
            raise PeerClosed("connection closed by the peer")
        self._end += received

    def read(self, length: int) -> bytes:
        """Exactly ``length`` bytes (``length`` at most the buffer size)."""
        if length > len(self._buffer):
            raise ValueError(f"read({length}) is larger than the buffer; use copy()")
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

    def skip(self, length: int) -> None:
        self.copy(length, lambda _piece: None)

    def pdu_header(self) -> tuple[int, int]:
        """(type, length) of the next PDU."""
        pdu_type, length = _HEADER.unpack(self.read(6))
        return pdu_type, length

    def pdv_header(self) -> tuple[int, int, int]:
        """(data length, presentation context ID, control header) of the next PDV."""
        item_length, context_id, control = _PDV_HEADER.unpack(self.read(6))
        if item_length < 2:
            raise ProtocolError(f"PDV item length {item_length} is below 2")
        return item_length - 2, context_id, control


# -- fixed PDUs ------------------------------------------------------------------------


def associate_rj(result: int, source: int, reason: int) -> bytes:
    return struct.pack(">BxLxBBB", A_ASSOCIATE_RJ, 4, result, source, reason)


def release_rp() -> bytes:
    return struct.pack(">BxL4x", A_RELEASE_RP, 4)


def abort(source: int = ABORT_SERVICE_PROVIDER, reason: int = REASON_NOT_SPECIFIED) -> bytes:
    return struct.pack(">BxL2xBB", A_ABORT, 4, source, reason)


#: One P-DATA-TF PDU holding one PDV (callers keep it within the peer's limit).
p_data = encode_p_data


# -- command sets (Implicit VR Little Endian, group 0000) ------------------------------

AFFECTED_SOP_CLASS = 0x0002
COMMAND_FIELD = 0x0100
MESSAGE_ID = 0x0110
MESSAGE_ID_RESPONDED = 0x0120
PRIORITY = 0x0700
DATA_SET_TYPE = 0x0800
STATUS = 0x0900
ERROR_COMMENT = 0x0902
AFFECTED_SOP_INSTANCE = 0x1000

C_STORE_RQ = 0x0001
C_ECHO_RQ = 0x0030
C_CANCEL_RQ = 0x0FFF
NO_DATA_SET = 0x0101


def decode_command(data: bytes) -> dict[int, bytes]:
    """Element number -> raw value of a command set (PS3.7 6.3.1)."""
    elements = decode_command_set(data)
    if elements is None:
        raise ProtocolError("invalid or truncated command set")
    return elements


def command_uint(elements: dict[int, bytes], element: int) -> int | None:
    value = elements.get(element)
    if value is None or len(value) != 2:
        return None
    return int(struct.unpack("<H", value)[0])


def text(value: bytes | None) -> str:
    """A command set string value (a UID), without its padding."""
    return (value or b"").decode("ascii", "replace").strip("\x00 ")


def command_text(elements: dict[int, bytes], element: int) -> str:
    return text(elements.get(element))


def _even(value: bytes, pad: bytes) -> bytes:
    return value + pad if len(value) % 2 else value


def _uid(raw: bytes) -> bytes:
    """A UID value as received, re-padded to even length with NUL."""
    return _even(raw.rstrip(b"\x00 "), b"\x00")


def encode_response(
    command_field: int,
    message_id: int,
    status: int,
    sop_class: bytes | None,
    sop_instance: bytes | None,
    comment: str | None = None,
) -> bytes:
    """The command set of a response without a data set: C-STORE-RSP, C-ECHO-RSP or
    the failure answer to an operation we do not provide. ``sop_class`` and
    ``sop_instance`` are the request's raw values, echoed back."""
    elements = []
    if sop_class:
        elements.append(command_element(AFFECTED_SOP_CLASS, _uid(sop_class)))
    elements.append(command_element(COMMAND_FIELD, struct.pack("<H", command_field | 0x8000)))
    elements.append(command_element(MESSAGE_ID_RESPONDED, struct.pack("<H", message_id)))
    elements.append(command_element(DATA_SET_TYPE, struct.pack("<H", NO_DATA_SET)))
    elements.append(command_element(STATUS, struct.pack("<H", status)))
    if comment:
        text = comment.encode("ascii", "replace")[:64]
        elements.append(command_element(ERROR_COMMENT, _even(text, b" ")))
    if sop_instance:
        elements.append(command_element(AFFECTED_SOP_INSTANCE, _uid(sop_instance)))
    body = b"".join(elements)
    return command_element(0x0000, struct.pack("<L", len(body))) + body
