"""The DICOM association acceptor of the receiver: negotiation, then C-STORE and
C-ECHO until the peer releases or aborts.

Why our own and not pynetdicom's ``AE.start_server``: pynetdicom runs every
association through a DUL thread and a reactor thread that poll each other through
queues, a full state machine and pydicom Datasets per command. Receiving one small
instance cost 1.0-1.5 ms of CPU in pynetdicom alone (more than the durable write),
and one 525 KB image arrives as ~32 PDUs, each one a trip through those queues: the
receiver reached 140-300 instances/s where the benchmark asks for more
(docs/benchmarks.md). Here one thread per association reads the socket directly and
streams each data set fragment straight into its file.

What pynetdicom does well is still used: decoding the A-ASSOCIATE-RQ and encoding
the A-ASSOCIATE-AC (``pynetdicom.pdu``), and presentation context and role
negotiation (``pynetdicom.presentation.negotiate_as_acceptor``).

The protocol rules that apply to an SCP (PS3.8 9 and the state table, PS3.7 9.1):

- the first PDU must be an A-ASSOCIATE-RQ, complete within ``acse_timeout`` of
  the connection (ARTIM, enforced by the accept loop);
- protocol version bit 0 and the DICOM application context, or A-ASSOCIATE-RJ;
- calling AE allow-list, called AE, association limits (established associations
  only, in all and per source address): A-ASSOCIATE-RJ with the standard
  result/source/reason, and the application is told why;
- in each accepted context, the requestor's first transfer syntax that we accept;
- then P-DATA-TF carrying command and data set fragments on accepted contexts only;
  anything else (unknown context, data set without a command, a PDU type out of
  place, a broken length) is answered with A-ABORT;
- ``dimse_timeout`` bounds the wait for the rest of a message in progress,
  ``network_timeout`` an idle association; either ends in A-ABORT;
- A-RELEASE-RQ is answered with A-RELEASE-RP; an A-ABORT or a dropped connection
  discards the object in progress (its sender got no response, so nothing
  acknowledged is lost).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pydicom.uid import UID
from pynetdicom import pdu, pdu_primitives
from pynetdicom.presentation import PresentationContext, build_context, negotiate_as_acceptor

from dicomrouter import wire

log = logging.getLogger("dicomrouter.receive")

APPLICATION_CONTEXT = wire.APPLICATION_CONTEXT
IMPLEMENTATION_CLASS_UID = wire.IMPLEMENTATION_CLASS_UID
IMPLEMENTATION_VERSION = wire.IMPLEMENTATION_VERSION

#: Largest A-ASSOCIATE-RQ we read (128 contexts with many transfer syntaxes fit).
MAX_ASSOCIATE_RQ = 128 * 1024
#: Largest command set we assemble (a C-STORE-RQ is about 200 bytes).
MAX_COMMAND = 64 * 1024
_PREAMBLE = b"\x00" * 128 + b"DICM"
#: Objects up to this size are gathered in memory before they are written.
IN_MEMORY_LIMIT = 1024 * 1024
#: Connections still negotiating, per allowed association (see _room_to_negotiate).
PENDING_PER_ASSOCIATION = 4
#: Refusals of one kind from one address are logged and audited once per this many
#: seconds (the first at once, then a count): a flood costs a few lines, not one each.
REFUSAL_REPORT_INTERVAL = 60.0

# A-ASSOCIATE-RJ (result, source, reason), PS3.8 9.3.4
REJECT_CALLING_AE = (0x01, 0x01, 0x03)
REJECT_CALLED_AE = (0x01, 0x01, 0x07)
REJECT_CONTEXT_NAME = (0x01, 0x01, 0x02)
REJECT_PROTOCOL_VERSION = (0x01, 0x02, 0x02)
REJECT_LIMIT = (0x02, 0x03, 0x02)

# DIMSE statuses the acceptor itself answers (PS3.7 C)
SOP_CLASS_NOT_SUPPORTED = 0x0122
UNRECOGNIZED_OPERATION = 0x0211
PROCESSING_FAILURE = 0x0110
OUT_OF_RESOURCES = 0xA700
INVALID_UID = 0xC001


@dataclass(frozen=True)
class AcceptorSettings:
    """What each new association is negotiated with (re-read per association, so a
    reloaded configuration applies to the next one)."""

    ae_title: str
    allowed_callers: frozenset[str] | None = None
    require_called_ae: bool = True
    max_pdu_size: int = 0
    #: Transfer syntaxes in which private SOP classes are accepted; empty: refused.
    private_transfer_syntaxes: tuple[str, ...] = ()
    max_associations: int = 32
    #: Established associations, and connections still negotiating, per source address.
    max_associations_per_host: int = 8
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    network_timeout: float = 120.0


@dataclass(frozen=True)
class Peer:
    """The other end of an association."""

    calling_ae: str
    called_ae: str
    address: str
    port: int


class StoreService(Protocol):
    """What the acceptor asks of the application (the :class:`Receiver`)."""

    def allow_connection(self, address: str) -> bool:
        """Before anything is read: is this source address allowed?"""

    def on_rejected(self, peer: Peer, reason: str) -> None:
        """An association was refused with A-ASSOCIATE-RJ."""

    def on_refused(self, address: str, reason: str, count: int) -> None:
        """``count`` connections from ``address`` were closed before negotiation
        (a limit on connections waiting to associate); called once per report
        interval and address, not once per connection."""

    def on_established(self, peer: Peer) -> None:
        """An association was accepted."""

    def on_store(
        self,
        peer: Peer,
        sop_class_uid: str,
        sop_instance_uid: str,
        path: Path,
        content: bytes | bytearray | None,
    ) -> tuple[int, str | None]:
        """A complete object is in ``path`` (preamble, file meta, data set as
        received; not yet fsynced) and, when it is small, also in ``content``.
        Keep it (move it away) or not; return the DIMSE status and an optional
        error comment for the C-STORE-RSP."""

    def on_association_end(self, peer: Peer, aborted: bool) -> None:
        """An established association ended (released, aborted, timed out, cut)."""


def supported_contexts(
    storage_classes: Iterable[str],
    transfer_syntaxes: list[str],
    verification_class: str,
    verification_syntaxes: list[str],
) -> list[PresentationContext]:
    contexts = [build_context(sop_class, transfer_syntaxes) for sop_class in storage_classes]
    contexts.append(build_context(verification_class, verification_syntaxes))
    return contexts


class AssociationAcceptor:
    """Listens on a TCP port and runs one thread per association."""

    def __init__(
        self,
        settings: Callable[[], AcceptorSettings],
        service: StoreService,
        contexts: list[PresentationContext],
        tmp_dir: Path,
    ):
        self.settings = settings
        self.service = service
        self.contexts = contexts
        self.abstract_syntaxes = frozenset(str(c.abstract_syntax) for c in contexts)
        self.syntaxes_by_class = {
            str(c.abstract_syntax): frozenset(str(ts) for ts in c.transfer_syntax) for c in contexts
        }
        self.tmp_dir = tmp_dir
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._active: dict[int, _Connection] = {}
        self._next_id = 0
        self._refusals = _RefusalReport(service)

    @property
    def address(self) -> tuple[str, int]:
        assert self._listener is not None
        host, port = self._listener.getsockname()[:2]
        return host, port

    def _admit(self, key: int, limit: int, per_host: int) -> str | None:
        """Count connection ``key`` as an established association, unless ``limit``
        associations already are, or ``per_host`` from its source address (atomic:
        two negotiations cannot both take the last slot). Returns the setting that
        refused it, or None. Connections still negotiating do not count: an idle TCP
        connection must not cost a modality its association."""
        with self._lock:
            connection = self._active.get(key)
            if connection is None:
                return "dicom.max_associations"
            established = [c for c in self._active.values() if c.established]
            if len(established) >= limit:
                return "dicom.max_associations"
            if sum(1 for c in established if c.host == connection.host) >= per_host:
                return "dicom.max_associations_per_host"
            connection.established = True
            return None

    def start(self, bind: str, port: int) -> None:
        family = socket.AF_INET6 if ":" in bind else socket.AF_INET
        listener = socket.create_server((bind, port), family=family, backlog=64)
        listener.settimeout(0.5)
        self._listener = listener
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name="dicom-accept", daemon=True
        )
        self._accept_thread.start()

    @property
    def listening(self) -> bool:
        """The accept loop runs (readiness: see ``store.heartbeat``)."""
        thread = self._accept_thread
        return thread is not None and thread.is_alive() and not self._stopping.is_set()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop listening and cut open associations (an object in progress is
        discarded: its sender got no response and will send it again)."""
        self._stopping.set()
        if self._accept_thread is not None:
            self._accept_thread.join(timeout)
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            active = list(self._active.values())
        for connection in active:
            connection.cut()
        for connection in active:
            connection.thread.join(timeout)

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            self._enforce_artim()
            self._refusals.flush()
            try:
                sock, address = self._listener.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                if self._stopping.is_set():
                    return
                # e.g. EMFILE: out of file descriptors. Do not spin on it.
                log.warning("accepting a DICOM connection failed: %s", exc)
                self._stopping.wait(0.1)
                continue
            host, port = str(address[0]), int(address[1])
            try:
                allowed = self.service.allow_connection(host)
            except Exception:
                log.exception("connection check failed for %s", host)
                allowed = False
            if not allowed:
                sock.close()
                continue
            if not self._room_to_negotiate(host):
                sock.close()
                continue
            key = 0
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                with self._lock:
                    self._next_id += 1
                    key = self._next_id
                    association = _Association(self, sock, host, port, key)
                    thread = threading.Thread(
                        target=association.run, name=f"assoc-{host}:{port}", daemon=True
                    )
                    self._active[key] = _Connection(thread, sock, time.monotonic(), host)
                thread.start()
            except Exception as exc:  # e.g. "can't start new thread": keep accepting
                log.error("cannot serve a DICOM connection from %s: %s", host, exc)
                self._finished(key)
                sock.close()
                self._stopping.wait(0.1)

    def _room_to_negotiate(self, host: str) -> bool:
        """Whether a new connection from ``host`` may wait to associate. At most
        ``PENDING_PER_ASSOCIATION * max_associations`` connections may be negotiating
        at once, on top of the established associations, and at most
        ``max_associations_per_host`` from one source address: a flood of idle
        connections costs neither unbounded threads nor the modalities their
        association slots, and one address cannot take every waiting place from
        the others (each is cut after ``acse_timeout`` anyway)."""
        settings = self.settings()
        limit = PENDING_PER_ASSOCIATION * settings.max_associations
        with self._lock:
            negotiating = [c for c in self._active.values() if not c.established]
            from_host = sum(1 for c in negotiating if c.host == host)
        # The reasons name the limit, not the count of the moment: they key the
        # refusal report, which must stay one entry per address and kind.
        if from_host >= settings.max_associations_per_host:
            self._refusals.refused(
                host,
                f"{settings.max_associations_per_host} connections from this address are "
                "already waiting to associate (dicom.max_associations_per_host)",
            )
            return False
        if len(negotiating) >= limit:
            self._refusals.refused(
                host,
                f"{limit} connections are already waiting to associate "
                f"({PENDING_PER_ASSOCIATION} x dicom.max_associations)",
            )
            return False
        return True

    def _enforce_artim(self) -> None:
        """Cut connections that have not completed association negotiation within
        ``acse_timeout`` (PS3.8 ARTIM). The socket's own timeout bounds each wait for
        bytes; this bounds the whole request, which a peer trickling one byte at a
        time would otherwise stretch forever. Checked every accept-loop turn (0.5 s)."""
        limit = self.settings().acse_timeout
        if not limit:
            return
        cutoff = time.monotonic() - limit
        with self._lock:  # as _admit does: an association accepted meanwhile is not cut
            cut = sum(
                c.cut() for c in self._active.values() if not c.established and c.started < cutoff
            )
        if cut:
            log.warning(
                "closed %d DICOM connection(s): no association within %gs (acse_timeout)",
                cut,
                limit,
            )

    def _finished(self, key: int) -> None:
        with self._lock:
            self._active.pop(key, None)


