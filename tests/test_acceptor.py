"""The receiver's association acceptor at the protocol level.

Well-behaved peers (dcmtk storescu/echoscu, pynetdicom) are covered by the interop
and pipeline tests; here raw sockets play the peers that break the rules: aborts and
dropped connections mid-object, PDUs out of place, unknown contexts, stalls. Each
must end in the right PDU (A-ASSOCIATE-RJ, A-ABORT, a failure status), leave no
temporary file behind, and leave the acceptor serving the next caller.
"""

from __future__ import annotations

import io
import socket
import struct
import subprocess
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
)
from pynetdicom import AE, pdu, pdu_primitives
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicomrouter.dicomnet import (
    AcceptorSettings,
    BaseHandler,
    Command,
    Peer,
    Server,
    Sink,
    StoreRequest,
)
from dicomrouter.dicomnet import pdu as ul
from dicomrouter.dicomnet.constants import (
    APPLICATION_CONTEXT,
    AbortReason,
    AbortSource,
    CommandField,
    PduType,
)
from dicomrouter.receive.contexts import (
    ACCEPTED_TRANSFER_SYNTAXES,
    STORAGE_SOP_CLASSES,
    VERIFICATION_SOP_CLASS,
    VERIFICATION_TRANSFER_SYNTAXES,
)
from dicomrouter.receive.scp import IDENTITY
from dicomrouter.receive.spool import Spool
from dicomrouter.store.part10 import encode_file_meta
from tests.support import require_peers
from tests.support.dcmtk import dcmtk_env, dcmtk_tool
from tests.support.synth import make_small_study, make_study

HOST = "127.0.0.1"


class FakeService(BaseHandler):
    """Records what the acceptor tells the application; spools objects into
    ``tmp_dir`` as the receiver does, and keeps them in ``kept``."""

    def __init__(self, tmp_dir: Path, kept: Path, status: tuple[int, str | None] = (0, None)):
        self.tmp_dir = tmp_dir
        self.kept = kept
        self.status = status
        self.allowed = True
        self.rejected: list[tuple[Peer, str]] = []
        self.refused: list[tuple[str, str, int]] = []
        self.established: list[Peer] = []
        self.ended: list[tuple[Peer, bool]] = []
        self.stored: list[tuple[str, str, bytes]] = []
        self.contents: list[bytes | bytearray | None] = []
        self.ended_event = threading.Event()

    def allow_connection(self, address: str) -> bool:
        return self.allowed

    def on_rejected(self, peer: Peer, reason: str) -> None:
        self.rejected.append((peer, reason))

    def on_refused(self, address: str, reason: str, count: int) -> None:
        self.refused.append((address, reason, count))

    def on_established(self, peer: Peer) -> None:
        self.established.append(peer)

    def open_sink(self, request: StoreRequest) -> Sink | tuple[int, str | None]:
        meta = encode_file_meta(
            request.sop_class_uid, request.sop_instance_uid, request.transfer_syntax
        )
        return Spool(self.tmp_dir, meta)

    def on_store(self, request: StoreRequest, sink: Sink) -> tuple[int, str | None]:
        assert isinstance(sink, Spool)
        content = sink.finish()
        if sink.status is not None or sink.path is None:
            return sink.status or (0xA700, "storage error")
        path, sop_class_uid, sop_instance_uid = (
            sink.path,
            request.sop_class_uid,
            request.sop_instance_uid,
        )
        on_disk = path.read_bytes()
        assert content is None or content == on_disk
        self.contents.append(content)
        self.stored.append((sop_class_uid, sop_instance_uid, on_disk))
        path.rename(self.kept / f"{sop_instance_uid}.dcm")
        return self.status

    def on_association_end(self, peer: Peer, aborted: bool) -> None:
        self.ended.append((peer, aborted))
        self.ended_event.set()


@pytest.fixture
def acceptor(tmp_path: Path):
    """A running acceptor with short timeouts; yields (acceptor, service, tmp_dir)."""
    tmp_dir, kept = tmp_path / "tmp", tmp_path / "kept"
    tmp_dir.mkdir()
    kept.mkdir()
    service = FakeService(tmp_dir, kept)
    settings = {
        "value": AcceptorSettings(
            ae_title="DICOMROUTER",
            max_associations=2,
            acse_timeout=2.0,
            dimse_timeout=1.0,
            network_timeout=1.0,
        )
    }
    supported = dict.fromkeys(STORAGE_SOP_CLASSES, ACCEPTED_TRANSFER_SYNTAXES)
    supported[VERIFICATION_SOP_CLASS] = VERIFICATION_TRANSFER_SYNTAXES
    server = Server(lambda: settings["value"], service, supported, IDENTITY)
    server.listen(HOST, 0)
    server.test_settings = settings  # type: ignore[attr-defined]
    try:
        yield server, service, tmp_dir
    finally:
        server.stop()


