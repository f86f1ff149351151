"""dicomrouter.transforms.transcode on pydicom's bundled test images (no download).

Every lossless transcode is written the way a C-STORE carries it (encode_dataset),
read back as a Part-10 file and decoded: its pixels must equal the original's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    JPEG2000,
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from dicomrouter.config.models import DicomDestinationConfig
from dicomrouter.config.transforms import LOSSLESS_SYNTAXES, LOSSY_SYNTAXES, NO_ENCODER
from dicomrouter.transforms.transcode import (
    TranscodeError,
    can_encode,
    can_transcode,
    encode_dataset,
    transcode,
)

LOSSLESS_TARGETS = [
    "rle",
    "jpeg-ls-lossless",
    "jpeg2000-lossless",
    "jpeg-lossless-sv1",
    "htj2k-lossless",
    "explicit-little",
    "implicit-little",
    "deflated",
]
IMAGES = [
    "CT_small.dcm",  # 16-bit signed CT, Explicit VR LE
    "MR_small_implicit.dcm",  # 16-bit signed MR, Implicit VR LE
    "examples_overlay.dcm",  # BitsStored 12 of 16
    "SC_rgb_rle_2frame.dcm",  # RGB, 8-bit, 2 frames, RLE
    "SC_rgb_rle_16bit_2frame.dcm",  # RGB, 16-bit, 2 frames
    "SC_rgb_jpeg_dcmtk.dcm",  # JPEG baseline YBR_FULL_422: decoded to RGB
    "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS lossless source
    "JPEG2000.dcm",  # JPEG 2000 source, 16-bit
    "examples_palette.dcm",  # PALETTE COLOR, 8-bit
    "examples_jpeg2k.dcm",  # JPEG 2000 YBR_RCT: decoded to RGB
]


def bundled(name: str) -> Path:
    path = get_testdata_file(name, download=False)
    assert isinstance(path, str), name
    return Path(path)


def decoded(path: Path) -> np.ndarray:
    """The pixels pydicom decodes (YBR converted to RGB, as transcode does)."""
    return dcmread(path).pixel_array


def round_trip(ds: Dataset, folder: Path) -> Path:
    """``ds`` as a C-STORE carries it, written as a Part-10 file by hand."""
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    from pydicom.filebase import DicomBytesIO

    meta = DicomBytesIO()
    write_file_meta_info(meta, ds.file_meta, enforce_standard=True)
    path.write_bytes(b"\x00" * 128 + b"DICM" + meta.getvalue() + encode_dataset(ds))
    return path


@pytest.mark.parametrize("target_name", LOSSLESS_TARGETS)
@pytest.mark.parametrize("name", IMAGES)
def test_lossless_transcode_keeps_pixels_and_uid(name: str, target_name: str, tmp_path: Path):
    source = bundled(name)
    target = LOSSLESS_SYNTAXES[target_name]
    ds = dcmread(source)
    uid, sop_class = str(ds.SOPInstanceUID), str(ds.SOPClassUID)
    unchanged = ds.file_meta.TransferSyntaxUID == target
    if target == HTJ2KLossless and ds.BitsStored != ds.BitsAllocated:
        # imagecodecs' HTJ2K encoder writes a precision of BitsAllocated bits only
        with pytest.raises(TranscodeError, match="BitsStored 12 of 16"):
            transcode(ds, target, allow_lossy=False)
        return
    transcode(ds, target, allow_lossy=False)

    assert ds.file_meta.TransferSyntaxUID == target
    path = round_trip(ds, tmp_path)
    back = dcmread(path)
    assert back.file_meta.TransferSyntaxUID == target
    assert back.SOPInstanceUID == uid
    assert back.file_meta.MediaStorageSOPInstanceUID == uid
    assert back.file_meta.MediaStorageSOPClassUID == sop_class
    assert "LossyImageCompressionMethod" not in back or back.LossyImageCompression == "01"
    original = decoded(source)
    assert back.pixel_array.shape == original.shape
    assert np.array_equal(back.pixel_array, original)
    if UID(target).is_encapsulated and back.SamplesPerPixel == 3 and not unchanged:
        assert back.PhotometricInterpretation == "RGB"
        assert back.PlanarConfiguration == 0


@pytest.mark.parametrize(
    "target", [RLELossless, JPEGLSLossless, JPEG2000Lossless, JPEGLosslessSV1, HTJ2KLossless]
)
def test_planar_configuration_1(target: str, tmp_path: Path) -> None:
    """Colour-by-plane RGB is encoded from the right samples (PlanarConfiguration 0
    after the transcode)."""
    ds = dcmread(bundled("examples_rgb_color.dcm"))
    original = ds.pixel_array.copy()
    ds.PixelData = np.ascontiguousarray(original.transpose(2, 0, 1)).tobytes()
    ds.PlanarConfiguration = 1
    assert np.array_equal(ds.pixel_array, original)
    transcode(ds, target, allow_lossy=False)
    back = dcmread(round_trip(ds, tmp_path))
    assert back.PlanarConfiguration == 0
    assert np.array_equal(back.pixel_array, original)


@pytest.mark.parametrize("target", [JPEGLSLossless, JPEGLosslessSV1, HTJ2KLossless])
def test_multi_frame_keeps_frame_count(target: str, tmp_path: Path) -> None:
    ds = dcmread(bundled("SC_rgb_rle_16bit_2frame.dcm"))
    transcode(ds, target, allow_lossy=False)
    back = dcmread(round_trip(ds, tmp_path))
    assert int(back.NumberOfFrames) == 2
    assert back.pixel_array.shape == (2, 100, 100, 3)


@pytest.mark.parametrize("target", [JPEGLSNearLossless, JPEG2000])
def test_lossy_gets_a_new_uid_and_references_the_original(target: str, tmp_path: Path) -> None:
    ds = dcmread(bundled("CT_small.dcm"))
    old = str(ds.SOPInstanceUID)
    transcode(ds, target, allow_lossy=True)
    back = dcmread(round_trip(ds, tmp_path))
    assert back.SOPInstanceUID != old
    assert back.file_meta.MediaStorageSOPInstanceUID == back.SOPInstanceUID
    assert back.file_meta.TransferSyntaxUID == target
    assert back.LossyImageCompression == "01"
    assert back.LossyImageCompressionMethod == (
        "ISO_14495_1" if target == JPEGLSNearLossless else "ISO_15444_1"
    )
    assert float(back.LossyImageCompressionRatio) > 1.0
    ref = back.SourceImageSequence[-1]
    assert ref.ReferencedSOPInstanceUID == old
    assert ref.ReferencedSOPClassUID == back.SOPClassUID
    purpose = ref.PurposeOfReferenceCodeSequence[0]
    assert (purpose.CodeValue, purpose.CodingSchemeDesignator) == ("121320", "DCM")
    assert purpose.CodeMeaning == "Uncompressed predecessor"
    assert back.DerivationCodeSequence[-1].CodeValue == "113040"
    # Lossy, but close: the near-lossless error bound and a 10:1 J2K stay near.
    original = decoded(bundled("CT_small.dcm")).astype(np.int32)
    diff = np.abs(back.pixel_array.astype(np.int32) - original)
    assert diff.max() > 0 or target == JPEG2000
    if target == JPEGLSNearLossless:
        assert diff.max() <= 2


def test_a_lossy_resend_is_the_same_new_instance() -> None:
    """A retry after a lost association must not make a second instance at the peer:
    the new UID is derived from the original's and the syntax, not random."""
    uids = set()
    for _ in range(2):
        ds = dcmread(bundled("CT_small.dcm"))
        transcode(ds, JPEGLSNearLossless, allow_lossy=True)
        uids.add(str(ds.SOPInstanceUID))
    assert len(uids) == 1
    other = dcmread(bundled("CT_small.dcm"))
    transcode(other, JPEG2000, allow_lossy=True)
    assert str(other.SOPInstanceUID) not in uids


