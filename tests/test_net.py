"""pynetdicom/pydicom tuning in dicomrouter.net: cheaper, same bytes, never more
permissive."""

from __future__ import annotations

import copy
import warnings
from io import BytesIO
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest.mock import patch

import pytest
from pydicom import config as pydicom_config
from pydicom.data import get_testdata_file
from pydicom.filereader import read_file_meta_info
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID
from pynetdicom import (
    PYNETDICOM_IMPLEMENTATION_UID,
    PYNETDICOM_IMPLEMENTATION_VERSION,
    dimse_messages,
    dsutils,
)
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_STORE_RQ, C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import create_file_meta, split_dataset
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_primitives import P_DATA

from dicomrouter import net
from dicomrouter.store import InstanceHeader, InvalidUID, read_header


@pytest.fixture
def no_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    """install_no_value_validation() for one test; pydicom's settings are restored."""
    settings = pydicom_config.settings
    monkeypatch.setattr(settings, "reading_validation_mode", settings.reading_validation_mode)
    monkeypatch.setattr(settings, "writing_validation_mode", settings.writing_validation_mode)
    monkeypatch.setattr(net, "_validation_off", False)
    net.install_no_value_validation()


@pytest.mark.usefixtures("no_validation")
def test_value_validation_off_still_refuses_bad_uids(tmp_path: Path) -> None:
    assert pydicom_config.settings.reading_validation_mode == pydicom_config.IGNORE
    assert pydicom_config.settings.writing_validation_mode == pydicom_config.IGNORE
    source = read_header(get_testdata_file("CT_small.dcm"))
    for keyword in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        dataset = copy.deepcopy(source)
        dataset[keyword].value = "1.2.3/../../etc"
        path = tmp_path / f"{keyword}.dcm"
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # pydicom no longer even warns
            dataset.save_as(path, enforce_file_format=True)
            header = read_header(path, identity_only=True)
        with pytest.raises(InvalidUID, match=keyword):
            InstanceHeader.from_dataset(header)


_UIDS = [
    ("1.2.840.10008.5.1.4.1.1.2", "1.2.3", "1.2.840.10008.1.2.1"),  # odd, even, odd
    ("1.2", "1.23", "1.2.840.10008.1.2"),
    ("1.2.840.10008.5.1.4.1.1.7", "9" * 64, "1.2.840.10008.1.2.4.50"),
    ("1.2.3.4", "1.2.3.4.5", "1.2.840.10008.1.2.2"),
]


@pytest.mark.parametrize(("sop_class", "sop_instance", "syntax"), _UIDS)
@pytest.mark.parametrize(
    ("implementation_uid", "version"),
    [
        (PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION),
        ("1.2.3.44", "ODD"),
    ],
)
def test_encode_file_meta_matches_pydicom(
    sop_class: str, sop_instance: str, syntax: str, implementation_uid: str, version: str
) -> None:
    expected = BytesIO()
    write_file_meta_info(
        expected,
        create_file_meta(
            sop_class_uid=UID(sop_class),
            sop_instance_uid=UID(sop_instance),
            transfer_syntax=UID(syntax),
            implementation_uid=UID(implementation_uid),
            implementation_version=version,
        ),
    )
    encoded = net.encode_file_meta(sop_class, sop_instance, syntax, implementation_uid, version)
    assert encoded == expected.getvalue()


@pytest.fixture
def fast_file_meta(monkeypatch: pytest.MonkeyPatch) -> None:
    """install_fast_file_meta() for one test; pynetdicom's functions are restored."""
    for name in ("create_file_meta", "write_file_meta_info"):
        monkeypatch.setattr(dimse_messages, name, getattr(dimse_messages, name))
    monkeypatch.setattr(net, "_fast_file_meta", False)
    net.install_fast_file_meta()


@pytest.mark.usefixtures("fast_file_meta")
def test_received_file_meta_is_what_pydicom_writes(tmp_path: Path) -> None:
    """Through the patched names pynetdicom's DIMSE decoder calls: same bytes, and a
    file that pydicom reads back with the same File Meta."""
    sop_class, sop_instance, syntax = _UIDS[0]
    patched = BytesIO()
    dimse_messages.write_file_meta_info(
        patched,
        dimse_messages.create_file_meta(
            sop_class_uid=UID(sop_class),
            sop_instance_uid=UID(sop_instance),
            transfer_syntax=UID(syntax),
        ),
    )
    expected = BytesIO()
    write_file_meta_info(
        expected,
        create_file_meta(
            sop_class_uid=UID(sop_class),
            sop_instance_uid=UID(sop_instance),
            transfer_syntax=UID(syntax),
        ),
    )
    assert patched.getvalue() == expected.getvalue()
    path = tmp_path / "x.dcm"
    path.write_bytes(b"\0" * 128 + b"DICM" + patched.getvalue())
    meta = read_file_meta_info(path)
    assert meta.MediaStorageSOPInstanceUID == sop_instance
    assert meta.TransferSyntaxUID == syntax