@dataclass
class _Refusals:
    """Refusals of one kind from one address not reported yet, and the last report."""

    audit: bool
    count: int = 0
    reported: float | None = None


class _RefusalReport:
    """Logs (and, for connections closed unread, audits through the service) the
    refusals of one kind from one address once per ``REFUSAL_REPORT_INTERVAL``: the
    first at once, later ones as a count. Thread-safe; ``flush`` reports counts
    left over once their interval has passed (called by the accept loop)."""

    def __init__(self, service: StoreService) -> None:
        self.service = service
        self._lock = threading.Lock()
        self._pending: dict[tuple[str, str], _Refusals] = {}

    def refused(self, address: str, reason: str, audit: bool = True) -> None:
        now = time.monotonic()
        with self._lock:
            entry = self._pending.setdefault((address, reason), _Refusals(audit))
            entry.count += 1
            if entry.reported is not None and now - entry.reported < REFUSAL_REPORT_INTERVAL:
                return
            first, count = entry.reported is None, entry.count
            entry.count, entry.reported = 0, now
        self._report(address, reason, count, audit, first)

    def flush(self) -> None:
        now = time.monotonic()
        due: list[tuple[str, str, _Refusals, int]] = []
        with self._lock:
            for key, entry in list(self._pending.items()):
                if entry.reported is not None and now - entry.reported < REFUSAL_REPORT_INTERVAL:
                    continue
                if entry.count:
                    due.append((*key, entry, entry.count))
                    entry.count, entry.reported = 0, now
                else:  # quiet for a whole interval: the next refusal is reported at once
                    del self._pending[key]
        for address, reason, entry, count in due:
            self._report(address, reason, count, entry.audit, False)

    def _report(self, address: str, reason: str, count: int, audit: bool, first: bool) -> None:
        if first:
            log.warning(
                "refused a DICOM connection from %s: %s (more refusals like it are "
                "counted and logged every %gs)",
                address,
                reason,
                REFUSAL_REPORT_INTERVAL,
            )
        else:
            log.warning(
                "refused %d more DICOM connection(s) from %s in the last %gs: %s",
                count,
                address,
                REFUSAL_REPORT_INTERVAL,
                reason,
            )
        if audit:
            try:
                self.service.on_refused(address, reason, count)
            except Exception:
                log.exception("recording refused connections from %s failed", address)


