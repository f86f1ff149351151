"""The dispatcher's association requestor at the protocol level.

Well-behaved peers (dcmtk storescp, Orthanc, pynetdicom) are covered by
test_destination_dicom and the interop tests; here raw sockets play destinations
that do what those never do: limit PDUs to a few KB, answer another message, send a
release request or close an idle association, reject transiently. The sender must
keep within the peer's limits, end a broken association, report the instance as
transient, and never reuse an association the peer has given up.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import UID
from pynetdicom import pdu, pdu_primitives
from pynetdicom.presentation import PresentationContext

from dicomrouter.destinations import DestinationUnavailable, DicomSender, Outcome
from dicomrouter.destinations.association import (
    AssociationLost,
    Timeouts,
    open_association,
    store_file,
)
from dicomrouter.dicomnet import Command
from dicomrouter.dicomnet import pdu as ul
from dicomrouter.dicomnet.constants import (
    APPLICATION_CONTEXT,
    AbortSource,
    DataSetType,
    PduType,
    PdvControl,
)
from dicomrouter.store import part10
from tests.test_destination_dicom import ct_batch, dest, without_meta

HOST = "127.0.0.1"


def _accept_pdu(request: pdu_primitives.A_ASSOCIATE, max_pdu: int) -> bytes:
    results = []
    for proposed in request.presentation_context_definition_list:
        context = PresentationContext()
        context.context_id = proposed.context_id
        context.abstract_syntax = proposed.abstract_syntax
        context.transfer_syntax = [proposed.transfer_syntax[0]]
        context.result = 0x00
        results.append(context)
    max_length = pdu_primitives.MaximumLengthNotification()
    max_length.maximum_length_received = max_pdu
    class_uid = pdu_primitives.ImplementationClassUIDNotification()
    class_uid.implementation_class_uid = UID("1.2.826.0.1.3680043.9.9999")
    answer = pdu_primitives.A_ASSOCIATE()
    answer.application_context_name = UID(APPLICATION_CONTEXT)
    answer.calling_ae_title = request.calling_ae_title
    answer.called_ae_title = request.called_ae_title
    answer.result = 0x00
    answer.result_source = 0x01
    answer.presentation_context_definition_results_list = results
    answer.user_information = [max_length, class_uid]
    return bytes(pdu.A_ASSOCIATE_AC(answer).encode())


class Conversation:
    """One accepted connection of a :class:`RawDestination`."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.reader = ul.SocketReader(sock)
        self.pdu_lengths: list[int] = []

    def associate(self) -> pdu_primitives.A_ASSOCIATE:
        pdu_type, length = ul.read_header(self.reader)
        assert pdu_type == PduType.A_ASSOCIATE_RQ
        request = pdu.A_ASSOCIATE_RQ()
        request.decode(bytes((pdu_type, 0)) + length.to_bytes(4, "big") + self.reader.read(length))
        return request.to_primitive()

    def _pdvs(self) -> Iterator[tuple[int, int, bytes]]:
        """(context ID, control header, value) of every PDV, PDU after PDU."""
        while True:
            pdu_type, length = ul.read_header(self.reader)
            assert pdu_type == PduType.P_DATA_TF, pdu_type
            self.pdu_lengths.append(length)  # the variable field, which the limit bounds
            remaining = length
            while remaining:
                size, context, control = ul.read_pdv_header(self.reader)
                remaining -= size + 6
                value = bytearray()
                self.reader.copy(size, value.extend)  # read() is for what fits its buffer
                yield context, control, bytes(value)

    def message(self) -> tuple[int, Command, bytes]:
        """The next DIMSE message: (context ID, command elements, data set bytes)."""
        command, data = bytearray(), bytearray()
        elements: Command | None = None
        for context, control, value in self._pdvs():
            if control & PdvControl.COMMAND:
                command += value
                if control & PdvControl.LAST:
                    elements = Command.decode(bytes(command))
                    if elements.data_set_type == DataSetType.ABSENT:
                        return context, elements, b""
            else:
                assert elements is not None, "data set before its command"
                data += value
                if control & PdvControl.LAST:
                    return context, elements, bytes(data)
        raise AssertionError("unreachable")

    def respond(self, context: int, elements: Command, status: int = 0) -> None:
        message_id = elements.message_id or 0
        field = elements.command_field or 0
        assert (message_id, field) == (elements.message_id, elements.command_field)
        response = elements.response(status).encode()
        self.sock.sendall(ul.p_data(context, 0x03, response))

    def expect_release(self) -> None:
        pdu_type, length = ul.read_header(self.reader)
        ul.skip(self.reader, length)
        assert pdu_type == PduType.A_RELEASE_RQ, pdu_type
        self.sock.sendall(ul.release_rp())


