"""Encoders pydicom 3.0 does not have, written as pydicom encoding plugins over
imagecodecs (Christoph Gohlke, BSD):

* JPEG Lossless, Non-Hierarchical, First-Order Prediction (Process 14, Selection
  Value 1), 1.2.840.10008.1.2.4.70, with libjpeg-turbo 3's lossless mode
  (``imagecodecs.jpeg8_encode(lossless=True, predictor=1)``): SOF3, predictor 1,
  point transform 0, sample precision = BitsStored (2 to 16);
* High-Throughput JPEG 2000 Lossless Only, 1.2.840.10008.1.2.4.201, with OpenJPH
  (``imagecodecs.htj2k_encode``): reversible 5/3 wavelet, HT block coder, a J2K
  codestream (no JP2 box), no multi-component transform.

pydicom 3.0 has no ``Encoder`` for either syntax (``pydicom.pixels.get_encoder``
raises), so ``Dataset.compress()`` cannot reach them. This module builds its own
:class:`pydicom.pixels.encoders.base.Encoder` for each, with this module as the
plugin: pydicom splits the frames, validates the image against PS3.5's table
for the syntax (where pydicom has one) and calls :func:`_encode_frame`;
:func:`compress` encapsulates the frames as ``Dataset.compress()`` does.

numpy and imagecodecs are imported only when a frame is encoded: the processes that
never decode (the node, the HTTP service) make ``import numpy`` fail.
"""

from __future__ import annotations

from importlib import metadata
from typing import TYPE_CHECKING

from pydicom.uid import UID, HTJ2KLossless, JPEGLosslessSV1

if TYPE_CHECKING:
    import numpy as np
    from pydicom.dataset import Dataset
    from pydicom.pixels.encoders.base import Encoder, EncodeRunner

#: The syntaxes this module encodes.
SYNTAXES = frozenset({JPEGLosslessSV1, HTJ2KLossless})

#: The oldest imagecodecs with an HTJ2K encoder taking ``reversible`` and ``rgb``
#: (the HTJ2K codec came in 2026.1.1, its options in 2026.1.14); its wheels bundle
#: libjpeg-turbo 3, whose lossless mode takes precisions 2 to 16.
MIN_IMAGECODECS = (2026, 1, 14)

#: pydicom's plugin protocol: what a plugin needs when it is not available.
ENCODER_DEPENDENCIES = {
    JPEGLosslessSV1: ("numpy", "imagecodecs>=2026.1.14"),
    HTJ2KLossless: ("numpy", "imagecodecs>=2026.1.14"),
}

_ENCODERS: dict[str, Encoder] = {}


def is_available(uid: str) -> bool:
    """pydicom's plugin protocol: whether imagecodecs (new enough) is installed.
    Read from the package metadata, so that asking does not import numpy."""
    if uid not in SYNTAXES:
        return False
    try:
        version = metadata.version("imagecodecs")
    except metadata.PackageNotFoundError:
        return False
    try:
        parts = tuple(int(p) for p in version.split(".")[:3])
    except ValueError:
        return False
    return parts >= MIN_IMAGECODECS


def get_encoder(uid: str) -> Encoder:
    """The pydicom ``Encoder`` for ``uid`` (one of :data:`SYNTAXES`), with this
    module as its only plugin."""
    uid = UID(uid)
    if uid not in SYNTAXES:
        raise NotImplementedError(f"no imagecodecs encoder for {uid}")
    if uid not in _ENCODERS:
        from pydicom.pixels.encoders.base import Encoder

        encoder = Encoder(uid)
        encoder.add_plugin("imagecodecs", (__name__, "_encode_frame"))
        _ENCODERS[uid] = encoder
    return _ENCODERS[uid]


def compress(ds: Dataset, uid: str) -> None:
    """Encode the native pixel data of ``ds`` (its File Meta says Explicit VR Little
    Endian) in ``uid`` in place, as ``Dataset.compress(uid,
    generate_instance_uid=False)`` does for the syntaxes pydicom encodes."""
    from pydicom.encaps import encapsulate, encapsulate_extended
    from pydicom.valuerep import VR

    encoder = get_encoder(uid)
    if not encoder.is_available:
        raise RuntimeError(f"no encoder installed: {'; '.join(encoder.missing_dependencies)}")
    frames = list(encoder.iter_encode(ds))
    total = (len(frames) - 1) * 8 + sum(len(f) for f in frames[:-1])
    if total > 2**32 - 1:
        ds.PixelData, ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths = encapsulate_extended(
            frames
        )
    else:
        ds.PixelData = encapsulate(frames)
    element = ds["PixelData"]
    element.is_undefined_length = True
    element.VR = VR.OB
    # pydicom caches the decoded array by the ids of the pixel elements; drop it as
    # Dataset.compress() does, so the check after the encode really decodes.
    ds._pixel_array = None
    ds._pixel_id = {}
    ds.file_meta.TransferSyntaxUID = UID(uid)


