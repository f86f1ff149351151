"""The DICOM Upper Layer state machine (PS3.8 9.2), without sockets.

The states, events and actions are the standard's own, written as data: one
:data:`TRANSITIONS` table maps (state, event) to an action, and each action names
its next state. :class:`UpperLayer` applies it. It reads from a :class:`~.pdu.Reader`
(``read(n)`` and ``copy(n, sink)``, so a data set streams to its file without being
held in memory), returns what it read as events, and returns the bytes each local
request must send. The drivers (:mod:`.server`, :mod:`.requestor`) own the socket,
the timers and the threads; tests drive the machine with bytes in memory.

Above the PDUs, the machine also assembles DIMSE messages from P-DATA-TF PDVs: a
command set from its fragments (then :class:`CommandReceived`), and the fragments of
the data set that follows (:class:`DataReceived`, whose bytes the driver copies
where it wants with :meth:`UpperLayer.read_data`). It refuses what PS3.8 annex E
forbids: a PDV on a context that was not accepted, a data set without its command,
a command inside a data set, a message split across contexts.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from .command import Command
from .constants import AbortReason, AbortSource, PduType, PdvControl, Rejection
from .negotiation import (
    AssociateAccept,
    AssociateRequest,
    Identity,
    decode_associate_ac,
    decode_associate_rq,
    encode_associate_ac,
    encode_associate_rq,
)
from .pdu import (
    Buffer,
    ProtocolError,
    Reader,
    abort,
    associate_rj,
    message,
    read_header,
    read_pdv_header,
    release_rp,
    release_rq,
    skip,
)

#: Largest A-ASSOCIATE-RQ or -AC read (128 contexts with many transfer syntaxes fit
#: in about 40 KB); also below every reader's buffer, so it is read in one piece.
MAX_ASSOCIATE = 128 * 1024
#: Transitions kept in :attr:`UpperLayer.trace` (bounded: an association may last
#: for millions of PDUs).
TRACE_LENGTH = 64
#: Largest command set assembled (a C-STORE-RQ is about 200 bytes).
MAX_COMMAND = 64 * 1024


class State(Enum):
    """PS3.8 table 9-10."""

    Sta1 = "Idle"
    Sta2 = "Transport connection open (awaiting A-ASSOCIATE-RQ PDU)"
    Sta3 = "Awaiting local A-ASSOCIATE response primitive"
    Sta4 = "Awaiting transport connection opening to complete"
    Sta5 = "Awaiting A-ASSOCIATE-AC or A-ASSOCIATE-RJ PDU"
    Sta6 = "Association established and ready for data transfer"
    Sta7 = "Awaiting A-RELEASE-RP PDU"
    Sta8 = "Awaiting local A-RELEASE response primitive"
    Sta9 = "Release collision requestor side; awaiting A-RELEASE response primitive"
    Sta10 = "Release collision acceptor side; awaiting A-RELEASE-RP PDU"
    Sta11 = "Release collision requestor side; awaiting A-RELEASE-RP PDU"
    Sta12 = "Release collision acceptor side; awaiting A-RELEASE response primitive"
    Sta13 = "Awaiting transport connection close indication"


class Event(Enum):
    """PS3.8 table 9-10."""

    Evt1 = "A-ASSOCIATE request (local user)"
    Evt2 = "Transport connect confirmation (local transport service)"
    Evt3 = "A-ASSOCIATE-AC PDU (received on transport connection)"
    Evt4 = "A-ASSOCIATE-RJ PDU (received on transport connection)"
    Evt5 = "Transport connection indication (local transport service)"
    Evt6 = "A-ASSOCIATE-RQ PDU (received on transport connection)"
    Evt7 = "A-ASSOCIATE response primitive (accept)"
    Evt8 = "A-ASSOCIATE response primitive (reject)"
    Evt9 = "P-DATA request primitive"
    Evt10 = "P-DATA-TF PDU (received on transport connection)"
    Evt11 = "A-RELEASE request primitive"
    Evt12 = "A-RELEASE-RQ PDU (received on transport connection)"
    Evt13 = "A-RELEASE-RP PDU (received on transport connection)"
    Evt14 = "A-RELEASE response primitive"
    Evt15 = "A-ABORT request primitive"
    Evt16 = "A-ABORT PDU (received on transport connection)"
    Evt17 = "Transport connection closed indication (local transport service)"
    Evt18 = "ARTIM timer expired (association reject/release timer)"
    Evt19 = "Unrecognized or invalid PDU received"


_S = State


class Action(Enum):
    """PS3.8 tables 9-6 to 9-9: (name, what it does, next state). AE-6 and AR-8 have
    two possible next states; the machine picks one."""

    AE_1 = ("AE-1", "Issue TRANSPORT CONNECT request primitive", (_S.Sta4,))
    AE_2 = ("AE-2", "Send A-ASSOCIATE-RQ PDU", (_S.Sta5,))
    AE_3 = ("AE-3", "Issue A-ASSOCIATE confirmation (accept) primitive", (_S.Sta6,))
    AE_4 = ("AE-4", "Issue A-ASSOCIATE confirmation (reject), close transport", (_S.Sta1,))
    AE_5 = ("AE-5", "Issue transport connection response; start ARTIM", (_S.Sta2,))
    AE_6 = ("AE-6", "Stop ARTIM; issue A-ASSOCIATE indication", (_S.Sta3, _S.Sta13))
    AE_7 = ("AE-7", "Send A-ASSOCIATE-AC PDU", (_S.Sta6,))
    AE_8 = ("AE-8", "Send A-ASSOCIATE-RJ PDU and start ARTIM", (_S.Sta13,))
    DT_1 = ("DT-1", "Send P-DATA-TF PDU", (_S.Sta6,))
    DT_2 = ("DT-2", "Issue P-DATA indication", (_S.Sta6,))
    AR_1 = ("AR-1", "Send A-RELEASE-RQ PDU", (_S.Sta7,))
    AR_2 = ("AR-2", "Issue A-RELEASE indication", (_S.Sta8,))
    AR_3 = ("AR-3", "Issue A-RELEASE confirmation, close transport", (_S.Sta1,))
    AR_4 = ("AR-4", "Send A-RELEASE-RP PDU and start ARTIM", (_S.Sta13,))
    AR_5 = ("AR-5", "Stop ARTIM", (_S.Sta1,))
    AR_6 = ("AR-6", "Issue P-DATA indication", (_S.Sta7,))
    AR_7 = ("AR-7", "Send P-DATA-TF PDU", (_S.Sta8,))
    AR_8 = ("AR-8", "Issue A-RELEASE indication (release collision)", (_S.Sta9, _S.Sta10))
    AR_9 = ("AR-9", "Send A-RELEASE-RP PDU", (_S.Sta11,))
    AR_10 = ("AR-10", "Issue A-RELEASE confirmation primitive", (_S.Sta12,))
    AA_1 = ("AA-1", "Send A-ABORT PDU, start ARTIM", (_S.Sta13,))
    AA_2 = ("AA-2", "Stop ARTIM, close transport", (_S.Sta1,))
    AA_3 = ("AA-3", "Issue A-ABORT (or A-P-ABORT) indication, close transport", (_S.Sta1,))
    AA_4 = ("AA-4", "Issue A-P-ABORT indication", (_S.Sta1,))
    AA_5 = ("AA-5", "Stop ARTIM", (_S.Sta1,))
    AA_6 = ("AA-6", "Ignore PDU", (_S.Sta13,))
    AA_7 = ("AA-7", "Send A-ABORT PDU", (_S.Sta13,))
    AA_8 = ("AA-8", "Send A-ABORT PDU (provider), issue A-P-ABORT, start ARTIM", (_S.Sta13,))

    @property
    def label(self) -> str:
        label: str = self.value[0]
        return label

    @property
    def next_states(self) -> tuple[State, ...]:
        states: tuple[State, ...] = self.value[2]
        return states


def _table() -> dict[tuple[State, Event], Action]:
    """PS3.8 table 9-10, row by row. A PDU received where the table has no entry
    for it is treated as invalid (AA-8), as the standard's rows for Evt19 do."""
    a, e = Action, Event
    table: dict[tuple[State, Event], Action] = {
        (_S.Sta1, e.Evt1): a.AE_1,
        (_S.Sta4, e.Evt2): a.AE_2,
        (_S.Sta5, e.Evt3): a.AE_3,
        (_S.Sta5, e.Evt4): a.AE_4,
        (_S.Sta1, e.Evt5): a.AE_5,
        (_S.Sta2, e.Evt6): a.AE_6,
        (_S.Sta3, e.Evt7): a.AE_7,
        (_S.Sta3, e.Evt8): a.AE_8,
        (_S.Sta6, e.Evt9): a.DT_1,
        (_S.Sta8, e.Evt9): a.AR_7,
        (_S.Sta6, e.Evt10): a.DT_2,
        (_S.Sta7, e.Evt10): a.AR_6,
        (_S.Sta6, e.Evt11): a.AR_1,
        (_S.Sta6, e.Evt12): a.AR_2,
        (_S.Sta7, e.Evt12): a.AR_8,
        (_S.Sta7, e.Evt13): a.AR_3,
        (_S.Sta10, e.Evt13): a.AR_10,
        (_S.Sta11, e.Evt13): a.AR_3,
        (_S.Sta8, e.Evt14): a.AR_4,
        (_S.Sta9, e.Evt14): a.AR_9,
        (_S.Sta12, e.Evt14): a.AR_4,
        (_S.Sta4, e.Evt15): a.AA_2,
        (_S.Sta2, e.Evt16): a.AA_2,
        (_S.Sta13, e.Evt16): a.AA_2,
        (_S.Sta2, e.Evt17): a.AA_5,
        (_S.Sta13, e.Evt17): a.AR_5,
        (_S.Sta2, e.Evt18): a.AA_2,
        (_S.Sta13, e.Evt18): a.AA_2,
    }
    received = (e.Evt3, e.Evt4, e.Evt6, e.Evt10, e.Evt12, e.Evt13, e.Evt19)
    for state in State:
        if state in (_S.Sta1, _S.Sta4):
            continue  # no transport connection: nothing can be received
        if state not in (_S.Sta2, _S.Sta13):
            table.setdefault((state, e.Evt15), a.AA_1)
            table.setdefault((state, e.Evt16), a.AA_3)
            table.setdefault((state, e.Evt17), a.AA_4)
        for event in received:
            if state == _S.Sta2:
                default = a.AA_1
            elif state == _S.Sta13:
                default = a.AA_7 if event in (e.Evt6, e.Evt19) else a.AA_6
            else:
                default = a.AA_8
            table.setdefault((state, event), default)
    table[(_S.Sta4, e.Evt17)] = a.AA_4
    return table


