"""The bytes of dicomrouter.dicomnet (command sets, PDUs) and store.part10 (File
Meta) against pynetdicom's and pydicom's encoders and
decoders: the same bytes for what we write, the same values for what we read; and
pydicom without value validation is no more permissive about what we must refuse."""

from __future__ import annotations

import copy
import struct
import warnings
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from pydicom import config as pydicom_config
from pydicom.data import get_testdata_file
from pydicom.filereader import read_file_meta_info
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION, dsutils
from pynetdicom.dimse_messages import C_ECHO_RQ, C_STORE_RQ, C_STORE_RSP
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.dsutils import create_file_meta, split_dataset

from dicomrouter.dicomnet import Command, pdu
from dicomrouter.dicomnet.constants import CommandField
from dicomrouter.store import InstanceHeader, InvalidUID, header, part10, read_header


@pytest.fixture
def no_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    """install_no_value_validation() for one test; pydicom's settings are restored."""
    settings = pydicom_config.settings
    monkeypatch.setattr(settings, "reading_validation_mode", settings.reading_validation_mode)
    monkeypatch.setattr(settings, "writing_validation_mode", settings.writing_validation_mode)
    monkeypatch.setattr(header, "_validation_off", False)
    header.install_no_value_validation()


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
    encoded = part10.encode_file_meta(sop_class, sop_instance, syntax, implementation_uid, version)
    assert encoded == expected.getvalue()


def _pynetdicom_command(message: Any, primitive: C_STORE | C_ECHO) -> bytes:
    """The command set pynetdicom's DIMSE encoder writes for ``primitive``."""
    message.primitive_to_message(primitive)
    return b"".join(
        data[1:]
        for p_data in message.encode_msg(1, 0)
        for _cx, data in p_data.presentation_data_value_list
        if data[0] & 0x01
    )


@pytest.mark.parametrize("sop_instance", ["1.2.3", "1.2.34", "9" * 64])
@pytest.mark.parametrize("message_id", [1, 0xFFFF])
def test_store_requests_encode_as_pynetdicom_does(sop_instance: str, message_id: int) -> None:
    primitive = C_STORE()
    primitive.MessageID = message_id
    primitive.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    primitive.AffectedSOPInstanceUID = sop_instance
    primitive.Priority = 0  # medium, as ours
    primitive.DataSet = BytesIO(b"\x08\x00")  # "has a data set"
    ours = Command.request(
        CommandField.C_STORE_RQ, message_id, "1.2.840.10008.5.1.4.1.1.2", sop_instance, True
    ).encode()
    assert ours == _pynetdicom_command(C_STORE_RQ(), primitive)


def test_echo_requests_encode_as_pynetdicom_does() -> None:
    primitive = C_ECHO()
    primitive.MessageID = 7
    primitive.AffectedSOPClassUID = "1.2.840.10008.1.1"
    ours = Command.request(CommandField.C_ECHO_RQ, 7, "1.2.840.10008.1.1").encode()
    assert ours == _pynetdicom_command(C_ECHO_RQ(), primitive)


def _rsp_command_set(**values: object) -> bytes:
    """A C-STORE-RSP command set as pynetdicom's own encoder writes it."""
    primitive = C_STORE()
    primitive.MessageIDBeingRespondedTo = values.pop("message_id", 9)
    primitive.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    primitive.AffectedSOPInstanceUID = "1.2.3.4"
    for name, value in values.items():
        setattr(primitive, name, value)
    return _pynetdicom_command(C_STORE_RSP(), primitive)


@pytest.mark.parametrize(
    "values",
    [
        {"Status": 0x0000},
        {"Status": 0xB000, "message_id": 0xFFFF},
        {"Status": 0xA700, "ErrorComment": "disk full"},
        {"Status": 0xC000, "ErrorComment": "odd"},
        {"Status": 0xA900, "OffendingElement": [0x00100010]},
    ],
)
def test_store_responses_decode_as_pynetdicom_does(values: dict[str, object]) -> None:
    encoded = _rsp_command_set(**dict(values))
    ours = Command.decode(encoded)
    field, responded, status = ours.command_field, ours.message_id_responded, ours.status
    comment = ours.error_comment
    message = C_STORE_RSP()
    message.command_set = dsutils.decode(BytesIO(encoded), True, True)
    theirs = message.message_to_primitive()
    assert field == 0x8001
    assert responded == theirs.MessageIDBeingRespondedTo
    assert status == theirs.Status
    assert comment == theirs.ErrorComment


