"""What every sender is given and what it reports, whatever the destination's kind.

An instance may carry a ``prepare`` callable: the transforms it goes through, run
just before it is sent (:func:`prepared`), so that a batch of thousands never holds
more than one transformed copy per sender. Without one, the stored file is sent
byte for byte.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from pydicom.uid import UID

from dicomrouter.transforms import TransformRefused, TransformUnavailable

from .status import Outcome

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreparedFile:
    """The file to send in place of the stored one (a transformed copy)."""

    path: Path
    sop_instance_uid: str
    transfer_syntax_uid: str
    description: str
    """How it was made (pipelines and versions): recorded with the delivery."""
    temporary: bool = True
    """Deleted once sent."""


@dataclass(frozen=True)
class OutgoingInstance:
    """One stored instance to deliver; UIDs come from the index so nothing is parsed."""

    key: int
    """Opaque id of the caller (index row id), echoed back in :class:`InstanceResult`."""
    path: Path
    """Part-10 file on disk (preamble, ``DICM``, group 0002, then the dataset)."""
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    prepare: Callable[[], PreparedFile] | None = None
    """Transforms to run just before sending; None: send ``path`` as it is."""
    sent_as: str | None = None
    """Set on the prepared copy: how it was made (see :func:`prepared`)."""


@dataclass
class InstanceResult:
    """Outcome of one instance; ``status`` is ``None`` when no response came back."""

    key: int
    outcome: Outcome
    status: int | None
    message: str
    sent_as: str | None = None
    """How it went out when not byte for byte (pipelines, transfer syntax)."""
    sent_uid: str | None = None
    """The SOP Instance UID sent, when it is not the stored one (a transform, a
    lossy transcode)."""
    sent_transfer_syntax_uid: str | None = None
    """The transfer syntax the instance was sent in, when it was sent."""
    held: bool = False
    """Not sent because its transforms cannot run now: it waits, without using up a
    delivery attempt."""


@contextmanager
def prepared(inst: OutgoingInstance) -> Iterator[OutgoingInstance | InstanceResult]:
    """``inst`` ready to send: itself, or its transformed copy (deleted on exit); or,
    when its transforms refuse it or cannot run, the result to report instead
    (refused: failed for good, with the reason; cannot run: retried later)."""
    if inst.prepare is None:
        yield inst
        return
    try:
        ready = inst.prepare()
    except TransformRefused as exc:
        yield InstanceResult(inst.key, Outcome.PERMANENT, None, f"not sent: {exc}")
        return
    except TransformUnavailable as exc:
        yield InstanceResult(
            inst.key, Outcome.TRANSIENT, None, f"transform cannot run: {exc}", held=True
        )
        return
    except Exception as exc:  # an unreadable stored file: this instance, not the batch
        log.warning("cannot transform %s: %s", inst.sop_instance_uid, exc, exc_info=True)
        yield InstanceResult(
            inst.key, Outcome.PERMANENT, None, f"cannot transform: {error_text(exc)}"
        )
        return
    try:
        yield replace(
            inst,
            path=ready.path,
            sop_instance_uid=ready.sop_instance_uid,
            transfer_syntax_uid=ready.transfer_syntax_uid,
            prepare=None,
            sent_as=ready.description,
        )
    finally:
        if ready.temporary:
            ready.path.unlink(missing_ok=True)


def error_text(exc: BaseException) -> str:
    """An exception as one line for a delivery's reason (its type when it says
    nothing)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def annotate(result: InstanceResult, original: OutgoingInstance, sent: OutgoingInstance) -> None:
    """Record on ``result`` how what was sent differs from the stored ``original``:
    the pipelines of a transformed copy, another transfer syntax, another UID."""
    how = [sent.sent_as] if sent.sent_as else []
    syntax = result.sent_transfer_syntax_uid
    if syntax and syntax != original.transfer_syntax_uid:
        name = UID(syntax).name
        how.append(f"sent in {name if name and name != syntax else syntax}")
    if how and not result.sent_as:
        result.sent_as = "; ".join(how)
    if sent.sop_instance_uid != original.sop_instance_uid and not result.sent_uid:
        result.sent_uid = sent.sop_instance_uid
