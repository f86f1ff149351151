"""The server's own duties around the state machine: the TLS handshake is under
ARTIM and stop() like any negotiation, and a handler's failure is a status, not an
aborted association."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from dicomrouter.dicomnet import Command, CommandField, Reply, Request, Status
from dicomrouter.dicomnet.constants import VERIFICATION_SOP_CLASS
from dicomrouter.dicomnet.handler import AcceptorSettings, BaseHandler
from dicomrouter.dicomnet.requestor import OutboundAssociation, Timeouts
from dicomrouter.dicomnet.server import Server
from dicomrouter.tls import server_context
from tests.dicomnet.peers import IDENTITY
from tests.support.dcmtk import HOST
from tests.support.pki import Pki

FIND = "1.2.840.10008.5.1.4.1.2.2.1"  # Study Root Query/Retrieve - FIND
ILE = "1.2.840.10008.1.2"
SUPPORTED = {FIND: [ILE], VERIFICATION_SOP_CLASS: [ILE]}


class FailingHandler(BaseHandler):
    def on_request(self, request: Request) -> Iterator[Reply]:
        if request.command_field == CommandField.C_ECHO_RQ:
            yield Reply(Status.SUCCESS)
            return
        yield Reply(Status.PENDING, data_set=b"")
        raise OSError("the handler's disk is gone")  # not the association's socket


def serve(acse_timeout: float = 30.0, tls: Pki | None = None) -> tuple[Server, int]:
    settings = AcceptorSettings("ANY-SCP", acse_timeout=acse_timeout)
    server = Server(lambda: settings, FailingHandler(), SUPPORTED, IDENTITY)
    context = server_context(tls.server_cert, tls.server_key) if tls else None
    return server, server.listen(HOST, 0, context).address[1]


def silent_connection(port: int) -> socket.socket:
    sock = socket.create_connection((HOST, port), timeout=10)
    time.sleep(0.2)  # accepted; its handshake now waits for a ClientHello
    return sock


def test_artim_cuts_a_tls_handshake_that_never_comes(pki: Pki) -> None:
    server, port = serve(acse_timeout=1.0, tls=pki)
    try:
        sock = silent_connection(port)
        started = time.monotonic()
        assert sock.recv(1) == b""  # closed by the server
        assert time.monotonic() - started < 2.5  # ARTIM (1 s, checked every 0.5 s)
    finally:
        server.stop()


def test_stop_cuts_tls_handshakes_in_progress(pki: Pki) -> None:
    server, port = serve(tls=pki)
    socks = [silent_connection(port) for _ in range(3)]
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 2.0  # not the 30 s acse_timeout
    for sock in socks:
        assert sock.recv(1) == b""
        sock.close()


@pytest.mark.timeout(30)
def test_a_handler_failure_is_a_failure_status_and_the_association_goes_on() -> None:
    server, port = serve()
    try:
        association = OutboundAssociation.request(
            HOST,
            port,
            "SCU",
            "ANY-SCP",
            [(FIND, ILE), (VERIFICATION_SOP_CLASS, ILE)],
            Timeouts(5, 5, 5),
            IDENTITY,
        )
        query = Command.request(CommandField.C_FIND_RQ, 1, FIND, with_data_set=True)
        statuses = [r.status for r in association.send_request(query, ILE, b"")]
        assert statuses == [Status.PENDING, Status.PROCESSING_FAILURE]
        assert association.echo(2).status == Status.SUCCESS
        association.release()
    finally:
        server.stop()
