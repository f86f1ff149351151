"""Change the transfer syntax of one data set: decode its pixel data and encode it
again, with pydicom's pixel encoders and decoders (pylibjpeg, openjpeg, pyjpegls
and the RLE plugins), and for JPEG Lossless SV1 and HTJ2K Lossless, which pydicom
3.0 does not encode, the imagecodecs plugin in :mod:`dicomrouter.transforms.codecs`.

What a destination may ask for, and why some syntaxes are refused, is in
``docs/transforms.md`` ("Transfer syntax per destination"). In short:

* a lossless transcode keeps the SOP Instance UID (PS3.4 allows it for a lossless
  change of transfer syntax) and is verified: the encoded frames are decoded again
  and must equal the source's pixels, or the transcode fails;
* a lossy one (only with ``allow_lossy``) gets a new SOP Instance UID, references the
  original in the Source Image Sequence and sets the Lossy Image Compression
  attributes;
* a data set without Pixel Data is never put in a compressed syntax: the caller
  sends it as received or in Explicit VR Little Endian instead.

Only one data set is decoded at a time: a transcode holds that instance's decoded
frames, its encoded frames, and (while verifying) one more decoded copy.

numpy is imported only when pixels are handled: the processes that never decode
(the node, the HTTP service) make ``import numpy`` fail, and they import the
sender (and so this module) for a C-ECHO.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Mapping
from typing import TYPE_CHECKING

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    generate_uid,
)

from dicomrouter.config.transforms import NO_ENCODER
from dicomrouter.transforms import codecs

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)

#: Syntaxes whose data set is written without encapsulated pixel data: any image can
#: go there once its pixel data is decoded.
NATIVE_SYNTAXES = frozenset({ExplicitVRLittleEndian, ImplicitVRLittleEndian})
_DEFLATED = DeflatedExplicitVRLittleEndian

#: Lossless compressed syntaxes we can encode (when the plugin is installed); the
#: last two with :mod:`dicomrouter.transforms.codecs` (imagecodecs).
LOSSLESS_ENCODED = frozenset(
    {RLELossless, JPEGLSLossless, JPEG2000Lossless, JPEGLosslessSV1, HTJ2KLossless}
)
#: Lossy syntaxes we can encode, with the encoder's settings and the value of
#: LossyImageCompressionMethod (PS3.3 C.7.6.1.1.5.1).
LOSSY_ENCODED: Mapping[str, tuple[dict[str, object], str]] = {
    JPEGLSNearLossless: ({"jls_error": 2}, "ISO_14495_1"),
    JPEG2000: ({"j2k_cr": [10.0]}, "ISO_15444_1"),
}
#: LossyImageCompressionMethod of the lossy syntaxes we may meet as a source.
_LOSSY_METHODS = {
    JPEGBaseline8Bit: "ISO_10918_1",
    JPEGExtended12Bit: "ISO_10918_1",
    JPEGLSNearLossless: "ISO_14495_1",
    JPEG2000: "ISO_15444_1",
}

# CID 7202 (Source Image Purposes of Reference) and CID 7203 (Image Derivation).
_UNCOMPRESSED_PREDECESSOR = ("121320", "DCM", "Uncompressed predecessor")
_LOSSY_PREDECESSOR = ("121330", "DCM", "Lossy compressed predecessor")
_LOSSY_COMPRESSION = ("113040", "DCM", "Lossy Compression")


class TranscodeError(Exception):
    """This data set cannot be put in the syntax asked for (no codec, no pixel data
    for a compressed syntax, pixel data a lossless encode would change...). The
    caller falls back to another syntax; the message says why."""


def _label(uid: str) -> str:
    name = UID(uid).name
    return f"{name} ({uid})" if name and name != uid else uid


#: Encapsulated syntaxes that keep every pixel value.
_LOSSLESS_ENCAPSULATED = frozenset(
    {
        "1.2.840.10008.1.2.1.98",  # Encapsulated Uncompressed Explicit VR Little Endian
        RLELossless,
        "1.2.840.10008.1.2.4.57",  # JPEG Lossless (Process 14)
        JPEGLosslessSV1,
        JPEGLSLossless,
        JPEG2000Lossless,
        "1.2.840.10008.1.2.4.92",  # JPEG 2000 Part 2 Multi-component (Lossless Only)
        HTJ2KLossless,
        "1.2.840.10008.1.2.4.202",  # HTJ2K Lossless RPCL
    }
)


def is_lossy(uid: str) -> bool:
    """Whether ``uid`` is a lossy transfer syntax (every encapsulated syntax but the
    lossless ones: JPEG baseline and extended, JPEG-LS near-lossless, JPEG 2000,
    HTJ2K, the MPEG and HEVC family...)."""
    return UID(uid).is_encapsulated and uid not in _LOSSLESS_ENCAPSULATED


def can_decode(source: str) -> bool:
    """Whether pixel data stored in ``source`` can be decoded here."""
    ts = UID(source)
    if ts == ExplicitVRBigEndian:
        return False  # see can_transcode
    if not ts.is_encapsulated:
        return True
    from pydicom.pixels import get_decoder

    try:
        return bool(get_decoder(ts).is_available)
    except NotImplementedError:
        return False


def can_encode(target: str) -> bool:
    """Whether a data set can be written in ``target`` here (for an encapsulated
    syntax: pydicom has an encoder for it and its plugin is installed)."""
    ts = UID(target)
    if ts in NATIVE_SYNTAXES or ts == _DEFLATED:
        return True
    if ts not in LOSSLESS_ENCODED and ts not in LOSSY_ENCODED:
        return False
    if ts in codecs.SYNTAXES:
        return codecs.is_available(ts)
    from pydicom.pixels import get_encoder

    try:
        return bool(get_encoder(ts).is_available)
    except NotImplementedError:
        return False


def can_transcode(source: str, target: str) -> bool:
    """Whether an image stored in ``source`` can be transcoded to ``target`` here.

    Explicit VR Big Endian is never a source: pydicom 3 re-encodes such a data set
    as little endian without swapping its OW pixel bytes.
    """
    if UID(source) == UID(target):
        return True
    if UID(source) == ExplicitVRBigEndian:
        return False
    return can_decode(source) and can_encode(target)


def transcode(dataset: Dataset, target_uid: str, *, allow_lossy: bool) -> Dataset:
    """Put ``dataset`` (read from a Part-10 file, with its File Meta) in the transfer
    syntax ``target_uid``, in place; return it. Write it with :func:`encode_dataset`.

    Raises :class:`TranscodeError` when it cannot be done; ``dataset`` may then be
    half changed, so read the file again to send it another way.
    """
    target = UID(target_uid)
    meta = getattr(dataset, "file_meta", None)
    if meta is None or "TransferSyntaxUID" not in meta:
        raise TranscodeError("the data set has no File Meta transfer syntax")
    source = UID(meta.TransferSyntaxUID)
    if source == target:
        return dataset
    lossy = is_lossy(target)
    if lossy and not allow_lossy:
        raise TranscodeError(f"{_label(target)} is lossy and allow_lossy is not set")
    if not can_transcode(source, target):
        raise TranscodeError(
            f"cannot transcode from {_label(source)} to {_label(target)} here: "
            + _missing(source, target)
        )
    has_pixels = "PixelData" in dataset
    if target.is_encapsulated and not has_pixels:
        raise TranscodeError(
            f"no Pixel Data: {_label(target)} is meaningless for this object "
            f"({_label(str(dataset.get('SOPClassUID', '')))})"
        )
    if has_pixels and source.is_encapsulated:
        try:
            # as_rgb: YBR_FULL(_422) from JPEG becomes RGB, PhotometricInterpretation
            # and PlanarConfiguration follow.
            dataset.decompress(generate_instance_uid=False, as_rgb=True)
        except Exception as exc:
            raise TranscodeError(f"decoding {_label(source)} failed: {_one_line(exc)}") from exc
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    if not target.is_encapsulated:
        meta.TransferSyntaxUID = target
        return dataset

    import numpy as np

    _check_encodable(dataset)
    original = _pixels(dataset)
    if int(dataset.get("SamplesPerPixel", 1)) > 1 and dataset.get("PlanarConfiguration") == 1:
        # The encoders take colour-by-pixel data (pydicom's RLE encoder silently
        # mixes the samples of colour-by-plane data): reorder it first.
        dataset.PixelData = np.ascontiguousarray(original).tobytes()
        dataset.PlanarConfiguration = 0
    kwargs: dict[str, object] = dict(LOSSY_ENCODED[target][0]) if lossy else {}
    old_uid = str(dataset.SOPInstanceUID)
    native_size = len(dataset.PixelData)
    try:
        if target in codecs.SYNTAXES:
            codecs.compress(dataset, target)
        else:
            dataset.compress(target, generate_instance_uid=False, **kwargs)  # type: ignore[arg-type]
    except Exception as exc:
        raise TranscodeError(f"encoding {_label(target)} failed: {_one_line(exc)}") from exc
    if lossy:
        _mark_lossy(dataset, target, source, old_uid, native_size)
    else:
        decoded = _pixels(dataset)
        if decoded.shape != original.shape or not np.array_equal(decoded, original):
            raise TranscodeError(
                f"the {_label(target)} encode did not decode to the same pixels; not sent"
            )
    meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    return dataset


def encode_dataset(dataset: Dataset) -> bytes:
    """The data set (no File Meta) encoded in its File Meta's transfer syntax, as a
    C-STORE carries it: Implicit or Explicit VR Little Endian (encapsulated pixel
    data included), Deflated (explicit, then raw deflate as PS3.5 A.5 says)."""
    ts = UID(dataset.file_meta.TransferSyntaxUID)
    if ts == ExplicitVRBigEndian:
        raise TranscodeError("writing Explicit VR Big Endian is not supported")
    buffer = DicomBytesIO()
    buffer.is_little_endian = True
    buffer.is_implicit_VR = ts == ImplicitVRLittleEndian
    try:
        write_dataset(buffer, dataset)
    except Exception as exc:
        raise TranscodeError(f"cannot encode the data set: {_one_line(exc)}") from exc
    data = buffer.getvalue()
    if ts == _DEFLATED:
        deflater = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -zlib.MAX_WBITS)
        data = deflater.compress(data) + deflater.flush()
        if len(data) % 2:
            data += b"\x00"
    return data


# -- internals -----------------------------------------------------------------


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _missing(source: UID, target: UID) -> str:
    if source == ExplicitVRBigEndian:
        return "Explicit VR Big Endian pixel data would be corrupted"
    if target in NO_ENCODER:
        return NO_ENCODER[target]
    from pydicom.pixels import get_decoder, get_encoder

    reasons: list[str] = []
    for uid, getter, what in ((source, get_decoder, "decoder"), (target, get_encoder, "encoder")):
        if uid in NATIVE_SYNTAXES or uid == _DEFLATED:
            continue
        if what == "encoder" and uid in codecs.SYNTAXES:
            getter = codecs.get_encoder
        try:
            codec = getter(uid)
        except NotImplementedError:
            reasons.append(f"no {what} for {_label(uid)}")
            continue
        if not codec.is_available:
            missing = "; ".join(codec.missing_dependencies)
            reasons.append(f"no {what} for {_label(uid)} installed ({missing})")
    return ", ".join(reasons) or "no codec"


def _check_encodable(ds: Dataset) -> None:
    """Refuse what a compressed syntax would not keep exactly: float pixels, bit
    depths other than 8 and 16, and values in the bits above BitsStored (an
    overlay, or noise a modality left there: the encoders keep BitsStored bits)."""
    allocated = int(ds.get("BitsAllocated", 0))
    stored = int(ds.get("BitsStored", allocated))
    if str(ds.get("PhotometricInterpretation", "")) == "YBR_FULL_422":
        raise TranscodeError(
            "uncompressed YBR_FULL_422 (chroma subsampled) pixel data is not encoded here"
        )
    if allocated not in (8, 16):
        raise TranscodeError(f"BitsAllocated {allocated} is not encoded here (8 or 16 only)")
    if stored > allocated or stored < 1:
        raise TranscodeError(f"BitsStored {stored} does not fit BitsAllocated {allocated}")
    if stored == allocated:
        return
    import numpy as np

    raw = np.frombuffer(
        ds.PixelData, dtype=np.uint8 if allocated == 8 else np.dtype("<u2"), count=-1
    )
    if int(ds.get("PixelRepresentation", 0)) == 0:
        clean = not np.right_shift(raw, stored).any()
    else:
        high = np.right_shift(raw, stored - 1)
        clean = bool(np.all((high == 0) | (high == (1 << (allocated - stored + 1)) - 1)))
    if not clean:
        raise TranscodeError(
            f"pixel values use the bits above BitsStored ({stored} of {allocated}): a "
            "compressed encode would drop them"
        )


def _pixels(ds: Dataset) -> np.ndarray:
    try:
        return ds.pixel_array  # type: ignore[no-any-return]
    except Exception as exc:
        raise TranscodeError(f"cannot read the pixel data: {_one_line(exc)}") from exc


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _mark_lossy(ds: Dataset, target: UID, source: UID, old_uid: str, native_size: int) -> None:
    """New identity and the Lossy Image Compression attributes (PS3.3 C.7.6.1.1.5)."""
    was_lossy = str(ds.get("LossyImageCompression", "")) == "01" or is_lossy(source)
    # The same original sent lossy in the same syntax is the same new instance, so a
    # resend (a retry after a lost association) is not a second copy at the peer.
    ds.SOPInstanceUID = generate_uid(entropy_srcs=["dicomrouter lossy", old_uid, str(target)])
    compressed = sum(len(f) for f in _fragments(ds))
    ratio = f"{native_size / max(1, compressed):.2f}"[:16]
    method = LOSSY_ENCODED[target][1]
    ratios = [str(v) for v in _values(ds.get("LossyImageCompressionRatio"))]
    methods = [str(v) for v in _values(ds.get("LossyImageCompressionMethod"))]
    if was_lossy and not methods and source in _LOSSY_METHODS:
        methods = [_LOSSY_METHODS[source]]
    if len(ratios) != len(methods):  # do not pair values that do not belong together
        ratios, methods = [], []
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionRatio = [*ratios, ratio] if ratios else ratio
    ds.LossyImageCompressionMethod = [*methods, method] if methods else method
    reference = Dataset()
    reference.ReferencedSOPClassUID = ds.SOPClassUID
    reference.ReferencedSOPInstanceUID = old_uid
    purpose = _LOSSY_PREDECESSOR if was_lossy else _UNCOMPRESSED_PREDECESSOR
    reference.PurposeOfReferenceCodeSequence = Sequence([_code(*purpose)])
    existing = list(ds.get("SourceImageSequence", []))
    ds.SourceImageSequence = Sequence([*existing, reference])
    ds.DerivationCodeSequence = Sequence(
        [*ds.get("DerivationCodeSequence", []), _code(*_LOSSY_COMPRESSION)]
    )


def _values(element_value: object) -> list[object]:
    if element_value is None or element_value == "":
        return []
    if isinstance(element_value, str | int | float):
        return [element_value]
    return list(element_value)  # type: ignore[call-overload]


def _fragments(ds: Dataset) -> list[bytes]:
    from pydicom.encaps import generate_fragments

    return list(generate_fragments(ds.PixelData))
