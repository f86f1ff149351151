"""Our side of an outgoing association: request it, send DIMSE requests (C-STORE of
a file streamed from disk, C-ECHO, or any request with its data set), read their
responses, release or abort. No threads: one blocking socket with a timeout per
wait, driving :class:`~.machine.UpperLayer` in the requestor role.

Why not pynetdicom's requestor: each of its associations runs a DUL thread and a
reactor thread that poll the socket and each other every 0.2-1 ms, even while idle.
Profiled in the dispatch process, those two loops were about 45% of its CPU.

The rules (PS3.8 9 and its state table): ``connect_timeout`` bounds the TCP
connection (and the TLS handshake), ``acse_timeout`` the wait for the
A-ASSOCIATE-AC/RJ and for the A-RELEASE-RP, ``dimse_timeout`` the wait for each
response; a timeout ends the association with A-ABORT. One message at a time (no
asynchronous operations window is proposed). An A-ABORT, a closed connection or
anything out of place from the peer ends the association: :class:`AssociationLost`.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .command import Command
from .constants import (
    VERIFICATION_SOP_CLASS,
    AbortSource,
    CommandField,
    Rejection,
    Status,
    is_pending,
    is_response,
    response_field,
)
from .handler import Peer, Reply
from .handler import Request as IncomingRequest
from .machine import (
    Aborted,
    AssociationAccepted,
    CommandReceived,
    DataReceived,
    ReleaseConfirmed,
    ReleaseRequested,
    State,
    StateError,
    UpperLayer,
    Violation,
)
from .machine import AssociationRejected as Rejected
from .negotiation import MAX_CONTEXTS, AssociateRequest, Identity, ProposedContext
from .pdu import PeerClosed, ProtocolError, SocketReader, abort, send_buffers, send_file_message

#: What answers a request the peer sends on an outgoing association.
RequestHandler = Callable[[IncomingRequest], Iterable[Reply]]

#: Largest data set of a response read into memory (a C-FIND identifier).
MAX_RESPONSE_DATA_SET = 16 * 1024 * 1024


class CannotConnect(Exception):
    """No TCP connection (refused, unreachable, or none within ``connect_timeout``),
    or no TLS session with the peer (``tls``: the handshake failed)."""

    def __init__(self, message: str, tls: bool = False):
        super().__init__(message)
        self.tls = tls


class AssociationRejected(Exception):
    """A-ASSOCIATE-RJ; ``permanent`` unless its result says "rejected-transient"."""

    def __init__(self, rejection: Rejection):
        self.rejection = rejection
        self.permanent = rejection.permanent
        self.kind = "rejected-permanent" if self.permanent else "rejected-transient"
        self.detail = rejection.describe()
        super().__init__(f"association {self.kind}: {self.detail}")


class AssociationLost(Exception):
    """The association ended before the operation completed: A-ABORT, connection
    closed, a timeout (``timed_out``) or a protocol error by the peer."""

    def __init__(self, message: str, timed_out: bool = False):
        super().__init__(message)
        self.timed_out = timed_out


@dataclass(frozen=True)
class Timeouts:
    """Seconds; 0 or None waits forever.

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
class Hooks:
    """Called when an association opens and closes (metrics, without importing them)."""

    opened: Callable[[], object] = lambda: None
    closed: Callable[[], object] = lambda: None


@dataclass(frozen=True)
class TlsClient:
    """TLS for an outgoing association: the context, and the name to verify."""

    context: ssl.SSLContext
    server_hostname: str | None = None


@dataclass(frozen=True)
class Response:
    """A response: its status, error comment, and data set (C-FIND identifiers)."""

    status: int
    comment: str | None
    command: Command | None = field(default=None, compare=False)
    data_set: bytes | None = field(default=None, compare=False)