@pytest.mark.usefixtures("fast_file_meta")
def test_empty_uid_in_file_meta_is_still_refused_by_pydicom() -> None:
    """pynetdicom relies on pydicom refusing an empty required element; so do we."""
    meta = dimse_messages.create_file_meta(
        sop_class_uid=UID(""),
        sop_instance_uid=UID("1.2.3"),
        transfer_syntax=UID("1.2.840.10008.1.2"),
    )
    with pytest.raises(AttributeError, match="Media Storage SOP Class UID"):
        dimse_messages.write_file_meta_info(BytesIO(), meta)


def _store_response(status: int, **values: object) -> C_STORE:
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = values.pop("message_id", 7)
    rsp.AffectedSOPClassUID = values.pop("sop_class", "1.2.840.10008.5.1.4.1.1.2")
    sop_instance = values.pop("sop_instance", "1.2.3")
    if sop_instance is not None:
        rsp.AffectedSOPInstanceUID = sop_instance
    rsp.Status = status
    for name, value in values.items():
        setattr(rsp, name, value)
    return rsp


def _pynetdicom_encoding(rsp: C_STORE) -> bytes:
    message = C_STORE_RSP()
    message.primitive_to_message(rsp)
    (pdata,) = list(message.encode_msg(1, 0))
    ((_, pdv),) = pdata.presentation_data_value_list
    assert pdv[0] == 0x03  # command, last fragment
    return pdv[1:]


@pytest.mark.parametrize("status", [0x0000, 0xB000, 0xA700, 0xC001, 0xFFFF])
@pytest.mark.parametrize("sop_instance", ["1.2.3", "1.2.34", "9" * 64, None])
@pytest.mark.parametrize("message_id", [1, 0xFFFF])
def test_encode_store_response_matches_pynetdicom(
    status: int, sop_instance: str | None, message_id: int
) -> None:
    rsp = _store_response(status, sop_instance=sop_instance, message_id=message_id)
    assert net.encode_store_response(rsp) == _pynetdicom_encoding(rsp)


def test_store_responses_with_optional_elements_are_left_to_pynetdicom() -> None:
    assert net.encode_store_response(_store_response(0xC000, ErrorComment="bad")) is None
    assert net.encode_store_response(_store_response(0xA900, OffendingElement=[0x00100010])) is None


@pytest.fixture
def original_send_msg(monkeypatch: pytest.MonkeyPatch) -> Any:
    """install_fast_store_response() for one test; returns pynetdicom's send_msg,
    which is restored afterwards."""
    original = DIMSEServiceProvider.send_msg
    monkeypatch.setattr(DIMSEServiceProvider, "send_msg", original)
    monkeypatch.setattr(net, "_fast_store_response", False)
    net.install_fast_store_response()
    return original


class _Socket:
    """Stands in for the DUL's AssociationSocket: decodes what is written straight
    to it with pynetdicom's own P-DATA-TF decoder."""

    def __init__(self, capture: _Capture) -> None:
        self.capture = capture

    def send(self, data: bytes) -> None:
        pdu = P_DATA_TF()
        pdu.decode(data)
        self.capture.sent.append(pdu.to_primitive())
        self.capture.direct += 1


class _Capture:
    """Stands in for the DIMSE provider's association and DUL."""

    def __init__(self, handlers: list[object], state: str = "Sta6") -> None:
        self.sent: list[P_DATA] = []
        self.handlers = handlers
        self.events: list[object] = []
        self.socket = _Socket(self)
        self.state_machine = SimpleNamespace(current_state=state)
        self.direct = 0

    def get_handlers(self, event: object) -> list[object]:
        return self.handlers

    def _abort_nonblocking(self) -> None:  # pynetdicom's trigger() swaps these in
        pass

    def _abort_blocking(self) -> None:
        pass

    def send_pdu(self, pdata: P_DATA) -> None:
        self.sent.append(pdata)


def _send(
    method: Any,
    primitive: C_STORE,
    max_pdu: int,
    handlers: list[object],
    state: str = "Sta6",
    capture: _Capture | None = None,
) -> list[list[tuple[int, bytes]]]:
    """The P-DATA that DIMSEServiceProvider.send_msg (``method``) hands to the DUL
    or writes to its socket."""
    capture = capture or _Capture(handlers, state)
    provider = DIMSEServiceProvider.__new__(DIMSEServiceProvider)
    with (
        patch.object(DIMSEServiceProvider, "assoc", capture),
        patch.object(DIMSEServiceProvider, "dul", capture),
        patch.object(DIMSEServiceProvider, "maximum_pdu_size", max_pdu),
    ):
        method(provider, primitive, 5)
    return [list(p.presentation_data_value_list) for p in capture.sent]