# -- a raw peer ---------------------------------------------------------------------------


def associate_rq(
    calling: str = "RAWSCU",
    called: str = "DICOMROUTER",
    contexts: list[tuple[int, str, str | list[str]]] | None = None,
    max_pdu: int = 16382,
) -> bytes:
    primitive = pdu_primitives.A_ASSOCIATE()
    primitive.application_context_name = APPLICATION_CONTEXT
    primitive.calling_ae_title = calling
    primitive.called_ae_title = called
    items = []
    for context_id, abstract, transfer in contexts or [(1, CTImageStorage, ExplicitVRLittleEndian)]:
        context = PresentationContext()
        context.context_id = context_id
        context.abstract_syntax = abstract
        context.transfer_syntax = [transfer] if isinstance(transfer, str) else transfer
        items.append(context)
    primitive.presentation_context_definition_list = items
    max_length = pdu_primitives.MaximumLengthNotification()
    max_length.maximum_length_received = max_pdu
    implementation = pdu_primitives.ImplementationClassUIDNotification()
    implementation.implementation_class_uid = "1.2.3.4"
    primitive.user_information = [max_length, implementation]
    return bytes(pdu.A_ASSOCIATE_RQ(primitive).encode())


class RawPeer:
    def __init__(self, port: int, source: str | None = None):
        bind = (source, 0) if source else None
        self.sock = socket.create_connection((HOST, port), timeout=5, source_address=bind)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = ul.SocketReader(self.sock)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def receive(self) -> tuple[int, bytes]:
        pdu_type, length = ul.read_header(self.reader)
        return pdu_type, self.reader.read(length)

    def associate(self, **options: object) -> dict[int, tuple[int, bytes]]:
        self.send(associate_rq(**options))  # type: ignore[arg-type]
        pdu_type, body = self.receive()
        assert pdu_type == PduType.A_ASSOCIATE_AC, body
        accepted = pdu.A_ASSOCIATE_AC()
        accepted.decode(bytes((pdu_type, 0)) + struct.pack(">L", len(body)) + body)
        return {
            cx.context_id: (cx.result, cx.transfer_syntax) for cx in accepted.presentation_context
        }

    def command(self, context_id: int, command: bytes, control: int = 0x03) -> None:
        self.send(ul.p_data(context_id, control, command))

    def store(self, command: bytes, data: bytes) -> dict[int, bytes]:
        """One C-STORE on context 1: command, whole data set, the response."""
        self.command(1, command)
        self.command(1, data, control=0x02)
        return self.response()

    def response(self) -> dict[int, bytes]:
        pdu_type, body = self.receive()
        assert pdu_type == PduType.P_DATA_TF, (pdu_type, body)
        return Command.decode(body[6:])

    def closed(self) -> bool:
        self.sock.settimeout(5)
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


def store_rq(sop_instance: str, message_id: int = 1, sop_class: str = CTImageStorage) -> bytes:
    def element(number: int, value: bytes) -> bytes:
        return struct.pack("<HHL", 0, number, len(value)) + value

    def uid(text: str) -> bytes:
        raw = text.encode()
        return raw + b"\x00" if len(raw) % 2 else raw

    body = b"".join(
        (
            element(0x0002, uid(sop_class)),
            element(0x0100, struct.pack("<H", 0x0001)),
            element(0x0110, struct.pack("<H", message_id)),
            element(0x0700, struct.pack("<H", 0)),
            element(0x0800, struct.pack("<H", 0x0000)),
            element(0x1000, uid(sop_instance)),
        )
    )
    return element(0x0000, struct.pack("<L", len(body))) + body


def data_set_bytes(path: Path) -> tuple[str, bytes]:
    """(SOP Instance UID, the data set as in the file: Explicit VR Little Endian)."""
    dataset = dcmread(path)
    assert dataset.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    raw = path.read_bytes()
    # preamble, DICM, then (0002,0000) UL whose value is the rest of the group's length
    (group_length,) = struct.unpack_from("<L", raw, 132 + 8)
    return str(dataset.SOPInstanceUID), raw[132 + 12 + group_length :]


