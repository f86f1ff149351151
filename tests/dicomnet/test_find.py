"""The dicomnet machinery carries C-FIND, over real sockets, and honours the peer's
maximum PDU length in both directions.

What is proven:

- A dicomnet ``Server`` with a test-only handler (pending identifiers, then
  success) answers dcmtk's ``findscu``: both matches arrive, read back with pydicom
  from the files ``findscu -X`` writes; the handler saw the query findscu sent,
  decoded in the negotiated transfer syntax. Also with ``-pdu 4096`` and
  identifiers of ~20 KB (fragmented, reassembled by dcmtk).
- A requestor that declares a maximum PDU length of 4096 (a raw socket client,
  so nothing of dicomnet checks dicomnet) receives no P-DATA-TF larger than that,
  while the identifiers are ~20 KB; and fragments fill the limit (a limit honoured
  by sending tiny PDUs would not pass).
- The other direction: ``OutboundAssociation`` sending a ~100 KB C-STORE (from
  bytes, and from a file) to a raw acceptor that announced 4096 sends no P-DATA-TF
  larger than that, and the data set arrives intact.
- ``OutboundAssociation.send_request`` runs a C-FIND against our own Server: two
  pending responses with their identifiers, then success.

"Larger" is about the PDU-length field (the variable field, PS3.8 D.1), which the
peer's limit bounds; the whole PDU is 6 bytes more.
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pynetdicom import dsutils

from dicomrouter.dicomnet import pdu
from dicomrouter.dicomnet.command import Command
from dicomrouter.dicomnet.constants import CommandField, PduType, PdvControl, Status, is_pending
from dicomrouter.dicomnet.handler import AcceptorSettings, BaseHandler, Reply, Request
from dicomrouter.dicomnet.negotiation import (
    AssociateRequest,
    ProposedContext,
    decode_associate_ac,
    encode_associate_rq,
)
from dicomrouter.dicomnet.requestor import OutboundAssociation, Timeouts
from dicomrouter.dicomnet.server import Server
from tests.dicomnet.peers import IDENTITY, RawAcceptor, read_message, read_pdu
from tests.support.dcmtk import HOST, dcmtk_env, dcmtk_tool

FIND = "1.2.840.10008.5.1.4.1.2.2.1"
VERIFICATION = "1.2.840.10008.1.1"
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
IMPLICIT = "1.2.840.10008.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
SUPPORTED = {FIND: [IMPLICIT, EXPLICIT], VERIFICATION: [IMPLICIT]}
AE_TITLE = "ANY-SCP"
TIMEOUTS = Timeouts(5, 5, 5)
LIMIT = 4096

MATCHES = [
    ("DOE^JOHN", "1.2.826.0.1.3680043.9.9999.1"),
    ("ROE^JANE", "1.2.826.0.1.3680043.9.9999.2"),
]
PADDING_TAG = 0x00091010  # private OB, under creator (0009,0010)


# -- the handler and the server -------------------------------------------------------------


def encode(dataset: Dataset, syntax: str) -> bytes:
    return bytes(dsutils.encode(dataset, syntax == IMPLICIT, True))


def decode(data: bytes, syntax: str) -> Dataset:
    return read_dataset(BytesIO(data), syntax == IMPLICIT, True)


def query(syntax: str) -> bytes:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.PatientName = ""
    identifier.StudyInstanceUID = ""
    return encode(identifier, syntax)


class FindHandler(BaseHandler):
    """C-FIND: each of MATCHES as a pending response, then success; each identifier
    padded with a private OB of ``padding`` bytes when asked."""

    def __init__(self, padding: int = 0) -> None:
        self.padding = padding
        self.queries: list[tuple[str, Dataset]] = []

    def on_request(self, request: Request) -> Iterator[Reply] | list[Reply]:
        if request.command_field != CommandField.C_FIND_RQ:
            return super().on_request(request)
        return self._find(request)

    def _find(self, request: Request) -> Iterator[Reply]:
        assert request.data_set is not None
        asked = decode(request.data_set, request.transfer_syntax)
        self.queries.append((request.transfer_syntax, asked))
        for name, study in MATCHES:
            match = Dataset()
            match.QueryRetrieveLevel = asked.QueryRetrieveLevel
            match.PatientName = name
            match.StudyInstanceUID = study
            if self.padding:
                match.add_new(0x00090010, "LO", "DICOMNET TEST")
                match.add_new(PADDING_TAG, "OB", bytes(i % 256 for i in range(self.padding)))
            yield Reply(Status.PENDING, data_set=encode(match, request.transfer_syntax))
        yield Reply(Status.SUCCESS)


def check_match(dataset: Dataset, expected: tuple[str, str], padding: int) -> None:
    assert (str(dataset.PatientName), str(dataset.StudyInstanceUID)) == expected
    assert dataset.QueryRetrieveLevel == "STUDY"
    if padding:
        assert bytes(dataset[PADDING_TAG].value) == bytes(i % 256 for i in range(padding))


@pytest.fixture
def serve() -> Iterator[Callable[..., tuple[str, int]]]:
    """Start a dicomnet Server for a handler; stopped at the end of the test."""
    servers: list[Server] = []

    def start(handler: FindHandler, **settings: object) -> tuple[str, int]:
        config = AcceptorSettings(AE_TITLE, **settings)  # type: ignore[arg-type]
        server = Server(lambda: config, handler, SUPPORTED, IDENTITY)
        servers.append(server)
        return server.listen(HOST, 0).address

    yield start
    for server in servers:
        server.stop()


# -- a raw peer: PDUs read and written by hand ----------------------------------------------


# -- findscu, a real peer -------------------------------------------------------------------


def findscu(port: int, outdir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    args = [dcmtk_tool("findscu"), "-S", "-aet", "FINDSCU", "-aec", AE_TITLE, "-to", "10"]
    args += ["-td", "10", "-X", "-od", str(outdir), *extra]
    args += ["-k", "QueryRetrieveLevel=STUDY", "-k", "PatientName=", "-k", "StudyInstanceUID="]
    args += [HOST, str(port)]
    return subprocess.run(args, capture_output=True, text=True, env=dcmtk_env(), timeout=60)


@pytest.mark.interop
@pytest.mark.parametrize(
    ("padding", "extra"),
    [(0, ()), (20_000, ("-pdu", str(LIMIT)))],
    ids=["plain", "20KB identifiers, -pdu 4096"],
)
def test_findscu_gets_both_matches(
    dcmtk: None,
    serve: Callable[..., tuple[str, int]],
    tmp_path: Path,
    padding: int,
    extra: tuple[str, ...],
) -> None:
    handler = FindHandler(padding)
    _host, port = serve(handler)
    result = findscu(port, tmp_path, *extra)
    output = result.stdout + result.stderr
    # findscu exits 0 even when the C-FIND failed (e.g. "DUL Illegal PDU Length 4102.
    # Max expected 4096"): its output and the files it wrote are what tell.
    assert result.returncode == 0, output
    assert "Failed" not in output and "Illegal PDU" not in output, output
    files = sorted(tmp_path.glob("rsp*.dcm"))
    assert [f.name for f in files] == ["rsp0001.dcm", "rsp0002.dcm"]
    for path, expected in zip(files, MATCHES, strict=True):
        check_match(dcmread(path, force=True), expected, padding)
    ((syntax, asked),) = handler.queries
    assert syntax in SUPPORTED[FIND]
    assert asked.QueryRetrieveLevel == "STUDY"
    assert "PatientName" in asked and "StudyInstanceUID" in asked


# -- the requestor's limit, honoured by our acceptor ----------------------------------------


def test_responses_fit_a_requestor_max_pdu_of_4096(serve: Callable[..., tuple[str, int]]) -> None:
    padding = 20_000
    host, port = serve(FindHandler(padding))
    request = AssociateRequest(
        "RAWSCU", AE_TITLE, (ProposedContext(1, FIND, (IMPLICIT,)),), max_pdu=LIMIT
    )
    sizes: list[int] = []
    responses: list[tuple[Command, bytes | None]] = []
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(encode_associate_rq(request, IDENTITY))
        pdu_type, body = read_pdu(sock)
        assert pdu_type == PduType.A_ASSOCIATE_AC
        assert decode_associate_ac(body, request).accepted() == {1: (FIND, IMPLICIT)}
        command = Command.request(CommandField.C_FIND_RQ, 1, FIND, with_data_set=True)
        sock.sendall(
            pdu.p_data(1, PdvControl.COMMAND | PdvControl.LAST, command.encode())
            + pdu.p_data(1, PdvControl.LAST, query(IMPLICIT))
        )
        while True:
            message = read_message(sock, sizes)
            assert message is not None
            context_id, response, data = message
            assert context_id == 1
            responses.append((response, data))
            assert response.status is not None
            if not is_pending(response.status):
                break
        sock.sendall(pdu.release_rq())
        assert read_pdu(sock)[0] == PduType.A_RELEASE_RP

    assert [r.status for r, _ in responses] == [Status.PENDING, Status.PENDING, Status.SUCCESS]
    assert {r.message_id_responded for r, _ in responses} == {1}
    for (_response, data), expected in zip(responses[:2], MATCHES, strict=True):
        assert data is not None and len(data) > padding
        check_match(decode(data, IMPLICIT), expected, padding)
    assert responses[2][1] is None
    assert max(sizes) <= LIMIT, sorted(sizes)[-5:]
    assert max(sizes) == LIMIT  # fragments fill the limit: not a vacuous bound
    assert len(sizes) >= 2 * (padding // LIMIT) + 1


# -- the acceptor's limit, honoured by our requestor ----------------------------------------


class StoringAcceptor(RawAcceptor):
    """Records every P-DATA-TF length and message, answers each C-STORE with
    success and the release with RP."""

    def __init__(self, max_pdu: int) -> None:
        super().__init__(max_pdu)
        self.sizes: list[int] = []
        self.messages: list[tuple[int, Command, bytes | None]] = []
        self.released = False

    def serve(self, conn: socket.socket, request: AssociateRequest) -> None:
        while (message := read_message(conn, self.sizes)) is not None:
            self.messages.append(message)
            context_id, command, _data = message
            response = command.response(Status.SUCCESS)
            conn.sendall(
                pdu.p_data(context_id, PdvControl.COMMAND | PdvControl.LAST, response.encode())
            )
        conn.sendall(pdu.release_rp())
        self.released = True


@pytest.mark.parametrize("source", ["store_bytes", "store_file"])
def test_store_fits_an_acceptor_max_pdu_of_4096(tmp_path: Path, source: str) -> None:
    data_set = bytes(i * 13 % 256 for i in range(100 * 1024 + 3))
    acceptor = StoringAcceptor(LIMIT)
    acceptor.start()
    association = OutboundAssociation.request(
        HOST, acceptor.port, "DICOMNET", "RAWSCP", [(CT_STORAGE, EXPLICIT)], TIMEOUTS, IDENTITY
    )
    try:
        assert association.peer_max_pdu == LIMIT
        if source == "store_bytes":
            response = association.store_bytes(data_set, CT_STORAGE, "1.2.3.4", EXPLICIT, 1)
        else:
            path = tmp_path / "object.dcm"
            path.write_bytes(b"\x00" * 128 + b"DICM" + data_set)  # offset: past a preamble
            response = association.store_file(path, 1, (CT_STORAGE, "1.2.3.4", EXPLICIT, 132))
        assert response.status == Status.SUCCESS
    finally:
        association.release()
    acceptor.join(10)
    assert not acceptor.is_alive()
    if acceptor.error is not None:
        raise acceptor.error
    assert acceptor.released
    assert acceptor.request is not None and acceptor.request.max_pdu == 0
    ((context_id, command, received),) = acceptor.messages
    assert context_id == 1
    assert command.command_field == CommandField.C_STORE_RQ
    assert command.affected_sop_instance == "1.2.3.4" and command.message_id == 1
    assert received == data_set
    assert max(acceptor.sizes) <= LIMIT, sorted(acceptor.sizes)[-5:]
    assert max(acceptor.sizes) == LIMIT
    assert len(acceptor.sizes) >= len(data_set) // LIMIT


# -- our requestor against our acceptor -------------------------------------------------------


@pytest.mark.parametrize(
    ("syntax", "padding"),
    [(EXPLICIT, 0), (IMPLICIT, 0), (EXPLICIT, 2_500_000)],
    ids=["explicit", "implicit", "explicit, 2.5 MB identifiers"],
)
def test_send_request_c_find_against_our_server(
    serve: Callable[..., tuple[str, int]], syntax: str, padding: int
) -> None:
    handler = FindHandler(padding)
    host, port = serve(handler)
    association = OutboundAssociation.request(
        host, port, "DICOMNET", AE_TITLE, [(FIND, syntax)], TIMEOUTS, IDENTITY
    )
    try:
        assert association.contexts == {(FIND, syntax): 1}
        command = Command.request(CommandField.C_FIND_RQ, 5, FIND, with_data_set=True)
        responses = list(association.send_request(command, syntax, query(syntax)))
        assert association.is_established
    finally:
        association.release()
    assert [r.status for r in responses] == [Status.PENDING, Status.PENDING, Status.SUCCESS]
    for response, expected in zip(responses[:2], MATCHES, strict=True):
        assert response.command is not None and response.command.message_id_responded == 5
        assert response.data_set is not None
        check_match(decode(response.data_set, syntax), expected, padding)
    assert responses[2].data_set is None
    ((seen_syntax, asked),) = handler.queries
    assert seen_syntax == syntax
    assert asked.QueryRetrieveLevel == "STUDY" and str(asked.PatientName) == ""
