"""The P-DATA-TF fragmenter (dicomnet.pdu): ``fragments``, ``message`` and
``send_file_message``.

What is proven: whatever the peer's maximum PDU length (4096, 16382, or 0 for
"unlimited", where fragments stay within ``UNLIMITED_FRAGMENT`` so memory is
bounded), no P-DATA-TF PDU exceeds it, each PDU holds one PDV with the right
context and control bits (command bit on command fragments, "last" bit on the
last fragment of the command and of the data set only), the fragments reassemble
to the original bytes, and fragments are as large as the limit allows (a limit
that is respected only by sending tiny PDUs would also pass a "never longer"
check). An empty data set is one empty PDV with the "last" bit.

The limit is on the PDU's variable field, i.e. its PDU-length field (PS3.8 D.1:
"maximum length of the variable field of the P-DATA-TF PDUs"): the 6-byte PDU
header is not counted, the 6 bytes of PDV header are.

``send_file_message`` is read off a real ``socket.socketpair``: the bytes on the
wire, the file read from ``offset``, in blocks of ``SEND_BLOCK``.
"""

from __future__ import annotations

import socket
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from dicomrouter.dicomnet import pdu
from dicomrouter.dicomnet.command import Command
from dicomrouter.dicomnet.constants import CommandField, PduType, PdvControl

COMMAND = Command.request(
    CommandField.C_STORE_RQ, 3, "1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", with_data_set=True
).encode()
LIMITS = [4096, 16382, 0]


@dataclass(frozen=True)
class Pdv:
    pdu_length: int  # the PDU-length field: what the peer's limit bounds
    context_id: int
    control: int
    value: bytes


def parse(wire: bytes) -> list[Pdv]:
    """Every PDU in ``wire``, each required to be a P-DATA-TF of exactly one PDV."""
    pdvs, offset = [], 0
    while offset < len(wire):
        pdu_type, length = struct.unpack_from(">BxL", wire, offset)
        assert pdu_type == PduType.P_DATA_TF
        item_length, context_id, control = struct.unpack_from(">LBB", wire, offset + 6)
        assert item_length + 4 == length, "one PDV per PDU, filling it"
        start = offset + 12
        pdvs.append(Pdv(length, context_id, control, wire[start : start + item_length - 2]))
        offset += 6 + length
    assert offset == len(wire)
    return pdvs


