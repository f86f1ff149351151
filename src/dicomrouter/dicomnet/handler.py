"""What an application gives the acceptor, and what it gets: a narrow boundary in
the spirit of Orthanc's ``IStoreRequestHandler``.

The network layer negotiates, frames, assembles and answers; the application only
decides. C-STORE data sets stream into a :class:`Sink` the handler opens (its file,
its memory), then :meth:`ServiceHandler.on_store` says what became of the object.
Every other DIMSE request (C-ECHO, C-FIND, C-MOVE, C-GET, N-ACTION,
N-EVENT-REPORT...) reaches :meth:`ServiceHandler.on_request` with its data set, and
each :class:`Reply` it yields is sent at once: pending C-FIND responses with their
identifiers, then the final status.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from .command import Command
from .constants import CommandField, Status


@dataclass(frozen=True)
class AcceptorSettings:
    """What each new association is negotiated with (read per association, so a
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
    #: Whether the association runs over TLS.
    secure: bool = False


@dataclass(frozen=True)
class StoreRequest:
    """A C-STORE-RQ whose data set is about to arrive."""

    peer: Peer
    context_id: int
    message_id: int
    sop_class_uid: str
    sop_instance_uid: str
    #: The transfer syntax of the presentation context: the data set's encoding.
    transfer_syntax: str


@dataclass(frozen=True)
class Request:
    """Any other DIMSE request, with its data set (an identifier, an action's
    information) when it has one."""

    peer: Peer
    context_id: int
    abstract_syntax: str
    transfer_syntax: str
    command: Command
    data_set: bytes | None = None

    @property
    def command_field(self) -> int:
        return self.command.command_field


@dataclass(frozen=True)
class Reply:
    """One response to a :class:`Request`. ``fields`` sets more command elements
    (e.g. ``remaining``/``completed`` of C-MOVE), by :class:`Command` field name."""

    status: int
    comment: str | None = None
    data_set: bytes | None = None
    fields: Mapping[str, int | str] = field(default_factory=dict)


class Sink(Protocol):
    """Where a C-STORE data set goes, fragment by fragment."""

    def write(self, piece: memoryview) -> object:
        """Take the next piece (valid only during the call)."""

    def discard(self) -> None:
        """Drop whatever was kept (the object was refused or the association ended
        mid-object); called after :meth:`ServiceHandler.on_store` too, so it must be
        idempotent."""


StatusAndComment = tuple[int, str | None]


class ServiceHandler(Protocol):
    """The application behind an acceptor. Called on the association's thread; the
    response goes out when the call returns, so nothing slow belongs here."""

    def allow_connection(self, address: str) -> bool:
        """Before anything is read: is this source address allowed?"""

    def on_rejected(self, peer: Peer, reason: str) -> None:
        """An association was refused with A-ASSOCIATE-RJ."""

    def on_refused(self, address: str, reason: str, count: int) -> None:
        """``count`` connections from ``address`` were closed before negotiation (a
        limit, a failed TLS handshake); once per report interval and address."""

    def on_established(self, peer: Peer) -> None:
        """An association was accepted."""

    def open_sink(self, request: StoreRequest) -> Sink | StatusAndComment:
        """Where to put the data set that follows, or the status to answer with
        (the data set is then read and dropped)."""

    def on_store(self, request: StoreRequest, sink: Sink) -> StatusAndComment:
        """The whole data set is in ``sink``: keep it or not, and say so."""

    def on_request(self, request: Request) -> Iterable[Reply]:
        """Every other request; the last reply yielded must not be pending."""

    def on_association_end(self, peer: Peer, aborted: bool) -> None:
        """An established association ended (released, aborted, timed out, cut)."""


class BaseHandler:
    """Defaults for a :class:`ServiceHandler`: every connection allowed, nothing
    recorded, C-ECHO answered with success, every other request refused as an
    operation not provided, C-STORE refused as a SOP class not supported."""

    def allow_connection(self, address: str) -> bool:
        return True

    def on_rejected(self, peer: Peer, reason: str) -> None:
        return None

    def on_refused(self, address: str, reason: str, count: int) -> None:
        return None

    def on_established(self, peer: Peer) -> None:
        return None

    def open_sink(self, request: StoreRequest) -> Sink | StatusAndComment:
        return Status.SOP_CLASS_NOT_SUPPORTED, "storage is not provided"

    def on_store(self, request: StoreRequest, sink: Sink) -> StatusAndComment:
        return Status.PROCESSING_FAILURE, None

    def on_request(self, request: Request) -> Iterable[Reply]:
        if request.command_field == CommandField.C_ECHO_RQ:
            return [Reply(Status.SUCCESS)]
        return [Reply(Status.UNRECOGNIZED_OPERATION, "operation not provided")]

    def on_association_end(self, peer: Peer, aborted: bool) -> None:
        return None
