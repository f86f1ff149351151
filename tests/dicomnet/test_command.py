"""DIMSE command sets (dicomnet.command) against pynetdicom's DIMSE encoder.

What is proven: for each kind of message we send or answer (C-STORE-RQ/RSP,
C-ECHO-RQ, C-FIND-RQ/RSP, C-MOVE-RSP, N-ACTION-RQ/RSP, N-EVENT-REPORT-RQ/RSP),
``Command.encode`` writes the same bytes as pynetdicom's ``dimse_messages`` encoded
by pydicom in Implicit VR Little Endian (the technique of tests/test_wire.py: the
command PDVs pynetdicom's ``encode_msg`` produces, joined); ``Command.decode`` reads
pynetdicom's bytes back to the same command, and ours to the same values
pynetdicom reads; and ``decode`` refuses what is not a command set with
``ProtocolError`` rather than another exception.
"""

from __future__ import annotations

import struct
from io import BytesIO
from typing import Any

import pytest
from pynetdicom import dsutils
from pynetdicom.dimse_messages import (
    C_ECHO_RQ,
    C_FIND_RQ,
    C_FIND_RSP,
    C_MOVE_RQ,
    C_MOVE_RSP,
    C_STORE_RQ,
    C_STORE_RSP,
    N_ACTION_RQ,
    N_ACTION_RSP,
    N_EVENT_REPORT_RQ,
    N_EVENT_REPORT_RSP,
)
from pynetdicom.dimse_primitives import C_ECHO, C_FIND, C_MOVE, C_STORE, N_ACTION, N_EVENT_REPORT

from dicomrouter.dicomnet.command import MAX_COMMENT, Command
from dicomrouter.dicomnet.constants import (
    VERIFICATION_SOP_CLASS,
    CommandField,
    DataSetType,
    Priority,
    Status,
)
from dicomrouter.dicomnet.pdu import ProtocolError

CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
FIND = "1.2.840.10008.5.1.4.1.2.2.1"
MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
PRINT_JOB = "1.2.840.10008.5.1.1.14"
STORAGE_COMMITMENT = "1.2.840.10008.1.20.1"
COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"
SOME_DATA = b"\x08\x00\x52\x00\x06\x00\x00\x00STUDY "  # any data set: "one follows"


def pynetdicom_command(message: Any, primitive: Any) -> bytes:
    """The command set pynetdicom's DIMSE encoder writes for ``primitive``."""
    message.primitive_to_message(primitive)
    return b"".join(
        data[1:]
        for p_data in message.encode_msg(1, 0)
        for _cx, data in p_data.presentation_data_value_list
        if data[0] & 0x01
    )


def primitive(kind: type, **values: Any) -> Any:
    item = kind()
    for name, value in values.items():
        setattr(item, name, BytesIO(value) if isinstance(value, bytes) else value)
    return item


STORE_RQ = Command.request(CommandField.C_STORE_RQ, 7, CT_STORAGE, "1.2.3.4.5", with_data_set=True)
FIND_RQ = Command.request(CommandField.C_FIND_RQ, 11, FIND, with_data_set=True)