def test_lossy_of_a_lossy_image_is_multi_valued(tmp_path: Path) -> None:
    ds = dcmread(bundled("SC_rgb_jpeg_dcmtk.dcm"))  # JPEG baseline, already lossy
    old = str(ds.SOPInstanceUID)
    transcode(ds, JPEG2000, allow_lossy=True)
    back = dcmread(round_trip(ds, tmp_path))
    assert back.LossyImageCompression == "01"
    assert list(back.LossyImageCompressionMethod) == ["ISO_10918_1", "ISO_15444_1"]
    assert len(back.LossyImageCompressionRatio) == 2
    ref = back.SourceImageSequence[-1]
    assert ref.ReferencedSOPInstanceUID == old
    assert ref.PurposeOfReferenceCodeSequence[0].CodeValue == "121330"


def test_lossy_is_refused_without_allow_lossy() -> None:
    ds = dcmread(bundled("CT_small.dcm"))
    uid = ds.SOPInstanceUID
    with pytest.raises(TranscodeError, match="lossy"):
        transcode(ds, JPEG2000, allow_lossy=False)
    assert ds.SOPInstanceUID == uid
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian


def test_no_pixel_data_is_not_put_in_a_compressed_syntax() -> None:
    ds = dcmread(bundled("reportsi.dcm"))  # Basic Text SR
    with pytest.raises(TranscodeError, match="no Pixel Data"):
        transcode(ds, RLELossless, allow_lossy=False)
    ds = dcmread(bundled("reportsi.dcm"))
    transcode(ds, LOSSLESS_SYNTAXES["deflated"], allow_lossy=False)
    assert ds.file_meta.TransferSyntaxUID == LOSSLESS_SYNTAXES["deflated"]


