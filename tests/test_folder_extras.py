"""The extras of a folder destination: previews (``render``), encapsulated documents
(``extract_documents``) and a DICOMDIR per study (``dicomdir``). Previews are judged
by their pixels decoded back; documents by their bytes; DICOMDIRs by dcmtk's
``dcmdump``, dicom3tools' ``dciodvfy`` and the instances they reference."""

from __future__ import annotations

import os
import re
import subprocess
import threading
from pathlib import Path
from typing import Any

import imagecodecs
import numpy as np
import pytest
from pydantic import ValidationError
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.fileset import FileSet
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    EncapsulatedCDAStorage,
    EncapsulatedPDFStorage,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from dicomrouter.config import FolderDestinationConfig
from dicomrouter.destinations import Outcome
from dicomrouter.destinations import dicomdir as fileset
from dicomrouter.destinations.dicomdir import FILESET_DIR, file_id
from dicomrouter.destinations.folder import TMP_DIR, FolderSender
from tests.support import require_peers, skip_or_fail
from tests.support.synth import make_study
from tests.test_destination_folder import outgoing

STUDY, SERIES = generate_uid(), generate_uid()
DCIODVFY, DCDIRDMP = "/usr/bin/dciodvfy", "/usr/bin/dcdirdmp"


def sender(root: Path, **extra: Any) -> FolderSender:
    return FolderSender(FolderDestinationConfig(type="folder", path=root, **extra))