def _wait(condition, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def leftovers(tmp_dir: Path) -> list[str]:
    return sorted(p.name for p in tmp_dir.iterdir())


# -- well-formed exchanges -----------------------------------------------------------------


def test_store_in_fragments_is_written_byte_for_byte(acceptor, tmp_path: Path) -> None:
    server, service, tmp_dir = acceptor
    (source,) = make_small_study(tmp_path / "src", 1)
    uid, data = data_set_bytes(source)
    peer = RawPeer(server.address[1])
    assert peer.associate()[1][0] == 0
    # The command in two fragments, the data set in three PDUs.
    command = store_rq(uid, message_id=7)
    peer.command(1, command[:10], control=0x01)
    peer.command(1, command[10:], control=0x03)
    third = len(data) // 3
    peer.command(1, data[:third], control=0x00)
    peer.command(1, data[third : 2 * third], control=0x00)
    peer.command(1, data[2 * third :], control=0x02)
    response = peer.response()
    assert response.status == 0
    assert response.message_id_responded == 7
    assert response.command_field == 0x8001
    assert response.affected_sop_instance == uid
    peer.send(struct.pack(">BxL4x", PduType.A_RELEASE_RQ, 4))
    assert peer.receive()[0] == PduType.A_RELEASE_RP
    peer.close()
    sop_class, sop_instance, content = service.stored[0]
    assert (sop_class, sop_instance) == (CTImageStorage, uid)
    assert content.endswith(data)
    stored = dcmread(io.BytesIO(content))
    assert stored.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert stored.file_meta.MediaStorageSOPInstanceUID == uid
    _wait(lambda: service.ended)
    assert service.ended[0][1] is False  # released, not aborted
    assert leftovers(tmp_dir) == []


def test_failure_status_and_comment_reach_the_sender(acceptor, tmp_path: Path) -> None:
    server, service, _tmp = acceptor
    service.status = (0xA700, "storage is full")
    (source,) = make_small_study(tmp_path / "src", 1)
    uid, data = data_set_bytes(source)
    peer = RawPeer(server.address[1])
    peer.associate()
    response = peer.store(store_rq(uid), data)
    assert response.status == 0xA700
    assert response.error_comment == "storage is full"
    peer.close()


def test_large_object_in_one_unlimited_pdu_streams_through(acceptor, tmp_path: Path) -> None:
    """max_pdu_size 0: a sender may put a whole 2 MB data set in one PDV, more than
    the read buffer; it is streamed to the file, never held whole."""
    server, service, tmp_dir = acceptor
    (source,) = make_study(tmp_path / "src", 1, rows=1024, cols=1024)
    uid, data = data_set_bytes(source)
    assert len(data) > 2_000_000
    peer = RawPeer(server.address[1])
    peer.associate(max_pdu=0)
    assert peer.store(store_rq(uid), data).status == 0
    peer.close()
    assert service.stored[0][2].endswith(data)


def test_pynetdicom_requestor_with_small_pdus_and_echo(acceptor, tmp_path: Path) -> None:
    server, service, _tmp = acceptor
    server.test_settings["value"] = AcceptorSettings(ae_title="DICOMROUTER", max_pdu_size=4096)
    sources = make_small_study(tmp_path / "src", 3)
    ae = AE(ae_title="PYNETSCU")
    ae.add_requested_context(CTImageStorage, ImplicitVRLittleEndian)
    ae.add_requested_context(Verification)
    assoc = ae.associate(HOST, server.address[1], ae_title="DICOMROUTER")
    assert assoc.is_established
    assert assoc.acceptor.maximum_length == 4096
    assert assoc.send_c_echo().Status == 0
    for path in sources:
        assert assoc.send_c_store(dcmread(path)).Status == 0
    assoc.release()
    assert len(service.stored) == 3
    for (_cls, uid, content), path in zip(service.stored, sources, strict=True):
        stored = dcmread(io.BytesIO(content))
        assert stored.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
        assert stored.SOPInstanceUID == uid == dcmread(path).SOPInstanceUID
        assert stored.PixelData == dcmread(path).PixelData
    assert [peer.calling_ae for peer in service.established] == ["PYNETSCU"]


PRIVATE_CLASS = "1.3.12.2.1107.5.9.1"  # Siemens CSA Non-Image Storage: not in DICOM
PATIENT_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"  # a standard class, not storage


def _private_object(path: Path) -> Dataset:
    dataset = dcmread(path)
    dataset.SOPClassUID = PRIVATE_CLASS
    dataset.file_meta.MediaStorageSOPClassUID = PRIVATE_CLASS
    return dataset


@pytest.mark.parametrize("accept", [True, False])
def test_private_sop_classes_are_accepted_when_configured(
    acceptor, tmp_path: Path, accept: bool
) -> None:  # type: ignore[no-untyped-def]
    """dcmtk storescu refuses to send a SOP class it does not know, so pynetdicom
    plays the modality here. A private class is accepted in our transfer syntaxes
    (and stored) when the settings say so; a standard non-storage class never is."""
    server, service, _tmp = acceptor
    syntaxes = tuple(ACCEPTED_TRANSFER_SYNTAXES) if accept else ()
    server.test_settings["value"] = AcceptorSettings(
        ae_title="DICOMROUTER", private_transfer_syntaxes=syntaxes
    )
    (source,) = make_small_study(tmp_path / "src", 1)
    ae = AE(ae_title="PYNETSCU")
    ae.add_requested_context(PRIVATE_CLASS, ExplicitVRLittleEndian)
    ae.add_requested_context(PATIENT_ROOT_FIND, ImplicitVRLittleEndian)
    ae.add_requested_context(CTImageStorage, ImplicitVRLittleEndian)
    assoc = ae.associate(HOST, server.address[1], ae_title="DICOMROUTER")
    assert assoc.is_established
    accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
    expected = {PRIVATE_CLASS, CTImageStorage} if accept else {CTImageStorage}
    assert accepted == expected
    if accept:
        assert assoc.send_c_store(_private_object(source)).Status == 0
    assoc.release()
    stored_classes = [sop_class for sop_class, _uid, _content in service.stored]
    assert stored_classes == ([PRIVATE_CLASS] if accept else [])


def test_dcmtk_echoscu_and_storescu(acceptor, tmp_path: Path) -> None:
    require_peers()
    server, service, _tmp = acceptor
    port = str(server.address[1])
    echo = subprocess.run(
        [dcmtk_tool("echoscu"), "-aec", "DICOMROUTER", HOST, port],
        env=dcmtk_env(),
        capture_output=True,
        timeout=30,
    )
    assert echo.returncode == 0, echo.stderr
    sources = make_small_study(tmp_path / "src", 2)
    store = subprocess.run(
        [dcmtk_tool("storescu"), "-aec", "DICOMROUTER", HOST, port, *map(str, sources)],
        env=dcmtk_env(),
        capture_output=True,
        timeout=30,
    )
    assert store.returncode == 0, store.stderr
    assert {uid for _c, uid, _d in service.stored} == {
        str(dcmread(p).SOPInstanceUID) for p in sources
    }


# -- refusals -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "settings", "expected", "reason"),
    [
        ({"called": "SOMEONE"}, {}, (1, 1, 7), "called AE title"),
        ({"calling": "CT9"}, {"allowed_callers": frozenset({"CT1"})}, (1, 1, 3), "allowed_callers"),
    ],
)
def test_rejections_carry_the_standard_reason(
    acceptor,
    options: dict[str, str],
    settings: dict[str, object],
    expected: tuple[int, int, int],
    reason: str,
) -> None:
    server, service, _tmp = acceptor
    server.test_settings["value"] = AcceptorSettings(ae_title="DICOMROUTER", **settings)  # type: ignore[arg-type]
    peer = RawPeer(server.address[1])
    peer.send(associate_rq(**options))
    pdu_type, body = peer.receive()
    assert pdu_type == PduType.A_ASSOCIATE_RJ
    assert tuple(body[1:4]) == expected
    assert reason in service.rejected[0][1]
    assert service.established == []
    peer.close()


