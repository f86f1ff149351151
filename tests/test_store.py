"""The store: UIDs never become paths outside storage; commits are atomic; the index
reports a locked or broken database as unavailable (the receiver answers 0xA700)."""

from __future__ import annotations

import io
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag

from dicomrouter.store import (
    IndexUnavailable,
    InstanceHeader,
    InstanceIndex,
    InvalidUID,
    ObjectStore,
    Provenance,
    Recorded,
    StorageError,
    create_index_engine,
    missing_identity,
    part10,
    read_header,
    validate_uid,
)
from dicomrouter.store import index as index_module
from dicomrouter.store.header import read_identity


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "   ",
        "../../etc/passwd",
        "1.2.3/../../x",
        "1.2..3",
        ".1.2",
        "1.2.",
        "1.2.a",
        "1" * 65,
        None,
        "1.2.3\n",  # "$" in a regex would let a trailing newline through
        "1.2\n.3",
    ],
)
def test_invalid_uids_are_refused(bad: object) -> None:
    with pytest.raises(InvalidUID):
        validate_uid(bad, "SOPInstanceUID")


def test_valid_uid_is_stripped_of_padding() -> None:
    assert validate_uid("1.2.840.10008.1.2\x00", "TransferSyntaxUID") == "1.2.840.10008.1.2"


def test_paths_stay_inside_storage(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path / "s", "test")
    store.prepare()
    assert store.relative_path("1.2", "1.2.3", "1.2.3.4") == "1.2/1.2.3/1.2.3.4.dcm"
    with pytest.raises(InvalidUID):
        store.relative_path("1.2", "..", "1.2.3.4")
    for escape in ("../../outside.dcm", "../objects2/x.dcm", "/etc/passwd", "a/../..", ""):
        with pytest.raises(StorageError):
            store.absolute(escape)
    assert store.absolute("1.2/./1.2.3/x.dcm") == store.objects / "1.2" / "1.2.3" / "x.dcm"


def test_commit_moves_the_file_into_place(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path / "s", "test")
    store.prepare()
    temp = store.tmp / "incoming.dcm"
    temp.write_bytes(b"x" * 100)
    final = store.commit(temp, store.relative_path("1.2", "1.2.3", "1.2.3.4"))
    assert final.read_bytes() == b"x" * 100
    assert not temp.exists()
    assert final.parent in store._durable


def test_sweep_removes_only_idle_partial_files(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path / "s", "test")
    store.prepare()
    old, fresh = store.tmp / "old.dcm", store.tmp / "fresh.dcm"
    old.write_bytes(b"a")
    fresh.write_bytes(b"b")
    os.utime(old, (time.time() - 600, time.time() - 600))
    assert store.sweep_tmp(older_than=300) == 1
    assert not old.exists() and fresh.exists()


def test_header_identity_and_missing_elements() -> None:
    dataset = read_header(get_testdata_file("CT_small.dcm"), identity_only=True)
    assert missing_identity(dataset) == []
    header = InstanceHeader.from_dataset(dataset)
    assert header.modality == "CT" and header.transfer_syntax_uid == "1.2.840.10008.1.2.1"
    assert "PixelData" not in read_header(get_testdata_file("CT_small.dcm"))


def _reference_header(dataset: Dataset) -> tuple[str, ...]:
    """What ``from_dataset`` must return: pydicom's converted values, stripped."""

    def text(keyword: str) -> str:
        value = dataset.get(keyword)
        return "" if value is None else str(value).strip("\x00 ")

    return tuple(
        text(k)
        for k in (
            "SOPInstanceUID",
            "StudyInstanceUID",
            "SeriesInstanceUID",
            "PatientID",
            "PatientName",
            "AccessionNumber",
            "StudyDate",
            "StudyDescription",
            "Modality",
        )
    )


def _fast_header(dataset: Dataset) -> tuple[str, ...]:
    header = InstanceHeader.from_dataset(dataset)
    return (
        header.sop_instance_uid,
        header.study_instance_uid,
        header.series_instance_uid,
        header.patient_id,
        header.patient_name,
        header.accession_number,
        header.study_date,
        header.study_description,
        header.modality,
    )


