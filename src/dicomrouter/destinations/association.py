"""Our side of an outgoing DICOM association: request it, send C-STORE and C-ECHO,
release or abort. No threads: one blocking socket with a timeout per wait.

Why not pynetdicom's requestor: each of its associations runs a DUL thread and a
reactor thread that poll the socket and each other every 0.2-1 ms, even while idle.
Profiled in the dispatch process (1000 small instances to storescp), those two loops
were about 45% of its CPU, CPU the receiver on the other core could not use; with a
1 ms poll the sending slowed instead. The acceptor
(:mod:`dicomrouter.receive.acceptor`) was replaced for the same reasons. What
pynetdicom does well is kept: encoding the A-ASSOCIATE-RQ and decoding the
A-ASSOCIATE-AC (``pynetdicom.pdu``).

The rules of a requestor that sends C-STORE/C-ECHO (PS3.8 9 and its state table):

- ``connect_timeout`` bounds the TCP connection, ``acse_timeout`` the wait for the
  A-ASSOCIATE-AC/RJ and for the A-RELEASE-RP, ``dimse_timeout`` the wait for each
  response; a timeout ends the association with A-ABORT;
- one message at a time (no asynchronous operations window is proposed);
- an A-ABORT, a closed connection or anything out of place from the peer (a PDU
  type we do not expect, a response to another message) ends the association:
  :class:`AssociationLost`; the caller retries later.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

from pydicom.uid import UID
from pynetdicom import pdu, pdu_primitives
from pynetdicom.presentation import build_context

from dicomrouter import wire
from dicomrouter.observe import metrics

log = logging.getLogger(__name__)

VERIFICATION = "1.2.840.10008.1.1"
#: Largest A-ASSOCIATE-AC we read (128 accepted contexts take about 8 KB).
MAX_ASSOCIATE_AC = 256 * 1024
#: Largest response command set we read (a C-STORE-RSP is about 200 bytes).
MAX_COMMAND = 64 * 1024

_C_STORE_RSP = 0x8001
_C_ECHO_RSP = 0x8030


class CannotConnect(Exception):
    """No TCP connection (refused, unreachable, or none within ``connect_timeout``)."""


#: PS3.8 table 9-21: the A-ASSOCIATE-RJ source, and the reasons each source may give.
_RJ_SOURCES = {
    1: "Service User",
    2: "Service Provider (ACSE)",
    3: "Service Provider (Presentation)",
}
_RJ_REASONS = {
    1: {
        1: "No reason given",
        2: "Application context name not supported",
        3: "Calling AE title not recognised",
        7: "Called AE title not recognised",
    },
    2: {1: "No reason given", 2: "Protocol version not supported"},
    3: {1: "Temporary congestion", 2: "Local limit exceeded"},
}


class AssociationRejected(Exception):
    """A-ASSOCIATE-RJ; ``permanent`` unless its result says "rejected-transient".

    Source and reason are named from our own copy of PS3.8's table, so a value the
    standard reserves (which some peers send) is reported as such instead of
    failing to decode; only result 2 is transient, as the standard defines it."""

    def __init__(self, result: int, source: int, reason: int):
        self.permanent = result != 0x02
        self.kind = "rejected-permanent" if self.permanent else "rejected-transient"
        source_name = _RJ_SOURCES.get(source, f"reserved source {source}")
        reason_name = _RJ_REASONS.get(source, {}).get(reason, f"reserved reason {reason}")
        self.detail = f"source {source_name}, reason {reason_name}"
        super().__init__(f"association {self.kind}: {self.detail}")


class AssociationLost(Exception):
    """The association ended before the operation completed: A-ABORT, connection
    closed, a timeout (``timed_out``) or a protocol error by the peer."""

    def __init__(self, message: str, timed_out: bool = False):
        super().__init__(message)
        self.timed_out = timed_out


@dataclass(frozen=True)
class Timeouts:
    """Seconds; 0 or None waits forever (as pynetdicom's ``None``).

    ``dimse`` bounds the wait for a response, ``network`` a send that cannot make
    progress because the peer stopped reading (its TCP window stays closed); without
    ``network``, sends are bounded by ``dimse`` too."""

    connect: float | None
    acse: float | None
    dimse: float | None
    network: float | None = None

    @property
    def send(self) -> float | None:
        return self.network or self.dimse


@dataclass(frozen=True)
class Response:
    """A C-STORE-RSP or C-ECHO-RSP: its status and error comment, if any."""

    status: int
    comment: str | None


class OutboundAssociation:
    """An established association; create with :meth:`request`.

    ``contexts`` maps each accepted (abstract syntax, transfer syntax) to its
    presentation context ID. Used by one thread; :meth:`abort` may also be called
    from another one, to end a send blocked on a hung peer.
    """

    def __init__(
        self, sock: socket.socket, contexts: dict[tuple[str, str], int], peer_max_pdu: int
    ):
        self.sock = sock
        self.contexts = contexts
        self.peer_max_pdu = peer_max_pdu
        self.reader = wire.SocketReader(sock, 64 * 1024)
        self._open = True
        self._closing = threading.Lock()  # abort() may race the sending thread
        self._timeouts = Timeouts(None, None, None)
        metrics.association_opened("outbound")

    # -- establishment -------------------------------------------------------------------
    @classmethod
    def request(
        cls,
        host: str,
        port: int,
        calling_ae: str,
        called_ae: str,
        proposed: list[tuple[str, str]],
        timeouts: Timeouts,
    ) -> OutboundAssociation:
        """Connect, propose one context per (abstract syntax, transfer syntax) in
        ``proposed`` (at most 128) and return the association once accepted.

        Raises :class:`CannotConnect`, :class:`AssociationRejected` or
        :class:`AssociationLost` (aborted, closed, or no answer within
        ``acse_timeout``). An association that accepted none of the contexts is
        returned all the same (``contexts`` empty): the caller decides."""
        if not 0 < len(proposed) <= 128:
            raise ValueError(f"{len(proposed)} presentation contexts (1 to 128 allowed)")
        try:
            sock = socket.create_connection((host, port), timeout=timeouts.connect or None)
        except OSError as exc:
            raise CannotConnect(str(exc) or type(exc).__name__) from exc
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(timeouts.acse or None)
            sock.sendall(_associate_rq(calling_ae, called_ae, proposed))
            reader = wire.SocketReader(sock, 64 * 1024)
            contexts, max_pdu = _read_associate_answer(reader, proposed)
        except TimeoutError:
            _abort_and_close(sock)
            raise AssociationLost(
                f"no A-ASSOCIATE response within {timeouts.acse:g}s", timed_out=True
            ) from None
        except (wire.PeerClosed, OSError) as exc:
            _abort_and_close(sock)
            raise AssociationLost(
                f"connection closed during association negotiation: {exc}"
            ) from None
        except wire.ProtocolError as exc:
            _abort_and_close(sock)
            raise AssociationLost(f"association negotiation failed: {exc}") from None
        except AssociationRejected:
            _close(sock)
            raise
        except AssociationLost:
            _close(sock)
            raise
        except Exception as exc:  # an A-ASSOCIATE-AC our decoder cannot take
            _abort_and_close(sock)
            raise AssociationLost(f"unreadable A-ASSOCIATE-AC: {exc}") from exc
        association = cls(sock, contexts, max_pdu)
        association.reader = reader  # it may already hold bytes past the AC
        association._timeouts = timeouts
        return association

    # -- state -----------------------------------------------------------------------------
    @property
    def is_established(self) -> bool:
        """Open, and the peer has neither closed the connection nor sent anything
        unasked (an A-ABORT, or an A-RELEASE-RQ) since the last response."""
        if not self._open:
            return False
        if self.reader.buffered:
            return False
        poller = select.poll()  # not select(): no limit on the descriptor number
        try:
            poller.register(self.sock, select.POLLIN)
            events = poller.poll(0)
        except (OSError, ValueError):
            return False
        return not events  # readable: closed, or a PDU nobody asked for

    # -- DIMSE -------------------------------------------------------------------------------
    def store_file(self, path: Path, message_id: int) -> Response:
        """C-STORE the data set of the Part-10 file ``path`` as it is on disk, on the
        context of its SOP class and transfer syntax.

        Raises ``ValueError`` when no context was accepted for that pair (or the
        file has no usable File Meta), ``OSError`` when the file cannot be read
        (nothing was sent), :class:`AssociationLost` when the association ends."""
        # An unreadable file raises OSError here, before anything is sent.
        meta = wire.read_file_meta(path) or _read_file_meta_with_pydicom(path)
        sop_class, sop_instance, syntax, offset = meta
        context_id = self.contexts.get((sop_class, syntax))
        if context_id is None:
            raise ValueError(
                f"no accepted presentation context for {sop_class} in {syntax} "
                "(the file's own transfer syntax)"
            )
        command = wire.encode_request(
            wire.C_STORE_RQ, message_id, sop_class, sop_instance, with_data_set=True
        )
        self._require_open()
        self.sock.settimeout(self._timeouts.send or None)
        try:
            wire.send_file_message(self.sock, context_id, command, path, offset, self.peer_max_pdu)
        except OSError as exc:  # the peer, or the file changing mid-send: message broken
            self._lost_while_sending(exc)
        return self._response(_C_STORE_RSP, message_id)

    def store_bytes(
        self, data_set: bytes, sop_class: str, sop_instance: str, syntax: str, message_id: int
    ) -> Response:
        """C-STORE an encoded data set (already in ``syntax``)."""
        context_id = self.contexts.get((sop_class, syntax))
        if context_id is None:
            raise ValueError(f"no accepted presentation context for {sop_class} in {syntax}")
        command = wire.encode_request(
            wire.C_STORE_RQ, message_id, sop_class, sop_instance, with_data_set=True
        )
        self._require_open()
        self.sock.settimeout(self._timeouts.send or None)
        try:
            self._send_fragments(context_id, command, data_set)
        except OSError as exc:
            self._lost_while_sending(exc)
        return self._response(_C_STORE_RSP, message_id)

    def echo(self, message_id: int = 1) -> Response:
        """C-ECHO; ``ValueError`` if Verification was not accepted."""
        context_id = next(
            (cid for (sop, _ts), cid in self.contexts.items() if sop == VERIFICATION), None
        )
        if context_id is None:
            raise ValueError("the Verification SOP Class was not accepted")
        self._require_open()
        self.sock.settimeout(self._timeouts.send or None)
        command = wire.encode_request(wire.C_ECHO_RQ, message_id, VERIFICATION)
        try:
            self.sock.sendall(wire.command_pdus(context_id, command, self.peer_max_pdu))
        except OSError as exc:
            self._lost_while_sending(exc)
        return self._response(_C_ECHO_RSP, message_id)

    # -- the end ---------------------------------------------------------------------------
    def release(self) -> None:
        """A-RELEASE-RQ, then wait (``acse_timeout``) for the A-RELEASE-RP; abort if
        none comes. Never raises."""
        if not self._open:
            return
        try:
            self.sock.settimeout(self._timeouts.acse or None)
            self.sock.sendall(wire.release_rq())
            while True:
                pdu_type, length = self.reader.pdu_header()
                self.reader.skip(length)
                if pdu_type in (wire.A_RELEASE_RP, wire.A_ABORT):
                    break
                if pdu_type == wire.A_RELEASE_RQ:  # release collision (PS3.8 7.2)
                    self.sock.sendall(wire.release_rp())
        except (OSError, wire.PeerClosed, wire.ProtocolError):
            self.abort()
            return
        self._finish()

    def abort(self) -> None:
        """A-ABORT (service user) and close; safe from another thread. Never raises,
        never waits.

        The A-ABORT goes out only if the send buffer has room for it at once: the
        usual reason to abort is a peer that stopped reading, whose full buffer
        would otherwise hold this call for the whole DIMSE timeout (and a send
        that had just timed out for a second one). Either way the connection is
        then shut down, which also wakes a ``recv`` blocked in another thread."""
        if not self._open:
            return
        with contextlib.suppress(OSError):
            self.sock.setblocking(False)
            self.sock.send(wire.abort(wire.ABORT_SERVICE_USER))
        self._finish()

    def _finish(self) -> None:
        with self._closing:
            if not self._open:
                return
            self._open = False
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes a recv blocked in another thread
        _close(self.sock)
        metrics.association_closed("outbound")

    # -- internals -------------------------------------------------------------------------
    def _require_open(self) -> None:
        if not self._open:
            raise AssociationLost("association already ended")

    def _lost_while_sending(self, exc: OSError) -> None:
        if isinstance(exc, TimeoutError):
            self.abort()
            raise AssociationLost(
                f"peer stopped reading for {self._timeouts.send or 0:g}s; association aborted",
                timed_out=True,
            ) from None
        self.abort()
        raise AssociationLost(f"association lost while sending: {exc}") from exc

    def _send_fragments(self, context_id: int, command: bytes, data: bytes) -> None:
        """The command, then ``data`` in P-DATA-TF PDUs within the peer's limit."""
        # A peer without a limit still gets bounded fragments (as for stored files).
        size = wire.fragment_size(self.peer_max_pdu, len(data))
        self.sock.sendall(wire.command_pdus(context_id, command, self.peer_max_pdu))
        for start in range(0, max(len(data), 1), size):
            last = start + size >= len(data)
            piece = data[start : start + size]
            self.sock.sendall(wire.p_data(context_id, 0x02 if last else 0x00, piece))

    def _response(self, command_field: int, message_id: int) -> Response:
        """Read PDUs until the response to ``message_id`` is complete."""
        reader = self.reader
        self.sock.settimeout(self._timeouts.dimse or None)
        command = bytearray()
        try:
            while True:
                pdu_type, length = reader.pdu_header()
                if pdu_type == wire.A_ABORT:
                    reader.skip(length)
                    self._finish()
                    raise AssociationLost("association aborted by peer (A-ABORT)")
                if pdu_type != wire.P_DATA_TF:
                    raise wire.ProtocolError(
                        f"unexpected PDU type 0x{pdu_type:02X} while awaiting a response"
                    )
                remaining = length
                while remaining:
                    data_length, _context, control = reader.pdv_header()
                    remaining -= data_length + 6
                    if remaining < 0 or not control & wire.CONTROL_COMMAND:
                        raise wire.ProtocolError("a data set or a broken PDV in a response")
                    if len(command) + data_length > MAX_COMMAND:
                        raise wire.ProtocolError("response command set too long")
                    command += reader.read(data_length)
                    if control & wire.CONTROL_LAST:
                        if remaining:
                            raise wire.ProtocolError("PDVs after the last command fragment")
                        return self._decode_response(bytes(command), command_field, message_id)
        except TimeoutError:
            self.abort()
            raise AssociationLost(
                f"no response within {self._timeouts.dimse:g}s; association aborted",
                timed_out=True,
            ) from None
        except wire.PeerClosed as exc:
            self._finish()
            raise AssociationLost(f"connection closed by peer: {exc}") from None
        except wire.ProtocolError as exc:
            self.abort()
            raise AssociationLost(f"protocol error by peer: {exc}") from None

    def _decode_response(self, data: bytes, command_field: int, message_id: int) -> Response:
        field, responded, status, comment = wire.decode_response(data)
        if field != command_field or responded != message_id:
            raise wire.ProtocolError(
                f"expected the response to message {message_id}, got command 0x"
                f"{field:04X} for message {responded}"
            )
        return Response(status, comment)


def _associate_rq(calling_ae: str, called_ae: str, proposed: list[tuple[str, str]]) -> bytes:
    contexts = []
    for index, (abstract, syntax) in enumerate(proposed):
        context = build_context(abstract, [syntax])
        context.context_id = 2 * index + 1
        contexts.append(context)
    max_length = pdu_primitives.MaximumLengthNotification()
    max_length.maximum_length_received = 0  # responses only: no reason to limit them
    class_uid = pdu_primitives.ImplementationClassUIDNotification()
    class_uid.implementation_class_uid = UID(wire.IMPLEMENTATION_CLASS_UID)
    version = pdu_primitives.ImplementationVersionNameNotification()
    version.implementation_version_name = wire.IMPLEMENTATION_VERSION
    primitive = pdu_primitives.A_ASSOCIATE()
    primitive.application_context_name = UID(wire.APPLICATION_CONTEXT)
    primitive.calling_ae_title = calling_ae
    primitive.called_ae_title = called_ae
    primitive.presentation_context_definition_list = contexts
    primitive.user_information = [max_length, class_uid, version]
    return bytes(pdu.A_ASSOCIATE_RQ(primitive).encode())


def _read_associate_answer(
    reader: wire.SocketReader, proposed: list[tuple[str, str]]
) -> tuple[dict[tuple[str, str], int], int]:
    """The accepted contexts and the peer's maximum PDU length, from its
    A-ASSOCIATE-AC; raises on A-ASSOCIATE-RJ, A-ABORT or anything else."""
    pdu_type, length = reader.pdu_header()
    if pdu_type == wire.A_ASSOCIATE_RJ:
        body = reader.read(min(length, 64))
        if len(body) < 4:
            raise wire.ProtocolError("short A-ASSOCIATE-RJ")
        raise AssociationRejected(body[1], body[2], body[3])
    if pdu_type == wire.A_ABORT:
        reader.skip(length)
        raise AssociationLost("association aborted by peer during negotiation (A-ABORT)")
    if pdu_type != wire.A_ASSOCIATE_AC:
        raise wire.ProtocolError(f"expected A-ASSOCIATE-AC, got PDU type 0x{pdu_type:02X}")
    _answer, primitive = wire.read_associate(reader, pdu_type, length, MAX_ASSOCIATE_AC)
    by_id = {2 * index + 1: pair for index, pair in enumerate(proposed)}
    contexts: dict[tuple[str, str], int] = {}
    for result in primitive.presentation_context_definition_results_list:
        context_id = result.context_id
        pair = by_id.get(context_id) if context_id is not None else None
        if pair is None or context_id is None or result.result != 0x00:
            continue
        accepted_syntax = str(result.transfer_syntax[0]) if result.transfer_syntax else pair[1]
        if accepted_syntax == pair[1]:  # one syntax proposed per context
            contexts[pair] = context_id
    max_pdu = 0
    for item in primitive.user_information:
        if isinstance(item, pdu_primitives.MaximumLengthNotification):
            max_pdu = int(item.maximum_length_received or 0)
    return contexts, max_pdu


def _read_file_meta_with_pydicom(path: Path) -> tuple[str, str, str, int]:
    """File Meta of a file whose group 0002 is not laid out as we write it."""
    from pydicom.filereader import _read_file_meta_info, read_preamble

    with open(path, "rb") as handle:
        try:
            read_preamble(handle, force=False)
            meta = _read_file_meta_info(handle)
            offset = handle.tell()
        except Exception as exc:
            raise ValueError(f"{path} has no readable File Meta: {exc}") from exc
    try:
        sop_class = str(meta.MediaStorageSOPClassUID)
        sop_instance = str(meta.MediaStorageSOPInstanceUID)
        syntax = str(meta.TransferSyntaxUID)
    except AttributeError as exc:
        raise ValueError(f"{path}: incomplete File Meta ({exc})") from exc
    return sop_class, sop_instance, syntax, offset


def _abort_and_close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.sendall(wire.abort(wire.ABORT_SERVICE_USER))
    _close(sock)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.close()
