"""What the receiver accepts: every storage SOP class in the transfer syntaxes we can
store as received and, where a destination needs it, decode (pylibjpeg plugins)."""

from __future__ import annotations

from pydicom import uid
from pynetdicom import DEFAULT_TRANSFER_SYNTAXES, AllStoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

ACCEPTED_TRANSFER_SYNTAXES: list[str] = [
    uid.ExplicitVRLittleEndian,
    uid.ImplicitVRLittleEndian,
    uid.DeflatedExplicitVRLittleEndian,
    uid.ExplicitVRBigEndian,
    uid.JPEGBaseline8Bit,
    uid.JPEGExtended12Bit,
    uid.JPEGLossless,
    uid.JPEGLosslessSV1,
    uid.JPEGLSLossless,
    uid.JPEGLSNearLossless,
    uid.JPEG2000Lossless,
    uid.JPEG2000,
    uid.HTJ2KLossless,
    uid.HTJ2KLosslessRPCL,
    uid.HTJ2K,
    uid.RLELossless,
]

STORAGE_SOP_CLASSES: list[str] = [cx.abstract_syntax for cx in AllStoragePresentationContexts]  # type: ignore[misc]
VERIFICATION_SOP_CLASS: str = Verification
#: C-ECHO in the transfer syntaxes pynetdicom offers by default.
VERIFICATION_TRANSFER_SYNTAXES: list[str] = list(DEFAULT_TRANSFER_SYNTAXES)