@dataclass
class _Connection:
    """A connection being served: its thread and socket; ``established`` once its
    association was accepted (only those count toward ``max_associations``)."""

    thread: threading.Thread
    sock: socket.socket
    started: float
    host: str = ""
    established: bool = False
    _cut: bool = False

    def cut(self) -> bool:
        """Shut the socket down (its thread's ``recv`` then ends); True the first time."""
        if self._cut:
            return False
        self._cut = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        return True


class _Incoming:
    """An object being received into its temporary file, or thrown away when its
    ``status`` is already decided (refused up front, or the disk failed).

    Objects up to ``IN_MEMORY_LIMIT`` are gathered in memory and written with one
    call at the end, and handed to the application whole so that it parses the
    header without reading the file back; larger ones stream to the file as they
    arrive, so memory stays flat whatever the size.
    """

    def __init__(
        self,
        context_id: int,
        command_field: int,
        message_id: int,
        sop_class: bytes | None,
        sop_instance: bytes | None,
    ):
        self.context_id = context_id
        self.command_field = command_field
        self.message_id = message_id
        self.sop_class = sop_class  # raw, echoed in the response
        self.sop_instance = sop_instance
        self.sop_class_uid = wire.text(sop_class)
        self.sop_instance_uid = wire.text(sop_instance)
        self.path: Path | None = None
        self.fd: int | None = None
        self.content: bytearray | None = None
        self.write: Callable[[memoryview], object] = _discard
        self.status: tuple[int, str | None] | None = None

    def open(self, tmp_dir: Path, meta: bytes) -> None:
        self.fd, name = tempfile.mkstemp(dir=tmp_dir, suffix=".part")
        self.path = Path(name)
        self.content = bytearray(_PREAMBLE)
        self.content += meta
        self.write = self._gather

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
            self.status = (OUT_OF_RESOURCES, "storage is full" if full else "storage error")
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