class OutboundAssociation:
    """An established association; create with :meth:`request`.

    ``contexts`` maps each accepted (abstract syntax, transfer syntax) to its
    presentation context ID. Used by one thread; :meth:`abort` may also be called
    from another one, to end a send blocked on a hung peer.
    """

    def __init__(
        self,
        sock: socket.socket,
        machine: UpperLayer,
        reader: SocketReader,
        timeouts: Timeouts,
        hooks: Hooks,
        peer: Peer,
        on_request: RequestHandler | None = None,
    ):
        self.sock = sock
        self.peer = peer
        self.on_request = on_request
        self.machine = machine
        self.reader = reader
        self.contexts = {pair: cid for cid, pair in machine.contexts.items()}
        self.peer_max_pdu = machine.peer_max_pdu
        self._timeouts = timeouts
        self._hooks = hooks
        self._open = True
        self._closing = threading.Lock()  # abort() may race the sending thread
        hooks.opened()

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
        identity: Identity,
        hooks: Hooks | None = None,
        tls: TlsClient | None = None,
        on_request: RequestHandler | None = None,
    ) -> OutboundAssociation:
        """Connect, propose one context per (abstract syntax, transfer syntax) in
        ``proposed`` (at most 128) and return the association once accepted.

        Raises :class:`CannotConnect`, :class:`AssociationRejected` or
        :class:`AssociationLost` (aborted, closed, or no answer within
        ``acse_timeout``). An association that accepted none of the contexts is
        returned all the same (``contexts`` empty): the caller decides.

        A request the peer sends on this association while we wait for a response
        (an N-EVENT-REPORT of storage commitment, say) goes to ``on_request``, whose
        replies are sent at once; without it the peer is told the operation is not
        provided."""
        if not 0 < len(proposed) <= MAX_CONTEXTS:
            raise ValueError(f"{len(proposed)} presentation contexts (1 to 128 allowed)")
        machine = UpperLayer(requestor=True, identity=identity)
        contexts = tuple(
            ProposedContext(2 * index + 1, abstract, (syntax,))
            for index, (abstract, syntax) in enumerate(proposed)
        )
        # Our limit for responses: none (they are small, or streamed by the reader).
        machine.connect(AssociateRequest(calling_ae, called_ae, contexts, max_pdu=0))
        sock = _connect(host, port, timeouts, tls)
        reader = SocketReader(sock, 64 * 1024)
        try:
            sock.settimeout(timeouts.acse or None)
            sock.sendall(machine.connected())
            event = machine.next_event(reader)
        except TimeoutError:
            _abort_and_close(sock)
            raise AssociationLost(
                f"no A-ASSOCIATE response within {timeouts.acse:g}s", timed_out=True
            ) from None
        except Violation as exc:
            _send_and_close(sock, exc.reply)
            raise AssociationLost(str(exc)) from None
        except (PeerClosed, OSError) as exc:
            _abort_and_close(sock)
            raise AssociationLost(
                f"connection closed during association negotiation: {exc}"
            ) from None
        except Exception as exc:  # e.g. a proposal pynetdicom cannot encode
            _abort_and_close(sock)
            raise AssociationLost(f"association negotiation failed: {exc}") from exc
        if isinstance(event, Rejected):
            _close(sock)
            raise AssociationRejected(event.rejection)
        if isinstance(event, Aborted):
            _close(sock)
            raise AssociationLost("association aborted by peer during negotiation (A-ABORT)")
        assert isinstance(event, AssociationAccepted)  # the table allows nothing else
        peer = Peer(calling_ae, called_ae, host, port, tls is not None)
        return cls(sock, machine, reader, timeouts, hooks or Hooks(), peer, on_request)

    # -- state -----------------------------------------------------------------------------
    @property
    def is_established(self) -> bool:
        """Open, and the peer has neither closed the connection nor sent anything
        unasked (an A-ABORT, or an A-RELEASE-RQ) since the last response."""
        if not self._open or self.machine.state is not State.Sta6:
            return False
        if self.reader.buffered:
            return False
        if isinstance(self.sock, ssl.SSLSocket) and self.sock.pending():
            return False
        poller = select.poll()  # not select(): no limit on the descriptor number
        try:
            poller.register(self.sock, select.POLLIN)
            events = poller.poll(0)
        except (OSError, ValueError):
            return False
        return not events  # readable: closed, or a PDU nobody asked for

    # -- DIMSE -------------------------------------------------------------------------------
    def store_file(self, path: Path, message_id: int, meta: tuple[str, str, str, int]) -> Response:
        """C-STORE the data set of the Part-10 file ``path`` as it is on disk, on the
        context of its SOP class and transfer syntax. ``meta`` is (SOP class, SOP
        instance, transfer syntax, offset of the data set) from its File Meta.

        Raises ``ValueError`` when no context was accepted for that pair,
        ``OSError`` when the file cannot be read (nothing was sent),
        :class:`AssociationLost` when the association ends."""
        sop_class, sop_instance, syntax, offset = meta
        context_id = self._context(sop_class, syntax)
        command = Command.request(
            CommandField.C_STORE_RQ, message_id, sop_class, sop_instance, with_data_set=True
        )
        self._require_open()
        try:
            limit = self.machine.sending(context_id)
        except StateError:  # abort() from another thread closed it meanwhile
            raise AssociationLost("association aborted") from None
        self.sock.settimeout(self._timeouts.send or None)
        try:
            send_file_message(self.sock, context_id, command.encode(), path, offset, limit)
        except OSError as exc:  # the peer, or the file changing mid-send: message broken
            self._lost_while_sending(exc)
        return self._response(command)

    def store_bytes(
        self, data_set: bytes, sop_class: str, sop_instance: str, syntax: str, message_id: int
    ) -> Response:
        """C-STORE an encoded data set (already in ``syntax``)."""
        context_id = self._context(sop_class, syntax)
        command = Command.request(
            CommandField.C_STORE_RQ, message_id, sop_class, sop_instance, with_data_set=True
        )
        return self._response(self._send(context_id, command, data_set))

    def echo(self, message_id: int = 1) -> Response:
        """C-ECHO; ``ValueError`` if Verification was not accepted."""
        context_id = next(
            (cid for (sop, _ts), cid in self.contexts.items() if sop == VERIFICATION_SOP_CLASS),
            None,
        )
        if context_id is None:
            raise ValueError("the Verification SOP Class was not accepted")
        command = Command.request(CommandField.C_ECHO_RQ, message_id, VERIFICATION_SOP_CLASS)
        return self._response(self._send(context_id, command, None))

    def send_request(
        self, command: Command, syntax: str, data_set: bytes | None = None
    ) -> Iterator[Response]:
        """Any request (C-FIND with its identifier, N-ACTION...), on the context of
        its SOP class in ``syntax``; yields each response, pending ones first."""
        context_id = self._context(command.sop_class, syntax)
        self._send(context_id, command, data_set)
        while True:
            response = self._response(command)
            yield response
            if not is_pending(response.status):
                return

    def action(
        self,
        sop_class: str,
        sop_instance: str,
        action_type: int,
        data_set: bytes,
        syntax: str,
        message_id: int = 1,
    ) -> Response:
        """N-ACTION-RQ with its action information ``data_set`` (encoded in
        ``syntax``), on the context of ``sop_class`` in ``syntax``; returns the
        N-ACTION-RSP. ``ValueError`` when no such context was accepted."""
        command = Command.action(message_id, sop_class, sop_instance, action_type)
        return self._response(self._send(self._context(sop_class, syntax), command, data_set))

    def wait_for_request(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a request from the peer (the
        N-EVENT-REPORT that follows an N-ACTION of storage commitment) and answer it
        through ``on_request``. True once one was served; False when none came in
        time, or the peer released the association instead (answered: the
        association is then over). Raises :class:`AssociationLost` on an A-ABORT,
        a closed connection or a protocol error."""
        self._require_open()
        if not self._readable(timeout):
            return False
        with self._receiving():
            self.sock.settimeout(self._timeouts.dimse or None)
            event = self.machine.next_event(self.reader)
            if isinstance(event, ReleaseRequested):
                with contextlib.suppress(OSError, ValueError):
                    self.sock.sendall(self.machine.release_response())
                self._finish()
                return False
            if isinstance(event, Aborted):
                self._finish()
                raise AssociationLost("association aborted by peer (A-ABORT)")
            if not isinstance(event, CommandReceived) or is_response(event.command.command_field):
                raise ProtocolError(f"{type(event).__name__} while no request was pending")
            self._serve(event.context_id, event.command)
            return True
        return False  # pragma: no cover (_receiving raises)

    def _readable(self, timeout: float) -> bool:
        if self.reader.buffered:
            return True
        if isinstance(self.sock, ssl.SSLSocket) and self.sock.pending():
            return True
        poller = select.poll()
        try:
            poller.register(self.sock, select.POLLIN)
            return bool(poller.poll(max(0, int(timeout * 1000))))
        except (OSError, ValueError):
            return True  # the read that follows reports what happened

    # -- the end ---------------------------------------------------------------------------
    def release(self) -> None:
        """A-RELEASE-RQ, then wait (``acse_timeout``) for the A-RELEASE-RP; abort if
        none comes. Never raises."""
        if not self._open:
            return
        machine = self.machine
        try:
            self.sock.settimeout(self._timeouts.acse or None)
            self.sock.sendall(machine.release())
            while True:
                event = machine.next_event(self.reader)
                if isinstance(event, ReleaseConfirmed | Aborted):
                    break
                if isinstance(event, ReleaseRequested):  # release collision (PS3.8 7.2)
                    self.sock.sendall(machine.release_response())
                # P-DATA still in flight from the peer is read and dropped
        except (OSError, PeerClosed, ProtocolError, ValueError):
            self.abort()
            return
        self._finish()

    def abort(self) -> None:
        """A-ABORT (service user) and close; safe from another thread. Never raises,
        never waits.

        The A-ABORT goes out only if the send buffer has room for it at once: the
        usual reason to abort is a peer that stopped reading, whose full buffer
        would otherwise hold this call for the whole DIMSE timeout. Either way the
        connection is then shut down, which also wakes a ``recv`` blocked in
        another thread."""
        if not self._open:
            return
        if not isinstance(self.sock, ssl.SSLSocket):
            # Over TLS, no: OpenSSL does not allow a write while the owner thread may
            # be inside a read or write on the same session. The peer sees the close.
            with contextlib.suppress(OSError, ValueError):
                self.sock.setblocking(False)
                self.sock.send(abort(AbortSource.SERVICE_USER))
        self._finish()

    def _finish(self) -> None:
        with self._closing:
            if not self._open:
                return
            self._open = False
        with contextlib.suppress(OSError, ValueError):
            # Wakes a recv blocked in another thread. The plain socket's shutdown, also
            # for TLS: SSLSocket.shutdown would drop its SSL object under that thread.
            socket.socket.shutdown(self.sock, socket.SHUT_RDWR)
        _close(self.sock)
        self.machine.connection_closed()
        self._hooks.closed()

    # -- internals -------------------------------------------------------------------------
    def _context(self, sop_class: str, syntax: str) -> int:
        context_id = self.contexts.get((sop_class, syntax))
        if context_id is None:
            raise ValueError(f"no accepted presentation context for {sop_class} in {syntax}")
        return context_id

    def _require_open(self) -> None:
        if not self._open or self.machine.state is not State.Sta6:
            raise AssociationLost("association already ended")

    def _send(self, context_id: int, command: Command, data: bytes | None) -> Command:
        self._require_open()
        self.sock.settimeout(self._timeouts.send or None)
        try:
            send_buffers(self.sock, self.machine.send(context_id, command, data))
        except OSError as exc:
            self._lost_while_sending(exc)
        except StateError:  # abort() from another thread closed it meanwhile
            raise AssociationLost("association aborted") from None
        return command

    def _lost_while_sending(self, exc: OSError) -> None:
        self.abort()
        if isinstance(exc, TimeoutError):
            raise AssociationLost(
                f"peer stopped reading for {self._timeouts.send or 0:g}s; association aborted",
                timed_out=True,
            ) from None
        raise AssociationLost(f"association lost while sending: {exc}") from exc

    @contextlib.contextmanager
    def _receiving(self) -> Iterator[None]:
        """What reading from the peer may raise, as :class:`AssociationLost`."""
        try:
            yield
        except TimeoutError:
            self.abort()
            raise AssociationLost(
                f"no response within {self._timeouts.dimse:g}s; association aborted",
                timed_out=True,
            ) from None
        except PeerClosed as exc:
            self._finish()
            raise AssociationLost(f"connection closed by peer: {exc}") from None
        except Violation as exc:
            with contextlib.suppress(OSError, ValueError):
                self.sock.sendall(exc.reply)
            self._finish()
            raise AssociationLost(f"protocol error by peer: {exc}") from None
        except ProtocolError as exc:
            self.abort()
            raise AssociationLost(f"protocol error by peer: {exc}") from None
        except StateError:  # abort() from another thread closed it meanwhile
            raise AssociationLost("association aborted") from None

    def _response(self, request: Command) -> Response:
        """Read until the response to ``request`` (and its data set) is complete."""
        machine = self.machine
        self.sock.settimeout(self._timeouts.dimse or None)
        expected = response_field(request.command_field)
        with self._receiving():
            while True:
                event = machine.next_event(self.reader)
                if isinstance(event, Aborted):
                    self._finish()
                    raise AssociationLost("association aborted by peer (A-ABORT)")
                if not isinstance(event, CommandReceived):
                    raise ProtocolError(f"{type(event).__name__} while awaiting a response")
                if is_response(event.command.command_field):
                    break
                self._serve(event.context_id, event.command)
            command = event.command
            if (
                command.command_field != expected
                or command.message_id_responded != request.message_id
                or command.status is None
            ):
                raise ProtocolError(
                    f"expected the response to message {request.message_id}, got command "
                    f"0x{command.command_field:04X} for message {command.message_id_responded}"
                )
            data = self._read_data_set() if command.has_data_set else None
            return Response(command.status, command.error_comment, command, data)
        raise AssertionError("unreachable")  # pragma: no cover (mypy: _receiving raises)

    def _serve(self, context_id: int, command: Command) -> None:
        """A request from the peer: its replies (``on_request``, or "not provided")."""
        data = self._read_data_set() if command.has_data_set else None
        if command.command_field == CommandField.C_CANCEL_RQ:
            return
        if command.message_id is None:
            raise ProtocolError("request without a Message ID")
        abstract_syntax, transfer_syntax = self.machine.contexts[context_id]
        incoming = IncomingRequest(
            self.peer, context_id, abstract_syntax, transfer_syntax, command, data
        )
        replies: Iterable[Reply] = [Reply(Status.UNRECOGNIZED_OPERATION, "operation not provided")]
        if self.on_request is not None:
            try:
                replies = list(self.on_request(incoming))
            except Exception as exc:  # the peer is owed an answer all the same
                replies = [Reply(Status.PROCESSING_FAILURE, str(exc)[:64])]
        self.sock.settimeout(self._timeouts.send or None)
        for reply in replies:
            response = command.response(reply.status, reply.comment, reply.data_set is not None)
            if reply.fields:
                response = response.but(**reply.fields)
            try:
                send_buffers(self.sock, self.machine.send(context_id, response, reply.data_set))
            except OSError as exc:
                self._lost_while_sending(exc)
        self.sock.settimeout(self._timeouts.dimse or None)

    def _read_data_set(self) -> bytes:
        data = bytearray()
        while True:
            event = self.machine.next_event(self.reader)
            if not isinstance(event, DataReceived):
                raise ProtocolError(f"{type(event).__name__} inside a response's data set")
            if len(data) + event.length > MAX_RESPONSE_DATA_SET:
                raise ProtocolError("response data set too large")
            self.machine.read_data(self.reader, data.extend)
            if event.last:
                return bytes(data)


def _connect(host: str, port: int, timeouts: Timeouts, tls: TlsClient | None) -> socket.socket:
    try:
        sock = socket.create_connection((host, port), timeout=timeouts.connect or None)
    except OSError as exc:
        raise CannotConnect(str(exc) or type(exc).__name__) from exc
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls is not None:
            sock = tls.context.wrap_socket(sock, server_hostname=tls.server_hostname or host)
    except (ssl.SSLError, ssl.CertificateError, OSError) as exc:
        _close(sock)
        if isinstance(exc, ssl.SSLCertVerificationError):
            reason = f"certificate verify failed: {exc.verify_message}"
        else:
            reason = str(getattr(exc, "reason", None) or exc)
        raise CannotConnect(f"TLS handshake failed: {reason}", tls=True) from exc
    return sock


def _send_and_close(sock: socket.socket, data: bytes) -> None:
    with contextlib.suppress(OSError, ValueError):
        if data:
            sock.sendall(data)
    _close(sock)


def _abort_and_close(sock: socket.socket) -> None:
    _send_and_close(sock, abort(AbortSource.SERVICE_USER))


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.close()