@pytest.mark.parametrize(
    "name",
    [
        "CT_small.dcm",
        "MR_small.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_implicit.dcm",
        "JPEG2000.dcm",
        "rtdose.dcm",
        "J2K_pixelrep_mismatch.dcm",  # ISO 2022 IR 13 / IR 87
        "SC_rgb_small_odd_big_endian.dcm",  # ISO_IR 192
        "examples_palette.dcm",
        "test-SR.dcm",
        "waveform_ecg.dcm",
    ],
)
def test_header_raw_values_match_pydicom_conversion(name: str) -> None:
    """The receive path reads the indexed elements from their raw bytes; the result
    must equal pydicom's own conversion (character sets, padding, byte order)."""
    path = get_testdata_file(name)
    fast = _fast_header(read_header(path, identity_only=True))
    reference = read_header(path)
    assert fast == _reference_header(reference)


@pytest.mark.parametrize(
    ("keyword", "charset", "raw", "expected"),
    [
        ("PatientID", "ISO_IR 100", b"ID\\2 ", "['ID', '2']"),  # multi-valued
        ("StudyDescription", "ISO_IR 100", b" Chest \x00", "Chest"),
        ("PatientID", "ISO_IR 100", b"M\xfcller", "M\xfcller"),
        ("PatientName", "ISO_IR 192", b"M\xc3\xbcller^J", "M\xfcller^J"),
        (
            "PatientName",
            ["ISO 2022 IR 13", "ISO 2022 IR 87"],
            b"Yamada^Tarou=\x1b$B;3ED\x1b(B^\x1b$BB@O:\x1b(B",
            "Yamada^Tarou=\u5c71\u7530^\u592a\u90ce",
        ),
    ],
)
def test_header_text_values_fall_back_to_pydicom(
    keyword: str, charset: str | list[str], raw: bytes, expected: str, tmp_path: Path
) -> None:
    source = read_header(get_testdata_file("CT_small.dcm"))
    source.SpecificCharacterSet = charset
    source[keyword].value = raw  # written as these bytes
    path = tmp_path / "x.dcm"
    source.save_as(path, enforce_file_format=True)
    field = {"PatientID": 3, "PatientName": 4, "StudyDescription": 7}[keyword]
    fast = _fast_header(read_header(path, identity_only=True))[field]  # raw bytes
    assert fast == _reference_header(read_header(path))[field] == expected  # pydicom


@pytest.mark.parametrize("raw", [b"1.2.3.444\n", b"\t1.2.3.444 ", b"1.2.3.444\r\n", b"1.2.3.4\x00"])
def test_header_raw_uids_are_read_as_pydicom_reads_them(raw: bytes, tmp_path: Path) -> None:
    """Padding and surrounding whitespace in a UID are dropped exactly as pydicom
    drops them, so the index never holds a UID with a newline in it."""
    source = read_header(get_testdata_file("CT_small.dcm"))
    source["StudyInstanceUID"].value = raw
    path = tmp_path / "x.dcm"
    source.save_as(path, enforce_file_format=True)
    fast = InstanceHeader.from_dataset(read_header(path, identity_only=True))
    reference = str(read_header(path).StudyInstanceUID)
    assert fast.study_instance_uid == reference == raw.decode().strip("\x00 \t\r\n")


def test_header_bad_uid_in_raw_element_is_rejected() -> None:
    from pydicom.dataelem import RawDataElement

    dataset = read_header(get_testdata_file("CT_small.dcm"), identity_only=True)
    raw = b"1.2.3/../x\x00"
    dataset[0x00080018] = RawDataElement(BaseTag(0x00080018), "UI", len(raw), raw, 0, False, True)  # type: ignore[assignment]
    with pytest.raises(InvalidUID):
        InstanceHeader.from_dataset(dataset)


def _header() -> InstanceHeader:
    return InstanceHeader.from_dataset(read_header(get_testdata_file("CT_small.dcm")))


def test_record_new_then_overwritten(index_url: str) -> None:
    index = InstanceIndex(create_index_engine(index_url))
    index.prepare()  # what the receiver does at start-up
    assert index.record(_header(), "a/b/c.dcm", 10, Provenance("CT1")) is Recorded.NEW
    assert index.exists(_header().sop_instance_uid)
    assert index.record(_header(), "a/b/c.dcm", 11, Provenance("CT1")) is Recorded.OVERWRITTEN


