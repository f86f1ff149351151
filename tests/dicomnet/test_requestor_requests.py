"""Requests the peer sends on an association we opened reach a handler too.

Storage commitment is the case in point: an SCP may send its N-EVENT-REPORT on the
association that carried the N-ACTION. Here a raw acceptor answers our C-ECHO only
after it has sent an N-EVENT-REPORT-RQ (with its data set) and read the response:
with ``on_request`` the handler sees the request and its reply goes back; without
it the peer is told the operation is not provided, and the association goes on.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable

import pytest

from dicomrouter.dicomnet import Command, CommandField, Reply, Request, Status, pdu
from dicomrouter.dicomnet.constants import VERIFICATION_SOP_CLASS, PdvControl
from dicomrouter.dicomnet.negotiation import AssociateRequest
from dicomrouter.dicomnet.requestor import OutboundAssociation, Timeouts
from tests.dicomnet.peers import IDENTITY, RawAcceptor, read_message

HOST = "127.0.0.1"
COMMITMENT = "1.2.840.10008.1.20.1"  # Storage Commitment Push Model
COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"
ILE = "1.2.840.10008.1.2"
COMMAND = PdvControl.COMMAND | PdvControl.LAST
EVENT_DATA = b"\x08\x00\x95\x11\x04\x00\x00\x00" + b"1.2\x00"  # a small data set


class ReportingAcceptor(RawAcceptor):
    """Sends an N-EVENT-REPORT-RQ before it answers the C-ECHO; keeps the response."""

    def __init__(self) -> None:
        super().__init__()
        self.report_response: Command | None = None

    def serve(self, conn: socket.socket, request: AssociateRequest) -> None:
        message = read_message(conn, [])
        assert message is not None
        echo_context, echo, _data = message
        report_context = next(
            c.context_id for c in request.contexts if c.abstract_syntax == COMMITMENT
        )
        report = Command.request(
            CommandField.N_EVENT_REPORT_RQ,
            77,
            COMMITMENT,
            COMMITMENT_INSTANCE,
            with_data_set=True,
            event_type_id=1,
        )
        conn.sendall(
            pdu.p_data(report_context, PdvControl.COMMAND | PdvControl.LAST, report.encode())
        )
        conn.sendall(pdu.p_data(report_context, PdvControl.LAST, EVENT_DATA))
        answer = read_message(conn, [])
        assert answer is not None
        self.report_response = answer[1]
        response = echo.response(Status.SUCCESS)
        conn.sendall(
            pdu.p_data(echo_context, PdvControl.COMMAND | PdvControl.LAST, response.encode())
        )
        assert read_message(conn, []) is None  # the release
        conn.sendall(pdu.release_rp())


@pytest.mark.parametrize("handled", [True, False])
def test_a_request_from_the_peer_reaches_the_handler(handled: bool) -> None:
    seen: list[Request] = []

    def on_request(request: Request) -> Iterable[Reply]:
        seen.append(request)
        return [Reply(Status.SUCCESS)]

    peer = ReportingAcceptor()
    peer.start()
    association = OutboundAssociation.request(
        HOST,
        peer.port,
        "ROUTER",
        "SCP",
        [(VERIFICATION_SOP_CLASS, ILE), (COMMITMENT, ILE)],
        Timeouts(5, 5, 5),
        IDENTITY,
        on_request=on_request if handled else None,
    )
    assert association.echo(5).status == Status.SUCCESS
    association.release()
    peer.join(10)
    assert peer.error is None, peer.error
    response = peer.report_response
    assert response is not None
    assert response.command_field == CommandField.N_EVENT_REPORT_RSP
    assert response.message_id_responded == 77
    assert response.affected_sop_instance == COMMITMENT_INSTANCE
    if handled:
        assert response.status == Status.SUCCESS
        (request,) = seen
        assert request.command.event_type_id == 1
        assert request.data_set == EVENT_DATA
        assert (request.abstract_syntax, request.transfer_syntax) == (COMMITMENT, ILE)
        assert request.peer.called_ae == "SCP"
    else:
        assert response.status == Status.UNRECOGNIZED_OPERATION
        assert seen == []