def _answer_to_protocol_version(server, version: int) -> tuple[int, bytes]:  # type: ignore[no-untyped-def]
    """The acceptor's answer to an A-ASSOCIATE-RQ carrying ``version``."""
    request = bytearray(associate_rq())
    request[6:8] = version.to_bytes(2, "big")
    peer = RawPeer(server.address[1])
    peer.send(bytes(request))
    try:
        return peer.receive()
    finally:
        peer.close()


def test_protocol_version_and_association_limit(acceptor) -> None:
    server, service, _tmp = acceptor
    pdu_type, body = _answer_to_protocol_version(server, 0x0002)
    assert (pdu_type, tuple(body[1:4])) == (PduType.A_ASSOCIATE_RJ, (1, 2, 2))
    # max_associations is 2: a third concurrent association is refused, transiently.
    first, second = RawPeer(server.address[1]), RawPeer(server.address[1])
    first.associate()
    second.associate()
    third = RawPeer(server.address[1])
    third.send(associate_rq())
    pdu_type, body = third.receive()
    assert (pdu_type, tuple(body[1:4])) == (PduType.A_ASSOCIATE_RJ, (2, 3, 2))
    assert "max_associations" in service.rejected[-1][1]
    for peer in (first, second, third):
        peer.close()


def test_a_released_association_frees_its_slot_before_the_peer_closes(acceptor) -> None:
    """The acceptor waits up to a second for the peer to close after A-RELEASE-RP or
    A-ASSOCIATE-RJ; meanwhile neither counts toward max_associations (2 here)."""
    server, service, _tmp = acceptor
    first, second = RawPeer(server.address[1]), RawPeer(server.address[1])
    first.associate()
    second.associate()
    refused = RawPeer(server.address[1])
    refused.send(associate_rq())
    assert refused.receive()[0] == PduType.A_ASSOCIATE_RJ  # and it stays connected
    second.send(ul.release_rq())
    assert second.receive()[0] == PduType.A_RELEASE_RP  # and it stays connected too
    third = RawPeer(server.address[1])
    third.associate()  # within the ARTIM second of both lingering connections
    assert len(service.rejected) == 1
    for peer in (first, second, refused, third):
        peer.close()


