"""dicomrouter.transforms.codecs: the imagecodecs encoders of JPEG Lossless SV1 and
HTJ2K Lossless, checked on the codestream itself and with decoders that are not
the encoder's (pylibjpeg-libjpeg and dcmtk for SV1, OpenJPEG for HTJ2K)."""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, HTJ2KLossless, JPEGLosslessSV1, generate_uid

from dicomrouter.transforms import codecs
from dicomrouter.transforms.transcode import TranscodeError, transcode
from tests.support import require_peers
from tests.support.dcmtk import dcmtk_env, dcmtk_tool
from tests.transforms.test_transcode import round_trip


def image(values: np.ndarray, stored: int, signed: bool) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.Rows, ds.Columns = values.shape[:2]
    ds.SamplesPerPixel = 3 if values.ndim == 3 else 1
    ds.PhotometricInterpretation = "RGB" if values.ndim == 3 else "MONOCHROME2"
    if values.ndim == 3:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = values.dtype.itemsize * 8
    ds.BitsStored, ds.HighBit = stored, stored - 1
    ds.PixelRepresentation = int(signed)
    ds.PixelData = values.tobytes()
    return ds


def sample(stored: int, signed: bool, colour: bool = False) -> np.ndarray:
    rng = np.random.default_rng(stored * 2 + signed)
    shape = (19, 23, 3) if colour else (19, 23)
    dtype = np.dtype(f"{'i' if signed else 'u'}{1 if stored <= 8 else 2}")
    low, high = (-(1 << (stored - 1)), 1 << (stored - 1)) if signed else (0, 1 << stored)
    values = rng.integers(low, high, shape, dtype=np.int64)
    values.flat[:2] = [low, high - 1]  # the extremes
    return values.astype(dtype)


def frame_of(ds: Dataset) -> bytes:
    from pydicom.encaps import generate_frames

    (frame,) = generate_frames(ds.PixelData, number_of_frames=1)
    return bytes(frame)


def jpeg_segments(data: bytes) -> dict[int, bytes]:
    """Marker → segment of the JPEG header, up to the first SOS."""
    found, i = {}, 2
    while i < len(data):
        marker, length = data[i + 1], struct.unpack(">H", data[i + 2 : i + 4])[0]
        found[marker] = data[i + 4 : i + 2 + length]
        if marker == 0xDA:
            break
        i += 2 + length
    return found


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("stored", [2, 7, 8, 10, 12, 15, 16])
def test_sv1_codestream_and_pixels(stored: int, signed: bool, tmp_path: Path) -> None:
    values = sample(stored, signed)
    ds = image(values, stored, signed)
    transcode(ds, JPEGLosslessSV1, allow_lossy=False)
    segments = jpeg_segments(frame_of(ds))
    assert 0xC3 in segments and not {0xC0, 0xC1, 0xC2} & set(segments)  # SOF3 only
    assert segments[0xC3][0] == stored  # sample precision P = BitsStored
    sos = segments[0xDA]
    ns = sos[0]
    assert (sos[1 + 2 * ns], sos[3 + 2 * ns] & 0x0F) == (1, 0)  # predictor 1, Pt 0
    back = dcmread(round_trip(ds, tmp_path))
    assert np.array_equal(back.pixel_array, values)


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("bits", [8, 16])
def test_htj2k_codestream_and_pixels(bits: int, signed: bool, tmp_path: Path) -> None:
    values = sample(bits, signed)
    ds = image(values, bits, signed)
    transcode(ds, HTJ2KLossless, allow_lossy=False)
    data = frame_of(ds)
    assert data[:4] == b"\xff\x4f\xff\x51"  # a J2K codestream: SOC then SIZ
    rsiz, ssiz = struct.unpack(">H", data[6:8])[0], data[42]
    assert rsiz & 0x4000  # Part 15 (HT) capabilities, with a CAP marker
    assert ssiz == (bits - 1) | (0x80 if signed else 0)
    cod = data.index(b"\xff\x52")
    scod_mct, cb_style, wavelet = data[cod + 8], data[cod + 12], data[cod + 13]
    assert (scod_mct, cb_style & 0x40, wavelet) == (0, 0x40, 1)  # no MCT, HT, 5/3
    import openjpeg  # pylibjpeg-openjpeg: OpenJPEG, not the OpenJPH that encoded it

    assert np.array_equal(openjpeg.decode(data), values)
    back = dcmread(round_trip(ds, tmp_path))
    assert np.array_equal(back.pixel_array, values)


@pytest.mark.parametrize("target", [JPEGLosslessSV1, HTJ2KLossless])
def test_rgb_stays_rgb(target: str, tmp_path: Path) -> None:
    values = sample(8, False, colour=True)
    ds = image(values, 8, False)
    transcode(ds, target, allow_lossy=False)
    back = dcmread(round_trip(ds, tmp_path))
    assert back.PhotometricInterpretation == "RGB"
    assert np.array_equal(back.pixel_array, values)


def test_refused_per_image() -> None:
    with pytest.raises(TranscodeError, match="BitsStored 12 of 16"):
        transcode(image(sample(12, False), 12, False), HTJ2KLossless, allow_lossy=False)
    with pytest.raises(TranscodeError, match="BitsStored 1"):
        transcode(image(sample(2, False) & 1, 1, False), JPEGLosslessSV1, allow_lossy=False)
    ybr = image(sample(8, False, colour=True), 8, False)
    ybr.PhotometricInterpretation = "YBR_FULL"
    with pytest.raises(TranscodeError, match="YBR_FULL"):
        transcode(ybr, JPEGLosslessSV1, allow_lossy=False)


def test_available_without_importing_numpy() -> None:
    assert codecs.is_available(JPEGLosslessSV1) and codecs.is_available(HTJ2KLossless)
    assert not codecs.is_available(ExplicitVRLittleEndian)


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("stored", [8, 12, 16])
def test_sv1_decodes_with_dcmdjpeg(stored: int, signed: bool, tmp_path: Path) -> None:
    require_peers(dcmtk=True)  # fails in CI, where it must run
    values = sample(stored, signed)
    ds = image(values, stored, signed)
    transcode(ds, JPEGLosslessSV1, allow_lossy=False)
    plain = tmp_path / "plain.dcm"
    out = subprocess.run(
        [dcmtk_tool("dcmdjpeg"), str(round_trip(ds, tmp_path)), str(plain)],
        capture_output=True,
        text=True,
        env=dcmtk_env(),
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert np.array_equal(dcmread(plain).pixel_array, values)