class _Association:
    """One connection, from A-ASSOCIATE-RQ to its end, on its own thread."""

    def __init__(
        self, acceptor: AssociationAcceptor, sock: socket.socket, host: str, port: int, key: int
    ):
        self.acceptor = acceptor
        self.sock = sock
        self.host = host
        self.port = port
        self.key = key
        self.reader = wire.SocketReader(sock)
        self.peer = Peer("", "", host, port)
        self.contexts: dict[int, tuple[str, str]] = {}
        self.settings = acceptor.settings()

    # -- life cycle ------------------------------------------------------------------
    def run(self) -> None:
        established = aborted = False
        incoming: list[_Incoming] = []
        try:
            established = self._negotiate()
            if established:
                aborted = not self._transfer(incoming)
        except wire.ProtocolError as exc:
            log.warning("aborting association from %s: %s", self._who(), exc)
            self._send_quietly(wire.abort(wire.ABORT_SERVICE_PROVIDER, exc.reason))
            aborted = True
        except TimeoutError:
            log.warning("aborting association from %s: timed out", self._who())
            self._send_quietly(wire.abort())
            aborted = True
        except wire.PeerClosed as exc:
            if established:
                log.warning("association from %s lost: %s", self._who(), exc)
            aborted = True
        except Exception:
            log.exception("association from %s failed", self._who())
            self._send_quietly(wire.abort())
            aborted = True
        finally:
            for message in incoming:
                message.discard()
            try:
                self.sock.close()
            except OSError:
                pass
            self.acceptor._finished(self.key)
            if established:
                try:
                    self.acceptor.service.on_association_end(self.peer, aborted)
                except Exception:
                    log.exception("association end handler failed")

    def _who(self) -> str:
        calling = self.peer.calling_ae or "?"
        return f"{calling} ({self.host}:{self.port})"

    def _send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _send_quietly(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError:
            pass

    # -- association establishment ---------------------------------------------------
    def _negotiate(self) -> bool:
        settings = self.settings
        self.sock.settimeout(settings.acse_timeout or None)
        pdu_type, length = self.reader.pdu_header()
        if pdu_type != wire.A_ASSOCIATE_RQ:
            raise wire.ProtocolError(
                f"expected A-ASSOCIATE-RQ, got PDU type 0x{pdu_type:02X}",
                wire.REASON_UNEXPECTED_PDU,
            )
        request, primitive = wire.read_associate(self.reader, pdu_type, length, MAX_ASSOCIATE_RQ)
        calling = str(primitive.calling_ae_title).strip()
        called = str(primitive.called_ae_title).strip()
        self.peer = Peer(calling, called, self.host, self.port)

        rejection: tuple[tuple[int, int, int], str] | None = None
        if not request.protocol_version & 0x0001:  # PS3.8 9.3.2: only bit 0 is tested
            rejection = REJECT_PROTOCOL_VERSION, "unsupported protocol version"
        elif str(primitive.application_context_name) != APPLICATION_CONTEXT:
            rejection = REJECT_CONTEXT_NAME, "unsupported application context"
        elif settings.allowed_callers is not None and calling not in settings.allowed_callers:
            rejection = REJECT_CALLING_AE, "calling AE title not in dicom.allowed_callers"
        elif settings.require_called_ae and called != settings.ae_title:
            rejection = (
                REJECT_CALLED_AE,
                f"called AE title {called!r} is not {settings.ae_title!r}",
            )
        elif limit := self.acceptor._admit(
            self.key, settings.max_associations, settings.max_associations_per_host
        ):
            rejection = REJECT_LIMIT, f"{limit} reached"
        if rejection is not None:
            (result, source, reason), why = rejection
            if rejection[0] == REJECT_LIMIT:
                # A flood of associations must not become a flood of log lines.
                self.acceptor._refusals.refused(self.host, f"association refused: {why}", False)
            else:
                log.warning(
                    "rejected association from %s (%s:%s) calling %s: %s",
                    calling or "?",
                    self.host,
                    self.port,
                    called or "?",
                    why,
                )
            self.acceptor.service.on_rejected(self.peer, why)  # queues its audit row
            self._answer_and_linger(wire.associate_rj(result, source, reason))
            return False

        roles: dict[UID, tuple[bool | None, bool | None]] = {}
        for item in primitive.user_information:
            if (
                isinstance(item, pdu_primitives.SCP_SCU_RoleSelectionNegotiation)
                and item.sop_class_uid is not None
            ):
                roles[item.sop_class_uid] = (item.scu_role, item.scp_role)
        proposed = primitive.presentation_context_definition_list
        results, role_replies = negotiate_as_acceptor(
            proposed, self.acceptor.contexts + self._private_contexts(proposed), roles
        )
        self._prefer_requestors_syntaxes(proposed, results)
        for context in results:
            if context.result == 0x00 and context.context_id is not None:
                self.contexts[context.context_id] = (
                    str(context.abstract_syntax),
                    str(context.transfer_syntax[0]),
                )
        self._send(self._accept_pdu(primitive, results, role_replies))
        log.debug(
            "accepted association from %s: %d of %d contexts",
            self._who(),
            len(self.contexts),
            len(results),
        )
        self.acceptor.service.on_established(self.peer)
        return True

    def _prefer_requestors_syntaxes(
        self, proposed: list[PresentationContext], results: list[PresentationContext]
    ) -> None:
        """In each accepted context, the first transfer syntax *the requestor* listed
        that we accept. pynetdicom picks by our list's order (uncompressed first), so
        a modality offering [JPEG Lossless, Explicit VR LE] in one context would be
        made to decompress: more bytes on the wire, on disk and to every destination,
        and not the object as the modality meant to send it."""
        requested = {c.context_id: c.transfer_syntax for c in proposed}
        private = frozenset(self.settings.private_transfer_syntaxes)
        for context in results:
            if context.result != 0x00:
                continue
            ours = self.acceptor.syntaxes_by_class.get(str(context.abstract_syntax), private)
            for syntax in requested.get(context.context_id, []):
                if str(syntax) in ours:
                    context.transfer_syntax = [syntax]
                    break

    def _private_contexts(self, proposed: list[PresentationContext]) -> list[PresentationContext]:
        """Contexts to accept for the private SOP classes among ``proposed`` (UIDs
        outside the DICOM root), when the settings accept them."""
        syntaxes = list(self.settings.private_transfer_syntaxes)
        if not syntaxes:
            return []
        known = self.acceptor.abstract_syntaxes
        extra: dict[str, PresentationContext] = {}
        for context in proposed:
            abstract = str(context.abstract_syntax or "")
            if abstract in known or abstract in extra or not UID(abstract).is_private:
                continue
            try:
                extra[abstract] = build_context(abstract, syntaxes)
            except ValueError:  # not a valid UID: refused like any unknown class
                continue
        return list(extra.values())

    def _accept_pdu(
        self,
        request: pdu_primitives.A_ASSOCIATE,
        results: list[PresentationContext],
        role_replies: list[pdu_primitives.SCP_SCU_RoleSelectionNegotiation],
    ) -> bytes:
        max_length = pdu_primitives.MaximumLengthNotification()
        max_length.maximum_length_received = self.settings.max_pdu_size
        class_uid = pdu_primitives.ImplementationClassUIDNotification()
        class_uid.implementation_class_uid = UID(IMPLEMENTATION_CLASS_UID)
        version = pdu_primitives.ImplementationVersionNameNotification()
        version.implementation_version_name = IMPLEMENTATION_VERSION
        primitive = pdu_primitives.A_ASSOCIATE()
        primitive.application_context_name = UID(APPLICATION_CONTEXT)
        primitive.calling_ae_title = request.calling_ae_title
        primitive.called_ae_title = request.called_ae_title
        primitive.result = 0x00
        primitive.result_source = 0x01
        primitive.presentation_context_definition_results_list = results
        primitive.user_information = [max_length, class_uid, version, *role_replies]
        return bytes(pdu.A_ASSOCIATE_AC(primitive).encode())

    def _answer_and_linger(self, last_pdu: bytes) -> None:
        """Send A-ASSOCIATE-RJ or A-RELEASE-RP, then give the peer a moment to read it
        and close first (PS3.8 ARTIM), so the answer is not lost to a connection reset.

        The association is over: its slot under ``max_associations`` is freed before
        the answer, so a peer slow to close cannot hold one for the ARTIM second (a
        modality that releases and at once opens its next association would be
        refused)."""
        self.acceptor._finished(self.key)
        self._send(last_pdu)
        deadline = time.monotonic() + 1.0  # for the whole wait: not per byte received
        try:
            while (left := deadline - time.monotonic()) > 0:
                self.sock.settimeout(left)
                if not self.sock.recv(4096):
                    break
        except OSError:
            pass

    # -- data transfer ---------------------------------------------------------------
    def _transfer(self, incoming: list[_Incoming]) -> bool:
        """P-DATA until release (returns True) or an A-ABORT from the peer (False)."""
        reader = self.reader
        settings = self.settings
        command = bytearray()
        command_context = 0
        while True:
            busy = bool(command) or bool(incoming)
            timeout = settings.dimse_timeout if busy else settings.network_timeout
            self.sock.settimeout(timeout or None)
            pdu_type, length = reader.pdu_header()
            if pdu_type == wire.P_DATA_TF:
                remaining = length
                while remaining:
                    if remaining < 6:
                        raise wire.ProtocolError("P-DATA-TF length does not match its PDVs")
                    size, context_id, control = reader.pdv_header()
                    remaining -= 6 + size
                    if remaining < 0:
                        raise wire.ProtocolError("PDV runs past the end of its P-DATA-TF")
                    if context_id not in self.contexts:
                        raise wire.ProtocolError(
                            f"presentation context {context_id} was not accepted"
                        )
                    if control & wire.CONTROL_COMMAND:
                        if incoming:
                            raise wire.ProtocolError("command fragment inside a data set")
                        if command and context_id != command_context:
                            raise wire.ProtocolError("command fragments on two contexts")
                        if len(command) + size > MAX_COMMAND:
                            raise wire.ProtocolError("command set too long")
                        command_context = context_id
                        command += reader.read(size)
                        if control & wire.CONTROL_LAST:
                            elements = wire.decode_command(bytes(command))
                            command.clear()
                            self._on_command(context_id, elements, incoming)
                    else:
                        if not incoming:
                            raise wire.ProtocolError("data set fragment without a command")
                        message = incoming[0]
                        if context_id != message.context_id:
                            raise wire.ProtocolError("data set on another context")
                        reader.copy(size, message.write)
                        if control & wire.CONTROL_LAST:
                            incoming.clear()
                            self._on_data_set(message)
            elif pdu_type == wire.A_RELEASE_RQ:
                reader.skip(length)
                if command or incoming:
                    raise wire.ProtocolError(
                        "A-RELEASE-RQ in the middle of a message", wire.REASON_UNEXPECTED_PDU
                    )
                self._answer_and_linger(wire.release_rp())
                return True
            elif pdu_type == wire.A_ABORT:
                reader.skip(min(length, 64))
                log.info("association from %s aborted by the peer", self._who())
                return False
            elif pdu_type in (
                wire.A_ASSOCIATE_RQ,
                wire.A_ASSOCIATE_AC,
                wire.A_ASSOCIATE_RJ,
                wire.A_RELEASE_RP,
            ):
                raise wire.ProtocolError(
                    f"unexpected PDU type 0x{pdu_type:02X}", wire.REASON_UNEXPECTED_PDU
                )
            else:
                raise wire.ProtocolError(
                    f"unrecognized PDU type 0x{pdu_type:02X}", wire.REASON_UNRECOGNIZED_PDU
                )

    def _on_command(
        self, context_id: int, elements: dict[int, bytes], incoming: list[_Incoming]
    ) -> None:
        field = wire.command_uint(elements, wire.COMMAND_FIELD)
        message_id = wire.command_uint(elements, wire.MESSAGE_ID)
        data_set_type = wire.command_uint(elements, wire.DATA_SET_TYPE)
        if field is None or data_set_type is None:
            raise wire.ProtocolError("command set without Command Field or Data Set Type")
        if field == wire.C_CANCEL_RQ:
            return  # nothing of ours can be cancelled; no response is due
        if message_id is None:
            raise wire.ProtocolError("request without a Message ID")
        has_data_set = data_set_type != wire.NO_DATA_SET
        sop_class = elements.get(wire.AFFECTED_SOP_CLASS)
        sop_instance = elements.get(wire.AFFECTED_SOP_INSTANCE)
        message = _Incoming(context_id, field, message_id, sop_class, sop_instance)
        abstract_syntax, transfer_syntax = self.contexts[context_id]
        if field == wire.C_ECHO_RQ and not has_data_set:
            self._respond(message, 0x0000, None)
            return
        if field != wire.C_STORE_RQ:
            message.status = (UNRECOGNIZED_OPERATION, "only C-STORE and C-ECHO are provided")
        elif not has_data_set:
            raise wire.ProtocolError("C-STORE-RQ without a data set")
        elif message.sop_class_uid != abstract_syntax:
            message.status = (
                SOP_CLASS_NOT_SUPPORTED,
                "Affected SOP Class differs from the presentation context",
            )
        else:
            try:
                meta = wire.encode_file_meta(
                    message.sop_class_uid,
                    message.sop_instance_uid,
                    transfer_syntax,
                    IMPLEMENTATION_CLASS_UID,
                    IMPLEMENTATION_VERSION,
                )
            except UnicodeEncodeError:
                message.status = (INVALID_UID, "Affected SOP Instance UID is not a UID")
            else:
                try:
                    message.open(self.acceptor.tmp_dir, meta)
                except OSError as exc:
                    log.error("cannot create a temporary file: %s", exc)
                    message.status = (OUT_OF_RESOURCES, "storage error")
        if has_data_set:
            incoming.append(message)
        else:
            status = message.status or (UNRECOGNIZED_OPERATION, None)
            self._respond(message, *status)

    def _on_data_set(self, message: _Incoming) -> None:
        status = message.status
        if status is None:
            try:
                content = message.finish()
            except OSError as exc:
                log.error("cannot write a received object: %s", exc)
                status = (OUT_OF_RESOURCES, "storage error")
            else:
                status = message.status  # set if the last write failed
        if status is None:
            assert message.path is not None
            try:
                status = self.acceptor.service.on_store(
                    self.peer,
                    message.sop_class_uid,
                    message.sop_instance_uid,
                    message.path,
                    content,
                )
            except Exception:
                log.exception("storing an object from %s failed", self._who())
                status = (OUT_OF_RESOURCES, "internal error")
        message.discard()  # whatever on_store left in tmp
        self._respond(message, *status)

    def _respond(self, message: _Incoming, status: int, comment: str | None) -> None:
        command = wire.encode_response(
            message.command_field,
            message.message_id,
            status,
            message.sop_class,
            message.sop_instance,
            comment,
        )
        last_command = wire.CONTROL_COMMAND | wire.CONTROL_LAST
        self._send(wire.p_data(message.context_id, last_command, command))