#: (state, event) -> action: PS3.8 table 9-10.
TRANSITIONS: dict[tuple[State, Event], Action] = _table()

_PDU_EVENTS = {
    PduType.A_ASSOCIATE_RQ: Event.Evt6,
    PduType.A_ASSOCIATE_AC: Event.Evt3,
    PduType.A_ASSOCIATE_RJ: Event.Evt4,
    PduType.P_DATA_TF: Event.Evt10,
    PduType.A_RELEASE_RQ: Event.Evt12,
    PduType.A_RELEASE_RP: Event.Evt13,
    PduType.A_ABORT: Event.Evt16,
}


# -- what the machine reports --------------------------------------------------------


@dataclass(frozen=True)
class AssociationRequested:
    """Sta3: answer with :meth:`UpperLayer.accept` or :meth:`UpperLayer.reject`."""

    request: AssociateRequest


@dataclass(frozen=True)
class AssociationAccepted:
    accept: AssociateAccept


@dataclass(frozen=True)
class AssociationRejected:
    rejection: Rejection


@dataclass(frozen=True)
class CommandReceived:
    context_id: int
    command: Command


@dataclass(frozen=True)
class DataReceived:
    """A data set fragment of ``length`` bytes; copy them with
    :meth:`UpperLayer.read_data` (or they are skipped at the next event)."""

    context_id: int
    length: int
    last: bool


