"""The bytes of the DICOM Upper Layer and of DIMSE command sets that our acceptor
(:mod:`dicomrouter.receive.acceptor`) and requestor
(:mod:`dicomrouter.destinations.association`) read and write (PS3.8 section 9, PS3.7
section 6.3 and annex E).

Only what C-STORE/C-ECHO needs is here: framing of PDUs read from a socket without
holding a whole PDU in memory, the small fixed PDUs (A-ASSOCIATE-RJ, A-RELEASE-RQ/RP,
A-ABORT, P-DATA-TF) and the Implicit VR Little Endian command set. The variable
A-ASSOCIATE-RQ/AC items are decoded and encoded by pynetdicom's PDU classes.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from pydicom.uid import generate_uid

from dicomrouter import __version__

if TYPE_CHECKING:  # loaded on use: the HTTP process reads File Metas, never PDUs
    from pynetdicom import pdu, pdu_primitives

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
#: Stable across versions: derived from the name under pydicom's UID root.
IMPLEMENTATION_CLASS_UID = generate_uid(entropy_srcs=["dicomrouter"])
IMPLEMENTATION_VERSION = f"DICOMROUTER_{__version__.replace('.', '')}"[:16]

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

    @property
    def buffered(self) -> int:
        """Bytes received and not read yet."""
        return self._end - self._start

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


# -- A-ASSOCIATE-RQ/AC (variable items: pynetdicom's PDU classes) ----------------------


def read_associate(
    reader: SocketReader, pdu_type: int, length: int, limit: int
) -> tuple[pdu.A_ASSOCIATE_RQ | pdu.A_ASSOCIATE_AC, pdu_primitives.A_ASSOCIATE]:
    """The A-ASSOCIATE-RQ or -AC whose header (``pdu_type``, ``length``) was just
    read, decoded by pynetdicom: (the PDU, its primitive). :class:`ProtocolError`
    if it is longer than ``limit`` or cannot be decoded."""
    from pynetdicom import pdu

    name = "A-ASSOCIATE-RQ" if pdu_type == A_ASSOCIATE_RQ else "A-ASSOCIATE-AC"
    if length > limit:
        raise ProtocolError(f"{name} of {length} bytes")
    body = reader.read(length)
    decoded = pdu.A_ASSOCIATE_RQ() if pdu_type == A_ASSOCIATE_RQ else pdu.A_ASSOCIATE_AC()
    try:
        decoded.decode(bytes((pdu_type, 0)) + length.to_bytes(4, "big") + body)
        return decoded, decoded.to_primitive()
    except Exception as exc:
        raise ProtocolError(f"undecodable {name}: {exc}") from exc


# -- fixed PDUs ------------------------------------------------------------------------


def associate_rj(result: int, source: int, reason: int) -> bytes:
    return struct.pack(">BxLxBBB", A_ASSOCIATE_RJ, 4, result, source, reason)


def release_rq() -> bytes:
    return struct.pack(">BxL4x", A_RELEASE_RQ, 4)


def release_rp() -> bytes:
    return struct.pack(">BxL4x", A_RELEASE_RP, 4)


def abort(source: int = ABORT_SERVICE_PROVIDER, reason: int = REASON_NOT_SPECIFIED) -> bytes:
    return struct.pack(">BxL2xBB", A_ABORT, 4, source, reason)


def p_data(context_id: int, control: int, data: bytes) -> bytes:
    """One P-DATA-TF PDU with one PDV (PS3.8 9.3.5); callers keep it within the
    peer's limit. The same bytes as pynetdicom's ``P_DATA_TF`` for one value."""
    return struct.pack(">BxLLBB", 0x04, len(data) + 6, len(data) + 2, context_id, control) + data


# -- command sets (Implicit VR Little Endian, group 0000) ------------------------------


def command_element(element: int, value: bytes) -> bytes:
    """One group-0000 element, Implicit VR Little Endian (command sets, PS3.7 6.3.1)."""
    return struct.pack("<HHL", 0x0000, element, len(value)) + value


_GROUP_ELEMENT = struct.Struct("<HHL")
_META_LONG_VRS = {b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"}


def decode_command_set(data: bytes | memoryview) -> dict[int, bytes] | None:
    """Element number -> raw value of an Implicit VR Little Endian command set
    (group 0000), or None when it is not one."""
    elements: dict[int, bytes] = {}
    offset, end = 0, len(data)
    while offset < end:
        if end - offset < 8:
            return None
        group, element, length = _GROUP_ELEMENT.unpack_from(data, offset)
        offset += 8
        if group != 0x0000 or length > end - offset:
            return None
        elements[element] = bytes(data[offset : offset + length])
        offset += length
    return elements


def _ui(raw: bytes) -> str:
    return raw.decode("ascii").rstrip("\x00 ")


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
WITH_DATA_SET = 0x0001
PRIORITY_MEDIUM = 0x0000


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


def decode_response(data: bytes) -> tuple[int, int, int, str | None]:
    """(command field, message ID responded to, status, error comment) of a
    response command set; :class:`ProtocolError` if one of the first three is
    missing or the command set is broken."""
    elements = decode_command(data)
    field = command_uint(elements, COMMAND_FIELD)
    responded = command_uint(elements, MESSAGE_ID_RESPONDED)
    status = command_uint(elements, STATUS)
    if field is None or responded is None or status is None:
        raise ProtocolError("a response without command field, message ID or status")
    raw_comment = elements.get(ERROR_COMMENT)
    comment = raw_comment.decode("latin-1").strip("\x00 ") if raw_comment else ""
    return field, responded, status, comment or None


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


def encode_request(
    command_field: int,
    message_id: int,
    sop_class: str,
    sop_instance: str | None = None,
    with_data_set: bool = False,
) -> bytes:
    """The command set of a C-STORE-RQ (``sop_instance``, with a data set) or a
    C-ECHO-RQ, priority medium (PS3.7 9.3.1.1, 9.3.5.1)."""
    elements = [
        command_element(AFFECTED_SOP_CLASS, _even(sop_class.encode("ascii"), b"\x00")),
        command_element(COMMAND_FIELD, struct.pack("<H", command_field)),
        command_element(MESSAGE_ID, struct.pack("<H", message_id)),
    ]
    if command_field == C_STORE_RQ:
        elements.append(command_element(PRIORITY, struct.pack("<H", PRIORITY_MEDIUM)))
    data_set = WITH_DATA_SET if with_data_set else NO_DATA_SET
    elements.append(command_element(DATA_SET_TYPE, struct.pack("<H", data_set)))
    if sop_instance is not None:
        value = _even(sop_instance.encode("ascii"), b"\x00")
        elements.append(command_element(AFFECTED_SOP_INSTANCE, value))
    body = b"".join(elements)
    return command_element(0x0000, struct.pack("<L", len(body))) + body


# -- Part-10 files: File Meta, and sending a stored data set ----------------------------

_META_VERSION = b"\x00\x01"


def _meta_element(element: int, vr: bytes, value: bytes) -> bytes:
    """One group-0002 element, Explicit VR Little Endian (PS3.5 7.1.2)."""
    if vr == b"OB":  # 4-byte length after 2 reserved bytes
        return struct.pack("<HH2s2xL", 0x0002, element, vr, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def _padded(text: str, pad: bytes) -> bytes:
    # pydicom encodes these values with its default character set (ISO-IR 100).
    data = text.encode("latin-1")
    return data + pad if len(data) % 2 else data


def encode_file_meta(
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax: str,
    implementation_uid: str,
    implementation_version: str,
) -> bytes:
    """The File Meta Information group (after preamble and ``DICM``) that
    ``write_file_meta_info(fp, create_file_meta(...))`` writes for these values."""
    body = b"".join(
        (
            _meta_element(0x0001, b"OB", _META_VERSION),
            _meta_element(0x0002, b"UI", _padded(sop_class_uid, b"\x00")),
            _meta_element(0x0003, b"UI", _padded(sop_instance_uid, b"\x00")),
            _meta_element(0x0010, b"UI", _padded(transfer_syntax, b"\x00")),
            _meta_element(0x0012, b"UI", _padded(implementation_uid, b"\x00")),
            _meta_element(0x0013, b"SH", _padded(implementation_version, b" ")),
        )
    )
    return _meta_element(0x0000, b"UL", struct.pack("<L", len(body))) + body


def _file_meta_length(head: bytes | bytearray | memoryview) -> int | None:
    """The File Meta group length from the first 144 bytes of a Part-10 file, or
    None when they are not the plain layout (preamble, ``DICM``, (0002,0000) UL)."""
    if len(head) < 144 or bytes(head[128:132]) != b"DICM":
        return None
    group, element, vr, length = struct.unpack_from("<HH2sH", head, 132)
    if (group, element, vr, length) != (0x0002, 0x0000, b"UL", 4):
        return None
    (group_length,) = struct.unpack_from("<L", head, 140)
    return group_length if group_length <= 64 * 1024 else None


def _file_meta_values(meta: bytes) -> tuple[str, str, str] | None:
    """(SOP class, SOP instance, transfer syntax) from the File Meta elements."""
    values: dict[int, bytes] = {}
    offset, end = 0, len(meta)
    while offset < end:
        if end - offset < 8:
            return None
        group, element, vr = struct.unpack_from("<HH2s", meta, offset)
        if group != 0x0002:
            return None
        if vr in _META_LONG_VRS:
            if end - offset < 12:
                return None
            (length,) = struct.unpack_from("<L", meta, offset + 8)
            offset += 12
        else:
            (length,) = struct.unpack_from("<H", meta, offset + 6)
            offset += 8
        values[element] = meta[offset : offset + length]
        offset += length
    try:
        sop_class, sop_instance, syntax = (_ui(values[e]) for e in (0x0002, 0x0003, 0x0010))
    except (KeyError, UnicodeDecodeError):
        return None
    if not (sop_class and sop_instance and syntax):
        return None
    return sop_class, sop_instance, syntax


def parse_file_meta(data: bytes | bytearray | memoryview) -> tuple[str, str, str, int] | None:
    """(SOP class, SOP instance, transfer syntax, offset of the data set) of a
    Part-10 file held in memory, or None when it is not the plain layout."""
    group_length = _file_meta_length(data)
    if group_length is None or len(data) < 144 + group_length:
        return None
    values = _file_meta_values(bytes(data[144 : 144 + group_length]))
    return None if values is None else (*values, 144 + group_length)


def read_file_meta(path: str | Path) -> tuple[str, str, str, int] | None:
    """:func:`parse_file_meta` of a file on disk, reading only its File Meta (None
    when it is not the plain layout: then pydicom reads it)."""
    with open(path, "rb") as handle:
        group_length = _file_meta_length(handle.read(144))
        if group_length is None:
            return None
        meta = handle.read(group_length)
    if len(meta) != group_length:
        return None
    values = _file_meta_values(meta)
    return None if values is None else (*values, 144 + group_length)


#: Bytes of a file read and written per system call when sending it.
SEND_BLOCK = 256 * 1024
#: Fragment size when the peer accepts PDUs of any length (bounded, so memory is).
UNLIMITED_FRAGMENT = 1024 * 1024
#: PDVs per ``sendmsg``: two buffers each, under Linux's IOV_MAX of 1024.
MAX_PDVS_PER_SEND = 500


def fragment_size(limit: int, length: int) -> int:
    """Value bytes per PDV for a peer whose maximum PDU length is ``limit`` (0: no
    limit), sending ``length`` bytes: within the limit (a PDV header is 6 bytes of
    it), and never above ``UNLIMITED_FRAGMENT`` so that memory stays bounded even
    for a peer that announces a limit of gigabytes."""
    if limit == 0:
        return min(max(length, 1), UNLIMITED_FRAGMENT)
    return max(1, min(limit - 6, UNLIMITED_FRAGMENT))


def command_pdus(context_id: int, command: bytes, limit: int) -> bytes:
    """A command set as P-DATA-TF PDUs within the peer's ``limit``: one PDU unless
    the peer's limit is smaller than the command (a few hundred bytes)."""
    size = fragment_size(limit, len(command))
    if len(command) <= size:
        return p_data(context_id, CONTROL_COMMAND | CONTROL_LAST, command)
    return b"".join(
        p_data(
            context_id,
            CONTROL_COMMAND | (CONTROL_LAST if start + size >= len(command) else 0),
            command[start : start + size],
        )
        for start in range(0, len(command), size)
    )