class RawDestination:
    """Accepts connections and hands each to ``script`` in a thread."""

    def __init__(self, script: Callable[[Conversation], None]):
        self.script = script
        self.server = socket.create_server((HOST, 0))
        self.port = self.server.getsockname()[1]
        self.conversations: list[Conversation] = []
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                sock, _ = self.server.accept()
            except OSError:
                return
            sock.settimeout(10)
            conversation = Conversation(sock)
            self.conversations.append(conversation)
            threading.Thread(target=self._run, args=(conversation,), daemon=True).start()

    def _run(self, conversation: Conversation) -> None:
        try:
            self.script(conversation)
        except (ul.PeerClosed, OSError):
            pass
        except BaseException as exc:  # an assertion in the script
            self.errors.append(exc)
        finally:
            conversation.sock.close()

    def close(self) -> None:
        self.server.close()


@pytest.fixture
def raw_destination():  # type: ignore[no-untyped-def]
    made: list[RawDestination] = []

    def make(script: Callable[[Conversation], None]) -> RawDestination:
        made.append(RawDestination(script))
        return made[-1]

    yield make
    for destination in made:
        destination.close()
        assert not destination.errors, destination.errors


def test_pdus_stay_within_the_peers_limit_and_the_data_set_arrives_whole(
    tmp_path: Path, raw_destination
) -> None:  # type: ignore[no-untyped-def]
    received: list[bytes] = []

    def script(peer: Conversation) -> None:
        request = peer.associate()
        contexts = request.presentation_context_definition_list
        # CT_small is explicit VR: offered as is, and as implicit VR (convertible);
        # one transfer syntax per context, odd context IDs.
        assert [c.context_id for c in contexts] == [1, 3]
        assert [len(c.transfer_syntax) for c in contexts] == [1, 1]
        assert str(request.called_ae_title).strip() == "PACS"
        assert str(request.calling_ae_title).strip() == "ROUTER"
        peer.sock.sendall(_accept_pdu(request, max_pdu=4096))
        for _ in range(2):
            context, elements, data = peer.message()
            received.append(data)
            peer.respond(context, elements)
        peer.expect_release()

    destination = raw_destination(script)
    batch = ct_batch(tmp_path / "s", 2)
    results = DicomSender(dest(destination.port), "ROUTER").send(batch)
    assert [r.outcome for r in results] == [Outcome.SUCCESS] * 2
    assert received == [without_meta(i.path) for i in batch]
    (peer,) = destination.conversations
    assert max(peer.pdu_lengths) <= 4096
    assert len(peer.pdu_lengths) > 2 * (len(received[0]) // 4096)  # really fragmented


def test_a_response_to_another_message_aborts_and_is_transient(
    tmp_path: Path, raw_destination
) -> None:  # type: ignore[no-untyped-def]
    def script(peer: Conversation) -> None:
        peer.sock.sendall(_accept_pdu(peer.associate(), max_pdu=0))
        context, elements, _data = peer.message()
        peer.respond(context, elements.but(message_id=999))
        pdu_type, _length = ul.read_header(peer.reader)
        assert pdu_type == PduType.A_ABORT

    destination = raw_destination(script)
    results = DicomSender(dest(destination.port), "ROUTER").send(ct_batch(tmp_path / "s", 2))
    assert [r.outcome for r in results] == [Outcome.TRANSIENT] * 2
    assert "protocol error" in results[0].message
    assert all(r.status is None for r in results)


def test_an_association_the_peer_gave_up_is_not_reused(tmp_path: Path, raw_destination) -> None:  # type: ignore[no-untyped-def]
    """A kept association that the peer released (A-RELEASE-RQ) or closed while it
    was idle is replaced by a new one: the next batch is not lost to it."""

    def script(peer: Conversation) -> None:
        peer.sock.sendall(_accept_pdu(peer.associate(), max_pdu=0))
        context, elements, _data = peer.message()
        peer.respond(context, elements)
        if len(destination.conversations) == 1:
            peer.sock.sendall(ul.release_rq())  # then the first one hangs up
            peer.sock.shutdown(socket.SHUT_WR)
            return
        peer.expect_release()

    destination = raw_destination(script)
    batch = ct_batch(tmp_path / "s", 2)
    sender = DicomSender(dest(destination.port), "ROUTER", keep_alive=30)
    assert sender.send(batch[:1])[0].outcome is Outcome.SUCCESS
    # Wait until the peer has given the kept association up (its socket closed).
    first = destination.conversations[0]
    deadline = time.monotonic() + 5
    while first.sock.fileno() != -1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert first.sock.fileno() == -1
    assert sender.send(batch[1:])[0].outcome is Outcome.SUCCESS
    sender.close()
    assert len(destination.conversations) == 2


def test_a_transient_rejection_is_transient(raw_destination) -> None:  # type: ignore[no-untyped-def]
    def script(peer: Conversation) -> None:
        peer.associate()
        peer.sock.sendall(ul.associate_rj(0x02, 0x03, 0x01))  # temporary congestion

    destination = raw_destination(script)
    with pytest.raises(DestinationUnavailable) as info:
        DicomSender(dest(destination.port), "ROUTER").echo()
    assert info.value.transient
    assert "rejected-transient" in str(info.value)
    assert "congestion" in str(info.value).lower()


def test_sending_starts_no_threads(tmp_path: Path, raw_destination) -> None:  # type: ignore[no-untyped-def]
    """Our requestor runs in the caller's thread: no reactor or DUL threads that
    poll while an association is open (the reason it replaced pynetdicom's)."""
    counts: list[int] = []

    def script(peer: Conversation) -> None:
        peer.sock.sendall(_accept_pdu(peer.associate(), max_pdu=0))
        for _ in range(3):
            context, elements, _data = peer.message()
            counts.append(threading.active_count())
            peer.respond(context, elements)
        peer.expect_release()

    destination = raw_destination(script)
    before = threading.active_count()
    results = DicomSender(dest(destination.port), "ROUTER").send(ct_batch(tmp_path / "s", 3))
    assert [r.outcome for r in results] == [Outcome.SUCCESS] * 3
    # The fake destination's own connection thread is the only one added meanwhile.
    assert counts == [before + 1] * 3


@pytest.mark.parametrize(("limit", "largest"), [(0, 1024 * 1024), (16384, 16384 - 6)])
def test_converted_data_sets_go_out_in_bounded_fragments(limit: int, largest: int) -> None:
    """A data set we re-encoded (decompressed for a destination that refused the
    stored syntax) is fragmented like a stored file: within the peer's limit, and in
    1 MB fragments when the peer has none, so no PDU holds a whole large image."""
    ours, theirs = socket.socketpair()
    data = bytes(range(256)) * (10 * 1024 + 1)  # 2.5 MB
    received: list[tuple[int, bytes]] = []

    def read() -> None:
        reader = ul.SocketReader(theirs)
        with contextlib.suppress(ul.PeerClosed):
            while True:
                pdu_type, length = ul.read_header(reader)
                if pdu_type != PduType.P_DATA_TF:  # the A-ABORT at the end
                    ul.skip(reader, length)
                    received.append((-pdu_type, b""))
                    continue
                size, _context, control = ul.read_pdv_header(reader)
                value = bytearray()
                reader.copy(size, value.extend)
                received.append((control, bytes(value)))

    reader_thread = threading.Thread(target=read)
    reader_thread.start()
    ul.send_buffers(ours, ul.message(1, b"command", data, limit))  # as store_bytes does
    ours.sendall(ul.abort(AbortSource.SERVICE_USER))
    ours.close()
    reader_thread.join(10)
    theirs.close()
    (command, *fragments, abort) = received
    assert command == (0x03, b"command")
    assert b"".join(value for _control, value in fragments) == data
    assert [control for control, _value in fragments] == [0] * (len(fragments) - 1) + [2]
    assert max(len(value) for _control, value in fragments) == largest
    assert abort == (-PduType.A_ABORT, b"")


@pytest.mark.timeout(30)  # a reuse check that waited for data would hang for dimse_timeout
def test_a_live_kept_association_is_reused_at_once(tmp_path: Path, raw_destination) -> None:  # type: ignore[no-untyped-def]
    def script(peer: Conversation) -> None:
        peer.sock.sendall(_accept_pdu(peer.associate(), max_pdu=0))
        for _ in range(2):
            context, elements, _data = peer.message()
            peer.respond(context, elements)
        peer.expect_release()

    destination = raw_destination(script)
    batch = ct_batch(tmp_path / "s", 2)
    sender = DicomSender(dest(destination.port, dimse_timeout=120), "ROUTER", keep_alive=30)
    assert sender.send(batch[:1])[0].outcome is Outcome.SUCCESS
    assert sender.send(batch[1:])[0].outcome is Outcome.SUCCESS
    sender.close()
    assert len(destination.conversations) == 1


def test_a_peer_that_stops_reading_costs_one_network_timeout_and_abort_never_waits(
    tmp_path: Path, raw_destination
) -> None:  # type: ignore[no-untyped-def]
    """A destination that accepts, then never reads: the send times out after the
    network timeout and the A-ABORT that follows must not wait for buffer space (it
    used to, for a second timeout); abort() from another thread returns at once."""
    stalled = threading.Event()

    def script(peer: Conversation) -> None:
        request = peer.associate()
        peer.sock.sendall(_accept_pdu(request, 0))
        stalled.wait(15)  # reads nothing more

    destination = raw_destination(script)
    big = tmp_path / "big.dcm"
    dataset = pydicom.dcmread(ct_batch(tmp_path / "one", 1)[0].path)
    dataset.PixelData = bytes(32 * 1024 * 1024)  # far beyond the socket buffers
    dataset.save_as(big, enforce_file_format=True)
    timeouts = Timeouts(connect=5, acse=5, dimse=30.0, network=2.0)  # a send stall
    meta = part10.read_plain_file_meta(big)
    assert meta is not None
    assoc = open_association(
        HOST, destination.port, "ROUTER", "DEST", [(meta[0], meta[2])], timeouts
    )
    started = time.monotonic()
    with pytest.raises(AssociationLost) as info:
        store_file(assoc, big, 1)
    took = time.monotonic() - started
    assert info.value.timed_out
    assert 1.9 < took < 3.5, took  # one network timeout, not two, and not the DIMSE one

    again = open_association(
        HOST, destination.port, "ROUTER", "DEST", [(meta[0], meta[2])], timeouts
    )
    sender = threading.Thread(target=lambda: with_lost(lambda: store_file(again, big, 1)))
    sender.start()
    time.sleep(0.5)  # the sender is now blocked on the full buffer
    started = time.monotonic()
    again.abort()
    assert time.monotonic() - started < 0.3
    sender.join(5)
    assert not sender.is_alive()  # the shutdown woke it
    stalled.set()


def with_lost(call: Callable[[], object]) -> None:
    with contextlib.suppress(AssociationLost):
        call()


@pytest.mark.parametrize("result, source, reason", [(1, 1, 0), (1, 3, 0), (1, 1, 4)])
def test_a_rejection_with_a_reserved_reason_is_still_a_rejection(
    raw_destination, result: int, source: int, reason: int
) -> None:  # type: ignore[no-untyped-def]
    """PS3.8 reserves some reason values; a peer that sends one still rejected us,
    permanently here: no ValueError from a decoder, no retry as if transient."""

    def script(peer: Conversation) -> None:
        peer.associate()
        peer.sock.sendall(ul.associate_rj(result, source, reason))

    destination = raw_destination(script)
    with pytest.raises(DestinationUnavailable) as info:
        DicomSender(dest(destination.port), "ROUTER").echo()
    assert not info.value.transient
    assert "rejected-permanent" in str(info.value)
    assert f"reason {reason}" in str(info.value) or "reserved" in str(info.value)


def test_an_undecodable_associate_answer_ends_the_association_cleanly(raw_destination) -> None:  # type: ignore[no-untyped-def]
    """An A-ASSOCIATE-AC we cannot decode (here: 100 KB of zeros) is a lost
    association, with the socket closed, not an exception of the decoder."""

    def script(peer: Conversation) -> None:
        peer.associate()
        body = bytes(100_000)
        peer.sock.sendall(struct.pack(">BBL", PduType.A_ASSOCIATE_AC, 0, len(body)) + body)
        with contextlib.suppress(OSError, ul.PeerClosed):
            ul.read_header(peer.reader)  # the A-ABORT, or the close

    destination = raw_destination(script)
    with pytest.raises(AssociationLost, match="unreadable A-ASSOCIATE-AC"):
        open_association(
            HOST,
            destination.port,
            "ROUTER",
            "DEST",
            [("1.2.840.10008.1.1", "1.2.840.10008.1.2")],
            Timeouts(connect=5, acse=5, dimse=5),
        )


@pytest.mark.parametrize(
    ("limit", "largest"),
    [
        (512, 512),  # 500+ PDVs per 256 KB block: more buffers than one sendmsg takes
        (100, 100),  # smaller than the C-STORE-RQ command set: it is fragmented too
        (0x7FFFFFFF, ul.UNLIMITED_FRAGMENT + 6),  # "any size": still bounded fragments
    ],
)
def test_odd_peer_limits_are_respected_and_the_message_arrives_whole(
    tmp_path: Path, raw_destination, limit: int, largest: int
) -> None:  # type: ignore[no-untyped-def]
    received: list[tuple[Command, bytes]] = []

    def script(peer: Conversation) -> None:
        peer.sock.sendall(_accept_pdu(peer.associate(), max_pdu=limit))
        context, elements, data = peer.message()
        received.append((elements, data))
        peer.respond(context, elements)
        peer.expect_release()

    destination = raw_destination(script)
    source = ct_batch(tmp_path / "s", 1)[0]
    dataset = pydicom.dcmread(source.path)
    dataset.PixelData = bytes(range(256)) * 8 * 1024  # 2 MB: several blocks and fragments
    dataset.Rows, dataset.Columns = 1024, 1024
    dataset.save_as(source.path, enforce_file_format=True)
    results = DicomSender(dest(destination.port), "ROUTER").send([source])
    assert [r.outcome for r in results] == [Outcome.SUCCESS], results
    ((elements, data),) = received
    assert elements.affected_sop_instance == source.sop_instance_uid
    assert data == without_meta(source.path)
    (peer,) = destination.conversations
    assert max(peer.pdu_lengths) == largest


def test_a_destinations_timeouts_reach_its_associations() -> None:
    sender = DicomSender(
        dest(
            4242, connect_timeout="3s", acse_timeout="4s", dimse_timeout="5s", network_timeout="6s"
        ),
        "ROUTER",
    )
    assert sender.timeouts == Timeouts(connect=3.0, acse=4.0, dimse=5.0, network=6.0)
    assert sender.timeouts.send == 6.0
