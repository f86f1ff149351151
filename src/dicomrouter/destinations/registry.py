"""Which sender delivers to which kind of destination (``destinations.<name>.type``).

Each kind's module is imported the first time a sender of that kind is made, so a
process loads only the client libraries of the kinds it sends to: the HTTP process,
which makes a sender only for an operator's echo, never loads them otherwise.

To add a kind: its configuration model in ``config/models.py`` (a subclass of
``BaseDestinationConfig`` in ``DESTINATION_MODELS`` and the ``DestinationConfig``
union), its module here beside ``dicom.py`` and ``folder.py`` with a class that
implements :class:`~.sender.Sender`, and one entry in :data:`_FACTORIES`.
docs/destinations.md has the whole list.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dicomrouter.config import BaseDestinationConfig

from .sender import Sender

__all__ = ["SenderOptions", "create_sender", "kinds"]


@dataclass(frozen=True)
class SenderOptions:
    """What a sender takes from the router rather than from its destination."""

    calling_ae: str = "DICOMROUTER"
    """The router's AE title (DICOM: the calling AE title unless the destination
    sets its own)."""
    keep_alive: float = 0.0
    """Seconds a connection is kept open after a batch for the next one (0: closed
    at once; then ``send`` may be called from several threads)."""
    name: str = ""
    """The destination's name (``destinations.<name>``), for messages that point at
    a key to fix."""


def _dicom(config: Any, options: SenderOptions) -> Sender:
    from .dicom import DicomSender

    return DicomSender(config, config.calling_ae_title or options.calling_ae, options.keep_alive)


def _folder(config: Any, options: SenderOptions) -> Sender:
    from .folder import FolderSender

    return FolderSender(config)


def _dicomweb(config: Any, options: SenderOptions) -> Sender:
    from .dicomweb import DicomwebSender

    return DicomwebSender(config, options.name, options.keep_alive)


def _s3(config: Any, options: SenderOptions) -> Sender:
    from .s3 import S3Sender

    return S3Sender(config)


#: kind -> a factory that imports the kind's module and makes its sender.
_FACTORIES: dict[str, Callable[[Any, SenderOptions], Sender]] = {
    "dicom": _dicom,
    "folder": _folder,
    "dicomweb": _dicomweb,
    "s3": _s3,
}


def kinds() -> tuple[str, ...]:
    """The kinds a sender can be made for (every kind the configuration knows)."""
    return tuple(_FACTORIES)


def create_sender(config: BaseDestinationConfig, options: SenderOptions | None = None) -> Sender:
    """A sender for the destination ``config``, of the kind its ``type`` names."""
    factory = _FACTORIES.get(config.type)
    if factory is None:
        raise ValueError(
            f"no sender for destination type {config.type!r} (known: {', '.join(_FACTORIES)})"
        )
    return factory(config, options or SenderOptions())