def test_big_endian_is_refused() -> None:
    assert not can_transcode(ExplicitVRBigEndian, JPEGLSLossless)
    assert not can_transcode(ExplicitVRBigEndian, ExplicitVRLittleEndian)
    with pytest.raises(TranscodeError, match="Big Endian"):
        transcode(dcmread(bundled("MR_small_bigendian.dcm")), RLELossless, allow_lossy=False)


def test_bits_above_bits_stored_are_refused() -> None:
    """12 of 16 bits stored, but a value uses bit 13: a compressed encode of 12 bits
    would lose it, so the transcode is refused rather than sent changed."""
    ds = dcmread(bundled("examples_overlay.dcm"))
    assert (ds.BitsAllocated, ds.BitsStored, ds.PixelRepresentation) == (16, 12, 0)
    arr = np.frombuffer(ds.PixelData, dtype="<u2").copy()
    arr[0] = 0x1000
    ds.PixelData = arr.tobytes()
    for target in (RLELossless, JPEGLSLossless, LOSSLESS_SYNTAXES["jpeg2000-lossless"]):
        with pytest.raises(TranscodeError, match="above BitsStored"):
            transcode(ds, target, allow_lossy=False)
    # An uncompressed target keeps every bit.
    transcode(ds, ExplicitVRLittleEndian, allow_lossy=False)


def test_signed_bits_above_bits_stored_sign_extension_is_fine(tmp_path: Path) -> None:
    """Signed 12-bit values sign-extended into 16 bits are exactly representable."""
    ds = dcmread(bundled("CT_small.dcm"))
    arr = ds.pixel_array.astype(np.int16)
    arr = np.clip(arr, -2048, 2047)
    ds.PixelData = arr.tobytes()
    ds.BitsStored, ds.HighBit = 12, 11
    transcode(ds, JPEGLSLossless, allow_lossy=False)
    back = dcmread(round_trip(ds, tmp_path))
    assert np.array_equal(back.pixel_array, arr)


def test_32_bit_pixels_are_refused_for_compression() -> None:
    with pytest.raises(TranscodeError, match="BitsAllocated 32"):
        transcode(dcmread(bundled("rtdose.dcm")), RLELossless, allow_lossy=False)


def test_named_syntaxes_without_an_encoder_are_exactly_the_refused_ones() -> None:
    """If pydicom gains an encoder (or a plugin goes missing), this fails: then
    config.transforms.NO_ENCODER must change with it."""
    for name, uid in {**LOSSLESS_SYNTAXES, **LOSSY_SYNTAXES}.items():
        if not uid:
            continue
        assert can_encode(uid) == (uid not in NO_ENCODER), name


@pytest.mark.parametrize("name", ["jpeg-baseline"])
def test_config_refuses_syntaxes_without_an_encoder(name: str) -> None:
    with pytest.raises(ValueError, match="no encoder"):
        DicomDestinationConfig(
            ae_title="PACS", host="127.0.0.1", port=104, transfer_syntax=name, allow_lossy=True
        )


def test_config_accepts_what_can_be_encoded() -> None:
    for name in (
        "rle",
        "jpeg-ls-lossless",
        "jpeg2000-lossless",
        "jpeg-lossless-sv1",
        "htj2k-lossless",
        "deflated",
    ):
        cfg = DicomDestinationConfig(
            ae_title="PACS", host="127.0.0.1", port=104, transfer_syntax=name
        )
        assert can_encode(cfg.transfer_syntax_uid)
