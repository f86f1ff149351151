"""transformed_copy: the copy is right, the pixels are the same bytes, memory is flat,
the original is untouched."""

from __future__ import annotations

import hashlib
import os
import stat
import tracemalloc
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import read_partial
from pydicom.uid import ExplicitVRLittleEndian

from dicomrouter.store.part10 import IMPLEMENTATION_CLASS_UID
from dicomrouter.transforms import ObjectContext, TransformRefused, diff_datasets, transformed_copy
from dicomrouter.transforms.output import TAIL_LIMIT
from dicomrouter.transforms.tags import PIXEL_GROUP
from tests.transforms.helpers import pipeline

CONTEXT = ObjectContext(calling_ae="MOD1")
CORPUS = [
    "CT_small.dcm",  # explicit little
    "MR_small_implicit.dcm",  # implicit little
    "JPEG2000.dcm",  # encapsulated
    "SC_rgb_jpeg_dcmtk.dcm",  # encapsulated, several fragments
    "image_dfl.dcm",  # deflated: read whole
    "MR_small_bigendian.dcm",  # big endian: read whole
    "rtplan.dcm",  # no pixel data, sequences
]


def corpus_file(name: str) -> Path:
    found = get_testdata_file(name)
    assert found is not None, name
    return Path(str(found))


