"""The transformed copy of a stored file, made without loading its pixels.

What :func:`transformed_copy` does, for a file in a little-endian, uncompressed-header
syntax (Implicit/Explicit VR Little Endian and every encapsulated syntax), when no
pipeline touches pixels:

1. it reads the data set *up to* group 7FE0 (Pixel Data and its companions: Extended
   Offset Table, Float Pixel Data...), leaving the file positioned there;
2. it walks the group-7FE0 element headers, seeking over their values (an
   encapsulated Pixel Data is walked item header by item header), to find where the
   raw part ends;
3. elements after it (Data Set Trailing Padding, Digital Signatures, private groups
   above 7FE0) are parsed and given to the steps too, when they are at most
   :data:`TAIL_LIMIT` bytes; larger ones are copied as raw bytes, unseen by the steps
   (unless a step must see every element: see below);
4. the steps run on that header;
5. the new file is written: our File Meta (:func:`~dicomrouter.store.part10.encode_file_meta`:
   its SOP Instance UID follows the data set's, the implementation class UID is ours),
   the header, then the raw group-7FE0 bytes copied from the source in chunks
   (``os.sendfile`` where there is one), then the tail.

A step that must see every element (``sees_every_element``: de-identification,
``remove_private``) gets the whole file instead whenever the header-only path would
hide something from it: elements after the pixel data too large to parse here, or
pixel data whose extent the walk cannot tell (an item of undefined length).

Memory is the header plus one chunk, whatever the size of the pixels. Unchanged header
elements are written back byte for byte (pydicom re-encodes only the values it
decoded), and Pixel Data is the same bytes.

Read whole instead (memory about the file's size, pixels still not decoded):

- a pipeline that ``touches_pixels`` (or names an element of group 7FE0);
- Deflated Explicit VR Little Endian: the data set is one zlib stream, it cannot be
  sought in; it is re-deflated on writing;
- Explicit VR Big Endian (retired; rare enough that a simpler path is worth more).

The source is opened read-only and never written. The copy goes to a new file in
``workdir`` created by ``mkstemp`` (mode 0600, a random name that owes nothing to tag
values); it is removed if anything fails. The caller deletes it after the send.
"""

from __future__ import annotations

import io
import os
import struct
import tempfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filebase import DicomFileLike
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian

from dicomrouter.store import InvalidUID, validate_uid
from dicomrouter.store.part10 import PREAMBLE, encode_file_meta, read_file_meta

from .base import ObjectContext, TransformRefused
from .pipeline import CompiledPipeline, apply_chain
from .tags import PIXEL_GROUP

#: Elements after group 7FE0 up to this size are parsed and transformed; beyond it
#: they are copied raw (they are padding or signatures in practice).
TAIL_LIMIT = 1024 * 1024
#: Bytes copied per read when ``os.sendfile`` is not available.
CHUNK = 1024 * 1024

_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR"}
_LONG_VRS |= {b"UT", b"UV"}
_UNDEFINED = 0xFFFFFFFF
_WHOLE_SYNTAXES = {str(DeflatedExplicitVRLittleEndian), str(ExplicitVRBigEndian)}


@dataclass(frozen=True)
class TransformedFile:
    """The copy to send: a Part-10 file in ``workdir`` (the caller deletes it)."""

    path: Path
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    size: int


def transformed_copy(
    source: Path,
    pipelines: Sequence[CompiledPipeline],
    context: ObjectContext,
    workdir: Path,
) -> TransformedFile:
    """``source`` through ``pipelines`` (in order), written to a new file in
    ``workdir``. Raises what the steps raise (TransformRefused, TransformUnavailable),
    OSError for the files, ValueError for a source that is not a Part-10 file."""
    meta = read_file_meta(source)
    syntax = meta.transfer_syntax
    whole = syntax in _WHOLE_SYNTAXES or any(p.touches_pixels for p in pipelines)
    fd, name = tempfile.mkstemp(prefix=".transform-", suffix=".dcm", dir=workdir)
    path = Path(name)
    try:
        with open(source, "rb") as src, os.fdopen(fd, "wb") as out:
            if whole:
                dataset = _whole(src, out, pipelines, context, syntax)
            else:
                try:
                    dataset = _header_only(
                        src, out, pipelines, context, syntax, meta.data_set_offset
                    )
                except _ReadWhole:  # raised before anything is written
                    dataset = _whole(src, out, pipelines, context, syntax)
        return TransformedFile(
            path=path,
            sop_instance_uid=str(dataset.SOPInstanceUID),
            sop_class_uid=str(dataset.SOPClassUID),
            transfer_syntax_uid=syntax,
            size=path.stat().st_size,
        )
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def _file_meta(dataset: Dataset, syntax: str) -> bytes:
    """Preamble and File Meta for the transformed data set."""
    try:
        sop_class = validate_uid(dataset.get("SOPClassUID"), "SOPClassUID")
        sop_instance = validate_uid(dataset.get("SOPInstanceUID"), "SOPInstanceUID")
    except InvalidUID as exc:
        raise TransformRefused(f"after the transform, {exc}") from None
    return PREAMBLE + encode_file_meta(sop_class, sop_instance, syntax)


def _writer(out: BinaryIO, implicit: bool, little: bool) -> DicomFileLike:
    fp = DicomFileLike(out)
    fp.is_implicit_VR = implicit
    fp.is_little_endian = little
    return fp