def _encode_frame(src: bytes, runner: EncodeRunner) -> bytes:
    """pydicom's plugin protocol: one frame of native little-endian pixel data (as
    the data set stores it) in, one codestream out. Raises ValueError for what the
    syntax or the encoder cannot hold; pydicom wraps it in a RuntimeError."""
    import numpy as np

    rows, columns = int(runner.rows), int(runner.columns)
    samples = int(runner.samples_per_pixel)
    allocated, stored = int(runner.bits_allocated), int(runner.bits_stored)
    signed = int(runner.pixel_representation) == 1
    photometric = str(runner.photometric_interpretation)
    if allocated not in (8, 16) or samples not in (1, 3):
        raise ValueError(f"BitsAllocated {allocated}, SamplesPerPixel {samples} not encoded")
    itemsize = allocated // 8
    count = rows * columns * samples
    if len(src) < count * itemsize:
        raise ValueError(f"a frame of {len(src)} bytes is too short for {count} samples")
    raw = np.frombuffer(src, dtype=f"<u{itemsize}", count=count)
    frame: np.ndarray
    if samples == 1:
        frame = raw.reshape(rows, columns)
    elif int(runner.planar_configuration) == 1:
        frame = raw.reshape(samples, rows, columns).transpose(1, 2, 0)
    else:
        frame = raw.reshape(rows, columns, samples)
    if runner.transfer_syntax == JPEGLosslessSV1:
        return _jpeg_lossless_sv1(frame, stored, signed, photometric)
    return _htj2k_lossless(frame, allocated, stored, signed, photometric)


def _jpeg_lossless_sv1(frame: np.ndarray, stored: int, signed: bool, photometric: str) -> bytes:
    """SOF3, predictor 1, point transform 0, precision BitsStored. The codestream
    holds the BitsStored low bits as unsigned samples: a signed image is stored
    two's complement in them, and decoders (pydicom, dcmtk) sign-extend from
    BitsStored as for any JPEG lossless image."""
    import imagecodecs
    import numpy as np

    if stored < 2:
        raise ValueError(f"BitsStored {stored}: libjpeg-turbo's lossless mode takes 2 to 16")
    if frame.shape[-1:] == (3,) and frame.ndim == 3 and photometric != "RGB":
        # libjpeg-turbo labels three components RGB (Adobe marker, no transform) and
        # its YCbCr lossless output does not decode in pylibjpeg-libjpeg.
        raise ValueError(f"{photometric} colour is encoded as RGB only")
    mask = (1 << stored) - 1
    if signed:
        values = np.bitwise_and(frame, mask)
    else:
        if int(frame.max(initial=0)) > mask:
            raise ValueError(f"pixel values above BitsStored {stored}")
        values = frame
    values = values.astype(np.uint8 if stored <= 8 else np.uint16, copy=False)
    encoded = imagecodecs.jpeg8_encode(
        np.ascontiguousarray(values), lossless=True, predictor=1, bitspersample=stored
    )
    return bytes(encoded)


def _htj2k_lossless(
    frame: np.ndarray, allocated: int, stored: int, signed: bool, photometric: str
) -> bytes:
    """Reversible 5/3, HT block coder, no multi-component transform (RGB stays RGB,
    as pydicom does for JPEG 2000 Lossless). OpenJPH, as imagecodecs drives it,
    writes a component precision of 8 or 16 bits (the array's item size), so only
    BitsStored 8 of 8 and 16 of 16 are encoded: PS3.5 8.2.4 wants the data set's
    pixel attributes consistent with the codestream."""
    import imagecodecs
    import numpy as np

    if stored != allocated:
        raise ValueError(
            f"BitsStored {stored} of {allocated}: imagecodecs' HTJ2K encoder writes a "
            f"precision of {allocated} bits only"
        )
    if photometric == "PALETTE COLOR" and signed:
        raise ValueError("signed PALETTE COLOR")
    values = frame.view(f"<i{allocated // 8}") if signed else frame
    encoded = imagecodecs.htj2k_encode(
        np.ascontiguousarray(values), rgb=False, planar=False, reversible=True
    )
    return bytes(encoded)
