"""One accepted connection, from its first byte to its end, on its own thread: the
socket driver of :class:`~.machine.UpperLayer` for the acceptor role.

The rules it applies on top of the state machine (PS3.8 9, PS3.7 9.1):

- the A-ASSOCIATE-RQ must come within ``acse_timeout`` of the connection (ARTIM,
  enforced by the server for the whole request, TLS handshake included);
- protocol version bit 0 and the DICOM application context, the calling AE
  allow-list, the called AE and the association limits, or A-ASSOCIATE-RJ with the
  standard result, source and reason;
- ``dimse_timeout`` bounds the wait for the rest of a message in progress,
  ``network_timeout`` an idle association; either ends in A-ABORT;
- A-RELEASE-RQ is answered with A-RELEASE-RP; an A-ABORT or a dropped connection
  discards the object in progress (its sender got no response, so nothing
  acknowledged is lost).
"""

from __future__ import annotations

import logging
import socket
import ssl
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from .command import Command
from .constants import (
    APPLICATION_CONTEXT,
    REJECT_CALLED_AE,
    REJECT_CALLING_AE,
    REJECT_CONTEXT_NAME,
    REJECT_LIMIT,
    REJECT_PROTOCOL_VERSION,
    AbortSource,
    CommandField,
    Rejection,
    Status,
    is_pending,
)
from .handler import AcceptorSettings, Peer, Reply, Request, Sink, StoreRequest
from .machine import (
    Aborted,
    AssociationRequested,
    CommandReceived,
    DataReceived,
    ReleaseRequested,
    UpperLayer,
    Violation,
)
from .pdu import Buffer, PeerClosed, ProtocolError, SocketReader, send_buffers

if TYPE_CHECKING:
    from .server import Server

log = logging.getLogger("dicomrouter.dicomnet")

#: Largest data set of a request other than C-STORE (an identifier, an action's
#: information) gathered in memory; a larger one is answered "out of resources".
MAX_REQUEST_DATA_SET = 4 * 1024 * 1024


class _Discard:
    """The sink of a data set already refused."""

    def write(self, piece: memoryview) -> None:
        return None

    def discard(self) -> None:
        return None


