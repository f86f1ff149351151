"""Outgoing associations for DICOM destinations: :mod:`dicomrouter.dicomnet`'s
requestor with our identity, our metrics, and stored files' File Meta read here.

The network layer imports nothing of ours, so what it needs from the rest of the
router comes in through this module: the implementation identity, the metric hooks,
and (:func:`store_file`) where a stored file's data set starts.
"""

from __future__ import annotations

from pathlib import Path

from dicomrouter.dicomnet import (
    AssociationLost,
    AssociationRejected,
    CannotConnect,
    Hooks,
    Identity,
    OutboundAssociation,
    Response,
    Timeouts,
    TlsClient,
)
from dicomrouter.dicomnet.constants import VERIFICATION_SOP_CLASS
from dicomrouter.observe import metrics
from dicomrouter.store.part10 import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION,
    read_file_meta,
)

__all__ = [
    "VERIFICATION",
    "AssociationLost",
    "AssociationRejected",
    "CannotConnect",
    "OutboundAssociation",
    "Response",
    "Timeouts",
    "TlsClient",
    "open_association",
    "store_file",
]

VERIFICATION = VERIFICATION_SOP_CLASS
IDENTITY = Identity(IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION)
_HOOKS = Hooks(
    opened=lambda: metrics.association_opened("outbound"),
    closed=lambda: metrics.association_closed("outbound"),
)


def open_association(
    host: str,
    port: int,
    calling_ae: str,
    called_ae: str,
    proposed: list[tuple[str, str]],
    timeouts: Timeouts,
    tls: TlsClient | None = None,
) -> OutboundAssociation:
    """:meth:`OutboundAssociation.request` as the router: our identity, counted in
    the association metrics."""
    return OutboundAssociation.request(
        host, port, calling_ae, called_ae, proposed, timeouts, IDENTITY, _HOOKS, tls
    )


def store_file(association: OutboundAssociation, path: Path, message_id: int) -> Response:
    """C-STORE a stored Part-10 file as it is on disk. ``OSError`` when it cannot be
    read and ``ValueError`` when it has no usable File Meta (nothing was sent)."""
    return association.store_file(path, message_id, read_file_meta(path))
