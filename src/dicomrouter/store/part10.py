"""Part-10 files (PS3.10 7.1): the File Meta Information we write before each
received data set, and the reading of it before a stored file is sent.

The receiver writes File Meta without pydicom (the bytes equal pydicom's
``write_file_meta_info``; a test checks them), and reads back only the plain layout
it writes. Any other layout (a file imported from elsewhere) goes through pydicom's
public reader.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import BinaryIO, NamedTuple

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset, read_preamble
from pydicom.tag import BaseTag
from pydicom.uid import generate_uid

from dicomrouter import __version__

#: Our implementation class UID: stable across versions, derived from the name
#: under pydicom's UID root. Sent in every association and written in File Meta.
IMPLEMENTATION_CLASS_UID = generate_uid(entropy_srcs=["dicomrouter"])
IMPLEMENTATION_VERSION = f"DICOMROUTER_{__version__.replace('.', '')}"[:16]

PREAMBLE = b"\x00" * 128 + b"DICM"
_META_VERSION = b"\x00\x01"
_META_LONG_VRS = {b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"}
#: File Meta groups longer than this are not the plain layout we write.
_MAX_META = 64 * 1024


class FileMeta(NamedTuple):
    """What a sender needs from a Part-10 file's File Meta."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    #: Where the data set starts in the file.
    data_set_offset: int


def _meta_element(element: int, vr: bytes, value: bytes) -> bytes:
    """One group-0002 element, Explicit VR Little Endian (PS3.5 7.1.2)."""
    if vr == b"OB":  # 4-byte length after 2 reserved bytes
        return struct.pack("<HH2s2xL", 0x0002, element, vr, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def _padded(text: str, pad: bytes) -> bytes:
    # pydicom encodes these values with its default character set (ISO-IR 100).
    data = text.encode("latin-1")
    return data + pad if len(data) % 2 else data


def encode_file_meta(
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax: str,
    implementation_uid: str = IMPLEMENTATION_CLASS_UID,
    implementation_version: str = IMPLEMENTATION_VERSION,
) -> bytes:
    """The File Meta Information group (after preamble and ``DICM``) that
    ``write_file_meta_info(fp, create_file_meta(...))`` writes for these values.
    ``UnicodeEncodeError`` when a value is not ISO-IR 100 text."""
    body = b"".join(
        (
            _meta_element(0x0001, b"OB", _META_VERSION),
            _meta_element(0x0002, b"UI", _padded(sop_class_uid, b"\x00")),
            _meta_element(0x0003, b"UI", _padded(sop_instance_uid, b"\x00")),
            _meta_element(0x0010, b"UI", _padded(transfer_syntax, b"\x00")),
            _meta_element(0x0012, b"UI", _padded(implementation_uid, b"\x00")),
            _meta_element(0x0013, b"SH", _padded(implementation_version, b" ")),
        )
    )
    return _meta_element(0x0000, b"UL", struct.pack("<L", len(body))) + body


def _ui(raw: bytes) -> str:
    return raw.decode("ascii").rstrip("\x00 ")


def _file_meta_length(head: bytes | bytearray | memoryview) -> int | None:
    """The File Meta group length from the first 144 bytes of a Part-10 file, or
    None when they are not the plain layout (preamble, ``DICM``, (0002,0000) UL)."""
    if len(head) < 144 or bytes(head[128:132]) != b"DICM":
        return None
    group, element, vr, length = struct.unpack_from("<HH2sH", head, 132)
    if (group, element, vr, length) != (0x0002, 0x0000, b"UL", 4):
        return None
    (group_length,) = struct.unpack_from("<L", head, 140)
    return int(group_length) if group_length <= _MAX_META else None


def _file_meta_values(meta: bytes) -> tuple[str, str, str] | None:
    """(SOP class, SOP instance, transfer syntax) from the File Meta elements."""
    values: dict[int, bytes] = {}
    offset, end = 0, len(meta)
    while offset < end:
        if end - offset < 8:
            return None
        group, element, vr = struct.unpack_from("<HH2s", meta, offset)
        if group != 0x0002:
            return None
        if vr in _META_LONG_VRS:
            if end - offset < 12:
                return None
            (length,) = struct.unpack_from("<L", meta, offset + 8)
            offset += 12
        else:
            (length,) = struct.unpack_from("<H", meta, offset + 6)
            offset += 8
        values[element] = meta[offset : offset + length]
        offset += length
    try:
        sop_class, sop_instance, syntax = (_ui(values[e]) for e in (0x0002, 0x0003, 0x0010))
    except (KeyError, UnicodeDecodeError):
        return None
    if not (sop_class and sop_instance and syntax):
        return None
    return sop_class, sop_instance, syntax


def parse_file_meta(data: bytes | bytearray | memoryview) -> FileMeta | None:
    """The File Meta of a Part-10 file held in memory, or None when it is not the
    plain layout."""
    group_length = _file_meta_length(data)
    if group_length is None or len(data) < 144 + group_length:
        return None
    values = _file_meta_values(bytes(data[144 : 144 + group_length]))
    return None if values is None else FileMeta(*values, 144 + group_length)


def read_plain_file_meta(path: str | Path) -> FileMeta | None:
    """:func:`parse_file_meta` of a file on disk, reading only its File Meta."""
    with open(path, "rb") as handle:
        group_length = _file_meta_length(handle.read(144))
        if group_length is None:
            return None
        meta = handle.read(group_length)
    if len(meta) != group_length:
        return None
    values = _file_meta_values(meta)
    return None if values is None else FileMeta(*values, 144 + group_length)


def read_file_meta(path: str | Path) -> FileMeta:
    """The File Meta of any Part-10 file: the plain layout directly, any other
    through pydicom's public reader. ``OSError`` when the file cannot be read,
    ``ValueError`` when it has no usable File Meta."""
    return read_plain_file_meta(path) or _read_with_pydicom(path)


def _not_group_2(tag: BaseTag, vr: str | None, length: int) -> bool:
    return tag.group != 0x0002


def _read_with_pydicom(path: str | Path) -> FileMeta:
    with open(path, "rb") as handle:
        try:
            meta = _read_meta_group(handle)
            offset = handle.tell()
        except Exception as exc:  # pydicom raises many types on garbage input
            raise ValueError(f"{path} has no readable File Meta: {exc}") from exc
    try:
        return FileMeta(
            str(meta.MediaStorageSOPClassUID),
            str(meta.MediaStorageSOPInstanceUID),
            str(meta.TransferSyntaxUID),
            offset,
        )
    except AttributeError as exc:
        raise ValueError(f"{path}: incomplete File Meta ({exc})") from exc


def _read_meta_group(handle: BinaryIO) -> Dataset:
    """Group 0002 (Explicit VR Little Endian whatever the data set's syntax),
    leaving ``handle`` at the first element of the data set."""
    read_preamble(handle, force=False)
    return read_dataset(handle, is_implicit_VR=False, is_little_endian=True, stop_when=_not_group_2)
