"""Raw-socket DICOM peers for the dicomnet tests: just enough of an acceptor, written
from the standard's bytes, to see exactly what our requestor sends and to answer
with what a test needs (a small PDU limit, a request of its own)."""

from __future__ import annotations

import socket
import struct
import threading
from abc import ABC, abstractmethod

from dicomrouter.dicomnet.command import Command
from dicomrouter.dicomnet.constants import PduType, PdvControl
from dicomrouter.dicomnet.negotiation import (
    AssociateAccept,
    AssociateRequest,
    ContextOutcome,
    Identity,
    decode_associate_rq,
    encode_associate_ac,
)
from tests.support.dcmtk import HOST

IDENTITY = Identity("1.2.826.0.1.3680043.9.9999", "TEST")


def recv_exact(sock: socket.socket, length: int) -> bytes:
    data = bytearray()
    while len(data) < length:
        chunk = sock.recv(length - len(data))
        if not chunk:
            raise EOFError(f"connection closed after {len(data)} of {length} bytes")
        data += chunk
    return bytes(data)


def read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    pdu_type, length = struct.unpack(">BxL", recv_exact(sock, 6))
    return pdu_type, recv_exact(sock, length)


def pdvs_of(body: bytes) -> list[tuple[int, int, bytes]]:
    pdvs, offset = [], 0
    while offset < len(body):
        item_length, context_id, control = struct.unpack_from(">LBB", body, offset)
        pdvs.append((context_id, control, body[offset + 6 : offset + 4 + item_length]))
        offset += 4 + item_length
    assert offset == len(body), "PDVs do not fill their PDU"
    return pdvs


def read_message(sock: socket.socket, sizes: list[int]) -> tuple[int, Command, bytes | None] | None:
    """The next DIMSE message (context, command, data set), recording each P-DATA-TF's
    length field in ``sizes``; None for an A-RELEASE-RQ between messages."""
    command, data, decoded = bytearray(), bytearray(), None
    while True:
        pdu_type, body = read_pdu(sock)
        if pdu_type == PduType.A_RELEASE_RQ and not command:
            return None
        assert pdu_type == PduType.P_DATA_TF, f"PDU type 0x{pdu_type:02X} inside a message"
        sizes.append(len(body))
        pdvs = pdvs_of(body)
        for index, (context_id, control, value) in enumerate(pdvs):
            done = False
            if control & PdvControl.COMMAND:
                assert decoded is None, "a command fragment after the command"
                command += value
                if control & PdvControl.LAST:
                    decoded = Command.decode(command)
                    done = not decoded.has_data_set
            else:
                assert decoded is not None, "data before the command"
                data += value
                done = bool(control & PdvControl.LAST)
            if done:
                assert index == len(pdvs) - 1, "two messages in one PDU"
                assert decoded is not None
                return context_id, decoded, bytes(data) if decoded.has_data_set else None


class RawAcceptor(threading.Thread, ABC):
    """Accepts one association, every proposed context in its first transfer syntax,
    announcing ``max_pdu``; then :meth:`serve` plays the rest. An exception in it is
    kept in ``error`` for the test thread to report."""

    def __init__(self, max_pdu: int = 0) -> None:
        super().__init__(daemon=True)
        self.max_pdu = max_pdu
        self.listener = socket.create_server((HOST, 0))
        self.listener.settimeout(10)
        self.port = int(self.listener.getsockname()[1])
        self.request: AssociateRequest | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            conn, _address = self.listener.accept()
            with conn:
                conn.settimeout(10)
                self.request = self._accept(conn)
                self.serve(conn, self.request)
        except BaseException as exc:  # reported by the test thread
            self.error = exc
        finally:
            self.listener.close()

    def _accept(self, conn: socket.socket) -> AssociateRequest:
        pdu_type, body = read_pdu(conn)
        assert pdu_type == PduType.A_ASSOCIATE_RQ
        request = decode_associate_rq(body)
        outcomes = tuple(
            ContextOutcome(c.context_id, 0, c.abstract_syntax, c.transfer_syntaxes[0])
            for c in request.contexts
        )
        conn.sendall(
            encode_associate_ac(request, AssociateAccept(outcomes, self.max_pdu), IDENTITY)
        )
        return request

    @abstractmethod
    def serve(self, conn: socket.socket, request: AssociateRequest) -> None:
        """What the acceptor does once associated (the test's part)."""
