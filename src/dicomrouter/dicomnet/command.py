"""DIMSE command sets (PS3.7 6.3.1, annex E) as a dataclass: group 0000 in Implicit
VR Little Endian, decoded from and encoded to bytes.

Elements are written in ascending tag order with their values padded to even
length as PS3.5 asks (UIDs with NUL, text with a space); the bytes equal what
pydicom writes through pynetdicom's DIMSE messages.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field, replace
from typing import Literal

from .constants import CommandField, DataSetType, Priority, response_field
from .pdu import ProtocolError

_ELEMENT = struct.Struct("<HHL")
_US = struct.Struct("<H")
_UL = struct.Struct("<L")

Kind = Literal["UI", "US", "AE", "LO"]

#: (element, dataclass field, value representation), in ascending element order.
ELEMENTS: tuple[tuple[int, str, Kind], ...] = (
    (0x0002, "affected_sop_class", "UI"),
    (0x0003, "requested_sop_class", "UI"),
    (0x0100, "command_field", "US"),
    (0x0110, "message_id", "US"),
    (0x0120, "message_id_responded", "US"),
    (0x0600, "move_destination", "AE"),
    (0x0700, "priority", "US"),
    (0x0800, "data_set_type", "US"),
    (0x0900, "status", "US"),
    (0x0902, "error_comment", "LO"),
    (0x1000, "affected_sop_instance", "UI"),
    (0x1001, "requested_sop_instance", "UI"),
    (0x1002, "event_type_id", "US"),
    (0x1008, "action_type_id", "US"),
    (0x1020, "remaining", "US"),
    (0x1021, "completed", "US"),
    (0x1022, "failed", "US"),
    (0x1023, "warning", "US"),
    (0x1030, "move_originator_ae", "AE"),
    (0x1031, "move_originator_message_id", "US"),
)
_BY_ELEMENT = {element: (name, kind) for element, name, kind in ELEMENTS}
#: Largest error comment written (LO: 64 characters).
MAX_COMMENT = 64


@dataclass(frozen=True)
class Command:
    """One command set. ``None`` means the element is absent."""

    command_field: int
    data_set_type: int = DataSetType.ABSENT
    message_id: int | None = None
    message_id_responded: int | None = None
    affected_sop_class: str | None = None
    requested_sop_class: str | None = None
    affected_sop_instance: str | None = None
    requested_sop_instance: str | None = None
    priority: int | None = None
    status: int | None = None
    error_comment: str | None = None
    move_destination: str | None = None
    event_type_id: int | None = None
    action_type_id: int | None = None
    remaining: int | None = None
    completed: int | None = None
    failed: int | None = None
    warning: int | None = None
    move_originator_ae: str | None = None
    move_originator_message_id: int | None = None
    #: Elements we have no field for, kept raw (element number -> value).
    other: dict[int, bytes] = field(default_factory=dict, compare=False)

    @property
    def has_data_set(self) -> bool:
        return self.data_set_type != DataSetType.ABSENT

    @property
    def sop_class(self) -> str:
        """The SOP class the message is about (affected, else requested)."""
        return self.affected_sop_class or self.requested_sop_class or ""

    # -- building ----------------------------------------------------------------------
    @classmethod
    def request(
        cls,
        command_field: int,
        message_id: int,
        sop_class: str,
        sop_instance: str | None = None,
        with_data_set: bool = False,
        **more: int | str | None,
    ) -> Command:
        """A request; C-STORE/FIND/MOVE/GET carry a priority (medium)."""
        priority = (
            Priority.MEDIUM
            if command_field
            in (
                CommandField.C_STORE_RQ,
                CommandField.C_FIND_RQ,
                CommandField.C_MOVE_RQ,
                CommandField.C_GET_RQ,
            )
            else None
        )
        data_set_type = DataSetType.PRESENT if with_data_set else DataSetType.ABSENT
        return cls(
            command_field=command_field,
            message_id=message_id,
            affected_sop_class=sop_class,
            affected_sop_instance=sop_instance,
            priority=priority,
            data_set_type=data_set_type,
            **more,  # type: ignore[arg-type]
        )

    def response(
        self, status: int, comment: str | None = None, with_data_set: bool = False
    ) -> Command:
        """The response to this request: its SOP class and instance echoed."""
        if self.message_id is None:
            raise ValueError("a request without a Message ID cannot be answered")
        return Command(
            command_field=response_field(self.command_field),
            message_id_responded=self.message_id,
            affected_sop_class=self.affected_sop_class or self.requested_sop_class,
            affected_sop_instance=self.affected_sop_instance or self.requested_sop_instance,
            data_set_type=DataSetType.PRESENT if with_data_set else DataSetType.ABSENT,
            status=status,
            error_comment=comment or None,
            # PS3.7 10.3.1 and 10.3.4: N-EVENT-REPORT-RSP and N-ACTION-RSP repeat the
            # request's event or action type.
            event_type_id=(
                self.event_type_id if self.command_field == CommandField.N_EVENT_REPORT_RQ else None
            ),
            action_type_id=(
                self.action_type_id if self.command_field == CommandField.N_ACTION_RQ else None
            ),
        )

    @classmethod
    def action(
        cls, message_id: int, sop_class: str, sop_instance: str, action_type: int
    ) -> Command:
        """An N-ACTION-RQ (PS3.7 10.3.4) with its action information data set."""
        return cls(
            command_field=CommandField.N_ACTION_RQ,
            message_id=message_id,
            requested_sop_class=sop_class,
            requested_sop_instance=sop_instance,
            action_type_id=action_type,
            data_set_type=DataSetType.PRESENT,
        )

    def but(self, **changes: int | str | None) -> Command:
        return replace(self, **changes)  # type: ignore[arg-type]

    # -- bytes ---------------------------------------------------------------------------
    def encode(self) -> bytes:
        """The command set, group length first."""
        parts = []
        for element, name, kind in ELEMENTS:
            value = getattr(self, name)
            if value is None:
                continue
            parts.append(_element(element, _encode_value(kind, value)))
        body = b"".join(parts)
        return _element(0x0000, _UL.pack(len(body))) + body

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> Command:
        """:class:`ProtocolError` when ``data`` is not a command set with a Command
        Field and a Data Set Type."""
        values: dict[str, int | str] = {}
        other: dict[int, bytes] = {}
        offset, end = 0, len(data)
        while offset < end:
            if end - offset < _ELEMENT.size:
                raise ProtocolError("truncated command set")
            group, element, length = _ELEMENT.unpack_from(data, offset)
            offset += _ELEMENT.size
            if group != 0x0000 or length > end - offset:
                raise ProtocolError("invalid command set")
            raw = bytes(data[offset : offset + length])
            offset += length
            known = _BY_ELEMENT.get(element)
            if known is None:
                other[element] = raw
                continue
            name, kind = known
            if kind == "US":
                if length != 2:
                    raise ProtocolError(f"command element (0000,{element:04X}) is not 2 bytes")
                values[name] = int(_US.unpack(raw)[0])
            else:
                values[name] = raw.decode("latin-1").strip("\x00 ")
        if "command_field" not in values or "data_set_type" not in values:
            raise ProtocolError("command set without Command Field or Data Set Type")
        return cls(other=other, **values)  # type: ignore[arg-type]


def _element(element: int, value: bytes) -> bytes:
    return _ELEMENT.pack(0x0000, element, len(value)) + value


def _encode_value(kind: Kind, value: int | str) -> bytes:
    if kind == "US":
        return _US.pack(int(value))
    text = str(value)
    if kind == "UI":
        data = text.encode("latin-1")
        return data + b"\x00" if len(data) % 2 else data
    if kind == "AE":
        data = text.encode("ascii", "replace")[:16]
        return data + b" " if len(data) % 2 else data
    data = text.encode("ascii", "replace")[:MAX_COMMENT]
    return data + b" " if len(data) % 2 else data
