"""Synthetic DICOM Part-10 files for tests and the benchmark.

Why synthetic: tests and benchmarks need many valid, uniquely identified objects of a
known size, written fast, without shipping patient data. The files are uncompressed
(Explicit VR Little Endian) so that every peer (dcmtk, Orthanc, pynetdicom) accepts them
without transcoding, and their size is predictable: ``rows * cols * bits / 8`` plus a
header of roughly 600 bytes.

Memory stays flat however large the study: one dataset per series is reused (only the
per-instance UIDs and numbers change), and one pixel buffer is shared by every image, so
a ~2 GB study is written file by file with a few hundred KB of live data.
"""

from __future__ import annotations

import datetime as _dt
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    SecondaryCaptureImageStorage,
    generate_uid,
)

__all__ = [
    "LARGE_SHAPE",
    "SMALL_SHAPE",
    "instance_size",
    "instances_for_bytes",
    "iter_study",
    "make_large_study",
    "make_small_study",
    "make_study",
    "pixel_buffer",
    "sop_class_for",
]

SMALL_SHAPE = (64, 64)
"""Rows, columns of a "small" image: 64*64*2 = 8 KiB of pixels (~9.4 KB per file)."""

LARGE_SHAPE = (512, 512)
"""Rows, columns of a "large" image: 512*512*2 = 512 KiB of pixels per file."""

_HEADER_ESTIMATE = 1240
"""Bytes of preamble, file meta and non-pixel attributes (measured: 1240 for CT)."""

_SOP_CLASSES: dict[str, UID] = {
    "CT": CTImageStorage,
    "MR": MRImageStorage,
}

# One immutable pixel buffer per (rows, cols, bits): immutable bytes can be shared by
# every dataset without copies, which is what keeps a 2 GB study at constant memory.
_PIXEL_CACHE: dict[tuple[int, int, int], bytes] = {}


def sop_class_for(modality: str) -> UID:
    """SOP Class UID for ``modality``: CT and MR image storage, else Secondary Capture.

    Secondary Capture is the safe default because every storage SCP accepts it and it
    carries any modality code.
    """
    return _SOP_CLASSES.get(modality.upper(), SecondaryCaptureImageStorage)