def test_protocol_version_with_bit_0_set_is_accepted(acceptor) -> None:
    """PS3.8 9.3.2: the acceptor tests only bit 0 of the protocol version."""
    server, _service, _tmp = acceptor
    assert _answer_to_protocol_version(server, 0x0003)[0] == PduType.A_ASSOCIATE_AC


def test_the_requestors_preferred_transfer_syntax_is_accepted(acceptor) -> None:
    """Several transfer syntaxes in one context: the first of the requestor's that we
    accept, not the first of our list (which starts uncompressed)."""
    server, _service, _tmp = acceptor
    mpeg2 = "1.2.840.10008.1.2.4.100"  # not accepted by us
    offers: list[list[str]] = [
        [JPEG2000Lossless, ExplicitVRLittleEndian, ImplicitVRLittleEndian],
        [ImplicitVRLittleEndian, ExplicitVRLittleEndian],
        [mpeg2, JPEGLosslessSV1, ExplicitVRLittleEndian],
    ]
    contexts = [(2 * k + 1, CTImageStorage, offer) for k, offer in enumerate(offers)]
    peer = RawPeer(server.address[1])
    accepted = peer.associate(contexts=contexts)
    assert accepted == {
        1: (0, JPEG2000Lossless),
        3: (0, ImplicitVRLittleEndian),
        5: (0, JPEGLosslessSV1),
    }
    peer.close()


def test_idle_connections_do_not_take_association_slots(acceptor) -> None:
    """Only established associations count toward max_associations (2 here): TCP
    connections that never send an A-ASSOCIATE-RQ must not lock modalities out."""
    server, service, _tmp = acceptor
    idle = [socket.create_connection(server.address) for _ in range(3)]
    time.sleep(0.2)  # all three accepted and waiting for their request
    first, second = RawPeer(server.address[1]), RawPeer(server.address[1])
    first.associate()
    second.associate()
    assert service.rejected == []
    for sock in idle:
        sock.close()
    first.close()
    second.close()