def test_broken_command_sets_are_protocol_errors() -> None:
    with pytest.raises(pdu.ProtocolError):
        Command.decode(b"\x00\x00\x00\x00\xff\xff")  # truncated
    no_data_set_type = struct.pack("<HHL2s", 0, 0x0100, 2, b"\x01\x80") + struct.pack(
        "<HHL2s", 0, 0x0120, 2, b"\x01\x00"
    )
    with pytest.raises(pdu.ProtocolError, match="Data Set Type"):
        Command.decode(no_data_set_type)


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "image_dfl.dcm", "JPEG2000.dcm"])
def test_file_meta_is_read_as_pydicom_reads_it(name: str) -> None:
    path = get_testdata_file(name)
    meta = read_file_meta_info(path)
    sop_class, sop_instance, syntax, offset = part10.read_plain_file_meta(path)  # type: ignore[misc]
    assert (sop_class, sop_instance, syntax) == (
        meta.MediaStorageSOPClassUID,
        meta.MediaStorageSOPInstanceUID,
        meta.TransferSyntaxUID,
    )
    assert offset == split_dataset(Path(path))[1]


def test_files_without_the_plain_layout_fall_back(tmp_path: Path) -> None:
    no_preamble = tmp_path / "raw.dcm"
    no_preamble.write_bytes(Path(get_testdata_file("CT_small.dcm")).read_bytes()[128:])
    assert part10.read_plain_file_meta(no_preamble) is None
    short = tmp_path / "short.dcm"
    short.write_bytes(b"\x00" * 128 + b"DICM")
    assert part10.read_plain_file_meta(short) is None


@pytest.mark.parametrize("limit", [0, 16384, 4096])
@pytest.mark.parametrize("length", [0, 1000, 700_001])
def test_file_messages_written_to_the_socket(tmp_path: Path, limit: int, length: int) -> None:
    """send_file_message() puts on the wire the PDUs pynetdicom's chunked send would
    (same fragments for a PDU limit; bounded fragments when unlimited)."""
    import os
    import socket
    import threading

    path = tmp_path / "object.dcm"
    payload = os.urandom(length)
    path.write_bytes(b"H" * 300 + payload)
    command = Command.request(
        CommandField.C_STORE_RQ, 3, "1.2.840.10008.5.1.4.1.1.2", "1.2.3", True
    ).encode()
    sender, receiver = socket.socketpair()
    pdus: list[tuple[int, list[tuple[int, int, bytes]]]] = []

    def read() -> None:
        reader = pdu.SocketReader(receiver)
        try:
            while True:
                pdu_type, size = pdu.read_header(reader)
                pdvs = []
                while size:
                    data_length, context_id, control = pdu.read_pdv_header(reader)
                    value = bytearray()
                    reader.copy(data_length, value.extend)
                    pdvs.append((context_id, control, bytes(value)))
                    size -= 6 + data_length
                pdus.append((pdu_type, pdvs))
        except pdu.PeerClosed:
            return

    thread = threading.Thread(target=read)
    thread.start()
    pdu.send_file_message(sender, 5, command, path, 300, limit)
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
        # pynetdicom's chunked send: fragments of limit - 6, the last one shorter.
        full, rest = divmod(length, limit - 6)
        expected = [limit - 6] * full + ([rest] if rest or not full else [])
        assert [len(d) for _cx, _c, d in data] == expected
        assert max(len(d) + 6 for _cx, _c, d in data) <= limit
    else:
        assert max(len(d) for _cx, _c, d in data) <= pdu.UNLIMITED_FRAGMENT