class _Gather:
    """The data set of a request other than C-STORE, in memory, up to a limit."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.too_large = False

    def write(self, piece: memoryview) -> None:
        if self.too_large:
            return
        if len(self.data) + len(piece) > MAX_REQUEST_DATA_SET:
            self.too_large = True
            self.data = bytearray()
            return
        self.data += piece

    def discard(self) -> None:
        self.data = bytearray()


class _Incoming:
    """A request whose data set is being received."""

    def __init__(
        self,
        context_id: int,
        command: Command,
        sink: Sink | _Gather,
        store: StoreRequest | None = None,
        status: tuple[int, str | None] | None = None,
    ):
        self.context_id = context_id
        self.command = command
        self.sink = sink
        self.store = store
        self.status = status


class AcceptorAssociation:
    """One connection served by :class:`~.server.Server`."""

    def __init__(
        self,
        server: Server,
        sock: socket.socket,
        host: str,
        port: int,
        key: int,
        tls: ssl.SSLContext | None = None,
    ):
        self.server = server
        self.sock = sock
        self.host = host
        self.port = port
        self.key = key
        self.tls = tls
        self.peer = Peer("", "", host, port, tls is not None)
        self.settings: AcceptorSettings = server.settings()
        self.machine = UpperLayer(requestor=False, identity=server.identity)
        self.reader = SocketReader(sock)
        self.incoming: _Incoming | None = None

    # -- life cycle -----------------------------------------------------------------------
    def run(self) -> None:
        established = aborted = False
        machine = self.machine
        try:
            if self.tls is not None and not self._handshake():
                return
            machine.connection_indication()
            established = self._negotiate()
            if established:
                aborted = not self._transfer()
        except Violation as exc:
            log.warning("aborting association from %s: %s", self._who(), exc)
            self._send_quietly(exc.reply)
            aborted = True
        except ProtocolError as exc:
            log.warning("aborting association from %s: %s", self._who(), exc)
            self._send_quietly(machine.abort(AbortSource.SERVICE_PROVIDER, exc.reason))
            aborted = True
        except TimeoutError:
            log.warning("aborting association from %s: timed out", self._who())
            self._send_quietly(machine.abort(AbortSource.SERVICE_PROVIDER))
            aborted = True
        except PeerClosed as exc:
            if established:
                log.warning("association from %s lost: %s", self._who(), exc)
            aborted = True
        except Exception:
            log.exception("association from %s failed", self._who())
            self._send_quietly(machine.abort(AbortSource.SERVICE_PROVIDER))
            aborted = True
        finally:
            if self.incoming is not None:
                self.incoming.sink.discard()
                self.incoming = None
            try:
                self.sock.close()
            except OSError:
                pass
            machine.connection_closed()
            self.server._finished(self.key)
            if established:
                try:
                    self.server.handler.on_association_end(self.peer, aborted)
                except Exception:
                    log.exception("association end handler failed")

    def _handshake(self) -> bool:
        """The TLS handshake, within ``acse_timeout`` (the server's ARTIM also cuts a
        handshake that trickles). A client that speaks plain DICOM to the TLS port,
        or presents a certificate we do not trust, is closed here and reported."""
        assert self.tls is not None
        self.sock.settimeout(self.settings.acse_timeout or None)
        try:
            # Wrapped first, handshake after: the server's cut() must reach the
            # socket the handshake runs on (wrapping detaches the plain one).
            wrapped = self.tls.wrap_socket(
                self.sock, server_side=True, do_handshake_on_connect=False
            )
            self.server._replace_socket(self.key, wrapped)
            self.sock = wrapped
            wrapped.do_handshake()
        except OSError as exc:  # ssl.SSLError is one
            reason = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
            self.server._refusals.refused(self.host, f"TLS handshake failed: {reason}")
            try:
                self.sock.close()
            except OSError:
                pass
            return False
        self.reader = SocketReader(wrapped)
        return True

    def _who(self) -> str:
        calling = self.peer.calling_ae or "?"
        return f"{calling} ({self.host}:{self.port})"

    def _send(self, data: bytes | list[Buffer]) -> None:
        if isinstance(data, list):
            send_buffers(self.sock, data)
        else:
            self.sock.sendall(data)

    def _send_quietly(self, data: bytes) -> None:
        if not data:
            return
        try:
            self.sock.sendall(data)
        except (OSError, ValueError):
            pass

    # -- association establishment ----------------------------------------------------------
    def _negotiate(self) -> bool:
        settings = self.settings
        server = self.server
        self.sock.settimeout(settings.acse_timeout or None)
        event = self.machine.next_event(self.reader)
        if isinstance(event, Aborted):  # Sta2: the only other event the table allows
            log.info("connection from %s:%s aborted before associating", self.host, self.port)
            return False
        assert isinstance(event, AssociationRequested)
        request = event.request
        calling, called = request.calling_ae, request.called_ae
        self.peer = Peer(calling, called, self.host, self.port, self.tls is not None)

        rejection: tuple[Rejection, str] | None = None
        if not request.protocol_version & 0x0001:  # PS3.8 9.3.2: only bit 0 is tested
            rejection = REJECT_PROTOCOL_VERSION, "unsupported protocol version"
        elif request.application_context != APPLICATION_CONTEXT:
            rejection = REJECT_CONTEXT_NAME, "unsupported application context"
        elif settings.allowed_callers is not None and calling not in settings.allowed_callers:
            rejection = REJECT_CALLING_AE, "calling AE title not in dicom.allowed_callers"
        elif settings.require_called_ae and called != settings.ae_title:
            rejection = REJECT_CALLED_AE, f"called AE title {called!r} is not {settings.ae_title!r}"
        elif limit := server._admit(
            self.key, settings.max_associations, settings.max_associations_per_host
        ):
            rejection = REJECT_LIMIT, f"{limit} reached"
        if rejection is not None:
            code, why = rejection
            if code == REJECT_LIMIT:
                # A flood of associations must not become a flood of log lines.
                server._refusals.refused(self.host, f"association refused: {why}", False)
            else:
                log.warning(
                    "rejected association from %s (%s:%s) calling %s: %s",
                    calling or "?",
                    self.host,
                    self.port,
                    called or "?",
                    why,
                )
            server.handler.on_rejected(self.peer, why)
            self._answer_and_linger(self.machine.reject(code))
            return False

        accept = server.capabilities.negotiate(
            request, settings.max_pdu_size, settings.private_transfer_syntaxes
        )
        self._send(self.machine.accept(accept))
        log.debug(
            "accepted association from %s: %d of %d contexts",
            self._who(),
            len(self.machine.contexts),
            len(request.contexts),
        )
        server.handler.on_established(self.peer)
        return True

    def _answer_and_linger(self, last_pdu: bytes) -> None:
        """Send A-ASSOCIATE-RJ or A-RELEASE-RP, then give the peer a moment to read it
        and close first (ARTIM), so the answer is not lost to a connection reset.

        The association is over: its slot under ``max_associations`` is freed before
        the answer, so a peer slow to close cannot hold one for the ARTIM second (a
        modality that releases and at once opens its next association would be
        refused)."""
        self.server._finished(self.key)
        self._send(last_pdu)
        deadline = time.monotonic() + 1.0  # for the whole wait: not per byte received
        try:
            while (left := deadline - time.monotonic()) > 0:
                self.sock.settimeout(left)
                if not self.sock.recv(4096):
                    break
        except (OSError, ValueError):
            pass

    # -- data transfer -------------------------------------------------------------------
    def _transfer(self) -> bool:
        """P-DATA until release (returns True) or an A-ABORT from the peer (False)."""
        machine = self.machine
        settings = self.settings
        while True:
            busy = machine.busy
            timeout = settings.dimse_timeout if busy else settings.network_timeout
            self.sock.settimeout(timeout or None)
            event = machine.next_event(self.reader)
            if isinstance(event, DataReceived):
                incoming = self.incoming
                assert incoming is not None  # the machine checked a command came first
                machine.read_data(self.reader, incoming.sink.write)
                if event.last:
                    self.incoming = None
                    self._on_data_set(incoming)
            elif isinstance(event, CommandReceived):
                self._on_command(event.context_id, event.command)
            elif isinstance(event, ReleaseRequested):
                self._answer_and_linger(machine.release_response())
                return True
            elif isinstance(event, Aborted):
                log.info("association from %s aborted by the peer", self._who())
                return False

    def _on_command(self, context_id: int, command: Command) -> None:
        field = command.command_field
        if field == CommandField.C_CANCEL_RQ:
            return  # nothing in progress can be cancelled; no response is due
        if command.message_id is None:
            raise ProtocolError("request without a Message ID")
        abstract_syntax, transfer_syntax = self.machine.contexts[context_id]
        if field == CommandField.C_STORE_RQ:
            if not command.has_data_set:
                raise ProtocolError("C-STORE-RQ without a data set")
            self.incoming = self._open_store(context_id, command, abstract_syntax, transfer_syntax)
            return
        if command.has_data_set:
            self.incoming = _Incoming(context_id, command, _Gather())
            return
        self._serve(Request(self.peer, context_id, abstract_syntax, transfer_syntax, command))

    def _open_store(
        self, context_id: int, command: Command, abstract_syntax: str, transfer_syntax: str
    ) -> _Incoming:
        if command.affected_sop_class != abstract_syntax:
            status = (
                Status.SOP_CLASS_NOT_SUPPORTED,
                "Affected SOP Class differs from the presentation context",
            )
            return _Incoming(context_id, command, _Discard(), status=status)
        assert command.message_id is not None
        store = StoreRequest(
            self.peer,
            context_id,
            command.message_id,
            command.affected_sop_class or "",
            command.affected_sop_instance or "",
            transfer_syntax,
        )
        try:
            opened = self.server.handler.open_sink(store)
        except Exception:
            log.exception("opening a sink for an object from %s failed", self._who())
            opened = (Status.OUT_OF_RESOURCES, "internal error")
        if isinstance(opened, tuple):
            return _Incoming(context_id, command, _Discard(), status=opened)
        return _Incoming(context_id, command, opened, store=store)

    def _on_data_set(self, incoming: _Incoming) -> None:
        if isinstance(incoming.sink, _Gather):
            gathered = incoming.sink
            if gathered.too_large:
                self._respond(
                    incoming.context_id,
                    incoming.command,
                    Reply(Status.OUT_OF_RESOURCES, "data set too large"),
                )
                return
            abstract_syntax, transfer_syntax = self.machine.contexts[incoming.context_id]
            request = Request(
                self.peer,
                incoming.context_id,
                abstract_syntax,
                transfer_syntax,
                incoming.command,
                bytes(gathered.data),
            )
            self._serve(request)
            return
        status = incoming.status
        if status is None:
            assert incoming.store is not None
            try:
                status = self.server.handler.on_store(incoming.store, incoming.sink)
            except Exception:
                log.exception("storing an object from %s failed", self._who())
                status = (Status.OUT_OF_RESOURCES, "internal error")
        incoming.sink.discard()  # whatever the handler left behind
        self._respond(incoming.context_id, incoming.command, Reply(*status))

    def _serve(self, request: Request) -> None:
        """The handler's replies, each sent as it comes (pending ones first). An
        error of the handler is answered with a failure status; an error sending is
        the association's, and ends it."""
        command = request.command
        replies: Iterator[Reply] = iter(())
        try:
            replies = iter(self.server.handler.on_request(request))
        except Exception:
            log.exception("serving a request from %s failed", self._who())
        while True:
            try:
                reply = next(replies)
            except StopIteration:
                break
            except Exception:
                log.exception("serving a request from %s failed", self._who())
                break
            self._respond(request.context_id, command, reply)
            if not is_pending(reply.status):
                return
        # No final status (the handler failed, or stopped after pending replies):
        # the peer is owed one.
        self._respond(request.context_id, command, Reply(Status.PROCESSING_FAILURE))

    def _respond(self, context_id: int, request: Command, reply: Reply) -> None:
        response = request.response(
            reply.status, reply.comment, with_data_set=reply.data_set is not None
        )
        if reply.fields:
            response = response.but(**reply.fields)
        self._send(self.machine.send(context_id, response, reply.data_set))