def check_message(pdvs: list[Pdv], limit: int, context_id: int, data: bytes | None) -> None:
    """The PDVs are ``COMMAND`` then ``data``, correctly marked, within ``limit``,
    and each fragment but the last of a part is as large as the limit allows."""
    bound = limit - pdu.PDV_OVERHEAD if limit else pdu.UNLIMITED_FRAGMENT
    for pdv in pdvs:
        assert pdv.context_id == context_id
        if limit:
            assert pdv.pdu_length <= limit
        assert len(pdv.value) <= bound
    commands = [p for p in pdvs if p.control & PdvControl.COMMAND]
    datas = [p for p in pdvs if not p.control & PdvControl.COMMAND]
    assert pdvs[: len(commands)] == commands, "the command comes first"
    for part, expected in ((commands, COMMAND), (datas, data)):
        if expected is None:
            assert part == []
            continue
        assert b"".join(p.value for p in part) == expected
        assert [bool(p.control & PdvControl.LAST) for p in part] == [False] * (len(part) - 1) + [
            True
        ]
        assert all(len(p.value) == min(bound, len(expected)) for p in part[:-1])
        assert len(part) == max(1, -(-len(expected) // min(bound, max(len(expected), 1))))


def data_of(length: int) -> bytes:
    return bytes(i * 7 % 251 for i in range(length))


def lengths_for(limit: int) -> list[int]:
    fragment = limit - pdu.PDV_OVERHEAD if limit else pdu.UNLIMITED_FRAGMENT
    return [0, 1, fragment - 1, fragment, fragment + 1, 3 * fragment + 17]


@pytest.mark.parametrize("limit", LIMITS)
def test_message_within_the_limit(limit: int) -> None:
    for length in lengths_for(limit):
        data = data_of(length)
        wire = b"".join(bytes(b) for b in pdu.message(5, COMMAND, data, limit))
        check_message(parse(wire), limit, 5, data)


@pytest.mark.parametrize("limit", LIMITS)
def test_message_without_a_data_set(limit: int) -> None:
    wire = b"".join(bytes(b) for b in pdu.message(1, COMMAND, None, limit))
    pdvs = parse(wire)
    check_message(pdvs, limit, 1, None)
    assert len(pdvs) == 1 and pdvs[0].control == PdvControl.COMMAND | PdvControl.LAST


def test_an_empty_data_set_is_one_empty_last_pdv() -> None:
    pdvs = parse(b"".join(bytes(b) for b in pdu.message(3, COMMAND, b"", 4096)))
    assert pdvs[-1] == Pdv(6, 3, PdvControl.LAST, b"")
    assert len(pdvs) == 2


def test_fragments_not_last_of_message() -> None:
    pdvs = parse(
        b"".join(
            bytes(b) for b in pdu.fragments(1, b"x" * 25, 10, command=False, last_of_message=False)
        )
    )
    assert [len(p.value) for p in pdvs] == [10, 10, 5]
    assert all(p.control == 0 for p in pdvs)


def test_fragments_do_not_copy_the_data() -> None:
    data = bytearray(b"abcdefgh" * 100)
    buffers = pdu.fragments(1, data, 300, command=False)
    slices = buffers[1::2]
    assert all(isinstance(s, memoryview) and s.obj is data for s in slices)


def test_an_unlimited_peer_gets_bounded_fragments() -> None:
    assert pdu.fragment_size(0, 10) == 10
    assert pdu.fragment_size(0, 0) == 1
    assert pdu.fragment_size(0, 50 * 1024 * 1024) == pdu.UNLIMITED_FRAGMENT
    assert pdu.fragment_size(2**32 - 1, 10) == pdu.UNLIMITED_FRAGMENT  # "gigabytes"
    assert pdu.fragment_size(4096, 10) == 4090


def test_p_data_is_one_pdv() -> None:
    assert pdu.p_data(7, 3, b"ab") == b"\x04\x00\x00\x00\x00\x08\x00\x00\x00\x04\x07\x03ab"


# -- send_file_message on a socket ---------------------------------------------------------


def send_file_and_read(path: Path, offset: int, limit: int) -> bytes:
    """What send_file_message puts on a socket, read by a thread on the other end."""
    ours, theirs = socket.socketpair()
    received = bytearray()

    def drain() -> None:
        while chunk := theirs.recv(1 << 16):
            received.extend(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        ours.settimeout(10)
        pdu.send_file_message(ours, 9, COMMAND, path, offset, limit)
    finally:
        ours.shutdown(socket.SHUT_WR)
        reader.join(10)
        ours.close()
        theirs.close()
    assert not reader.is_alive()
    return bytes(received)


@pytest.mark.parametrize("limit", LIMITS)
def test_send_file_message_within_the_limit(tmp_path: Path, limit: int) -> None:
    fragment = limit - pdu.PDV_OVERHEAD if limit else pdu.UNLIMITED_FRAGMENT
    preamble = b"P" * 132
    # several SEND_BLOCKs, and not a whole number of fragments or blocks
    lengths = [0, 1, fragment, 2 * pdu.SEND_BLOCK + fragment + 3]
    if limit == 0:
        lengths.append(2 * pdu.UNLIMITED_FRAGMENT + 5)
    for length in lengths:
        data = data_of(length)
        path = tmp_path / f"object-{length}.dcm"
        path.write_bytes(preamble + data)
        pdvs = parse(send_file_and_read(path, len(preamble), limit))
        check_message(pdvs, limit, 9, data)


def test_send_file_message_uses_few_system_calls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One sendmsg per block of about SEND_BLOCK bytes, not one per PDU."""
    path = tmp_path / "object.dcm"
    path.write_bytes(data_of(5 * pdu.SEND_BLOCK))
    calls = []
    real = pdu.send_buffers

    def counting(sock: socket.socket, buffers: list[pdu.Buffer]) -> None:
        calls.append(sum(len(b) for b in buffers))
        real(sock, buffers)

    monkeypatch.setattr(pdu, "send_buffers", counting)
    wire = send_file_and_read(path, 0, 16384)
    check_message(parse(wire), 16384, 9, path.read_bytes())
    assert len(calls) <= 6  # 5 blocks and a short one at most
    assert len(wire) == sum(calls)
