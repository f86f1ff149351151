"""The Part-10 file of an instance in another transfer syntax, for the kinds that
make the file they send themselves (``folder``, ``s3``, ``dicomweb``): the DICOM
sender transcodes on the association instead. The same code as DICOM destinations
(``transforms.transcode``).
"""

from __future__ import annotations

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID

from dicomrouter.store.part10 import PREAMBLE, encode_file_meta
from dicomrouter.transforms.transcode import TranscodeError, encode_dataset, transcode

from .outgoing import OutgoingInstance

__all__ = ["TranscodeError", "transcoded", "uid_label"]


def transcoded(inst: OutgoingInstance, target: str, allow_lossy: bool) -> tuple[bytes, Dataset]:
    """The Part-10 file of ``inst`` in ``target``, and its data set (for the layout);
    :class:`TranscodeError` when it cannot be made (then the object goes as received)."""
    try:
        ds = dcmread(inst.path)
    except Exception as exc:
        raise TranscodeError(f"cannot read stored file {inst.path}: {exc}") from exc
    transcode(ds, target, allow_lossy=allow_lossy)
    meta = encode_file_meta(str(ds.SOPClassUID), str(ds.SOPInstanceUID), target)
    return PREAMBLE + meta + encode_dataset(ds), ds


def uid_label(uid: str) -> str:
    """A transfer syntax for people: its name and UID."""
    name = UID(uid).name
    return f"{name} ({uid})" if name and name != uid else uid