def send_file_message(
    sock: socket.socket, context_id: int, command: bytes, path: str | Path, offset: int, limit: int
) -> None:
    """Send a C-STORE-RQ ``command`` and the data set read from ``path`` at
    ``offset`` as P-DATA-TF PDUs of at most ``limit`` bytes (0: unlimited).

    The file is read in blocks of about ``SEND_BLOCK`` bytes and each block goes out
    with one ``sendmsg`` of PDU headers and slices of the block: with a 16 KB peer
    limit a 525 KB image is ~17 system calls instead of ~66, and nothing is copied
    into a PDU first.
    """
    buffers: list[bytes | memoryview] = [command_pdus(context_id, command, limit)]
    with open(path, "rb", buffering=0) as handle:
        length = handle.seek(0, 2) - handle.seek(offset)
        size = fragment_size(limit, length)
        per_block = max(1, min(SEND_BLOCK // size, MAX_PDVS_PER_SEND))
        remaining = length
        while True:
            block = handle.read(min(per_block * size, remaining))
            if len(block) != min(per_block * size, remaining):
                raise OSError(f"{path} changed while it was being sent")
            view = memoryview(block)
            for start in range(0, max(len(block), 1), size):
                piece = view[start : start + size]
                last = remaining - start <= size
                header = struct.pack(
                    ">BxLLBB", 0x04, len(piece) + 6, len(piece) + 2, context_id, 2 if last else 0
                )
                buffers += (header, piece)
            _sendmsg_all(sock, buffers)
            buffers = []
            remaining -= len(block)
            if remaining <= 0:
                return


def _sendmsg_all(sock: socket.socket, buffers: list[bytes | memoryview]) -> None:
    """``sendall`` for a list of buffers (a blocking ``sendmsg`` may stop short)."""
    views = [memoryview(b) for b in buffers if len(b)]
    while views:
        sent = sock.sendmsg(views)
        while views and sent >= len(views[0]):
            sent -= len(views[0])
            views.pop(0)
        if views and sent:
            views[0] = views[0][sent:]
