"""Storage commitment in dicomnet: the data sets (dicomnet.commitment) against
pynetdicom's encoder, the requestor's N-ACTION and wait for the N-EVENT-REPORT on
the same association, and the acceptor taking an N-EVENT-REPORT on a new
association from pynetdicom, which proposes the SCP role for itself (PS3.4 J.3.3).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterable

import pytest
from pydicom import Dataset
from pydicom.sequence import Sequence
from pynetdicom import AE, build_role, dsutils

from dicomrouter.dicomnet import (
    AcceptorSettings,
    BaseHandler,
    Command,
    CommandField,
    Reply,
    Request,
    Server,
    Status,
    pdu,
)
from dicomrouter.dicomnet.commitment import (
    EVENT_ALL_COMMITTED,
    EVENT_SOME_FAILED,
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
    REQUEST_COMMITMENT,
    STORAGE_COMMITMENT_INSTANCE,
    STORAGE_COMMITMENT_PUSH,
    CommitmentReport,
    CommitmentRequest,
    Failure,
    Reference,
    decode_action,
    decode_report,
    encode_action,
    encode_report,
)
from dicomrouter.dicomnet.constants import PdvControl
from dicomrouter.dicomnet.negotiation import (
    AssociateRequest,
    Capabilities,
    ProposedContext,
    Role,
)
from dicomrouter.dicomnet.pdu import ProtocolError
from dicomrouter.dicomnet.requestor import OutboundAssociation, Timeouts
from tests.dicomnet.peers import IDENTITY, RawAcceptor, read_message

HOST = "127.0.0.1"
CT = "1.2.840.10008.5.1.4.1.1.2"
ILE = IMPLICIT_VR_LITTLE_ENDIAN
COMMAND = PdvControl.COMMAND | PdvControl.LAST
TRANSACTION = "1.2.826.0.1.3680043.9.9999.77"
REFS = (Reference(CT, "1.2.3.4.1"), Reference(CT, "1.2.3.4.22"))


def pynetdicom_request_data(syntax: str) -> bytes:
    dataset = Dataset()
    dataset.TransactionUID = TRANSACTION
    dataset.ReferencedSOPSequence = Sequence([_item(r.sop_class, r.sop_instance) for r in REFS])
    data = dsutils.encode(dataset, syntax == ILE, True)
    assert data is not None
    return data


def _item(sop_class: str, sop_instance: str, reason: int | None = None) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_instance
    if reason is not None:
        item.FailureReason = reason
    return item


# -- data sets ---------------------------------------------------------------------------


@pytest.mark.parametrize("syntax", [ILE, EXPLICIT_VR_LITTLE_ENDIAN])
def test_the_action_data_set_is_what_pynetdicom_encodes(syntax: str) -> None:
    ours = encode_action(CommitmentRequest(TRANSACTION, REFS), syntax)
    assert ours == pynetdicom_request_data(syntax)
    assert decode_action(ours, syntax) == CommitmentRequest(TRANSACTION, REFS)


@pytest.mark.parametrize("syntax", [ILE, EXPLICIT_VR_LITTLE_ENDIAN])
def test_a_report_with_failures_encoded_by_pynetdicom_is_read(syntax: str) -> None:
    dataset = Dataset()
    dataset.TransactionUID = TRANSACTION
    dataset.ReferencedSOPSequence = Sequence([_item(CT, "1.2.3.4.1")])
    dataset.FailedSOPSequence = Sequence([_item(CT, "1.2.3.4.22", 0x0112)])
    data = dsutils.encode(dataset, syntax == ILE, True)
    assert data is not None
    report = decode_report(data, EVENT_SOME_FAILED, syntax)
    assert report == CommitmentReport(
        TRANSACTION,
        EVENT_SOME_FAILED,
        (Reference(CT, "1.2.3.4.1"),),
        (Failure(CT, "1.2.3.4.22", 0x0112),),
    )
    assert encode_report(report, syntax) == data


def test_a_report_that_is_not_one_is_a_protocol_error() -> None:
    good = encode_report(CommitmentReport(TRANSACTION, 1, REFS, ()))
    with pytest.raises(ProtocolError, match="event type 3"):
        decode_report(good, 3)
    with pytest.raises(ProtocolError):
        decode_report(b"\x08\x00\x95\x11\x40\x00\x00\x00short", 1)  # truncated
    no_uid = Dataset()
    no_uid.ReferencedSOPSequence = Sequence([_item(CT, "1.2.3")])
    data = dsutils.encode(no_uid, True, True)
    assert data is not None
    with pytest.raises(ProtocolError):
        decode_report(data, 1)


# -- role selection (acceptor) -------------------------------------------------------------


def _request(roles: tuple[Role, ...]) -> AssociateRequest:
    return AssociateRequest(
        "ORTHANC", "ROUTER", (ProposedContext(1, STORAGE_COMMITMENT_PUSH, (ILE,)),), roles=roles
    )


@pytest.mark.parametrize(
    ("proposed", "answered"),
    [
        ((False, True), (False, True)),  # the SCP reporting: SCP role only
        ((True, True), (True, True)),
        (None, None),  # no role selection: default roles, no item in the answer
    ],
)
def test_the_commitment_scp_role_is_accepted_when_proposed(
    proposed: tuple[bool, bool] | None, answered: tuple[bool, bool] | None
) -> None:
    capabilities = Capabilities(
        {STORAGE_COMMITMENT_PUSH: [ILE]}, {STORAGE_COMMITMENT_PUSH: (True, True)}
    )
    roles = () if proposed is None else (Role(STORAGE_COMMITMENT_PUSH, *proposed),)
    accept = capabilities.negotiate(_request(roles), 0)
    assert accept.accepted() == {1: (STORAGE_COMMITMENT_PUSH, ILE)}
    if answered is None:
        assert accept.roles == ()
    else:
        assert [(r.sop_class, r.scu, r.scp) for r in accept.roles] == [
            (STORAGE_COMMITMENT_PUSH, *answered)
        ]


def test_without_roles_an_scp_only_proposal_is_not_given_the_scp_role() -> None:
    capabilities = Capabilities({STORAGE_COMMITMENT_PUSH: [ILE]})
    accept = capabilities.negotiate(_request((Role(STORAGE_COMMITMENT_PUSH, False, True),)), 0)
    assert all(not r.scp for r in accept.roles)


# -- requestor: N-ACTION, then the report on the same association ----------------------------


class CommitmentScp(RawAcceptor):
    """Answers an N-ACTION, then sends the N-EVENT-REPORT on the same association
    (``delay`` seconds later; never when ``report`` is False)."""

    def __init__(self, report: bool = True, delay: float = 0.2) -> None:
        super().__init__()
        self.report = report
        self.delay = delay
        self.action: tuple[Command, bytes | None] | None = None
        self.report_response: Command | None = None

    def serve(self, conn: socket.socket, request: AssociateRequest) -> None:
        message = read_message(conn, [])
        assert message is not None
        context_id, command, data = message
        self.action = (command, data)
        assert data is not None
        asked = decode_action(data)
        response = command.response(Status.SUCCESS)
        conn.sendall(pdu.p_data(context_id, COMMAND, response.encode()))
        if self.report:
            time.sleep(self.delay)
            report = Command.request(
                CommandField.N_EVENT_REPORT_RQ,
                1,
                STORAGE_COMMITMENT_PUSH,
                STORAGE_COMMITMENT_INSTANCE,
                with_data_set=True,
                event_type_id=EVENT_ALL_COMMITTED,
            )
            body = encode_report(CommitmentReport(asked.transaction_uid, 1, asked.references, ()))
            conn.sendall(pdu.p_data(context_id, COMMAND, report.encode()))
            conn.sendall(pdu.p_data(context_id, PdvControl.LAST, body))
            answer = read_message(conn, [])
            assert answer is not None
            self.report_response = answer[1]
        assert read_message(conn, []) is None  # the release
        conn.sendall(pdu.release_rp())


def _associate(peer: RawAcceptor, on_request=None) -> OutboundAssociation:  # type: ignore[no-untyped-def]
    return OutboundAssociation.request(
        HOST,
        peer.port,
        "ROUTER",
        "SCP",
        [(STORAGE_COMMITMENT_PUSH, ILE)],
        Timeouts(5, 5, 5),
        IDENTITY,
        on_request=on_request,
    )


def test_n_action_then_the_report_on_the_same_association() -> None:
    reports: list[CommitmentReport] = []

    def on_request(request: Request) -> Iterable[Reply]:
        assert request.command.command_field == CommandField.N_EVENT_REPORT_RQ
        assert request.data_set is not None
        reports.append(
            decode_report(request.data_set, request.command.event_type_id, request.transfer_syntax)
        )
        return [Reply(Status.SUCCESS)]

    peer = CommitmentScp()
    peer.start()
    association = _associate(peer, on_request)
    data = encode_action(CommitmentRequest(TRANSACTION, REFS))
    response = association.action(
        STORAGE_COMMITMENT_PUSH, STORAGE_COMMITMENT_INSTANCE, REQUEST_COMMITMENT, data, ILE, 9
    )
    assert response.status == Status.SUCCESS
    assert response.command is not None and response.command.action_type_id == 1
    assert association.wait_for_request(5) is True
    association.release()
    peer.join(10)
    assert peer.error is None, peer.error
    assert peer.action is not None
    command, sent = peer.action
    assert command.command_field == CommandField.N_ACTION_RQ
    assert command.requested_sop_class == STORAGE_COMMITMENT_PUSH
    assert command.requested_sop_instance == STORAGE_COMMITMENT_INSTANCE
    assert (command.action_type_id, command.message_id) == (1, 9)
    assert sent == data
    assert reports == [CommitmentReport(TRANSACTION, 1, REFS, ())]
    answer = peer.report_response
    assert answer is not None
    assert answer.command_field == CommandField.N_EVENT_REPORT_RSP
    assert (answer.status, answer.event_type_id) == (Status.SUCCESS, 1)


def test_no_report_in_time_is_false_and_the_association_goes_on() -> None:
    peer = CommitmentScp(report=False)
    peer.start()
    association = _associate(peer)
    data = encode_action(CommitmentRequest(TRANSACTION, REFS))
    response = association.action(
        STORAGE_COMMITMENT_PUSH, STORAGE_COMMITMENT_INSTANCE, REQUEST_COMMITMENT, data, ILE
    )
    assert response.status == Status.SUCCESS
    started = time.monotonic()
    assert association.wait_for_request(0.3) is False
    assert 0.25 < time.monotonic() - started < 2
    assert association.is_established
    association.release()
    peer.join(10)
    assert peer.error is None, peer.error


def test_an_action_without_its_context_is_a_value_error() -> None:
    peer = CommitmentScp(report=False)
    peer.start()
    association = _associate(peer)
    with pytest.raises(ValueError, match="no accepted presentation context"):
        association.action(CT, STORAGE_COMMITMENT_INSTANCE, 1, b"", ILE)
    association.abort()
    peer.join(10)


# -- acceptor: the report on a new association, from pynetdicom -----------------------------


class Recorder(BaseHandler):
    def __init__(self) -> None:
        self.requests: list[Request] = []

    def on_request(self, request: Request) -> Iterable[Reply]:
        self.requests.append(request)
        return [Reply(Status.SUCCESS)]


@pytest.mark.parametrize("scp_role", [True, False])
def test_the_acceptor_takes_a_report_from_pynetdicom(scp_role: bool) -> None:
    handler = Recorder()
    settings = AcceptorSettings(ae_title="ROUTER")
    server = Server(
        lambda: settings,
        handler,
        {STORAGE_COMMITMENT_PUSH: [ILE, EXPLICIT_VR_LITTLE_ENDIAN]},
        IDENTITY,
        roles={STORAGE_COMMITMENT_PUSH: (True, True)},
    )
    server.listen(HOST, 0)
    try:
        port = server.address[1]
        ae = AE(ae_title="ORTHANC")
        ae.add_requested_context(STORAGE_COMMITMENT_PUSH, ILE)
        roles = [build_role(STORAGE_COMMITMENT_PUSH, scp_role=True)] if scp_role else []
        assoc = ae.associate(HOST, port, ae_title="ROUTER", ext_neg=roles)
        assert assoc.is_established
        if scp_role:  # the acceptor answered the role item: the requestor is the SCP
            (context,) = assoc.accepted_contexts
            assert context.as_scp and not context.as_scu
        event = Dataset()
        event.TransactionUID = TRANSACTION
        event.ReferencedSOPSequence = Sequence([_item(CT, "1.2.3.4.1")])
        status, _reply = assoc.send_n_event_report(
            event, EVENT_ALL_COMMITTED, STORAGE_COMMITMENT_PUSH, STORAGE_COMMITMENT_INSTANCE
        )
        assoc.release()
    finally:
        server.stop()
    assert status.Status == Status.SUCCESS
    (request,) = handler.requests
    assert request.command.command_field == CommandField.N_EVENT_REPORT_RQ
    assert request.data_set is not None
    report = decode_report(request.data_set, request.command.event_type_id, request.transfer_syntax)
    assert report == CommitmentReport(TRANSACTION, 1, (Reference(CT, "1.2.3.4.1"),), ())


def test_threading_is_quiet() -> None:
    """The servers above leave no thread behind."""
    assert not [t for t in threading.enumerate() if t.name.startswith("dicom-")]