def test_connections_waiting_to_associate_are_capped(acceptor, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Beyond PENDING_PER_ASSOCIATION x max_associations connections that have not
    associated yet, new ones are closed at once (no thread each); established
    associations and their slots are unaffected."""
    from dicomrouter.dicomnet import server as server_module

    monkeypatch.setattr(server_module, "PENDING_PER_ASSOCIATION", 1)  # cap: 2
    server, _service, _tmp = acceptor
    established = RawPeer(server.address[1])
    established.associate()
    idle = [RawPeer(server.address[1]) for _ in range(2)]
    time.sleep(0.2)
    extra = RawPeer(server.address[1])
    assert extra.closed()  # the third connection waiting to associate
    idle[0].close()
    _wait(lambda: sum(1 for c in server._active.values() if not c.established) < 2)
    late = RawPeer(server.address[1])
    late.associate()  # room again, and a slot (2 allowed, 1 taken)
    for peer in (established, *idle, extra, late):
        peer.close()


def test_associations_per_source_address_are_capped(acceptor) -> None:
    """dicom.max_associations_per_host (1 here): a second association from the same
    address is refused, transiently, while another address still gets one."""
    server, service, _tmp = acceptor
    server.test_settings["value"] = replace(
        server.test_settings["value"], max_associations_per_host=1
    )
    first = RawPeer(server.address[1])
    first.associate()
    second = RawPeer(server.address[1])
    second.send(associate_rq())
    pdu_type, body = second.receive()
    assert (pdu_type, tuple(body[1:4])) == (PduType.A_ASSOCIATE_RJ, (2, 3, 2))
    assert service.rejected[-1][1] == "dicom.max_associations_per_host reached"
    other = RawPeer(server.address[1], source="127.0.0.2")
    other.associate()
    for peer in (first, second, other):
        peer.close()


def test_one_address_cannot_take_every_place_to_negotiate(acceptor) -> None:
    """Connections waiting to associate are capped per source address too
    (max_associations_per_host, 2 here): a third idle connection from 127.0.0.2
    is closed at once, while 127.0.0.1 still associates. The refusals are reported
    once, with their count, not once per connection."""
    server, service, _tmp = acceptor
    server.test_settings["value"] = replace(
        server.test_settings["value"], max_associations_per_host=2
    )
    idle = [RawPeer(server.address[1], source="127.0.0.2") for _ in range(2)]
    _wait(lambda: sum(1 for c in server._active.values() if c.host == "127.0.0.2") == 2)
    extra = [RawPeer(server.address[1], source="127.0.0.2") for _ in range(5)]
    for peer in extra:
        assert peer.closed()
    modality = RawPeer(server.address[1])
    modality.associate()
    assert service.rejected == []
    (report,) = service.refused  # the first refusal at once; the other four are counted
    assert report[0] == "127.0.0.2" and report[2] == 1
    assert "dicom.max_associations_per_host" in report[1]
    for peer in (*idle, *extra, modality):
        peer.close()


def test_an_association_request_trickled_byte_by_byte_is_cut_at_acse_timeout(acceptor) -> None:
    """ARTIM bounds the whole request (acse_timeout is 2 s here), not each wait for
    a byte: a peer sending one byte every 0.3 s is closed after ~2 s."""
    server, _service, _tmp = acceptor
    request = associate_rq()
    peer = RawPeer(server.address[1])
    started = time.monotonic()
    closed_after = None
    for byte in request[:-1]:
        try:
            peer.send(bytes([byte]))
        except OSError:
            closed_after = time.monotonic() - started
            break
        time.sleep(0.3)
        if time.monotonic() - started > 6:
            break
    if closed_after is None:
        assert peer.closed()
        closed_after = time.monotonic() - started
    assert 1.5 < closed_after < 4.5, closed_after
    peer.close()


def test_a_connection_that_cannot_get_a_thread_does_not_stop_the_listener(
    acceptor, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    """Thread.start failing (out of threads) closes that one connection; the accept
    loop goes on and the slot bookkeeping stays right."""
    server, service, _tmp = acceptor
    real_start = threading.Thread.start
    failures = []

    def start_once_failing(self: threading.Thread) -> None:
        if self.name.startswith("assoc-") and not failures:
            failures.append(self.name)
            raise RuntimeError("can't start new thread")
        real_start(self)

    monkeypatch.setattr(threading.Thread, "start", start_once_failing)
    unlucky = RawPeer(server.address[1])
    assert unlucky.closed()
    assert failures
    first, second = RawPeer(server.address[1]), RawPeer(server.address[1])
    first.associate()
    second.associate()  # no stale entry holds one of the two slots
    assert service.rejected == []
    for peer in (unlucky, first, second):
        peer.close()


def test_refused_source_address_is_closed_before_anything_is_read(acceptor) -> None:
    server, service, _tmp = acceptor
    service.allowed = False
    peer = RawPeer(server.address[1])
    assert peer.closed()
    service.allowed = True
    RawPeer(server.address[1]).associate()


# -- broken peers -----------------------------------------------------------------------------


def _object_in_progress(server, tmp_dir: Path, tmp_path: Path, half: bool) -> RawPeer:  # type: ignore[no-untyped-def]
    """A raw peer that has sent a C-STORE-RQ and part of its data set (half of it,
    or the first 100 bytes), once the object's temporary file exists."""
    (source,) = make_small_study(tmp_path / "src", 1)
    uid, data = data_set_bytes(source)
    peer = RawPeer(server.address[1])
    peer.associate()
    peer.command(1, store_rq(uid))
    peer.command(1, data[: len(data) // 2 if half else 100], control=0x00)
    _wait(lambda: leftovers(tmp_dir) != [])  # the object is being received
    return peer


def _stored_then_broken(acceptor, tmp_path: Path, breaker) -> None:  # type: ignore[no-untyped-def]
    """Send half an object, let ``breaker(peer)`` misbehave, and check nothing was
    stored or left in tmp and that the association ended as aborted."""
    server, service, tmp_dir = acceptor
    peer = _object_in_progress(server, tmp_dir, tmp_path, half=True)
    breaker(peer)
    assert service.ended_event.wait(5)
    assert service.ended[0][1] is True
    assert service.stored == []
    _wait(lambda: leftovers(tmp_dir) == [])
    # The acceptor still serves the next caller.
    RawPeer(server.address[1]).associate()


def test_a_abort_mid_object_discards_it(acceptor, tmp_path: Path) -> None:
    def abort(peer: RawPeer) -> None:
        peer.send(ul.abort(AbortSource.SERVICE_USER))

    _stored_then_broken(acceptor, tmp_path, abort)


def test_dropped_connection_mid_object_discards_it(acceptor, tmp_path: Path) -> None:
    _stored_then_broken(acceptor, tmp_path, RawPeer.close)


def test_stall_mid_object_is_aborted_after_dimse_timeout(acceptor, tmp_path: Path) -> None:
    def stall(peer: RawPeer) -> None:
        started = time.monotonic()
        pdu_type, _body = peer.receive()  # the acceptor gives up after 1 s
        assert pdu_type == PduType.A_ABORT
        assert 0.8 < time.monotonic() - started < 4

    _stored_then_broken(acceptor, tmp_path, stall)


def test_idle_association_is_aborted_after_network_timeout(acceptor) -> None:
    server, service, _tmp = acceptor
    peer = RawPeer(server.address[1])
    peer.associate()
    assert peer.receive()[0] == PduType.A_ABORT
    assert service.ended_event.wait(5) and service.ended[0][1] is True


@pytest.mark.parametrize(
    ("send", "reason"),
    [
        (lambda: ul.p_data(1, 0x02, b"\x00" * 10), AbortReason.INVALID_PDU_PARAMETER),  # no command
        (lambda: ul.p_data(9, 0x03, b"\x00" * 10), AbortReason.INVALID_PDU_PARAMETER),  # context 9
        (lambda: struct.pack(">BxL", 0x0A, 2) + b"xx", AbortReason.UNRECOGNIZED_PDU),
        (lambda: associate_rq(), AbortReason.UNEXPECTED_PDU),  # a second A-ASSOCIATE-RQ
        (lambda: ul.p_data(1, 0x03, b"\x01\x00\x00"), AbortReason.INVALID_PDU_PARAMETER),
        (lambda: struct.pack(">BxLLBB", 4, 6, 1, 1, 3), AbortReason.INVALID_PDU_PARAMETER),
    ],
    ids=[
        "data-without-command",
        "unknown-context",
        "unknown-pdu",
        "second-rq",
        "bad-command",
        "pdv-length-below-2",
    ],
)
def test_protocol_violations_end_in_a_abort(acceptor, send, reason: int) -> None:  # type: ignore[no-untyped-def]
    server, service, _tmp = acceptor
    peer = RawPeer(server.address[1])
    peer.associate()
    peer.send(send())
    pdu_type, body = peer.receive()
    assert pdu_type == PduType.A_ABORT
    assert body[2:4] == bytes((AbortSource.SERVICE_PROVIDER, reason))
    assert peer.closed()
    assert service.ended_event.wait(5) and service.ended[0][1] is True


def test_first_pdu_must_be_an_association_request(acceptor) -> None:
    server, service, _tmp = acceptor
    peer = RawPeer(server.address[1])
    peer.send(ul.p_data(1, 0x03, b""))
    assert peer.receive()[0] == PduType.A_ABORT
    garbage = RawPeer(server.address[1])
    garbage.send(struct.pack(">BxL", PduType.A_ASSOCIATE_RQ, 20) + b"\xff" * 20)
    assert garbage.receive()[0] == PduType.A_ABORT
    assert service.established == [] and service.ended == []
    RawPeer(server.address[1]).associate()


def test_an_abort_before_the_association_request_is_no_error(
    acceptor, caplog: pytest.LogCaptureFixture
) -> None:  # type: ignore[no-untyped-def]
    """PS3.8 Sta2 + A-ABORT (AA-2): the connection just closes; nothing is logged as
    an error and the listener serves the next caller."""
    server, service, _tmp = acceptor
    peer = RawPeer(server.address[1])
    peer.send(ul.abort(AbortSource.SERVICE_USER))
    assert peer.closed()
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]
    assert service.established == [] and service.ended == []
    RawPeer(server.address[1]).associate()


def test_operations_we_do_not_provide_get_a_status_not_an_abort(acceptor, tmp_path: Path) -> None:
    server, service, tmp_dir = acceptor
    (source,) = make_small_study(tmp_path / "src", 1)
    uid, data = data_set_bytes(source)
    peer = RawPeer(server.address[1])
    peer.associate(contexts=[(1, CTImageStorage, ExplicitVRLittleEndian)])
    # A C-FIND-RQ (command field 0x0020) with an identifier on a storage context.
    command = store_rq(uid, message_id=3).replace(
        struct.pack("<HHLH", 0, 0x0100, 2, 0x0001), struct.pack("<HHLH", 0, 0x0100, 2, 0x0020)
    )
    peer.command(1, command)
    peer.command(1, b"\x08\x00\x52\x00\x06\x00\x00\x00STUDY ", control=0x02)
    response = peer.response()
    assert response.status == 0x0211
    assert response.command_field == 0x8020
    # A C-STORE whose SOP class is not the context's: refused, association goes on.
    mr_request = store_rq(uid, message_id=4, sop_class="1.2.840.10008.5.1.4.1.1.4")
    assert peer.store(mr_request, data).status == 0x0122
    assert peer.store(store_rq(uid, message_id=5), data).status == 0
    assert [uid for _c, uid, _d in service.stored] == [uid]
    assert leftovers(tmp_dir) == []
    peer.close()


def test_stop_cuts_open_associations_and_removes_partial_files(acceptor, tmp_path: Path) -> None:
    server, service, tmp_dir = acceptor
    peer = _object_in_progress(server, tmp_dir, tmp_path, half=False)
    server.stop()
    assert leftovers(tmp_dir) == []
    assert service.ended[0][1] is True
    assert peer.closed()


# -- the command set codec --------------------------------------------------------------------


def test_response_encoding_matches_pynetdicom() -> None:
    """Our C-STORE-RSP bytes are what pynetdicom's own encoder produces."""
    from pynetdicom.dimse_messages import C_STORE_RSP
    from pynetdicom.dimse_primitives import C_STORE

    for status, comment in ((0x0000, None), (0xA700, "storage is full"), (0xC001, "odd")):
        primitive = C_STORE()
        primitive.MessageIDBeingRespondedTo = 12
        primitive.AffectedSOPClassUID = CTImageStorage
        primitive.AffectedSOPInstanceUID = "1.2.3.45"
        primitive.Status = status
        if comment:
            primitive.ErrorComment = comment
        message = C_STORE_RSP()
        message.primitive_to_message(primitive)
        expected = b"".join(
            data[1:]
            for p_data in message.encode_msg(1, 16382)
            for _cx, data in p_data.presentation_data_value_list
            if data[0] & 0x01
        )
        request = Command.request(CommandField.C_STORE_RQ, 12, CTImageStorage, "1.2.3.45", True)
        ours = request.response(status, comment).encode()
        assert ours == expected


def test_disk_full_mid_object_answers_out_of_resources(
    acceptor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write that fails (ENOSPC) while a large object streams in: the rest of the
    data set is read and dropped, the sender gets 0xA700 and the association goes on."""
    import errno
    import os

    from dicomrouter.receive import spool

    server, service, tmp_dir = acceptor
    (source,) = make_study(tmp_path / "src", 1, rows=1024, cols=1024)
    uid, data = data_set_bytes(source)

    class FullDisk:
        def __getattr__(self, name: str) -> object:
            return getattr(os, name)

        @staticmethod
        def write(fd: int, data: object) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(spool, "os", FullDisk())
    peer = RawPeer(server.address[1])
    peer.associate()
    response = peer.store(store_rq(uid), data)
    assert response.status == 0xA700
    assert response.error_comment == "storage is full"
    assert service.stored == [] and leftovers(tmp_dir) == []
    monkeypatch.undo()
    assert peer.store(store_rq(uid, message_id=2), data).status == 0
    peer.close()