@dataclass(frozen=True)
class ReleaseRequested:
    """Answer with :meth:`UpperLayer.release_response`."""


@dataclass(frozen=True)
class ReleaseConfirmed:
    pass


@dataclass(frozen=True)
class Aborted:
    source: int
    reason: int


Received = (
    AssociationRequested
    | AssociationAccepted
    | AssociationRejected
    | CommandReceived
    | DataReceived
    | ReleaseRequested
    | ReleaseConfirmed
    | Aborted
)


class StateError(Exception):
    """A local request the current state does not allow (a bug of the caller)."""


class Violation(ProtocolError):
    """The peer broke the protocol; ``reply`` (an A-ABORT, or nothing) must be sent
    before the connection is closed. The machine is in Sta13 or Sta1."""

    def __init__(self, message: str, reason: int, reply: bytes):
        super().__init__(message, reason)
        self.reply = reply


def _read_value(reader: Reader, length: int) -> bytes:
    """``length`` bytes whatever the reader's buffer size (the callers bound
    ``length``; a buffer smaller than a limit must not make the limit a lie)."""
    value = bytearray()
    reader.copy(length, value.extend)
    return bytes(value)


class UpperLayer:
    """One association's protocol state, for either role.

    Not thread-safe; one driver thread uses it (``abort`` from another thread goes
    through the driver, which serialises it)."""

    def __init__(self, requestor: bool, identity: Identity):
        self.requestor = requestor
        self.identity = identity
        self.state = State.Sta1
        #: Whether the ARTIM timer runs; the driver enforces its deadline.
        self.artim = False
        self.request: AssociateRequest | None = None
        #: Accepted presentation contexts: ID -> (abstract syntax, transfer syntax).
        self.contexts: dict[int, tuple[str, str]] = {}
        #: The peer's maximum PDU length (0: no limit): what we send fits in it.
        self.peer_max_pdu = 0
        #: The last actions taken, for tests and debugging: (state, event, action).
        self.trace: deque[tuple[State, Event, Action]] = deque(maxlen=TRACE_LENGTH)
        self._pdu_left = 0  # bytes of the current P-DATA-TF not parsed yet
        self._data_left = 0  # bytes of the current data fragment not read yet
        self._command = bytearray()
        self._command_context = 0
        self._data_context: int | None = None  # a data set is due on this context

    # -- transitions --------------------------------------------------------------------
    def _apply(self, event: Event, next_state: State | None = None) -> Action:
        action = TRANSITIONS.get((self.state, event))
        if action is None:
            raise StateError(f"{event.name} ({event.value}) is not allowed in {self.state.name}")
        self.trace.append((self.state, event, action))
        self.state = next_state or action.next_states[0]
        if self.state in (State.Sta2, State.Sta13):
            self.artim = True
        elif self.state in (State.Sta1, State.Sta3, State.Sta6):
            self.artim = False
        return action

    @property
    def busy(self) -> bool:
        """A message is partly received (the DIMSE timeout applies, not the idle one)."""
        return bool(self._command) or self._data_context is not None

    # -- local requests -----------------------------------------------------------------
    def connect(self, request: AssociateRequest) -> None:
        """Evt1: the requestor asks for an association; open the connection next."""
        self._apply(Event.Evt1)
        self.request = request

    def connected(self) -> bytes:
        """Evt2: the connection is open; returns the A-ASSOCIATE-RQ to send."""
        self._apply(Event.Evt2)
        assert self.request is not None
        return encode_associate_rq(self.request, self.identity)

    def connection_indication(self) -> None:
        """Evt5: a peer connected to us (the acceptor); ARTIM starts."""
        self._apply(Event.Evt5)

    def accept(self, accept: AssociateAccept) -> bytes:
        """Evt7: returns the A-ASSOCIATE-AC."""
        self._apply(Event.Evt7)
        assert self.request is not None
        self.contexts = accept.accepted()
        self.peer_max_pdu = self.request.max_pdu
        return encode_associate_ac(self.request, accept, self.identity)

    def reject(self, rejection: Rejection) -> bytes:
        """Evt8: returns the A-ASSOCIATE-RJ; then wait for the peer to close (ARTIM)."""
        self._apply(Event.Evt8)
        return associate_rj(*rejection)

    def send(self, context_id: int, command: Command, data: Buffer | None = None) -> list[Buffer]:
        """Evt9: a DIMSE message as P-DATA-TF PDUs within the peer's limit."""
        self.sending(context_id)
        return message(context_id, command.encode(), data, self.peer_max_pdu)

    def sending(self, context_id: int) -> int:
        """Evt9 for a driver that frames a message itself (a file streamed from
        disk): checks the state and the context; returns the peer's PDU limit."""
        if context_id not in self.contexts:
            raise StateError(f"presentation context {context_id} was not accepted")
        self._apply(Event.Evt9)
        return self.peer_max_pdu

    def release(self) -> bytes:
        """Evt11: returns the A-RELEASE-RQ."""
        self._apply(Event.Evt11)
        return release_rq()

    def release_response(self) -> bytes:
        """Evt14: returns the A-RELEASE-RP."""
        self._apply(Event.Evt14)
        return release_rp()

    def abort(
        self, source: int = AbortSource.SERVICE_USER, reason: int = AbortReason.NOT_SPECIFIED
    ) -> bytes:
        """Evt15: returns the A-ABORT to send (nothing where there is no association
        to abort: then the driver just closes)."""
        if (self.state, Event.Evt15) not in TRANSITIONS:
            return b""
        action = self._apply(Event.Evt15)
        return abort(source, reason) if action is Action.AA_1 else b""

    def connection_closed(self) -> None:
        """Evt17: the transport connection is gone."""
        if (self.state, Event.Evt17) in TRANSITIONS:
            self._apply(Event.Evt17)
        else:
            self.state = State.Sta1
        self.artim = False

    def artim_expired(self) -> None:
        """Evt18: close the connection."""
        self._apply(Event.Evt18)

    # -- what the peer sent ---------------------------------------------------------------
    def read_data(self, reader: Reader, sink: Callable[[memoryview], object]) -> None:
        """Copy the bytes of the data fragment just reported to ``sink``."""
        left, self._data_left = self._data_left, 0
        reader.copy(left, sink)

    def next_event(self, reader: Reader) -> Received:
        """Read until the next thing to report. Raises :class:`Violation` (with the
        A-ABORT to send) when the peer breaks the protocol, and lets the reader's
        ``PeerClosed`` and timeouts through."""
        if self._data_left:
            self.read_data(reader, lambda _piece: None)
        while True:
            if self._pdu_left:
                received = self._next_pdv(reader)
                if received is not None:
                    return received
                continue
            pdu_type, length = read_header(reader)
            event = _PDU_EVENTS.get(pdu_type, Event.Evt19)  # type: ignore[call-overload]
            action = TRANSITIONS.get((self.state, event))
            if action is None:
                raise StateError(f"nothing can be received in {self.state.name}")
            handled = self._received(event, action, pdu_type, length, reader)
            if handled is not None:
                return handled

    def _violation(
        self, message_text: str, reason: int = AbortReason.INVALID_PDU_PARAMETER
    ) -> Violation:
        """AA-8 (or AA-1 before an association, AA-7 once closing): the A-ABORT to
        send, and the machine in Sta13 awaiting the close."""
        self._pdu_left = self._data_left = 0
        self._command.clear()
        self._data_context = None
        event = Event.Evt19
        action = TRANSITIONS.get((self.state, event))
        reply = b""
        if action is not None and action is not Action.AA_6:
            self._apply(event)
            reply = abort(AbortSource.SERVICE_PROVIDER, reason)
        return Violation(message_text, reason, reply)

    def _received(
        self, event: Event, action: Action, pdu_type: int, length: int, reader: Reader
    ) -> Received | None:
        if action is Action.AA_6:  # closing: anything but an abort is ignored
            skip(reader, length)
            self.trace.append((self.state, event, action))
            return None
        if event is Event.Evt19:
            skip(reader, min(length, 64))
            raise self._violation(
                f"unrecognized PDU type 0x{pdu_type:02X}", AbortReason.UNRECOGNIZED_PDU
            )
        if action in (Action.AA_8, Action.AA_1, Action.AA_7):
            raise self._violation(
                f"unexpected PDU type 0x{pdu_type:02X} in {self.state.name}",
                AbortReason.UNEXPECTED_PDU,
            )
        if event is Event.Evt16:
            body = reader.read(min(length, 64))
            self._apply(event)
            source, reason = (body[2], body[3]) if len(body) >= 4 else (0, 0)
            return Aborted(source, reason)
        if event is Event.Evt10:
            self._apply(event)
            self._pdu_left = length
            if length == 0:
                raise self._violation("empty P-DATA-TF")
            return None
        if event in (Event.Evt6, Event.Evt3):
            if length > MAX_ASSOCIATE:
                name = "A-ASSOCIATE-RQ" if event is Event.Evt6 else "A-ASSOCIATE-AC"
                raise self._violation(f"{name} of {length} bytes")
            body = _read_value(reader, length)
            try:
                if event is Event.Evt6:
                    request = decode_associate_rq(body)
                else:
                    assert self.request is not None
                    accept = decode_associate_ac(body, self.request)
            except ProtocolError as exc:
                raise self._violation(str(exc)) from None
            if event is Event.Evt6:
                self._apply(event, State.Sta3)
                self.request = request
                return AssociationRequested(request)
            self._apply(event)
            self.contexts = accept.accepted()
            self.peer_max_pdu = accept.max_pdu
            return AssociationAccepted(accept)
        if event is Event.Evt4:
            body = reader.read(min(length, 64))
            if len(body) < 4:
                raise self._violation("short A-ASSOCIATE-RJ")
            self._apply(event)
            return AssociationRejected(Rejection(body[1], body[2], body[3]))
        skip(reader, length)  # A-RELEASE-RQ/RP: 4 reserved bytes
        if event is Event.Evt12:
            if self.busy:
                raise self._violation(
                    "A-RELEASE-RQ in the middle of a message", AbortReason.UNEXPECTED_PDU
                )
            if action is Action.AR_8:
                self._apply(event, State.Sta9 if self.requestor else State.Sta10)
            else:
                self._apply(event)
            return ReleaseRequested()
        self._apply(event)  # Evt13; after AR-10 (collision, acceptor side) our RP is due
        return ReleaseConfirmed()

    def _next_pdv(self, reader: Reader) -> Received | None:
        if self._pdu_left < 6:
            raise self._violation("P-DATA-TF length does not match its PDVs")
        try:
            size, context_id, control = read_pdv_header(reader)
        except ProtocolError as exc:
            raise self._violation(str(exc)) from None
        self._pdu_left -= 6 + size
        if self._pdu_left < 0:
            raise self._violation("PDV runs past the end of its P-DATA-TF")
        if context_id not in self.contexts:
            raise self._violation(f"presentation context {context_id} was not accepted")
        if control & PdvControl.COMMAND:
            if self._data_context is not None:
                raise self._violation("command fragment inside a data set")
            if self._command and context_id != self._command_context:
                raise self._violation("command fragments on two contexts")
            if len(self._command) + size > MAX_COMMAND:
                raise self._violation("command set too long")
            self._command_context = context_id
            reader.copy(size, self._command.extend)
            if not control & PdvControl.LAST:
                return None
            try:
                command = Command.decode(self._command)
            except ProtocolError as exc:
                raise self._violation(str(exc)) from None
            self._command.clear()
            if command.has_data_set:
                self._data_context = context_id
            return CommandReceived(context_id, command)
        if self._data_context is None:
            raise self._violation("data set fragment without a command")
        if context_id != self._data_context:
            raise self._violation("data set on another context")
        last = bool(control & PdvControl.LAST)
        if last:
            self._data_context = None
        self._data_left = size
        return DataReceived(context_id, size, last)