def pixel_buffer(rows: int, cols: int, bits: int = 16) -> bytes:
    """Return the shared pixel data for an image of this shape.

    The content is a repeating ramp rather than zeros so the data is not trivially
    compressible (a transport that compressed would otherwise look unrealistically fast).
    """
    if bits not in (8, 16):
        raise ValueError(f"bits must be 8 or 16, not {bits}")
    key = (rows, cols, bits)
    buf = _PIXEL_CACHE.get(key)
    if buf is None:
        length = rows * cols * (bits // 8)
        ramp = bytes(range(256))
        buf = (ramp * (length // 256 + 1))[:length]
        _PIXEL_CACHE[key] = buf
    return buf


def instance_size(rows: int, cols: int, bits: int = 16) -> int:
    """Approximate size in bytes of one file written by :func:`make_study`."""
    return rows * cols * (bits // 8) + _HEADER_ESTIMATE


def instances_for_bytes(total_bytes: int, rows: int = 512, cols: int = 512, bits: int = 16) -> int:
    """Number of instances of this shape needed for a study of about ``total_bytes``."""
    return max(1, math.ceil(total_bytes / instance_size(rows, cols, bits)))


def _split(n: int, parts: int) -> list[int]:
    """Spread ``n`` items over ``parts`` buckets as evenly as possible (first ones larger)."""
    base, extra = divmod(n, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def _series_template(
    *,
    study_uid: str,
    series_uid: str,
    series_number: int,
    rows: int,
    cols: int,
    bits: int,
    modality: str,
    sop_class: UID,
    study_description: str,
    series_description: str,
    patient_id: str,
    patient_name: str,
    accession_number: str,
    study_date: str,
    study_time: str,
    frame_of_reference_uid: str,
) -> Dataset:
    """Build the dataset shared by every instance of one series."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "DR_SYNTH"

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = sop_class
    ds.StudyDate = study_date
    ds.SeriesDate = study_date
    ds.ContentDate = study_date
    ds.StudyTime = study_time
    ds.SeriesTime = study_time
    ds.ContentTime = study_time
    ds.AccessionNumber = accession_number
    ds.Modality = modality
    ds.Manufacturer = "dicomrouter-synth"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = study_description
    ds.SeriesDescription = series_description
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = series_number
    ds.FrameOfReferenceUID = frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [0.5, 0.5]
    ds.SliceThickness = 1.0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = bits
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    if modality.upper() == "CT":
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.KVP = 120
    ds.PixelData = pixel_buffer(rows, cols, bits)
    # The element VR must be explicit for writing: OW for 16-bit, OB for 8-bit.
    ds["PixelData"].VR = "OW" if bits == 16 else "OB"
    return ds


def iter_study(
    outdir: str | Path,
    n_instances: int,
    *,
    rows: int = SMALL_SHAPE[0],
    cols: int = SMALL_SHAPE[1],
    bits: int = 16,
    modality: str = "CT",
    study_description: str = "SYNTHETIC STUDY",
    patient_id: str = "SYNTH0001",
    patient_name: str = "SYNTHETIC^PATIENT",
    accession_number: str = "",
    series_count: int = 1,
    study_uid: str | None = None,
    sop_class_uid: str | None = None,
    prefix: str = "IMG",
) -> Iterator[Path]:
    """Write the study lazily, yielding each path right after its file is written.

    Useful when a caller wants to start sending before the whole study exists, or to
    report progress on a multi-GB study. :func:`make_study` describes the options.
    """
    if n_instances < 0:
        raise ValueError("n_instances must be >= 0")
    if series_count < 1:
        raise ValueError("series_count must be >= 1")
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    sop_class = UID(sop_class_uid) if sop_class_uid else sop_class_for(modality)
    now = _dt.datetime.now()
    study_date = now.strftime("%Y%m%d")
    study_time = now.strftime("%H%M%S")
    frame_uid = generate_uid()
    counter = 0
    for series_index, count in enumerate(_split(n_instances, series_count), start=1):
        if count == 0:
            continue
        ds = _series_template(
            study_uid=study_uid,
            series_uid=generate_uid(),
            series_number=series_index,
            rows=rows,
            cols=cols,
            bits=bits,
            modality=modality,
            sop_class=sop_class,
            study_description=study_description,
            series_description=f"SERIES {series_index}",
            patient_id=patient_id,
            patient_name=patient_name,
            accession_number=accession_number,
            study_date=study_date,
            study_time=study_time,
            frame_of_reference_uid=frame_uid,
        )
        for number in range(1, count + 1):
            sop_uid = generate_uid()
            ds.SOPInstanceUID = sop_uid
            ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
            ds.InstanceNumber = number
            ds.ImagePositionPatient = [0.0, 0.0, float(number)]
            ds.SliceLocation = float(number)
            counter += 1
            path = out / f"{prefix}{counter:06d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            yield path


def make_study(outdir: str | Path, n_instances: int, **options: Any) -> list[Path]:
    """Write one study of ``n_instances`` images into ``outdir`` and return the paths.

    Takes the keyword options of :func:`iter_study` (rows, cols, bits, modality,
    study_description, patient_id, patient_name, accession_number, series_count,
    study_uid, sop_class_uid, prefix). Instances are spread as evenly as possible over
    ``series_count`` series, each with a fresh Series Instance UID; every SOP Instance
    UID is fresh from ``generate_uid()``. The defaults give "small" ~9.4 KB CT images;
    pass ``rows=512, cols=512`` (or use :func:`make_large_study`) for ~525 KB images.
    Files are named ``<prefix><NNNNNN>.dcm`` in write order, flat in ``outdir`` (created
    if missing), so use a distinct ``prefix`` to write several studies into one folder.
    ``study_uid`` lets several calls add series to the same study. ``sop_class_uid``
    overrides the class derived from ``modality`` (CT, MR, else Secondary Capture).
    """
    return list(iter_study(outdir, n_instances, **options))


def make_small_study(outdir: str | Path, n_instances: int, **kwargs: Any) -> list[Path]:
    """:func:`make_study` with 64x64 16-bit images (~9.4 KB per file)."""
    return make_study(outdir, n_instances, rows=SMALL_SHAPE[0], cols=SMALL_SHAPE[1], **kwargs)


def make_large_study(outdir: str | Path, n_instances: int, **kwargs: Any) -> list[Path]:
    """:func:`make_study` with 512x512 16-bit images (~525 KB per file)."""
    return make_study(outdir, n_instances, rows=LARGE_SHAPE[0], cols=LARGE_SHAPE[1], **kwargs)