@pytest.mark.parametrize(
    ("rsp", "max_pdu", "fast"),
    [
        (_store_response(0x0000), 0, True),
        (_store_response(0x0000), 16382, True),
        (_store_response(0xB000, sop_instance=None), 16382, True),
        (_store_response(0x0000), 64, False),  # does not fit one PDU
        (_store_response(0xC000, ErrorComment="unreadable"), 0, False),
    ],
)
def test_send_msg_sends_the_same_pdus_as_pynetdicom(
    original_send_msg: Any, rsp: C_STORE, max_pdu: int, fast: bool
) -> None:
    def send(method: Any, handlers: list[object]) -> list[list[tuple[int, bytes]]]:
        return _send(method, rsp, max_pdu, handlers)

    reference = send(original_send_msg, [])
    built: list[object] = []
    to_message = C_STORE_RSP.primitive_to_message

    def counting(message: C_STORE_RSP, primitive: C_STORE) -> None:
        built.append(message)
        to_message(message, primitive)

    with patch.object(C_STORE_RSP, "primitive_to_message", counting):
        assert send(DIMSEServiceProvider.send_msg, []) == reference
    assert len(built) == (0 if fast else 1)  # the fast path builds no DIMSE message
    # A handler bound to EVT_DIMSE_SENT gets pynetdicom's message object: its path.
    calls: list[object] = []
    handler = [(lambda event: calls.append(event.message), None)]
    assert send(DIMSEServiceProvider.send_msg, handler) == reference
    assert len(calls) == 1 and isinstance(calls[0], C_STORE_RSP)


def _store_request(path: str, offset: int, **values: object) -> C_STORE:
    """A C-STORE-RQ as ``send_c_store(path)`` builds it in chunked mode."""
    req = C_STORE()
    req.MessageID = values.pop("message_id", 3)
    req.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    req.AffectedSOPInstanceUID = values.pop("sop_instance", "1.2.3.4")
    req.Priority = values.pop("priority", 2)
    for name, value in values.items():
        setattr(req, name, value)
    req._dataset_path = (Path(path), offset)
    return req


@pytest.mark.parametrize("max_pdu", [0, 16382, 4096, 1000])
@pytest.mark.parametrize(
    "values",
    [
        {},
        {"sop_instance": "1.2.34", "message_id": 0xFFFF, "priority": 0},
        {"MoveOriginatorApplicationEntityTitle": "MOVER", "MoveOriginatorMessageID": 5},
    ],
)
def test_store_requests_from_files_send_the_same_pdus(
    original_send_msg: Any, max_pdu: int, values: dict[str, object]
) -> None:
    path = get_testdata_file("CT_small.dcm")
    req = _store_request(path, 332, **dict(values))
    fast = "MoveOriginatorApplicationEntityTitle" not in values
    reference = _send(original_send_msg, req, max_pdu, [])
    assert len(reference) > 2 or max_pdu in (0, 16382)
    built: list[object] = []
    to_message = C_STORE_RQ.primitive_to_message

    def counting(message: C_STORE_RQ, primitive: C_STORE) -> None:
        built.append(message)
        to_message(message, primitive)

    with patch.object(C_STORE_RQ, "primitive_to_message", counting):
        assert _send(DIMSEServiceProvider.send_msg, req, max_pdu, []) == reference
    assert len(built) == (0 if fast else 1)


def test_fast_sends_go_straight_to_the_socket_only_when_established(
    original_send_msg: Any,
) -> None:
    """In Sta6 the PDUs are written by the sending thread; in any other state (a
    release or abort under way) they go through the DUL's queue as before."""
    path = get_testdata_file("CT_small.dcm")
    established = _Capture([])
    assert _send(
        DIMSEServiceProvider.send_msg, _store_request(path, 332), 4096, [], capture=established
    )
    assert established.direct == len(established.sent) > 2
    releasing = _Capture([], state="Sta7")
    assert _send(
        DIMSEServiceProvider.send_msg, _store_request(path, 332), 4096, [], capture=releasing
    )
    assert releasing.direct == 0 and len(releasing.sent) > 2


def _rsp_command_set(**values: object) -> bytes:
    """A C-STORE-RSP command set as pynetdicom's own encoder writes it."""
    primitive = C_STORE()
    primitive.MessageIDBeingRespondedTo = values.pop("message_id", 9)
    primitive.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    primitive.AffectedSOPInstanceUID = "1.2.3.4"
    for name, value in values.items():
        setattr(primitive, name, value)
    message = C_STORE_RSP()
    message.primitive_to_message(primitive)
    return b"".join(
        data[1:]
        for p_data in message.encode_msg(1, 0)
        for _cx, data in p_data.presentation_data_value_list
        if data[0] & 0x01
    )