def sha(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def raw_from_pixel_group(path: Path) -> bytes:
    """The file's bytes from the first element of group 7FE0 to the end."""
    with open(path, "rb") as handle:
        read_partial(handle, stop_when=lambda tag, vr, length: tag >= PIXEL_GROUP)
        return handle.read()


@pytest.mark.parametrize("name", CORPUS)
def test_noop_pipeline_keeps_the_dataset_and_the_original(name: str, tmp_path: Path) -> None:
    source = corpus_file(name)
    before = sha(source)
    noop = pipeline([{"remove": ["0011,1234"]}])
    out = transformed_copy(source, [noop], CONTEXT, tmp_path)
    assert sha(source) == before
    original, copy = dcmread(source), dcmread(out.path)
    assert diff_datasets(original, copy) == []
    assert original == copy
    if "PixelData" in original:
        assert copy.PixelData == original.PixelData
    assert copy.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
    assert copy.file_meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
    assert out.size == out.path.stat().st_size
    assert out.transfer_syntax_uid == original.file_meta.TransferSyntaxUID
    assert out.sop_instance_uid == original.SOPInstanceUID


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small_implicit.dcm", "JPEG2000.dcm"])
def test_pixel_group_is_copied_byte_for_byte(name: str, tmp_path: Path) -> None:
    source = corpus_file(name)
    steps = [{"set": {"InstitutionName": "General Hospital", "StationName": "{CallingAETitle}"}}]
    out = transformed_copy(source, [pipeline(steps)], CONTEXT, tmp_path)
    assert raw_from_pixel_group(out.path) == raw_from_pixel_group(source)
    copy = dcmread(out.path)
    assert (copy.InstitutionName, copy.StationName) == ("General Hospital", "MOD1")


def test_file_meta_follows_a_changed_sop_instance_uid(tmp_path: Path) -> None:
    source = corpus_file("CT_small.dcm")
    out = transformed_copy(
        source, [pipeline([{"set": {"SOPInstanceUID": "1.2.3.999"}}])], CONTEXT, tmp_path
    )
    copy = dcmread(out.path)
    assert copy.SOPInstanceUID == copy.file_meta.MediaStorageSOPInstanceUID == "1.2.3.999"
    assert out.sop_instance_uid == "1.2.3.999"
    assert out.sop_class_uid == copy.SOPClassUID


def test_hostile_values_never_reach_the_temporary_path(tmp_path: Path) -> None:
    source = corpus_file("CT_small.dcm")
    hostile = pipeline(
        [{"set": {"PatientID": "../../../etc/passwd", "StudyDescription": "/tmp/x\0;rm -rf"}}]
    )
    workdir = tmp_path / "work"
    workdir.mkdir()
    out = transformed_copy(source, [hostile], CONTEXT, workdir)
    assert out.path.parent == workdir
    assert out.path.name.startswith(".transform-") and out.path.suffix == ".dcm"
    assert "passwd" not in str(out.path) and "etc" not in out.path.name
    assert stat.S_IMODE(out.path.stat().st_mode) == 0o600
    assert sorted(p.name for p in workdir.iterdir()) == [out.path.name]
    assert dcmread(out.path).PatientID == "../../../etc/passwd"


def test_a_refusal_propagates_and_leaves_no_file(tmp_path: Path) -> None:
    source = corpus_file("CT_small.dcm")
    refusing = pipeline([{"set": {"StationName": "{InstitutionName}"}}])  # 18 characters
    with pytest.raises(TransformRefused, match="StationName"):
        transformed_copy(source, [refusing], CONTEXT, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_missing_sop_instance_uid_after_the_steps_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TransformRefused, match="SOPInstanceUID is missing"):
        transformed_copy(
            corpus_file("CT_small.dcm"),
            [pipeline([{"remove": ["SOPInstanceUID"]}])],
            CONTEXT,
            tmp_path,
        )


def test_the_source_may_be_read_only(tmp_path: Path) -> None:
    source = tmp_path / "ro.dcm"
    source.write_bytes(corpus_file("CT_small.dcm").read_bytes())
    source.chmod(0o400)
    before = (sha(source), source.stat().st_mtime_ns)
    transformed_copy(source, [pipeline([{"remove": ["PatientName"]}])], CONTEXT, tmp_path)
    assert (sha(source), source.stat().st_mtime_ns) == before


def test_remove_pixel_data_reads_the_whole_file(tmp_path: Path) -> None:
    out = transformed_copy(
        corpus_file("CT_small.dcm"), [pipeline([{"remove": ["PixelData"]}])], CONTEXT, tmp_path
    )
    assert "PixelData" not in dcmread(out.path)


def write_synthetic(path: Path, pixel_bytes: int, tail: Dataset | None = None) -> None:
    """An Explicit VR Little Endian CT whose Pixel Data is written in chunks (the test
    itself never holds it), optionally followed by elements after group 7FE0."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.5"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = "1.2.3.4.5"
    ds.PatientID = "BIG"
    ds.StudyDate = "20240101"
    ds.Rows, ds.Columns, ds.BitsAllocated = 32, 32, 16
    ds.NumberOfFrames = pixel_bytes // 2048
    ds.save_as(path, enforce_file_format=True)
    chunk = bytes(range(256)) * 4096  # 1 MiB
    with open(path, "ab") as handle:
        handle.write(b"\xe0\x7f\x10\x00OW\x00\x00" + pixel_bytes.to_bytes(4, "little"))
        remaining = pixel_bytes
        while remaining:
            handle.write(chunk[: min(remaining, len(chunk))])
            remaining -= min(remaining, len(chunk))
        if tail is not None:
            from pydicom.filebase import DicomFileLike
            from pydicom.filewriter import write_dataset

            fp = DicomFileLike(handle)
            fp.is_little_endian, fp.is_implicit_VR = True, False
            write_dataset(fp, tail)


def test_elements_after_pixel_data_are_transformed_too(tmp_path: Path) -> None:
    tail = Dataset()
    tail.add_new(0x7FE10010, "LO", "VENDOR")
    tail.add_new(0x7FE11001, "LO", "vendor blob")
    tail.add_new(0xFFFCFFFC, "OB", b"\0" * 16)
    source = tmp_path / "tail.dcm"
    write_synthetic(source, 4096, tail)
    out = transformed_copy(source, [pipeline([{"remove_private": True}])], CONTEXT, tmp_path)
    copy = dcmread(out.path)
    assert 0x7FE11001 not in copy and 0x7FE10010 not in copy
    assert copy[0xFFFCFFFC].value == b"\0" * 16
    assert copy.PixelData == dcmread(source).PixelData


def test_steps_that_must_see_every_element_get_the_whole_file_when_a_tail_is_large(
    tmp_path: Path,
) -> None:
    """Elements after the pixel data larger than TAIL_LIMIT are copied unseen by
    coercion steps; de-identification and private-data removal must see them, so the
    copy is made from the whole file for them."""
    tail = Dataset()
    tail.add_new(0x7FE10010, "LO", "VENDOR")
    tail.add_new(0x7FE11001, "OB", b"DOE^JANE" * (TAIL_LIMIT // 8 + 1))
    source = tmp_path / "tail.dcm"
    write_synthetic(source, 4096, tail)
    coercion = transformed_copy(
        source, [pipeline([{"set": {"StationName": "A"}}])], CONTEXT, tmp_path
    )
    assert dcmread(coercion.path)[0x7FE11001].value == tail[0x7FE11001].value
    for steps, environ in (
        ([{"deidentify": {"secret_env": "S"}}], {"S": "secret"}),
        ([{"remove_private": True}], {}),
        ([{"remove": ["7FE1,xx01"]}], {}),
    ):
        out = transformed_copy(source, [pipeline(steps, environ)], CONTEXT, tmp_path)
        assert b"DOE^JANE" not in out.path.read_bytes(), steps
        assert dcmread(out.path).PixelData == dcmread(source).PixelData


def write_undefined_length_fragment(path: Path) -> None:
    """An encapsulated image whose fragment item has undefined length (the walk over
    item headers cannot tell where the pixel data ends), followed by a private block
    that names the patient."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.50"
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.6"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = "1.2.3.4.6"
    ds.PatientName = "Doe^John"
    ds.BurnedInAnnotation = "NO"
    ds.save_as(path, enforce_file_format=True)
    with open(path, "ab") as handle:
        handle.write(b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff")
        handle.write(b"\xfe\xff\x00\xe0\x00\x00\x00\x00")  # empty offset table
        handle.write(b"\xfe\xff\x00\xe0\xff\xff\xff\xff" + b"\xff\xd8\xff\xd9")
        handle.write(b"\xfe\xff\xdd\xe0\x00\x00\x00\x00")  # sequence delimiter
        handle.write(b"\xe1\x7f\x10\x00LO\x08\x00ACME 1.0")
        handle.write(b"\xe1\x7f\x10\x10LO\x08\x00Doe^John")


def test_deidentification_sees_a_tail_hidden_behind_an_undefined_length_fragment(
    tmp_path: Path,
) -> None:
    source = tmp_path / "odd.dcm"
    write_undefined_length_fragment(source)
    deid = pipeline([{"deidentify": {"secret_env": "S"}}], environ={"S": "secret"})
    out = transformed_copy(source, [deid], CONTEXT, tmp_path)
    assert b"Doe^John" not in out.path.read_bytes()


def test_a_200_mb_instance_keeps_memory_flat(tmp_path: Path) -> None:
    size = 200 * 1024 * 1024
    source = tmp_path / "big.dcm"
    write_synthetic(source, size)
    steps = pipeline(
        [{"set": {"InstitutionName": "GH"}}, {"shift_dates": {"days": 2}}, {"remove_private": True}]
    )
    tracemalloc.start()
    try:
        out = transformed_copy(source, [steps], CONTEXT, tmp_path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 1024 * 1024, f"peak {peak} bytes for a {size}-byte instance"
    assert raw_from_pixel_group_hash(out.path) == raw_from_pixel_group_hash(source)
    header = dcmread(out.path, stop_before_pixels=True)
    assert (header.InstitutionName, header.StudyDate) == ("GH", "20240103")
    assert out.size == out.path.stat().st_size
    assert abs(out.size - source.stat().st_size) < 200  # File Meta and one element
    os.unlink(out.path)


def raw_from_pixel_group_hash(path: Path) -> str:
    with open(path, "rb") as handle:
        read_partial(handle, stop_when=lambda tag, vr, length: tag >= PIXEL_GROUP)
        digest = hashlib.sha256()
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
        return digest.hexdigest()