#: id -> (our command, pynetdicom message, pynetdicom primitive)
CASES: dict[str, tuple[Command, Any, Any]] = {
    "C-STORE-RQ": (
        STORE_RQ,
        C_STORE_RQ(),
        primitive(
            C_STORE,
            MessageID=7,
            AffectedSOPClassUID=CT_STORAGE,
            AffectedSOPInstanceUID="1.2.3.4.5",
            Priority=0,
            DataSet=SOME_DATA,
        ),
    ),
    "C-STORE-RQ max message ID, 64-char UID": (
        Command.request(CommandField.C_STORE_RQ, 0xFFFF, CT_STORAGE, "9" * 64, with_data_set=True),
        C_STORE_RQ(),
        primitive(
            C_STORE,
            MessageID=0xFFFF,
            AffectedSOPClassUID=CT_STORAGE,
            AffectedSOPInstanceUID="9" * 64,
            Priority=0,
            DataSet=SOME_DATA,
        ),
    ),
    "C-ECHO-RQ": (
        Command.request(CommandField.C_ECHO_RQ, 3, VERIFICATION_SOP_CLASS),
        C_ECHO_RQ(),
        primitive(C_ECHO, MessageID=3, AffectedSOPClassUID=VERIFICATION_SOP_CLASS),
    ),
    "C-STORE-RSP success": (
        STORE_RQ.response(Status.SUCCESS),
        C_STORE_RSP(),
        primitive(
            C_STORE,
            MessageIDBeingRespondedTo=7,
            AffectedSOPClassUID=CT_STORAGE,
            AffectedSOPInstanceUID="1.2.3.4.5",
            Status=0x0000,
        ),
    ),
    "C-STORE-RSP error with odd comment": (
        STORE_RQ.response(Status.OUT_OF_RESOURCES, "disk full"),
        C_STORE_RSP(),
        primitive(
            C_STORE,
            MessageIDBeingRespondedTo=7,
            AffectedSOPClassUID=CT_STORAGE,
            AffectedSOPInstanceUID="1.2.3.4.5",
            Status=0xA700,
            ErrorComment="disk full",
        ),
    ),
    "C-STORE-RSP error with even comment": (
        STORE_RQ.response(Status.CANNOT_UNDERSTAND, "bad UIDs"),
        C_STORE_RSP(),
        primitive(
            C_STORE,
            MessageIDBeingRespondedTo=7,
            AffectedSOPClassUID=CT_STORAGE,
            AffectedSOPInstanceUID="1.2.3.4.5",
            Status=0xC000,
            ErrorComment="bad UIDs",
        ),
    ),
    "C-FIND-RQ": (
        FIND_RQ,
        C_FIND_RQ(),
        primitive(C_FIND, MessageID=11, AffectedSOPClassUID=FIND, Priority=0, Identifier=SOME_DATA),
    ),
    "C-FIND-RSP pending with identifier": (
        FIND_RQ.response(Status.PENDING, with_data_set=True),
        C_FIND_RSP(),
        primitive(
            C_FIND,
            MessageIDBeingRespondedTo=11,
            AffectedSOPClassUID=FIND,
            Status=0xFF00,
            Identifier=SOME_DATA,
        ),
    ),
    "C-FIND-RSP success": (
        FIND_RQ.response(Status.SUCCESS),
        C_FIND_RSP(),
        primitive(C_FIND, MessageIDBeingRespondedTo=11, AffectedSOPClassUID=FIND, Status=0x0000),
    ),
    "N-ACTION-RQ": (
        Command(
            CommandField.N_ACTION_RQ,
            DataSetType.PRESENT,
            message_id=21,
            requested_sop_class=STORAGE_COMMITMENT,
            requested_sop_instance=COMMITMENT_INSTANCE,
            action_type_id=1,
        ),
        N_ACTION_RQ(),
        primitive(
            N_ACTION,
            MessageID=21,
            RequestedSOPClassUID=STORAGE_COMMITMENT,
            RequestedSOPInstanceUID=COMMITMENT_INSTANCE,
            ActionTypeID=1,
            ActionInformation=SOME_DATA,
        ),
    ),
    "N-EVENT-REPORT-RQ": (
        Command(
            CommandField.N_EVENT_REPORT_RQ,
            DataSetType.PRESENT,
            message_id=22,
            affected_sop_class=STORAGE_COMMITMENT,
            affected_sop_instance=COMMITMENT_INSTANCE,
            event_type_id=2,
        ),
        N_EVENT_REPORT_RQ(),
        primitive(
            N_EVENT_REPORT,
            MessageID=22,
            AffectedSOPClassUID=STORAGE_COMMITMENT,
            AffectedSOPInstanceUID=COMMITMENT_INSTANCE,
            EventTypeID=2,
            EventInformation=SOME_DATA,
        ),
    ),
    "N-ACTION-RQ from Command.action": (
        Command.action(23, STORAGE_COMMITMENT, COMMITMENT_INSTANCE, 1),
        N_ACTION_RQ(),
        primitive(
            N_ACTION,
            MessageID=23,
            RequestedSOPClassUID=STORAGE_COMMITMENT,
            RequestedSOPInstanceUID=COMMITMENT_INSTANCE,
            ActionTypeID=1,
            ActionInformation=SOME_DATA,
        ),
    ),
    "N-ACTION-RSP success, action type repeated": (
        Command.action(23, STORAGE_COMMITMENT, COMMITMENT_INSTANCE, 1).response(Status.SUCCESS),
        N_ACTION_RSP(),
        primitive(
            N_ACTION,
            MessageIDBeingRespondedTo=23,
            AffectedSOPClassUID=STORAGE_COMMITMENT,
            AffectedSOPInstanceUID=COMMITMENT_INSTANCE,
            ActionTypeID=1,
            Status=0x0000,
        ),
    ),
    "N-EVENT-REPORT-RSP success, event type repeated": (
        Command(
            CommandField.N_EVENT_REPORT_RQ,
            DataSetType.PRESENT,
            message_id=24,
            affected_sop_class=STORAGE_COMMITMENT,
            affected_sop_instance=COMMITMENT_INSTANCE,
            event_type_id=2,
        ).response(Status.SUCCESS),
        N_EVENT_REPORT_RSP(),
        primitive(
            N_EVENT_REPORT,
            MessageIDBeingRespondedTo=24,
            AffectedSOPClassUID=STORAGE_COMMITMENT,
            AffectedSOPInstanceUID=COMMITMENT_INSTANCE,
            EventTypeID=2,
            Status=0x0000,
        ),
    ),
    "C-MOVE-RSP pending with sub-operations": (
        Command(
            CommandField.C_MOVE_RSP,
            message_id_responded=31,
            affected_sop_class=MOVE,
            status=Status.PENDING,
            remaining=3,
            completed=2,
            failed=1,
            warning=0,
        ),
        C_MOVE_RSP(),
        primitive(
            C_MOVE,
            MessageIDBeingRespondedTo=31,
            AffectedSOPClassUID=MOVE,
            Status=0xFF00,
            NumberOfRemainingSuboperations=3,
            NumberOfCompletedSuboperations=2,
            NumberOfFailedSuboperations=1,
            NumberOfWarningSuboperations=0,
        ),
    ),
    "C-MOVE-RSP final with counts and comment": (
        Command(
            CommandField.C_MOVE_RSP,
            message_id_responded=31,
            affected_sop_class=MOVE,
            status=0xA702,
            error_comment="2 sub-operations failed",
            completed=5,
            failed=2,
            warning=0,
        ),
        C_MOVE_RSP(),
        primitive(
            C_MOVE,
            MessageIDBeingRespondedTo=31,
            AffectedSOPClassUID=MOVE,
            Status=0xA702,
            ErrorComment="2 sub-operations failed",
            NumberOfCompletedSuboperations=5,
            NumberOfFailedSuboperations=2,
            NumberOfWarningSuboperations=0,
        ),
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_encode_equals_pynetdicom(name: str) -> None:
    ours, message, item = CASES[name]
    assert ours.encode() == pynetdicom_command(message, item)


@pytest.mark.parametrize("name", list(CASES))
def test_decode_reads_pynetdicom_bytes(name: str) -> None:
    ours, message, item = CASES[name]
    assert Command.decode(pynetdicom_command(message, item)) == ours


@pytest.mark.parametrize("name", list(CASES))
def test_decode_of_encode_is_identity(name: str) -> None:
    ours = CASES[name][0]
    decoded = Command.decode(ours.encode())
    assert decoded == ours
    assert decoded.has_data_set is ours.has_data_set


@pytest.mark.parametrize("name", list(CASES))
def test_pynetdicom_reads_our_values(name: str) -> None:
    ours, message, _item = CASES[name]
    message.command_set = dsutils.decode(BytesIO(ours.encode()), True, True)
    values = {
        "CommandField": ours.command_field,
        "MessageID": ours.message_id,
        "MessageIDBeingRespondedTo": ours.message_id_responded,
        "AffectedSOPClassUID": ours.affected_sop_class,
        "RequestedSOPClassUID": ours.requested_sop_class,
        "AffectedSOPInstanceUID": ours.affected_sop_instance,
        "Status": ours.status,
        "ErrorComment": ours.error_comment,
        "CommandDataSetType": ours.data_set_type,
    }
    for keyword, value in values.items():
        if value is not None:
            assert message.command_set[keyword].value == value, keyword
    assert message.command_set.CommandGroupLength == len(ours.encode()) - 12


def test_every_field_survives_a_round_trip() -> None:
    command = Command(
        CommandField.C_STORE_RQ,
        DataSetType.PRESENT,
        message_id=1,
        message_id_responded=2,
        affected_sop_class="1.2.3",
        requested_sop_class="1.2.34",
        affected_sop_instance="1.2.345",
        requested_sop_instance="1.2.3456",
        priority=Priority.LOW,
        status=0xB000,
        error_comment="warned",
        move_destination="DEST",
        event_type_id=3,
        action_type_id=4,
        remaining=5,
        completed=6,
        failed=7,
        warning=8,
        move_originator_ae="ORIGIN_AE_16CHAR",
        move_originator_message_id=9,
    )
    assert Command.decode(command.encode()) == command


def test_elements_are_in_ascending_order_and_even() -> None:
    data = CASES["C-MOVE-RSP final with counts and comment"][0].encode()
    offset, tags = 0, []
    while offset < len(data):
        group, element, length = struct.unpack_from("<HHL", data, offset)
        assert group == 0 and length % 2 == 0
        tags.append(element)
        offset += 8 + length
    assert offset == len(data)
    assert tags == sorted(tags) and tags[0] == 0x0000


def test_move_requests_encode_as_pynetdicom_does() -> None:
    ours = Command.request(
        CommandField.C_MOVE_RQ, 5, MOVE, with_data_set=True, move_destination="ANY-SCP"
    )
    message = C_MOVE_RQ()
    message.command_set = dsutils.decode(BytesIO(ours.encode()), True, True)
    assert message.command_set.MoveDestination.strip() == "ANY-SCP"
    theirs = pynetdicom_command(
        C_MOVE_RQ(),
        primitive(
            C_MOVE,
            MessageID=5,
            AffectedSOPClassUID=MOVE,
            Priority=0,
            MoveDestination="ANY-SCP",
            Identifier=SOME_DATA,
        ),
    )
    assert Command.decode(theirs) == ours
    assert ours.encode() == theirs  # AE values padded to even length, as pydicom does


def test_request_builder() -> None:
    find = Command.request(CommandField.C_FIND_RQ, 4, FIND, with_data_set=True)
    assert find.priority == Priority.MEDIUM and find.has_data_set
    echo = Command.request(CommandField.C_ECHO_RQ, 4, VERIFICATION_SOP_CLASS)
    assert echo.priority is None and not echo.has_data_set
    action = Command.request(CommandField.N_ACTION_RQ, 4, PRINT_JOB, action_type_id=1)
    assert action.priority is None and action.action_type_id == 1


def test_response_echoes_the_request() -> None:
    action = Command(
        CommandField.N_ACTION_RQ,
        DataSetType.PRESENT,
        message_id=21,
        requested_sop_class=STORAGE_COMMITMENT,
        requested_sop_instance=COMMITMENT_INSTANCE,
        action_type_id=1,
    )
    response = action.response(Status.SUCCESS)
    assert response.command_field == CommandField.N_ACTION_RSP
    assert response.message_id_responded == 21 and response.message_id is None
    assert response.affected_sop_class == STORAGE_COMMITMENT  # requested -> affected
    assert response.affected_sop_instance == COMMITMENT_INSTANCE
    assert not response.has_data_set and response.error_comment is None
    with pytest.raises(ValueError):
        response.response(Status.SUCCESS)  # a response has no Message ID to answer


def test_error_comment_is_cut_to_its_maximum_and_made_ascii() -> None:
    response = STORE_RQ.response(Status.PROCESSING_FAILURE, "é" + "x" * 100)
    decoded = Command.decode(response.encode())
    assert decoded.error_comment == "?" + "x" * (MAX_COMMENT - 1)


def test_unknown_elements_are_kept_raw() -> None:
    extra = struct.pack("<HHL", 0, 0x0901, 4) + b"\x10\x00\x10\x00"  # Offending Element
    decoded = Command.decode(STORE_RQ.encode() + extra)
    assert decoded == STORE_RQ
    assert decoded.other[0x0901] == b"\x10\x00\x10\x00"


def _element(element: int, value: bytes) -> bytes:
    return struct.pack("<HHL", 0, element, len(value)) + value


_MINIMAL = _element(0x0100, b"\x30\x00") + _element(0x0800, b"\x01\x01")


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(STORE_RQ.encode()[:-3], id="value cut short"),
        pytest.param(STORE_RQ.encode() + b"\x00\x00\x00\x00\x10", id="header cut short"),
        pytest.param(_MINIMAL + struct.pack("<HHL", 0, 0x0900, 100), id="length past end"),
        pytest.param(_MINIMAL + struct.pack("<HHL", 8, 0x0018, 0), id="another group"),
        pytest.param(_element(0x0100, b"\x30\x00\x00\x00") + _MINIMAL[10:], id="US of 4 bytes"),
        pytest.param(_element(0x0100, b"\x30\x00"), id="no Data Set Type"),
        pytest.param(_element(0x0800, b"\x01\x01"), id="no Command Field"),
    ],
)
def test_decode_refuses_what_is_not_a_command_set(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        Command.decode(data)


def test_minimal_command_set_is_read() -> None:
    assert Command.decode(_MINIMAL) == Command(CommandField.C_ECHO_RQ, DataSetType.ABSENT)