@pytest.mark.parametrize(
    "values",
    [
        {"Status": 0x0000},
        {"Status": 0xB000, "message_id": 0xFFFF},
        {"Status": 0xA700, "ErrorComment": "disk full"},
        {"Status": 0xC000, "ErrorComment": "odd"},
    ],
)
def test_store_responses_decode_as_pynetdicom_does(values: dict[str, object]) -> None:
    ours = net.decode_store_response(_rsp_command_set(**dict(values)))
    message = C_STORE_RSP()
    message.command_set = dsutils.decode(BytesIO(_rsp_command_set(**dict(values))), True, True)
    theirs = message.message_to_primitive()
    for name in (
        "MessageIDBeingRespondedTo",
        "Status",
        "AffectedSOPClassUID",
        "AffectedSOPInstanceUID",
        "ErrorComment",
    ):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.is_valid_response


def test_unusual_store_responses_are_left_to_pynetdicom() -> None:
    assert (
        net.decode_store_response(_rsp_command_set(Status=0xA900, OffendingElement=[0x00100010]))
        is None
    )
    echo_rsp = _rsp_command_set(Status=0).replace(b"\x01\x80", b"\x30\x80", 1)
    assert net.decode_store_response(echo_rsp) is None  # a C-ECHO-RSP
    assert net.decode_store_response(b"\x00\x00\x00\x00\xff\xff") is None  # truncated


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "image_dfl.dcm", "JPEG2000.dcm"])
def test_file_meta_is_read_as_pydicom_reads_it(name: str) -> None:
    path = get_testdata_file(name)
    meta = read_file_meta_info(path)
    sop_class, sop_instance, syntax, offset = net.read_file_meta(path)  # type: ignore[misc]
    assert (sop_class, sop_instance, syntax) == (
        meta.MediaStorageSOPClassUID,
        meta.MediaStorageSOPInstanceUID,
        meta.TransferSyntaxUID,
    )
    assert offset == split_dataset(Path(path))[1]


def test_files_without_the_plain_layout_fall_back(tmp_path: Path) -> None:
    no_preamble = tmp_path / "raw.dcm"
    no_preamble.write_bytes(Path(get_testdata_file("CT_small.dcm")).read_bytes()[128:])
    assert net.read_file_meta(no_preamble) is None
    short = tmp_path / "short.dcm"
    short.write_bytes(b"\x00" * 128 + b"DICM")
    assert net.read_file_meta(short) is None


@pytest.mark.parametrize("limit", [0, 16384, 4096])
@pytest.mark.parametrize("length", [0, 1000, 700_001])
def test_file_messages_written_to_the_socket(tmp_path: Path, limit: int, length: int) -> None:
    """send_file_message() puts on the wire the PDUs pynetdicom's chunked send would
    (same fragments for a PDU limit; bounded fragments when unlimited)."""
    import os
    import socket
    import threading

    from dicomrouter.receive import wire

    path = tmp_path / "object.dcm"
    payload = os.urandom(length)
    path.write_bytes(b"H" * 300 + payload)
    command = net.encode_store_request(_store_request(str(path), 300))
    assert command is not None
    sender, receiver = socket.socketpair()
    pdus: list[tuple[int, list[tuple[int, int, bytes]]]] = []

    def read() -> None:
        reader = wire.SocketReader(receiver)
        try:
            while True:
                pdu_type, size = reader.pdu_header()
                pdvs = []
                while size:
                    data_length, context_id, control = reader.pdv_header()
                    value = bytearray()
                    reader.copy(data_length, value.extend)
                    pdvs.append((context_id, control, bytes(value)))
                    size -= 6 + data_length
                pdus.append((pdu_type, pdvs))
        except wire.PeerClosed:
            return

    thread = threading.Thread(target=read)
    thread.start()
    net.send_file_message(sender, 5, command, path, 300, limit)
    sender.close()
    thread.join(10)
    receiver.close()
    assert all(pdu_type == 0x04 and len(pdvs) == 1 for pdu_type, pdvs in pdus)
    pdvs = [pdv for _t, (pdv,) in pdus]
    assert pdvs[0] == (5, 0x03, command)
    data = pdvs[1:]
    assert [control for _cx, control, _d in data] == [0x00] * (len(data) - 1) + [0x02]
    assert b"".join(d for _cx, _c, d in data) == payload
    if limit:
        expected = [len(d) for _c, d in net._file_fragments(path, 300, limit)]
        assert [len(d) for _cx, _c, d in data] == expected
        assert max(len(d) + 6 for _cx, _c, d in data) <= limit
    else:
        assert max(len(d) for _cx, _c, d in data) <= net.UNLIMITED_FRAGMENT