@pytest.mark.sqlite_only
def test_locked_index_is_reported_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "i.sqlite"
    create_index_engine(f"sqlite:///{path}").dispose()
    index = InstanceIndex(create_index_engine(f"sqlite:///{path}", create=False, busy_timeout_ms=0))
    monkeypatch.setattr(index_module, "_LOCK_WAIT", 0.3)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        started = time.monotonic()
        with pytest.raises(IndexUnavailable):
            index.record(_header(), "a/b/c.dcm", 10, Provenance())
        assert time.monotonic() - started < 5
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    # Once the lock is gone the same call succeeds.
    assert index.record(_header(), "a/b/c.dcm", 10, Provenance()) is Recorded.NEW


def test_a_postgresql_lock_timeout_is_retried_until_the_lock_is_gone(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL says "busy" by SQLSTATE (55P03, lock_not_available), never in words
    SQLite uses: the receiver retries it, and succeeds once the lock is released."""
    import psycopg

    create_index_engine(postgres_url).dispose()
    engine = create_index_engine(postgres_url, create=False, busy_timeout_ms=100)
    index = InstanceIndex(engine)
    monkeypatch.setattr(index_module, "_LOCK_WAIT", 30.0)
    holder = psycopg.connect(postgres_url)
    holder.execute("LOCK TABLE instances IN EXCLUSIVE MODE")  # INSERTs wait behind it
    release = threading.Timer(1.0, holder.rollback)
    release.start()
    try:
        assert index.record(_header(), "a/b/c.dcm", 10, Provenance()) is Recorded.NEW
    finally:
        release.join()
        holder.close()
        engine.dispose()
    # And a lock held past the wait is reported, not waited for without end.
    monkeypatch.setattr(index_module, "_LOCK_WAIT", 0.3)
    holder = psycopg.connect(postgres_url)
    holder.execute("LOCK TABLE instances IN EXCLUSIVE MODE")
    try:
        with pytest.raises(IndexUnavailable, match="lock timeout"):
            index.record(_header(), "a/b/c.dcm", 11, Provenance())
    finally:
        holder.close()


def test_commit_without_replace_keeps_the_first_copy(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path / "s", "test")
    store.prepare()
    relative = store.relative_path("1.2", "1.2.3", "1.2.3.4")
    first, second = store.tmp / "a.dcm", store.tmp / "b.dcm"
    first.write_bytes(b"first")
    second.write_bytes(b"second")
    assert store.commit(first, relative, replace=False) is not None
    assert store.commit(second, relative, replace=False) is None
    assert store.absolute(relative).read_bytes() == b"first"
    assert second.exists()  # left for the caller (pynetdicom removes it)


def test_record_without_replace_keeps_the_indexed_copy(index_url: str) -> None:
    index = InstanceIndex(create_index_engine(index_url))
    assert (
        index.record(_header(), "a/b/c.dcm", 10, Provenance("CT1"), replace=False) is Recorded.NEW
    )
    assert (
        index.record(_header(), "a/b/c.dcm", 11, Provenance("CT2"), replace=False) is Recorded.KEPT
    )
    assert index.record(_header(), "a/b/c.dcm", 12, Provenance("CT3")) is Recorded.OVERWRITTEN


def _header_or_error(read: Any, content: bytes) -> tuple[str, object]:
    try:
        dataset = read(content)
    except Exception as exc:  # what the receiver turns into 0xC000
        return "unreadable", type(exc).__name__
    missing = missing_identity(dataset)
    if missing:
        return "missing", missing
    try:
        return "header", InstanceHeader.from_dataset(dataset)
    except InvalidUID as exc:
        return "invalid", str(exc)


@pytest.mark.filterwarnings("ignore:Expected explicit VR")  # one bundled file lies; both agree
def test_header_from_memory_is_the_header_from_the_file() -> None:
    """read_identity (File Meta by struct, data set by pydicom) gives what
    read_header gives, for every file pydicom bundles: every transfer syntax it has
    (deflated and big endian included), odd File Metas and broken files."""
    from tests.test_interop import _bundled_files

    files = _bundled_files()
    assert len(files) > 50
    fast = 0
    for name in files:
        content = Path(name).read_bytes()
        expected = _header_or_error(
            lambda data: read_header(io.BytesIO(data), identity_only=True), content
        )
        assert _header_or_error(read_identity, content) == expected, name
        fast += part10.parse_file_meta(content) is not None
    assert fast > len(files) // 2  # most went through the struct path
