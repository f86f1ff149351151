"""The folder sender (``type: folder``): layout, safe names, whole files only,
``on_exists``, and the split between a folder that cannot be written (the
destination pauses) and one instance that cannot be named (it fails)."""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from dicomrouter.config import FolderDestinationConfig
from dicomrouter.destinations import (
    DestinationUnavailable,
    Outcome,
    OutgoingInstance,
    PreparedFile,
    Sender,
)
from dicomrouter.destinations.folder import (
    MAX_COMPONENT_BYTES,
    TMP_DIR,
    FolderSender,
    safe_component,
)
from dicomrouter.transforms import TransformRefused
from tests.support import mounted_tmpfs
from tests.support.outgoing import outgoing, retag
from tests.support.synth import make_study


def folder(path: Path, **extra: Any) -> FolderSender:
    return FolderSender(FolderDestinationConfig(type="folder", path=path, **extra))


def written(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and TMP_DIR not in p.parts)


@pytest.fixture
def study(tmp_path: Path) -> list[Path]:
    return make_study(tmp_path / "in", 4, series_count=2, patient_id="PAT1")


@pytest.fixture
def out(tmp_path: Path) -> Path:
    root = tmp_path / "out"
    root.mkdir()
    return root


# -- safe names --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("", "_"),
        (".", "_"),
        ("..", "_"),
        ("...", "_"),
        ("../../etc", "_._.._etc"),
        ("a/b", "a_b"),
        ("a\\b", "a_b"),
        ("a\x00b", "a_b"),
        ("line\nbreak\ttab\x7f", "line_break_tab_"),
        ("right\u202eleft", "right_left"),
        (".hidden", "_hidden"),
        ("trailing. . ", "trailing"),
        ("  spaced  ", "spaced"),
        ("CON", "_CON"),
        ("nul.dcm", "_nul.dcm"),
        ("com1", "_com1"),
        ('a:b*c?d"e<f>g|h', "a_b_c_d_e_f_g_h"),
        ("Müller^Jürgen", "Müller^Jürgen"),
        ("山田^太郎", "山田^太郎"),
    ],
)
def test_safe_component(value: str, expected: str) -> None:
    assert safe_component(value) == expected


def test_safe_component_caps_long_names_and_keeps_them_apart() -> None:
    first, second = "x" * 300 + "1.dcm", "x" * 300 + "2.dcm"
    a, b = safe_component(first), safe_component(second)
    assert a != b
    for name in (a, b):
        assert len(name.encode()) <= MAX_COMPONENT_BYTES
        assert name.endswith(".dcm") and name.startswith("x" * 50)
    wide = safe_component("語" * 200)  # 3 bytes each: cut on a character boundary
    assert len(wide.encode()) <= MAX_COMPONENT_BYTES
    wide.encode("utf-8")  # valid UTF-8
    assert safe_component("\udcff") == "_"  # a lone surrogate


@pytest.mark.filterwarnings("ignore:The value length")
def test_a_hostile_value_never_leaves_the_folder(tmp_path: Path, out: Path) -> None:
    files = make_study(tmp_path / "in", 5)
    hostile = ["../../etc", "/abs/olute", "..", "a\x00b", "x" * 300]
    for path, value in zip(files, hostile, strict=True):
        retag(path, PatientID=value)
    sender = folder(out, layout="{PatientID}/{PatientID}_{SOPInstanceUID}.dcm")
    results = sender.send(outgoing(files))
    assert [r.outcome for r in results] == [Outcome.SUCCESS] * 5, results
    paths = written(out)
    assert len(paths) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]  # nothing outside
    for p in paths:
        assert p.resolve().is_relative_to(out.resolve())
        assert all(len(part.encode()) <= MAX_COMPONENT_BYTES for part in p.relative_to(out).parts)
        assert "\x00" not in str(p)


# -- layout and bytes ----------------------------------------------------------------


def test_default_layout_writes_every_byte(study: list[Path], out: Path) -> None:
    sender = folder(out)
    assert isinstance(sender, Sender)
    seen: list[Any] = []
    results = sender.send(outgoing(study), on_result=seen.append)
    assert [r.outcome for r in results] == [Outcome.SUCCESS] * 4
    assert seen == results
    for path in study:
        ds = dcmread(path, stop_before_pixels=True)
        target = (
            out / "PAT1" / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
        )
        assert target.read_bytes() == path.read_bytes()
        assert results[study.index(path)].message == f"written to {target.relative_to(out)}"
    assert os.listdir(out / TMP_DIR) == []  # no temporary file left