def _header_only(
    src: BinaryIO,
    out: BinaryIO,
    pipelines: Sequence[CompiledPipeline],
    context: ObjectContext,
    syntax: str,
    offset: int,
) -> Dataset:
    implicit = syntax == str(ImplicitVRLittleEndian)
    size = os.fstat(src.fileno()).st_size
    src.seek(offset)
    head = read_dataset(
        src,
        is_implicit_VR=implicit,
        is_little_endian=True,
        stop_when=lambda tag, vr, length: tag >= PIXEL_GROUP,
    )
    raw_start = src.tell()
    found_end = _end_of_pixel_group(src, raw_start, size, implicit)
    raw_end = size if found_end is None else found_end
    tail_parsed = 0 < size - raw_end <= TAIL_LIMIT
    unseen = found_end is None or (raw_end < size and not tail_parsed)
    if unseen and _sees_every_element(pipelines):
        # Elements the walk cannot see (an item of undefined length inside the pixel
        # data) or too large to parse here: a step that must see every element gets
        # the whole file, as pydicom reads it.
        raise _ReadWhole()
    if tail_parsed:
        src.seek(raw_end)
        tail = read_dataset(io.BytesIO(src.read()), is_implicit_VR=implicit, is_little_endian=True)
        for element in tail:
            head.add(element)
    apply_chain(pipelines, head, context)

    after = Dataset()
    for tag in [tag for tag in head.keys() if tag >= PIXEL_GROUP]:  # noqa: SIM118
        if tag >> 16 == PIXEL_GROUP >> 16 or not tail_parsed:
            raise TransformRefused(
                f"a step wrote ({tag >> 16:04X},{tag & 0xFFFF:04X}) after the pixel data; "
                "only a pipeline that reads the whole file may"
            )
        after[tag] = head[tag]
        del head[tag]
    out.write(_file_meta(head, syntax))
    write_dataset(_writer(out, implicit, True), head)
    out.flush()
    _copy_range(src, out, raw_start, raw_end - raw_start)
    if tail_parsed:
        write_dataset(_writer(out, implicit, True), after, parent_encoding=head._character_set)
    elif raw_end < size:
        _copy_range(src, out, raw_end, size - raw_end)
    return head


class _ReadWhole(Exception):
    """The header-only path cannot show a step every element it must see."""


def _sees_every_element(pipelines: Sequence[CompiledPipeline]) -> bool:
    return any(s.step.sees_every_element for p in pipelines for s in p.steps)


def _end_of_pixel_group(src: BinaryIO, start: int, size: int, implicit: bool) -> int | None:
    """Where the elements of group 7FE0 starting at ``start`` end, reading only
    element and item headers; None when it cannot tell (an item of undefined length,
    or not an item, inside: then everything after is copied raw, unless a step must
    see every element)."""
    position = start
    while position + 8 <= size:
        src.seek(position)
        header = src.read(12)
        group, _element = struct.unpack_from("<HH", header)
        if group != 0x7FE0:
            return position
        if implicit:
            (length,) = struct.unpack_from("<L", header, 4)
            position += 8
        elif header[4:6] in _LONG_VRS:
            if len(header) < 12:
                return None
            (length,) = struct.unpack_from("<L", header, 8)
            position += 12
        else:
            (length,) = struct.unpack_from("<H", header, 6)
            position += 8
        if length != _UNDEFINED:
            position += length
            continue
        while True:  # encapsulated: items of defined length up to the delimiter
            src.seek(position)
            item = src.read(8)
            if len(item) < 8:
                return None
            item_group, item_element, item_length = struct.unpack("<HHL", item)
            position += 8
            if (item_group, item_element) == (0xFFFE, 0xE0DD):
                break
            if item_length == _UNDEFINED or (item_group, item_element) != (0xFFFE, 0xE000):
                return None
            position += item_length
    return min(position, size)


def _copy_range(src: BinaryIO, out: BinaryIO, start: int, length: int) -> None:
    """Copy ``length`` bytes of ``src`` from ``start`` to the end of ``out``, in the
    kernel where it can, else in :data:`CHUNK` pieces: never the whole range at once."""
    if length <= 0:
        return
    out.flush()
    remaining = length
    sendfile = getattr(os, "sendfile", None)
    if sendfile is not None:
        try:
            offset = start
            while remaining:
                sent = sendfile(out.fileno(), src.fileno(), offset, min(remaining, 1 << 30))
                if sent == 0:
                    break
                offset += sent
                remaining -= sent
            if remaining == 0:
                return
            start = offset
        except OSError:
            pass
    src.seek(start)
    while remaining:
        chunk = src.read(min(CHUNK, remaining))
        if not chunk:
            raise OSError(f"source ended {remaining} bytes early")
        out.write(chunk)
        remaining -= len(chunk)


def _whole(
    src: BinaryIO,
    out: BinaryIO,
    pipelines: Sequence[CompiledPipeline],
    context: ObjectContext,
    syntax: str,
) -> Dataset:
    src.seek(0)
    dataset = dcmread(src)
    apply_chain(pipelines, dataset, context)
    # write_dataset writes the data set's elements only: our File Meta replaces its own.
    out.write(_file_meta(dataset, syntax))
    if syntax == str(DeflatedExplicitVRLittleEndian):
        buffer = io.BytesIO()
        write_dataset(_writer(buffer, False, True), dataset)
        deflater = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -zlib.MAX_WBITS)
        out.write(deflater.compress(buffer.getbuffer()) + deflater.flush())
    else:
        implicit = syntax == str(ImplicitVRLittleEndian)
        write_dataset(_writer(out, implicit, syntax != str(ExplicitVRBigEndian)), dataset)
    return dataset