def part10(path: Path, ds: Dataset) -> Path:
    """``ds`` with the usual patient/study/series attributes, saved as Part 10."""
    ds.SOPClassUID = ds.get("SOPClassUID", SecondaryCaptureImageStorage)
    ds.SOPInstanceUID = ds.get("SOPInstanceUID", generate_uid())
    ds.PatientID = ds.get("PatientID", "P1")
    ds.PatientName = "TEST^EXTRAS"
    ds.StudyInstanceUID = ds.get("StudyInstanceUID", STUDY)
    ds.SeriesInstanceUID = ds.get("SeriesInstanceUID", SERIES)
    ds.StudyDate = ds.get("StudyDate", "20240102")
    ds.StudyTime, ds.StudyID = "101010", "7"
    ds.Modality = ds.get("Modality", "OT")
    ds.SeriesNumber, ds.InstanceNumber = 1, ds.get("InstanceNumber", 1)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def image(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2", **attrs: Any) -> Path:
    ds = Dataset()
    for key, value in attrs.items():
        setattr(ds, key, value)
    bits = 8 if pixels.dtype == np.uint8 else 16
    ds.set_pixel_data(pixels, photometric, bits)
    return part10(path, ds)


def document(path: Path, data: bytes, sop_class: str, **attrs: Any) -> Path:
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf" if sop_class.endswith("1") else "text/XML"
    ds.EncapsulatedDocument = data
    ds.Modality = "DOC"
    for key, value in attrs.items():
        setattr(ds, key, value)
    return part10(path, ds)


def preview_of(root: Path, suffix: str = ".png") -> np.ndarray:
    (found,) = [p for p in root.rglob(f"*{suffix}") if TMP_DIR not in p.parts]
    data = found.read_bytes()
    return np.asarray(
        imagecodecs.png_decode(data) if suffix == ".png" else imagecodecs.jpeg8_decode(data)
    )


def window(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 (LINEAR) to 0..255."""
    y = ((x - (center - 0.5)) / (width - 1) + 0.5) * 255
    return np.clip(y, 0, 255)


@pytest.fixture
def out(tmp_path: Path) -> Path:
    root = tmp_path / "out"
    root.mkdir()
    return root


# -- previews ----------------------------------------------------------------------


RAMP = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 7) % 2000


def test_a_windowed_grey_image_is_rendered_with_its_window(tmp_path: Path, out: Path) -> None:
    src = image(tmp_path / "a.dcm", RAMP, WindowCenter=1000, WindowWidth=801)
    (result,) = sender(out, render="png").send(outgoing([src]))
    assert result.outcome is Outcome.SUCCESS, result.message
    got = preview_of(out)
    assert got.shape == (64, 64) and got.dtype == np.uint8
    assert np.abs(got.astype(int) - window(RAMP.astype(float), 1000, 801)).max() <= 1
    assert (got == 0).any() and (got == 255).any()  # clipped outside the window


def test_the_modality_lut_comes_before_the_window(tmp_path: Path, out: Path) -> None:
    src = image(
        tmp_path / "ct.dcm",
        RAMP,
        RescaleSlope=1,
        RescaleIntercept=-1024,
        WindowCenter=40,
        WindowWidth=400,
    )
    sender(out, render="png").send(outgoing([src]))
    expected = window(RAMP.astype(float) - 1024, 40, 400)
    assert np.abs(preview_of(out).astype(int) - expected).max() <= 1


def test_without_a_window_the_minimum_to_maximum_is_used(tmp_path: Path, out: Path) -> None:
    pixels = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) % 500) + 300
    src = image(tmp_path / "b.dcm", pixels)
    sender(out, render="png").send(outgoing([src]))
    expected = (pixels.astype(float) - 300) / 499 * 255
    got = preview_of(out)
    assert np.abs(got.astype(int) - expected).max() <= 1
    assert got.min() == 0 and got.max() == 255


def test_monochrome1_is_inverted(tmp_path: Path, out: Path) -> None:
    pixels = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) % 256) * 4
    src = image(tmp_path / "m1.dcm", pixels, photometric="MONOCHROME1")
    sender(out, render="png").send(outgoing([src]))
    expected = 255 - pixels.astype(float) / 1020 * 255
    got = preview_of(out)
    assert np.abs(got.astype(int) - expected).max() <= 1
    assert got[0, 0] == 255  # the lowest value is white


def test_rgb_is_written_as_it_is(tmp_path: Path, out: Path) -> None:
    rng = np.random.default_rng(13)
    pixels = rng.integers(0, 256, size=(32, 48, 3), dtype=np.uint8)
    src = image(tmp_path / "rgb.dcm", pixels, photometric="RGB")
    sender(out, render="png").send(outgoing([src]))
    assert np.array_equal(preview_of(out), pixels)


def test_ybr_full_is_converted_to_rgb(tmp_path: Path, out: Path) -> None:
    from pydicom.pixels import convert_color_space

    rng = np.random.default_rng(12)
    rgb = rng.integers(16, 240, size=(32, 32, 3), dtype=np.uint8)
    src = image(tmp_path / "ybr.dcm", convert_color_space(rgb, "RGB", "YBR_FULL"), "YBR_FULL")
    sender(out, render="png").send(outgoing([src]))
    assert np.abs(preview_of(out).astype(int) - rgb).max() <= 2  # rounding twice


def test_16_bit_rgb_is_scaled_to_8_bits(tmp_path: Path, out: Path) -> None:
    rng = np.random.default_rng(16)
    pixels = rng.integers(0, 65536, size=(16, 16, 3), dtype=np.uint16)
    src = image(tmp_path / "rgb16.dcm", pixels, photometric="RGB")
    sender(out, render="png").send(outgoing([src]))
    assert np.array_equal(preview_of(out), (pixels >> 8).astype(np.uint8))


def test_palette_colour_goes_through_its_palette(tmp_path: Path, out: Path) -> None:
    indices = (np.arange(32 * 32, dtype=np.uint8).reshape(32, 32) % 4).astype(np.uint8)
    red, green, blue = ([0, 65535, 0, 30000], [0, 0, 65535, 30000], [65535, 0, 0, 30000])
    attrs: dict[str, Any] = {}
    for name, lut in (("Red", red), ("Green", green), ("Blue", blue)):
        attrs[f"{name}PaletteColorLookupTableDescriptor"] = [4, 0, 16]
        attrs[f"{name}PaletteColorLookupTableData"] = np.array(lut, dtype="<u2").tobytes()
    src = image(tmp_path / "pal.dcm", indices, photometric="PALETTE COLOR", **attrs)
    (result,) = sender(out, render="png").send(outgoing([src]))
    assert result.outcome is Outcome.SUCCESS, result.message
    table = np.array([red, green, blue], dtype=np.uint16).T >> 8
    assert np.array_equal(preview_of(out), table[indices].astype(np.uint8))


def test_a_multi_frame_image_shows_its_middle_frame(tmp_path: Path, out: Path) -> None:
    frames = np.stack([np.full((16, 16), v, dtype=np.uint16) for v in (100, 500, 900)])
    frames[:, 0, 0] = 0  # every frame holds 0..1000, so min/max would not tell them apart
    frames[:, 0, 1] = 1000
    src = image(tmp_path / "mf.dcm", frames, NumberOfFrames=3)
    sender(out, render="png").send(outgoing([src]))
    got = preview_of(out)
    assert abs(int(got[8, 8]) - round(500 / 1000 * 255)) <= 1  # frame 2 of 3


def test_jpeg_previews(tmp_path: Path, out: Path) -> None:
    src = image(tmp_path / "j.dcm", RAMP, WindowCenter=1000, WindowWidth=2000)
    (result,) = sender(out, render="jpeg").send(outgoing([src]))
    assert result.outcome is Outcome.SUCCESS
    (jpg,) = out.rglob("*.jpg")
    assert jpg.name == f"{dcmread(src).SOPInstanceUID}.jpg"  # .dcm replaced
    got = preview_of(out, ".jpg").astype(int)
    expected = window(RAMP.astype(float), 1000, 2000)
    assert np.abs(got - expected).mean() < 3  # lossy, but this image


def test_objects_without_pixels_get_no_preview(tmp_path: Path, out: Path) -> None:
    src = document(tmp_path / "d.dcm", b"%PDF-1.4\n%%EOF\n", EncapsulatedPDFStorage)
    (result,) = sender(out, render="png").send(outgoing([src]))
    assert result.outcome is Outcome.SUCCESS, result.message
    assert [p.suffix for p in out.rglob("*") if p.is_file() and TMP_DIR not in p.parts] == [".dcm"]


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"PhotometricInterpretation": "HSV"}, "photometric interpretation HSV is not rendered"),
        ({"PixelData": b"\x00\x01" * 10}, "cannot render the image"),
    ],
)
def test_a_preview_that_cannot_be_made_leaves_the_file_delivered(
    tmp_path: Path, out: Path, change: dict[str, Any], reason: str
) -> None:
    src = image(tmp_path / "bad.dcm", RAMP)
    ds = dcmread(src)
    for key, value in change.items():
        setattr(ds, key, value)
    ds.save_as(src, enforce_file_format=True)
    (result,) = sender(out, render="png").send(outgoing([src]))
    assert result.outcome is Outcome.WARNING
    assert result.message.startswith("written to ") and f"no preview: {reason}" in result.message
    (written,) = [p for p in out.rglob("*") if p.is_file() and TMP_DIR not in p.parts]
    assert written.read_bytes() == src.read_bytes()


def test_a_preview_never_replaces_another_instances_file(tmp_path: Path, out: Path) -> None:
    """A value that renders to the preview name of another instance: its DICOM
    file stays, the preview is not written."""
    b = image(tmp_path / "b.dcm", RAMP, StudyDescription="x.png")
    a = image(tmp_path / "a.dcm", RAMP, StudyDescription="x.dcm")
    results = sender(out, render="png", layout="{StudyDescription}").send(outgoing([b, a]))
    assert [r.outcome for r in results] == [Outcome.SUCCESS, Outcome.WARNING]
    assert "x.png is a DICOM file: not replaced" in results[1].message
    assert (out / "x.png").read_bytes() == b.read_bytes()
    assert (out / "x.dcm").read_bytes() == a.read_bytes()


# -- documents ---------------------------------------------------------------------

PDF_ODD = b"%PDF-1.4\n1 0 obj <<>> endobj\ntrailer << >>\n%%EOF\n"
PDF_EVEN = PDF_ODD + b"\n"


@pytest.mark.parametrize("data", [PDF_ODD, PDF_EVEN], ids=["odd", "even"])
def test_a_pdf_is_extracted_as_it_was(tmp_path: Path, out: Path, data: bytes) -> None:
    assert len(PDF_ODD) % 2 == 1
    src = document(tmp_path / "r.dcm", data, EncapsulatedPDFStorage)
    assert len(dcmread(src).EncapsulatedDocument) % 2 == 0  # padded in the file
    (result,) = sender(out, extract_documents=True).send(outgoing([src]))
    assert result.outcome is Outcome.SUCCESS
    (pdf,) = out.rglob("*.pdf")
    assert pdf.read_bytes() == data
    assert pdf.with_suffix(".dcm").read_bytes() == src.read_bytes()


def test_the_encapsulated_document_length_is_honoured(tmp_path: Path, out: Path) -> None:
    data = PDF_EVEN[:-2] + b"\x00\x00"  # a document that itself ends with 00H
    src = document(
        tmp_path / "r.dcm", data, EncapsulatedPDFStorage, EncapsulatedDocumentLength=len(data)
    )
    sender(out, extract_documents=True).send(outgoing([src]))
    (pdf,) = out.rglob("*.pdf")
    assert pdf.read_bytes() == data


def test_a_cda_is_extracted_as_xml(tmp_path: Path, out: Path) -> None:
    data = b'<?xml version="1.0"?><ClinicalDocument xmlns="urn:hl7-org:v3"/>'
    src = document(tmp_path / "c.dcm", data, EncapsulatedCDAStorage)
    sender(out, extract_documents=True).send(outgoing([src]))
    (xml,) = out.rglob("*.xml")
    assert xml.read_bytes() == data


def test_a_document_object_without_its_document_is_a_warning(tmp_path: Path, out: Path) -> None:
    src = document(tmp_path / "e.dcm", b"%PDF", EncapsulatedPDFStorage)
    ds = dcmread(src)
    del ds.EncapsulatedDocument
    ds.save_as(src, enforce_file_format=True)
    (result,) = sender(out, extract_documents=True).send(outgoing([src]))
    assert result.outcome is Outcome.WARNING
    assert "no document: the object holds no Encapsulated Document" in result.message
    assert not list(out.rglob("*.pdf"))


def test_images_are_not_documents(tmp_path: Path, out: Path) -> None:
    files = make_study(tmp_path / "in", 2)
    results = sender(out, extract_documents=True).send(outgoing(files))
    assert {r.outcome for r in results} == {Outcome.SUCCESS}
    assert {p.suffix for p in out.rglob("*") if p.is_file() and TMP_DIR not in p.parts} == {".dcm"}


# -- DICOMDIR ----------------------------------------------------------------------


def check_dicomdir(study: Path, expected_uids: set[str]) -> None:
    """Valid for dcmtk and dicom3tools, and referencing exactly these instances,
    each at a conformant File ID of a file that holds it."""
    require_peers()
    skip_or_fail("" if Path(DCIODVFY).exists() else "dicom3tools not installed", "DICOMDIR checks")
    dicomdir = study / "DICOMDIR"
    dump = subprocess.run(
        ["/usr/bin/dcmdump", "-q", str(dicomdir)], capture_output=True, text=True, check=True
    )
    assert "MediaStorageDirectoryStorage" in dump.stdout
    check = subprocess.run([DCIODVFY, str(dicomdir)], capture_output=True, text=True)
    problems = [
        line
        for line in (check.stdout + check.stderr).splitlines()
        if line.startswith(("Error", "Warning"))
    ]
    assert check.returncode == 0 and not problems, check.stdout + check.stderr
    tree = subprocess.run([DCDIRDMP, str(dicomdir)], capture_output=True, text=True)
    assert tree.returncode == 0, tree.stderr  # follows every offset
    listing = tree.stdout + tree.stderr  # dcdirdmp writes its listing to stderr
    followed = [line.split("->")[1].strip() for line in listing.splitlines() if "->" in line]
    assert len(followed) == len(expected_uids), listing
    assert all((study / name.replace("\\", "/")).is_file() for name in followed), followed
    fs = FileSet()
    fs.load(dicomdir, raise_orphans=True)  # every record reachable through its offsets
    found = {}
    for instance in fs:
        parts = instance.ReferencedFileID
        parts = [parts] if isinstance(parts, str) else list(parts)
        assert len(parts) <= 8 and all(re.fullmatch("[A-Z0-9_]{1,8}", p) for p in parts), parts
        held = dcmread(instance.path, stop_before_pixels=True)
        assert held.SOPInstanceUID == instance.SOPInstanceUID
        found[str(instance.SOPInstanceUID)] = parts
    assert set(found) == expected_uids


def uids(files: list[Path]) -> set[str]:
    return {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files}


def test_dicomdir_lists_every_instance_and_follows_a_second_batch(
    tmp_path: Path, out: Path
) -> None:
    files = make_study(tmp_path / "in", 6, series_count=2, patient_id="PAT/../1")
    study_uid = str(dcmread(files[0]).StudyInstanceUID)
    send = sender(out, dicomdir=True, dicomdir_folder="{PatientID}/{StudyDate}")
    first = send.send(outgoing(files[:3]))
    assert {r.outcome for r in first} == {Outcome.SUCCESS}
    (dicomdir,) = out.rglob("DICOMDIR")
    study = dicomdir.parent
    assert study.parent == out / "PAT_.._1"  # one name: the value cannot climb out
    check_dicomdir(study, uids(files[:3]))
    second = sender(out, dicomdir=True, dicomdir_folder="{PatientID}/{StudyDate}")
    assert {r.outcome for r in second.send(outgoing(files[3:]))} == {Outcome.SUCCESS}
    check_dicomdir(study, uids(files))
    for path in files:  # every file arrived byte for byte, at a conformant File ID
        ds = dcmread(path, stop_before_pixels=True)
        placed = study / FILESET_DIR / file_id(ds.SeriesInstanceUID) / file_id(ds.SOPInstanceUID)
        assert placed.read_bytes() == path.read_bytes()
    assert str(dcmread(dicomdir).DirectoryRecordSequence[1].StudyInstanceUID) == study_uid


def test_dicomdir_with_previews_and_documents_beside_the_files(tmp_path: Path, out: Path) -> None:
    img = image(tmp_path / "i.dcm", RAMP)
    pdf = document(tmp_path / "p.dcm", PDF_ODD, EncapsulatedPDFStorage, InstanceNumber=2)
    send = sender(out, dicomdir=True, render="png", extract_documents=True)
    results = send.send(outgoing([img, pdf]))
    assert {r.outcome for r in results} == {Outcome.SUCCESS}, [r.message for r in results]
    (dicomdir,) = out.rglob("DICOMDIR")
    check_dicomdir(dicomdir.parent, uids([img, pdf]))
    (png,) = out.rglob("*.png")
    (extracted,) = out.rglob("*.pdf")
    assert extracted.read_bytes() == PDF_ODD
    assert png.name == file_id(str(dcmread(img).SOPInstanceUID)) + ".png"
    records = {r.DirectoryRecordType for r in dcmread(dicomdir).DirectoryRecordSequence}
    assert records == {"PATIENT", "STUDY", "SERIES", "IMAGE", "ENCAP DOC"}


def test_dicomdir_invents_record_values_a_header_lacks(tmp_path: Path, out: Path) -> None:
    src = image(tmp_path / "i.dcm", RAMP)
    ds = dcmread(src)
    ds.StudyID = ""
    del ds.StudyTime
    del ds.InstanceNumber
    ds.save_as(src, enforce_file_format=True)
    (result,) = sender(out, dicomdir=True).send(outgoing([src]))
    assert result.outcome is Outcome.SUCCESS
    (dicomdir,) = out.rglob("DICOMDIR")
    check_dicomdir(dicomdir.parent, uids([src]))
    assert (dicomdir.parent / FILESET_DIR).rglob("*")  # the file itself is unchanged
    (placed,) = [p for p in (dicomdir.parent / FILESET_DIR).rglob("*") if p.is_file()]
    assert placed.read_bytes() == src.read_bytes()


def test_two_instances_whose_names_meet_both_stay(tmp_path: Path, out: Path) -> None:
    a, b = make_study(tmp_path / "in", 2, series_count=1)
    send = sender(out, dicomdir=True)
    send.send(outgoing([a]))
    (placed,) = [p for p in out.rglob("*") if p.is_file() and p.parent.parent.name == FILESET_DIR]
    # b's first name is made a's: b must go to its next one, and a stay.
    b_uid = str(dcmread(b).SOPInstanceUID)
    taken = placed.parent / file_id(b_uid)
    os.rename(placed, taken)
    send.send(outgoing([b]))
    assert dcmread(taken).SOPInstanceUID != b_uid  # a, untouched
    assert (placed.parent / file_id(b_uid, 1)).read_bytes() == b.read_bytes()
    (dicomdir,) = out.rglob("DICOMDIR")
    check_dicomdir(dicomdir.parent, uids([a, b]))


def test_a_resend_lands_on_the_same_file(tmp_path: Path, out: Path) -> None:
    files = make_study(tmp_path / "in", 3)
    for mode in ("overwrite", "skip"):
        send = sender(out, dicomdir=True, on_exists=mode)
        send.send(outgoing(files))
        send.send(outgoing(files))
    placed = [p for p in out.rglob("*") if p.is_file() and FILESET_DIR in p.parts]
    assert len(placed) == 3
    (dicomdir,) = out.rglob("DICOMDIR")
    check_dicomdir(dicomdir.parent, uids(files))


def test_concurrent_writers_of_one_study_share_one_dicomdir(tmp_path: Path, out: Path) -> None:
    files = make_study(tmp_path / "in", 16, series_count=2)
    halves = [files[0::2], files[1::2]]
    errors: list[BaseException] = []

    def write(part: list[Path]) -> None:
        try:
            for path in part:  # one instance per batch: a DICOMDIR write each time
                sender(out, dicomdir=True).send(outgoing([path]))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(half,)) for half in halves]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    (dicomdir,) = out.rglob("DICOMDIR")
    check_dicomdir(dicomdir.parent, uids(files))


def test_a_dicomdir_is_never_written_from_a_stale_listing(
    tmp_path: Path, out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While one writer lists the study for its DICOMDIR, another cannot add a file
    to it (the study's lock), so the DICOMDIR written last lists both."""
    first, second = make_study(tmp_path / "in", 2, series_count=1)
    listing = fileset._fileset_files
    other: list[threading.Thread] = []

    def slow_listing(base: Path) -> Any:
        found = list(listing(base))
        if not other:  # the first listing: the other writer comes now
            other.append(
                threading.Thread(target=sender(out, dicomdir=True).send, args=(outgoing([second]),))
            )
            other[0].start()
            other[0].join(1.0)  # with the lock it waits for us; without, it is done
        return iter(found)

    monkeypatch.setattr(fileset, "_fileset_files", slow_listing)
    sender(out, dicomdir=True).send(outgoing([first]))
    other[0].join()
    (dicomdir,) = out.rglob("DICOMDIR")
    check_dicomdir(dicomdir.parent, uids([first, second]))


def test_a_dicomdir_that_cannot_be_written_keeps_its_instances_pending(
    tmp_path: Path, out: Path
) -> None:
    files = make_study(tmp_path / "in", 2, patient_id="P9")
    send = sender(out, dicomdir=True)
    ds = dcmread(files[0])
    blocker = out / "P9" / str(ds.StudyInstanceUID) / "DICOMDIR"
    blocker.mkdir(parents=True)  # a folder where the DICOMDIR goes
    reported: list[Any] = []
    results = send.send(outgoing(files), on_result=reported.append)
    assert [r.outcome for r in results] == [Outcome.TRANSIENT] * 2
    assert reported == results
    assert all(r.message.startswith("DICOMDIR not written: ") for r in results)
    blocker.rmdir()
    assert {r.outcome for r in send.send(outgoing(files))} == {Outcome.SUCCESS}
    check_dicomdir(blocker.parent, uids(files))


def test_extras_are_written_whole(
    tmp_path: Path, out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every extra arrives by a rename from the temporary folder (as the files do)."""
    img = image(tmp_path / "i.dcm", RAMP)
    pdf = document(tmp_path / "p.dcm", PDF_ODD, EncapsulatedPDFStorage, InstanceNumber=2)
    renames: list[tuple[Path, Path]] = []
    real = os.replace

    def spy(src: Any, dst: Any) -> None:
        renames.append((Path(src), Path(dst)))
        real(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    sender(out, dicomdir=True, render="png", extract_documents=True).send(outgoing([img, pdf]))
    arrived = {dst.suffix or dst.name: src for src, dst in renames}
    assert {".png", ".pdf", "DICOMDIR"} <= set(arrived)
    for src in arrived.values():
        assert src.parent == out / TMP_DIR and src.name.endswith(".part")
    assert not [p for p in (out / TMP_DIR).iterdir() if p.is_file()]


# -- configuration -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        (
            {"dicomdir": True, "layout": "{SOPInstanceUID}.dcm"},
            "layout cannot be used with dicomdir",
        ),
        ({"dicomdir": True, "on_exists": "version"}, "on_exists: version cannot be used"),
        ({"dicomdir_folder": "{PatientID}"}, "dicomdir_folder is used only with dicomdir"),
        (
            {"dicomdir": True, "dicomdir_folder": "../{PatientID}"},
            "dicomdir_folder '../{PatientID}'",
        ),
        (
            {"dicomdir": True, "dicomdir_folder": "{NoSuchKeyword}"},
            "dicomdir_folder '{NoSuchKeyword}'",
        ),
        ({"render": "gif"}, "render"),
    ],
)
def test_configuration_errors_name_the_key(
    tmp_path: Path, keys: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValidationError) as err:
        FolderDestinationConfig(type="folder", path=tmp_path, **keys)
    assert message in str(err.value)


def test_a_process_without_numpy_can_still_probe_the_folder(out: Path) -> None:
    """The HTTP process excludes numpy and makes senders only for an operator's echo:
    the extras load their pixel libraries when they render, not when imported."""
    import sys

    code = (
        "import sys; sys.modules['numpy'] = None\n"
        "from pathlib import Path\n"
        "from dicomrouter.config import FolderDestinationConfig\n"
        "from dicomrouter.destinations import create_sender\n"
        f"config = FolderDestinationConfig(type='folder', path=Path({str(out)!r}), "
        "render='png', extract_documents=True, dicomdir=True)\n"
        "create_sender(config).probe()\n"
        "print('probed')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "probed", done.stderr


def test_a_file_replaced_between_batches_is_read_again(tmp_path: Path, out: Path) -> None:
    """The sender keeps the records of files it read; a file replaced (overwrite)
    is read again, so the DICOMDIR says what the file now holds."""
    files = make_study(tmp_path / "in", 3, series_count=1)
    send = sender(out, dicomdir=True)
    send.send(outgoing(files))
    ds = dcmread(files[0])
    ds.InstanceNumber = 42
    ds.save_as(files[0], enforce_file_format=True)
    send.send(outgoing(files[:1]))
    (dicomdir,) = out.rglob("DICOMDIR")
    check_dicomdir(dicomdir.parent, uids(files))
    leaves = [
        r for r in dcmread(dicomdir).DirectoryRecordSequence if r.DirectoryRecordType == "IMAGE"
    ]
    numbers = [int(r.InstanceNumber) for r in leaves]
    assert numbers == sorted(numbers) and numbers[-1] == 42  # listed in Instance Number order
    (latest,) = [r for r in leaves if r.ReferencedSOPInstanceUIDInFile == ds.SOPInstanceUID]
    assert int(latest.InstanceNumber) == 42


def test_lock_files_of_studies_long_done_are_removed(tmp_path: Path, out: Path) -> None:
    """One lock file per study would pile up under .tmp/locks: those not used for an
    hour go, the one in use stays."""
    locks = out / TMP_DIR / "locks"
    locks.mkdir(parents=True)
    old, recent = locks / "old", locks / "recent"
    old.touch()
    recent.touch()
    os.utime(old, (1_000_000_000, 1_000_000_000))
    sender(out, dicomdir=True).send(outgoing(make_study(tmp_path / "in", 1)))
    left = {p.name for p in locks.iterdir()}
    assert "old" not in left and "recent" in left and len(left) == 2  # + this study's


def test_a_file_no_record_can_be_made_of_is_delivered_with_a_warning(
    tmp_path: Path, out: Path
) -> None:
    """An SR DOCUMENT record needs Completion Flag and Verification Flag (PS3.3
    F.5.24), which are not invented: the file is written, the DICOMDIR lists the
    rest, and the instance says why it is not listed."""
    img = image(tmp_path / "i.dcm", RAMP)
    sr = Dataset()
    sr.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    sr.Modality, sr.InstanceNumber = "SR", 2
    sr = part10(tmp_path / "sr.dcm", sr)
    results = sender(out, dicomdir=True).send(outgoing([img, sr]))
    assert [r.outcome for r in results] == [Outcome.SUCCESS, Outcome.WARNING]
    assert "(not in the DICOMDIR: " in results[1].message
    assert "Completion Flag" in results[1].message
    (dicomdir,) = out.rglob("DICOMDIR")
    check_dicomdir(dicomdir.parent, uids([img]))
    placed = [p for p in (dicomdir.parent / FILESET_DIR).rglob("*") if p.is_file()]
    assert sorted(p.read_bytes() for p in placed) == sorted([img.read_bytes(), sr.read_bytes()])


def test_extras_are_made_from_the_copy_that_went_out(tmp_path: Path, out: Path) -> None:
    """A transform's copy (here: another window, another patient) is what the preview
    and the DICOMDIR show, not the stored original."""
    from dataclasses import replace

    from dicomrouter.destinations import PreparedFile

    src = image(tmp_path / "i.dcm", RAMP, WindowCenter=1000, WindowWidth=801)
    copy = tmp_path / "copy.dcm"
    ds = dcmread(src)
    ds.WindowCenter, ds.WindowWidth, ds.PatientID = 300, 101, "ANON"
    ds.save_as(copy, enforce_file_format=True)
    prepared = PreparedFile(copy, str(ds.SOPInstanceUID), ExplicitVRLittleEndian, "anon", False)
    (inst,) = outgoing([src])
    send = sender(out, render="png", dicomdir=True)
    (result,) = send.send([replace(inst, prepare=lambda: prepared)])
    assert result.outcome is Outcome.SUCCESS and result.sent_as == "anon"
    assert np.abs(preview_of(out).astype(int) - window(RAMP.astype(float), 300, 101)).max() <= 1
    (dicomdir,) = out.rglob("DICOMDIR")
    assert dicomdir.parent.parent == out / "ANON"
    assert dcmread(dicomdir).DirectoryRecordSequence[0].PatientID == "ANON"


def test_non_ascii_values_reach_the_dicomdir_in_their_character_set(
    tmp_path: Path, out: Path
) -> None:
    src = image(
        tmp_path / "u.dcm",
        RAMP,
        SpecificCharacterSet="ISO_IR 192",
        PatientID="Müller",
        StudyDescription="Knie 膝",
    )
    ds = dcmread(src)
    ds.PatientName = "Müller^Jürgen"
    ds.save_as(src, enforce_file_format=True)
    (result,) = sender(out, dicomdir=True).send(outgoing([src]))
    assert result.outcome is Outcome.SUCCESS
    (dicomdir,) = out.rglob("DICOMDIR")
    assert dicomdir.parent.parent == out / "Müller"
    check_dicomdir(dicomdir.parent, uids([src]))
    patient, study = dcmread(dicomdir).DirectoryRecordSequence[:2]
    assert str(patient.PatientName) == "Müller^Jürgen" and study.StudyDescription == "Knie 膝"


def test_a_versioned_file_gets_its_own_preview(tmp_path: Path, out: Path) -> None:
    first = image(tmp_path / "v.dcm", RAMP, WindowCenter=1000, WindowWidth=801)
    send = sender(out, render="png", on_exists="version", layout="{PatientID}.dcm")
    send.send(outgoing([first]))
    ds = dcmread(first)
    ds.WindowCenter = 300
    ds.save_as(first, enforce_file_format=True)
    (result,) = send.send(outgoing([first]))
    assert result.message == "written to P1_2.dcm"
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == [
        "P1.dcm",
        "P1.png",
        "P1_2.dcm",
        "P1_2.png",
    ]
    second = np.asarray(imagecodecs.png_decode((out / "P1_2.png").read_bytes()))
    assert np.abs(second.astype(int) - window(RAMP.astype(float), 300, 801)).max() <= 1