def test_layout_format_specs_and_missing_values(study: list[Path], out: Path) -> None:
    retag(study[0], AccessionNumber="")
    sender = folder(out, layout="{PatientID}/{AccessionNumber}/{SeriesNumber:03d}_{Modality}/x.dcm")
    results = sender.send(outgoing(study[:1]), should_stop=lambda: False)
    assert results[0].outcome is Outcome.SUCCESS
    series = dcmread(study[0]).SeriesNumber
    assert written(out) == [out / "PAT1" / "_" / f"{int(series):03d}_CT" / "x.dcm"]


def test_a_value_that_does_not_fit_its_format_fails_that_instance(
    study: list[Path], out: Path
) -> None:
    sender = folder(out, layout="{PatientID:03d}/{SOPInstanceUID}.dcm")
    results = sender.send(outgoing(study[:2]))
    assert [r.outcome for r in results] == [Outcome.PERMANENT] * 2
    assert "cannot name the file" in results[0].message
    assert written(out) == []


def test_a_symbolic_link_out_of_the_folder_is_refused(
    tmp_path: Path, study: list[Path], out: Path
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (out / "PAT1").symlink_to(elsewhere)
    results = folder(out).send(outgoing(study[:1]))
    assert results[0].outcome is Outcome.PERMANENT
    assert "would be outside" in results[0].message
    assert list(elsewhere.iterdir()) == []


def test_should_stop_leaves_the_rest_unreported(study: list[Path], out: Path) -> None:
    calls = iter([False, False, True])
    results = folder(out).send(outgoing(study), should_stop=lambda: next(calls))
    assert [r.key for r in results] == [0, 1]


def test_a_transformed_copy_is_written_and_deleted(
    tmp_path: Path, study: list[Path], out: Path
) -> None:
    copy = tmp_path / "copy.dcm"
    data = dcmread(study[0])
    data.PatientID = "PSEUDO"
    data.SOPInstanceUID = "1.2.3.4.5"
    data.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.5"
    data.save_as(copy, enforce_file_format=True)
    copied = copy.read_bytes()
    inst = outgoing(study[:1])[0]
    prepared = PreparedFile(copy, "1.2.3.4.5", inst.transfer_syntax_uid, "research @ abc")
    refused_calls: list[int] = []

    def refuse() -> PreparedFile:
        refused_calls.append(1)
        raise TransformRefused("no")

    batch = [
        OutgoingInstance(**{**inst.__dict__, "prepare": lambda: prepared}),
        OutgoingInstance(**{**outgoing(study[1:2])[0].__dict__, "key": 1, "prepare": refuse}),
    ]
    results = folder(out, layout="{PatientID}/{SOPInstanceUID}.dcm").send(batch)
    assert results[0].outcome is Outcome.SUCCESS
    assert results[0].sent_as == "research @ abc" and results[0].sent_uid == "1.2.3.4.5"
    assert (out / "PSEUDO" / "1.2.3.4.5.dcm").read_bytes() == copied
    assert not copy.exists()  # the temporary copy is gone
    assert results[1].outcome is Outcome.PERMANENT and refused_calls


def test_transfer_syntax_is_honoured(study: list[Path], out: Path) -> None:
    sender = folder(out, layout="{SOPInstanceUID}.dcm", transfer_syntax="rle")
    results = sender.send(outgoing(study[:1]))
    assert results[0].outcome is Outcome.SUCCESS, results[0].message
    (path,) = written(out)
    ds = dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.5"
    assert results[0].sent_as and "RLE" in results[0].sent_as
    original = dcmread(study[0])
    assert (ds.pixel_array == original.pixel_array).all()


# -- whole files only ----------------------------------------------------------------


def test_no_partial_file_is_ever_visible(tmp_path: Path, out: Path) -> None:
    """A reader polling the folder while large files are written sees each file
    either absent or complete: the bytes go to a temporary file, then a rename."""
    files = make_study(tmp_path / "in", 6, rows=512, cols=512)
    expected = {dcmread(p, stop_before_pixels=True).SOPInstanceUID: p.stat().st_size for p in files}
    done = threading.Event()
    bad: list[str] = []

    def watch() -> None:
        while not done.is_set():
            for path in written(out):
                size = path.stat().st_size if path.exists() else None
                if size is not None and size != expected[path.stem]:
                    bad.append(f"{path.name}: {size}")

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        folder(out, layout="{SOPInstanceUID}.dcm").send(outgoing(files))
    finally:
        done.set()
        watcher.join()
    assert bad == []
    assert len(written(out)) == 6


def test_leftover_temporary_files_are_swept(study: list[Path], out: Path) -> None:
    tmp = out / TMP_DIR
    tmp.mkdir()
    old, fresh = tmp / ".old.part", tmp / ".fresh.part"
    old.write_bytes(b"x")
    fresh.write_bytes(b"x")
    os.utime(old, (1, 1))
    folder(out).send(outgoing(study[:1]))
    assert not old.exists() and fresh.exists()


# -- on_exists -----------------------------------------------------------------------


def _again(study: list[Path], out: Path, mode: str) -> list[Any]:
    layout = "{SOPInstanceUID}.dcm"
    folder(out, layout=layout, on_exists=mode).send(outgoing(study[:1]))
    retag(study[0], PatientName="Changed^Name")
    return folder(out, layout=layout, on_exists=mode).send(outgoing(study[:1]))


def test_on_exists_overwrite(study: list[Path], out: Path) -> None:
    results = _again(study, out, "overwrite")
    assert results[0].outcome is Outcome.SUCCESS
    (path,) = written(out)
    assert path.read_bytes() == study[0].read_bytes()


def test_on_exists_skip(study: list[Path], out: Path) -> None:
    before = study[0].read_bytes()
    results = _again(study, out, "skip")
    assert results[0].outcome is Outcome.SUCCESS
    assert "kept the file already" in results[0].message
    (path,) = written(out)
    assert path.read_bytes() == before


def test_on_exists_version(study: list[Path], out: Path) -> None:
    before = study[0].read_bytes()
    results = _again(study, out, "version")
    assert results[0].outcome is Outcome.SUCCESS
    first, second = written(out)
    assert first.read_bytes() == before
    assert second.name == first.stem + "_2.dcm"
    assert second.read_bytes() == study[0].read_bytes()
    # The same bytes again (a resend after a crash) make no third file.
    again = folder(out, layout="{SOPInstanceUID}.dcm", on_exists="version").send(
        outgoing(study[:1])
    )
    assert "the same file is already at" in again[0].message
    assert len(written(out)) == 2


# -- the folder itself -------------------------------------------------------------------


def test_a_missing_folder_is_unavailable(tmp_path: Path, study: list[Path]) -> None:
    sender = folder(tmp_path / "absent")
    with pytest.raises(DestinationUnavailable, match="does not exist"):
        sender.send(outgoing(study))
    with pytest.raises(DestinationUnavailable):
        sender.probe()
    assert sender.send([]) == []


def test_probe_writes_and_removes_a_file(out: Path) -> None:
    folder(out).probe()
    assert os.listdir(out / TMP_DIR) == []


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MB tmpfs."""
    with mounted_tmpfs(tmp_path / "small", "2m") as mount:
        yield mount


def test_a_full_disk_pauses_the_destination_and_keeps_nothing_partial(
    tmp_path: Path, small_fs: Path
) -> None:
    files = make_study(tmp_path / "in", 6, rows=512, cols=512)  # ~525 KB each, 2 MB disk
    sender = folder(small_fs, layout="{SOPInstanceUID}.dcm")
    results = sender.send(outgoing(files))
    outcomes = [r.outcome for r in results]
    assert outcomes[:3] == [Outcome.SUCCESS] * 3, results
    assert Outcome.TRANSIENT in outcomes and Outcome.PERMANENT not in outcomes
    assert "No space left" in results[-1].message
    sources = {f"{dcmread(f, stop_before_pixels=True).SOPInstanceUID}.dcm": f for f in files}
    for path in written(small_fs):  # what is there is whole: the file sent, byte for byte
        assert path.read_bytes() == sources[path.name].read_bytes()
    assert os.listdir(small_fs / TMP_DIR) == []
    # The next batch cannot write anything: the destination is unavailable (pauses).
    with pytest.raises(DestinationUnavailable, match="No space left"):
        sender.send(outgoing(files[4:]))
    for path in written(small_fs):
        path.unlink()
    sender.probe()
    assert [r.outcome for r in sender.send(outgoing(files[4:]))] == [Outcome.SUCCESS] * 2


def test_a_read_only_folder_is_unavailable_then_writable(tmp_path: Path, small_fs: Path) -> None:
    files = make_study(tmp_path / "in", 2)
    sender = folder(small_fs)
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    try:
        with pytest.raises(DestinationUnavailable, match="Read-only"):
            sender.send(outgoing(files))
        with pytest.raises(DestinationUnavailable):
            sender.probe()
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_fs)], check=True)
    sender.probe()
    assert [r.outcome for r in sender.send(outgoing(files))] == [Outcome.SUCCESS] * 2
