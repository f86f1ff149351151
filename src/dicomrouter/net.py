"""Our adjustments to pynetdicom and pydicom on the hot paths, all in one place.

Each is an ``install_*`` function (idempotent) with the measurement that justified
it, and tests/test_net.py checks that what a patched path puts on the wire is what
pynetdicom's own path would have:

- ``install_tcp_nodelay``: pynetdicom never sets ``TCP_NODELAY``; with Nagle's
  algorithm every small request/response pair stalls ~40 ms (field notes);
- ``install_low_latency_reactors``: shorter idle sleeps in pynetdicom's reactors;
- ``install_no_value_validation``: pydicom's per-value validation only ever warned;
- ``install_fast_file_meta``: the File Meta of received files packed directly;
- ``install_fast_store_response``: C-STORE-RSP and the C-STORE-RQ of a stored file
  packed directly instead of through a pydicom Dataset per message.

Anything unusual (optional elements, odd values, event listeners) keeps
pynetdicom's own code path.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator
from typing import Any

from pynetdicom.transport import AssociationServer, AssociationSocket

_installed = False


def _nodelay(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass


def install_tcp_nodelay() -> None:
    """Patch pynetdicom so every association socket has TCP_NODELAY. Idempotent."""
    global _installed
    if _installed:
        return
    original_create = AssociationSocket._create_socket
    original_accept = AssociationServer.get_request

    def create_socket(self, address):  # type: ignore[no-untyped-def]
        sock = original_create(self, address)
        _nodelay(sock)
        return sock

    def get_request(self):  # type: ignore[no-untyped-def]
        client, address = original_accept(self)
        _nodelay(client)
        return client, address

    AssociationSocket._create_socket = create_socket  # type: ignore[method-assign]
    AssociationServer.get_request = get_request  # type: ignore[method-assign]
    _installed = True


#: pynetdicom's reactors sleep 1 ms whenever they find nothing to do. A 512x512 image
#: arrives as dozens of PDUs, and each gap can cost a whole sleep: measured on
#: loopback, receiving 300 x 525 KB took 2.2-2.7 s with 1 ms and 1.6-1.9 s with
#: 0.1 ms. 0.2 ms keeps most of that gain; an idle association then costs about 2-3%
#: of a core for its polling threads, which we accept for a router.
REACTOR_DELAY = 0.0002

_low_latency = False


def install_low_latency_reactors(delay: float = REACTOR_DELAY) -> None:
    """Shorten pynetdicom's idle sleeps (DUL and association reactors). Idempotent."""
    global _low_latency
    if _low_latency:
        return
    import time as _time

    from pynetdicom import association, dul

    original_init = dul.DULServiceProvider.__init__

    def init(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        original_init(self, *args, **kwargs)
        self._run_loop_delay = delay

    class _FastSleep:
        """``time`` for pynetdicom.association: its reactor's 1 ms sleep becomes
        ``delay``; every other use of ``time`` is unchanged."""

        def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
            return getattr(_time, name)

        @staticmethod
        def sleep(seconds: float) -> None:
            _time.sleep(delay if seconds == 0.001 else seconds)

    dul.DULServiceProvider.__init__ = init  # type: ignore[method-assign]
    association.time = _FastSleep()  # type: ignore[assignment]
    _low_latency = True


_validation_off = False


def install_no_value_validation() -> None:
    """Stop pydicom checking every element value it reads or writes. Idempotent.

    pydicom's default for both reading and writing is ``WARN``: each value is
    matched against its VR's length and character rules and a bad one only emits
    a warning, so nothing is ever refused because of it. On our hot paths that is
    pure cost: pynetdicom decodes every command set, builds a file meta and encodes
    every response through pydicom (about 150 us of CPU per small instance on the
    receive path, measured). What we must refuse we check ourselves: UIDs that
    become paths are validated by :func:`dicomrouter.store.uids.validate_uid`, and
    pynetdicom still validates the UIDs of the DIMSE primitives on its own.
    """
    global _validation_off
    if _validation_off:
        return
    from pydicom import config as pydicom_config

    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    pydicom_config.settings.writing_validation_mode = pydicom_config.IGNORE
    _validation_off = True


# -- File Meta of received objects ------------------------------------------------------
#
# With STORE_RECV_CHUNKED_DATASET, pynetdicom starts every received file with a File
# Meta built by ``create_file_meta`` (a pydicom Dataset) and written by pydicom's
# ``write_file_meta_info``: element objects, keyword lookups and a generic encoder for
# six fixed elements, about 160 us of CPU per instance (8% of the receiver's GIL
# samples). :func:`encode_file_meta` writes the same bytes directly; a test checks them
# against pydicom's output.

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


class _EncodedFileMeta(bytes):
    """What our ``create_file_meta`` returns: the encoded group, ready to write."""


_fast_file_meta = False


def install_fast_file_meta() -> None:
    """Make pynetdicom write received files' File Meta with :func:`encode_file_meta`.
    Idempotent; only the two names pynetdicom's DIMSE decoder calls are replaced,
    and anything but plain text values goes to the originals."""
    global _fast_file_meta
    if _fast_file_meta:
        return
    from pynetdicom import (
        PYNETDICOM_IMPLEMENTATION_UID,
        PYNETDICOM_IMPLEMENTATION_VERSION,
        dimse_messages,
    )

    original_create = dimse_messages.create_file_meta
    original_write = dimse_messages.write_file_meta_info

    def create_file_meta(
        *,
        sop_class_uid: Any,
        sop_instance_uid: Any,
        transfer_syntax: Any,
        implementation_uid: Any = PYNETDICOM_IMPLEMENTATION_UID,
        implementation_version: Any = PYNETDICOM_IMPLEMENTATION_VERSION,
    ) -> Any:
        values = (
            sop_class_uid,
            sop_instance_uid,
            transfer_syntax,
            implementation_uid,
            implementation_version,
        )
        # Empty or non-text values go to pydicom, which refuses them as before.
        if all(isinstance(value, str) and value for value in values):
            try:
                return _EncodedFileMeta(encode_file_meta(*values))
            except UnicodeEncodeError:
                pass
        return original_create(
            sop_class_uid=sop_class_uid,
            sop_instance_uid=sop_instance_uid,
            transfer_syntax=transfer_syntax,
            implementation_uid=implementation_uid,
            implementation_version=implementation_version,
        )

    def write_file_meta_info(fp: Any, file_meta: Any, enforce_standard: bool = True) -> None:
        if isinstance(file_meta, _EncodedFileMeta):
            fp.write(file_meta)
        else:
            original_write(fp, file_meta, enforce_standard)

    dimse_messages.create_file_meta = create_file_meta  # type: ignore[assignment]
    dimse_messages.write_file_meta_info = write_file_meta_info  # type: ignore[assignment]
    _fast_file_meta = True


# -- C-STORE responses -------------------------------------------------------------------
#
# Every C-STORE-RSP goes through pynetdicom's generic DIMSE encoder: a DIMSEMessage with
# a pydicom Dataset, a pass over the command set keywords, and the whole command set
# encoded twice (once to compute the group length). That was a third of the receiving
# thread's CPU (py-spy: send_msg 34% of the association thread's samples). A C-STORE-RSP
# is seven fixed elements; :func:`encode_store_response` packs them directly when the
# response has no optional elements (failures carrying an ErrorComment or an
# OffendingElement still take pynetdicom's path). A test checks the bytes against
# pynetdicom's encoder.

_C_STORE_RSP = 0x8001
_NO_DATASET = 0x0101


def command_element(element: int, value: bytes) -> bytes:
    """One group-0000 element, Implicit VR Little Endian (command sets, PS3.7 6.3.1)."""
    return struct.pack("<HHL", 0x0000, element, len(value)) + value


def encode_store_response(primitive: Any) -> bytes | None:
    """The encoded command set of the C-STORE-RSP ``primitive``, or None when it has
    elements beyond the fixed ones (left to pynetdicom)."""
    if primitive.OffendingElement is not None or primitive.ErrorComment is not None:
        return None
    message_id = primitive.MessageIDBeingRespondedTo
    status = primitive.Status
    if not (isinstance(message_id, int) and isinstance(status, int)):
        return None
    if not (0 <= message_id <= 0xFFFF and 0 <= status <= 0xFFFF):
        return None
    elements = []
    sop_class, sop_instance = primitive.AffectedSOPClassUID, primitive.AffectedSOPInstanceUID
    try:
        if sop_class is not None:
            elements.append(command_element(0x0002, _padded(sop_class, b"\x00")))
        elements.append(command_element(0x0100, struct.pack("<H", _C_STORE_RSP)))
        elements.append(command_element(0x0120, struct.pack("<H", message_id)))
        elements.append(command_element(0x0800, struct.pack("<H", _NO_DATASET)))
        elements.append(command_element(0x0900, struct.pack("<H", status)))
        if sop_instance is not None:
            elements.append(command_element(0x1000, _padded(sop_instance, b"\x00")))
    except UnicodeEncodeError:
        return None
    body = b"".join(elements)
    return command_element(0x0000, struct.pack("<L", len(body))) + body


_C_STORE_RQ = 0x0001
_WITH_DATASET = 0x0001


def encode_store_request(primitive: Any) -> bytes | None:
    """The encoded command set of the C-STORE-RQ ``primitive`` (which has a data set),
    or None when it is not the plain case (a C-MOVE originator, odd values)."""
    if (
        primitive.MoveOriginatorApplicationEntityTitle is not None
        or primitive.MoveOriginatorMessageID is not None
    ):
        return None
    message_id, priority = primitive.MessageID, primitive.Priority
    sop_class, sop_instance = primitive.AffectedSOPClassUID, primitive.AffectedSOPInstanceUID
    if not (isinstance(message_id, int) and isinstance(priority, int)):
        return None
    if not (0 <= message_id <= 0xFFFF and 0 <= priority <= 0xFFFF):
        return None
    if not (isinstance(sop_class, str) and isinstance(sop_instance, str)):
        return None
    try:
        body = b"".join(
            (
                command_element(0x0002, _padded(sop_class, b"\x00")),
                command_element(0x0100, struct.pack("<H", _C_STORE_RQ)),
                command_element(0x0110, struct.pack("<H", message_id)),
                command_element(0x0700, struct.pack("<H", priority)),
                command_element(0x0800, struct.pack("<H", _WITH_DATASET)),
                command_element(0x1000, _padded(sop_instance, b"\x00")),
            )
        )
    except UnicodeEncodeError:
        return None
    return command_element(0x0000, struct.pack("<L", len(body))) + body


def encode_p_data(context_id: int, control: int, data: bytes) -> bytes:
    """One P-DATA-TF PDU with one PDV (PS3.8 9.3.5): what pynetdicom's ``P_DATA_TF``
    encodes for a single presentation data value."""
    return struct.pack(">BxLLBB", 0x04, len(data) + 6, len(data) + 2, context_id, control) + data


def _file_fragments(path: Any, offset: int, limit: int) -> Iterator[tuple[int, bytes]]:
    """(control header, bytes) of the data set read from ``path`` at ``offset``, in
    fragments that fit PDUs of ``limit`` bytes (0: one fragment), as pynetdicom's
    chunked send does (PS3.8 E.2: 0x00 data set, 0x02 data set last fragment)."""
    with open(path, "rb") as handle:
        length = handle.seek(0, 2) - handle.seek(offset)
        size = length if limit == 0 else limit - 6
        count = 1 if limit == 0 else max(1, -(-length // size))
        for number in range(count):
            yield (0x02 if number == count - 1 else 0x00), handle.read(size)


def _raw_socket(dimse: Any) -> socket.socket | None:
    """The OS socket of an established association, when its PDUs may be written
    to it directly: in Sta6 (DT-1 leaves it there) with nobody listening to
    ``EVT_PDU_SENT`` or ``EVT_DATA_SENT``."""
    from pynetdicom import evt

    dul = dimse.dul
    wrapper = dul.socket
    if wrapper is None or dul.state_machine.current_state != "Sta6":
        return None
    assoc = dimse.assoc
    if assoc.get_handlers(evt.EVT_PDU_SENT) or assoc.get_handlers(evt.EVT_DATA_SENT):
        return None
    raw = getattr(wrapper, "socket", None)
    # Exactly a plain socket: an ssl.SSLSocket (a subclass) has no sendmsg.
    return raw if type(raw) is socket.socket else None


#: Bytes of a file read and written per system call when sending it.
SEND_BLOCK = 256 * 1024
#: Fragment size when the peer accepts PDUs of any length (bounded, so memory is).
UNLIMITED_FRAGMENT = 1024 * 1024


def send_file_message(
    sock: socket.socket, context_id: int, command: bytes, path: Any, offset: int, limit: int
) -> None:
    """Send a C-STORE-RQ ``command`` and the data set read from ``path`` at
    ``offset`` as P-DATA-TF PDUs of at most ``limit`` bytes (0: unlimited).

    The file is read in blocks of about ``SEND_BLOCK`` bytes and each block goes out
    with one ``sendmsg`` of PDU headers and slices of the block: with a 16 KB peer
    limit a 525 KB image is ~17 system calls instead of ~66, and nothing is copied
    into a PDU first.
    """
    buffers: list[bytes | memoryview] = [encode_p_data(context_id, 0x03, command)]
    with open(path, "rb", buffering=0) as handle:
        length = handle.seek(0, 2) - handle.seek(offset)
        size = min(max(length, 1), UNLIMITED_FRAGMENT) if limit == 0 else limit - 6
        per_block = max(1, SEND_BLOCK // size)
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


_fast_store_response = False


def install_fast_store_response() -> None:
    """Send C-STORE-RSPs encoded by :func:`encode_store_response`, and C-STORE-RQs
    of files (``send_c_store(path)`` with ``STORE_SEND_CHUNKED_DATASET``) with
    :func:`encode_store_request`. Idempotent.

    Falls back to pynetdicom's ``send_msg`` for every other message, for messages
    with optional elements, when a handler is bound to ``EVT_DIMSE_SENT`` (it expects
    pynetdicom's message object) and when the command set would not fit one PDU.
    """
    global _fast_store_response
    if _fast_store_response:
        return
    from pynetdicom import evt
    from pynetdicom.dimse import DIMSEServiceProvider
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.pdu_primitives import P_DATA

    original_send_msg = DIMSEServiceProvider.send_msg

    def send(self: Any, context_id: int, control: int, data: bytes) -> None:
        dul = self.dul
        sock = dul.socket
        if (
            sock is not None
            and dul.state_machine.current_state == "Sta6"
            and not self.assoc.get_handlers(evt.EVT_PDU_SENT)
        ):
            # Straight onto the socket from this thread: a P-DATA-TF in Sta6 leaves
            # the state machine in Sta6 (DT-1), and the DUL's queue would add a
            # reactor wake-up (up to REACTOR_DELAY) per PDU, 32 of them per 525 KB
            # image at a 16 KB peer limit. A send error posts Evt17 as before.
            sock.send(encode_p_data(context_id, control, data))
            return
        pdata = P_DATA()
        pdata.presentation_data_value_list.append((context_id, bytes((control,)) + data))
        dul.send_pdu(pdata)

    def send_msg(self: Any, primitive: Any, context_id: int) -> None:
        if type(primitive) is C_STORE and not self.assoc.get_handlers(evt.EVT_DIMSE_SENT):
            limit = self.maximum_pdu_size
            if primitive.MessageIDBeingRespondedTo is not None:
                encoded = encode_store_response(primitive)
                if encoded is not None and (limit == 0 or len(encoded) + 6 <= limit):
                    send(self, context_id, 0x03, encoded)  # command, last fragment
                    return
            elif isinstance(primitive._dataset_path, tuple) and primitive.DataSet is None:
                # send_c_store(path) with STORE_SEND_CHUNKED_DATASET: (path, offset)
                encoded = encode_store_request(primitive)
                if encoded is not None and (limit == 0 or len(encoded) + 6 <= limit):
                    path, offset = primitive._dataset_path
                    raw = _raw_socket(self)
                    if raw is not None:
                        try:
                            send_file_message(raw, context_id, encoded, path, offset, limit)
                        except OSError:
                            self.dul.event_queue.put("Evt17")  # as AssociationSocket.send
                        return
                    send(self, context_id, 0x03, encoded)
                    for control, data in _file_fragments(path, offset, limit):
                        send(self, context_id, control, data)
                    return
        original_send_msg(self, primitive, context_id)

    original_receive = DIMSEServiceProvider.receive_primitive

    def receive_primitive(self: Any, primitive: Any) -> None:
        # A C-STORE-RSP in one fragment (all of them, in practice): decoded with
        # struct instead of a pydicom Dataset, queued as pynetdicom would.
        values = primitive.presentation_data_value_list
        if self.message is None and len(values) == 1:
            context_id, data = values[0]
            if data[:1] == b"\x03" and not self.assoc.get_handlers(evt.EVT_DIMSE_RECV):
                response = decode_store_response(memoryview(data)[1:])
                if response is not None:
                    response._context_id = context_id
                    self.msg_queue.put((context_id, response))
                    return
        original_receive(self, primitive)

    DIMSEServiceProvider.send_msg = send_msg  # type: ignore[method-assign]
    DIMSEServiceProvider.receive_primitive = receive_primitive  # type: ignore[method-assign]
    _fast_store_response = True


# -- C-STORE of a stored file, and its response ------------------------------------------
#
# ``Association.send_c_store(path)`` re-reads the file meta with pydicom
# (``split_dataset``) for every instance, and turns the response into a pydicom Dataset
# (``_check_received_status``); the DUL thread decodes each C-STORE-RSP command set into
# a Dataset before making it a primitive. Profiled in the dispatch process for 1000 small
# instances, those three were about a quarter of its CPU. :func:`send_stored_file` and
# the C-STORE-RSP decoder below do the same work with ``struct``.

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


#: The elements a plain C-STORE-RSP has (PS3.7 9.3.1.2); anything else goes to pynetdicom.
_STORE_RSP_ELEMENTS = frozenset({0x0000, 0x0002, 0x0100, 0x0120, 0x0800, 0x0900, 0x0902, 0x1000})


def decode_store_response(data: bytes | memoryview) -> Any:
    """A C-STORE-RSP primitive from its encoded command set, or None when the
    command set is anything but a plain C-STORE-RSP."""
    from pynetdicom.dimse_primitives import C_STORE

    elements = decode_command_set(data)
    if elements is None or not elements.keys() <= _STORE_RSP_ELEMENTS:
        return None
    try:
        (field,) = struct.unpack("<H", elements[0x0100])
        (message_id,) = struct.unpack("<H", elements[0x0120])
        (status,) = struct.unpack("<H", elements[0x0900])
        if field != 0x8001 or struct.unpack("<H", elements[0x0800]) != (_NO_DATASET,):
            return None
        primitive = C_STORE()
        primitive.MessageIDBeingRespondedTo = message_id
        primitive.Status = status
        if 0x0002 in elements:
            primitive.AffectedSOPClassUID = _ui(elements[0x0002])
        if 0x1000 in elements:
            primitive.AffectedSOPInstanceUID = _ui(elements[0x1000])
        if elements.get(0x0902):
            primitive.ErrorComment = elements[0x0902].decode("latin-1").rstrip("\x00 ")  # type: ignore[assignment]
    except (KeyError, struct.error, UnicodeDecodeError, ValueError, TypeError):
        return None
    return primitive


def read_file_meta(path: Any) -> tuple[str, str, str, int] | None:
    """(SOP class, SOP instance, transfer syntax, offset of the data set) from a
    Part-10 file's File Meta group, or None when it is not the plain layout (then
    pydicom reads it)."""
    with open(path, "rb") as handle:
        head = handle.read(132 + 12)
        if len(head) < 144 or head[128:132] != b"DICM":
            return None
        group, element, vr, length = struct.unpack_from("<HH2sH", head, 132)
        if (group, element, vr, length) != (0x0002, 0x0000, b"UL", 4):
            return None
        (group_length,) = struct.unpack_from("<L", head, 140)
        if group_length > 64 * 1024:
            return None
        meta = handle.read(group_length)
    if len(meta) != group_length:
        return None
    values: dict[int, bytes] = {}
    offset = 0
    while offset < group_length:
        if group_length - offset < 8:
            return None
        group, element, vr = struct.unpack_from("<HH2s", meta, offset)
        if group != 0x0002:
            return None
        if vr in _META_LONG_VRS:
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
    return sop_class, sop_instance, syntax, 144 + group_length


def send_stored_file(assoc: Any, path: Any, msg_id: int, priority: int = 2) -> Any:
    """``assoc.send_c_store(path, msg_id)`` for a Part-10 file, returning the
    response primitive (None if the DIMSE timeout expired; the association is then
    aborted as pynetdicom does). Needs :func:`install_fast_store_response`.

    Raises what ``send_c_store`` raises: ValueError when no accepted context has the
    file's exact SOP class and transfer syntax, OSError when the file is unreadable.
    Files whose File Meta is not the plain layout go through ``send_c_store``.
    """
    from pynetdicom.dimse_primitives import C_STORE

    if not assoc.is_established:  # as send_c_store
        raise RuntimeError("The association with a peer SCP must be established first")
    meta = read_file_meta(path)
    if meta is None:
        return as_store_response(assoc.send_c_store(path, msg_id=msg_id, priority=priority))
    sop_class, sop_instance, syntax, offset = meta
    context = assoc._get_valid_context(sop_class, syntax, "scu", allow_conversion=False)
    request = C_STORE()
    request.MessageID = msg_id
    request.AffectedSOPClassUID = sop_class
    request.AffectedSOPInstanceUID = sop_instance
    request.Priority = priority
    request._dataset_path = (path, offset)
    # As send_c_store: pause the association's reactor while the message is in flight.
    assoc._reactor_checkpoint.clear()
    while not assoc._is_paused:
        time.sleep(0.0001)
    try:
        assoc.dimse.send_msg(request, context.context_id)
        _context_id, response = assoc.dimse.get_msg(block=True)
    finally:
        assoc._reactor_checkpoint.set()
    if response is None:
        assoc._handle_no_response()
        return None
    if not response.is_valid_response:
        assoc.abort()
        return None
    return response


def as_store_response(status: Any) -> Any:
    """send_c_store's status Dataset as the C-STORE-RSP primitive it came from."""
    from pynetdicom.dimse_primitives import C_STORE

    if "Status" not in status:
        return None
    primitive = C_STORE()
    primitive.Status = int(status.Status)
    comment = status.get("ErrorComment")
    if comment:
        primitive.ErrorComment = str(comment)  # type: ignore[assignment]
    return primitive
