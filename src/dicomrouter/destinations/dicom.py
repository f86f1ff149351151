"""Deliver stored instances to a DICOM C-STORE SCP with pynetdicom.

Throughput comes from three choices (see the shared field notes):

* associations are reused for a whole batch (renewed every ``batch_size``
  instances, split when more than 128 presentation contexts are needed);
* files are streamed from disk (``STORE_SEND_CHUNKED_DATASET``) without being
  decoded, which requires the accepted presentation context to carry exactly the
  file's transfer syntax, so every context offers a single transfer syntax;
* every socket has ``TCP_NODELAY`` (:func:`dicomrouter.net.install_tcp_nodelay`).

Only when the destination refuses the stored transfer syntax is the file parsed:
encapsulated (compressed) pixel data is decoded with pydicom's pixel backends and
the dataset is sent as Explicit (or Implicit) VR Little Endian.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, build_context
from pynetdicom import _config as pynetdicom_config
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext

from dicomrouter.config.models import DicomDestinationConfig
from dicomrouter.net import (
    as_store_response,
    install_fast_store_response,
    install_low_latency_reactors,
    install_no_value_validation,
    install_tcp_nodelay,
    send_stored_file,
)
from dicomrouter.observe import metrics

from .status import Outcome, classify_status, describe_status

log = logging.getLogger(__name__)

#: PS3.8: presentation context IDs are odd numbers 1..255, so at most 128 per association.
MAX_CONTEXTS = 128

#: How long to wait for pynetdicom's association thread to end after release/abort.
_JOIN_TIMEOUT = 5.0

_ELE = ExplicitVRLittleEndian
_VERIFICATION = "1.2.840.10008.1.1"
_ILE = ImplicitVRLittleEndian


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


@dataclass
class InstanceResult:
    """Outcome of one instance; ``status`` is ``None`` when no C-STORE-RSP came back."""

    key: int
    outcome: Outcome
    status: int | None
    message: str


class DestinationUnavailable(Exception):
    """Nothing could be sent: no connection, association rejected or aborted.

    ``transient`` is False only when the destination said so (A-ASSOCIATE-RJ with
    result "rejected-permanent", or no presentation context accepted at all): the
    dispatcher should then pause the destination rather than retry quickly.
    """

    def __init__(self, message: str, *, transient: bool = True) -> None:
        super().__init__(message)
        self.transient = transient


class VerificationNotSupported(DestinationUnavailable):
    """The peer accepted an association but not the Verification SOP Class: it is up,
    it just cannot be pinged. A probe treats this as an answer."""


def fallback_syntaxes(transfer_syntax: str) -> tuple[UID, ...]:
    """Transfer syntaxes to propose for a file stored in ``transfer_syntax``, best first.

    The stored syntax always comes first so the file can be streamed as is. The
    alternatives are the ones we can convert to *losslessly and correctly*:

    * encapsulated (compressed) data can be decoded to Explicit/Implicit VR LE;
    * deflated data is inflated by pydicom and re-encoded;
    * Explicit VR LE can be re-encoded as Implicit VR LE (the default syntax every
      SCP must accept).

    Explicit VR Big Endian gets no fallback: pydicom 3 re-encodes such a dataset as
    little endian without swapping the bytes of OW/OF values, silently corrupting
    the pixel data (verified with pydicom 3.0.2).
    """
    ts = UID(transfer_syntax)
    if ts == _ILE:
        return (ts,)
    if ts == _ELE:
        return (ts, _ILE)
    if ts.is_encapsulated or ts == DeflatedExplicitVRLittleEndian:
        return (ts, _ELE, _ILE)
    return (ts,)


def _uid_label(uid: str) -> str:
    name = UID(uid).name
    return f"{name} ({uid})" if name and name != uid else uid


@dataclass
class _Chunk:
    """Instances sent over one association and the contexts it proposes."""

    instances: list[OutgoingInstance]
    contexts: list[tuple[str, str]]


def plan_associations(batch: Sequence[OutgoingInstance], batch_size: int) -> list[_Chunk]:
    """Split ``batch`` (in order) into associations of at most ``batch_size`` instances
    and at most :data:`MAX_CONTEXTS` presentation contexts (one per (SOP class,
    transfer syntax), never several syntaxes in one context)."""
    chunks: list[_Chunk] = []
    current: _Chunk | None = None
    seen: set[tuple[str, str]] = set()
    for inst in batch:
        needed = [
            (inst.sop_class_uid, str(ts)) for ts in fallback_syntaxes(inst.transfer_syntax_uid)
        ]
        new = [pair for pair in needed if pair not in seen]
        if current is None or (
            len(current.instances) >= batch_size or len(current.contexts) + len(new) > MAX_CONTEXTS
        ):
            current = _Chunk([], [])
            chunks.append(current)
            seen = set()
            new = needed
        current.instances.append(inst)
        for pair in new:
            seen.add(pair)
            current.contexts.append(pair)
    return chunks


class _ConnectionLost(Exception):
    """Internal: the association ended mid-batch; carries the reason for the results."""


class DicomSender:
    """Send batches of stored instances to one DICOM destination.

    Create one per destination and keep it: the pynetdicom ``AE`` is built lazily
    on first use and reused. ``send`` may be called from several threads (one
    association each); the shared ``AE`` is only configured once, under a lock.
    """

    def __init__(
        self, config: DicomDestinationConfig, calling_ae: str, keep_alive: float = 0.0
    ) -> None:
        """``keep_alive`` > 0 keeps the last association open that many seconds after
        ``send`` returns, so the next batch with the same (SOP class, transfer syntax)
        pairs reuses it: with instance-level routing a worker sends many small batches
        in a row, and opening an association for each one costs more than sending.
        Such a sender belongs to one thread; call :meth:`close` when done."""
        self.config = config
        self.calling_ae = config.calling_ae_title or calling_ae
        self.keep_alive = keep_alive
        self._ae: AE | None = None
        self._lock = threading.Lock()
        self._kept: _KeptAssociation | None = None
        self._active: Association | None = None

    # -- setup -------------------------------------------------------------------

    def _get_ae(self) -> AE:
        with self._lock:
            if self._ae is None:
                install_tcp_nodelay()
                install_low_latency_reactors()
                install_no_value_validation()
                install_fast_store_response()  # C-STORE-RQs of files, packed directly
                # Stream files from disk instead of decoding them. This is process
                # wide: any send_c_store(path) then needs an exact-syntax context.
                pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True
                ae = AE(ae_title=self.calling_ae)
                cfg = self.config
                ae.connection_timeout = cfg.connect_timeout
                ae.acse_timeout = cfg.acse_timeout
                ae.dimse_timeout = cfg.dimse_timeout
                ae.network_timeout = cfg.network_timeout
                # Only applies when we accept associations; as requestor our receive
                # limit is the ``max_pdu`` argument of associate() (see _associate).
                ae.maximum_pdu_size = 0
                self._ae = ae
            return self._ae

    @property
    def _where(self) -> str:
        c = self.config
        return f"{c.ae_title}@{c.host}:{c.port}"

    def _associate(self, contexts: list[PresentationContext]) -> Association:
        """Open an association or raise :class:`DestinationUnavailable`.

        An association that was accepted but with no presentation context accepted
        is returned (not established) so the caller can fail instances one by one.
        """
        ae = self._get_ae()
        cfg = self.config
        try:
            # max_pdu=0: we accept PDUs of any size (only responses come back, but
            # there is no reason to make the peer fragment them). The PDU size we
            # *send* is the peer's maximum, which we cannot choose.
            assoc = ae.associate(
                cfg.host,
                cfg.port,
                contexts=contexts,
                ae_title=cfg.ae_title,
                max_pdu=0,
                evt_handlers=metrics.association_handlers("outbound"),
            )
        except Exception as exc:  # invalid address, too many contexts...
            raise DestinationUnavailable(f"cannot associate with {self._where}: {exc}") from exc
        if assoc.is_established:
            return assoc
        _join(assoc)
        rsp = assoc.acceptor.primitive
        if assoc.is_rejected and rsp is not None:
            permanent = rsp.result == 0x01
            kind = "rejected-permanent" if permanent else "rejected-transient"
            raise DestinationUnavailable(
                f"association {kind} by {self._where}: source {rsp.source_str}, "
                f"reason {rsp.reason_str}",
                transient=not permanent,
            )
        if rsp is not None and rsp.result == 0x00:
            return assoc  # accepted, but none of the contexts: caller decides
        socket = assoc.dul.socket
        if socket is not None and not getattr(socket, "_is_connected", True):
            raise DestinationUnavailable(
                f"cannot connect to {self._where} (refused, unreachable or no answer "
                f"within {cfg.connect_timeout:g}s)"
            )
        if rsp is None and assoc.is_aborted:
            raise DestinationUnavailable(
                f"association with {self._where} aborted during negotiation "
                f"(or no A-ASSOCIATE response within {cfg.acse_timeout:g}s)"
            )
        raise DestinationUnavailable(f"association with {self._where} failed")

    # -- public API --------------------------------------------------------------

    def echo(self) -> None:
        """C-ECHO the destination; raise :class:`DestinationUnavailable` on failure.

        Used by the dispatcher to probe a paused destination cheaply.
        """
        assoc = self._associate([build_context(_VERIFICATION)])
        try:
            if not assoc.is_established:
                raise VerificationNotSupported(
                    f"{self._where} accepted the association but not the Verification SOP Class",
                    transient=False,
                )
            status = assoc.send_c_echo()
            if "Status" not in status:
                raise DestinationUnavailable(
                    f"no C-ECHO response from {self._where} within {self.config.dimse_timeout:g}s"
                )
            if status.Status != 0x0000:
                raise DestinationUnavailable(
                    f"C-ECHO to {self._where} failed: {describe_status(status.Status)}"
                )
        finally:
            _close(assoc)

    def send(
        self,
        batch: Sequence[OutgoingInstance],
        on_result: Callable[[InstanceResult], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> list[InstanceResult]:
        """Send ``batch``; report each instance's outcome as it happens and return all.

        * Raises :class:`DestinationUnavailable` only if the *first* association
          cannot be opened (nothing was sent), so the dispatcher can count
          consecutive connection failures.
        * If a later association fails, or an association is lost mid-batch (abort,
          connection closed, DIMSE timeout), the current and all remaining instances
          get a ``TRANSIENT`` result and ``send`` returns: the dispatcher retries
          later with backoff instead of us hammering a struggling peer.
        * ``should_stop()`` is checked before each instance; once it returns True
          the association is released and unsent instances get no result.
        """
        results: list[InstanceResult] = []

        def emit(result: InstanceResult) -> None:
            results.append(result)
            if on_result is not None:
                on_result(result)

        chunks = plan_associations(batch, self.config.batch_size)
        for index, chunk in enumerate(chunks):
            if should_stop is not None and should_stop():
                return results
            wanted = frozenset(chunk.contexts)
            assoc = self._reuse(wanted, len(chunk.instances))
            if assoc is None:
                contexts = [build_context(sop, [ts]) for sop, ts in chunk.contexts]
                try:
                    assoc = self._associate(contexts)
                except DestinationUnavailable as exc:
                    if index == 0:
                        raise
                    log.warning("%s", exc)
                    self._fail_rest(chunks[index:], 0, str(exc), emit)
                    return results
                kept = _KeptAssociation(assoc, wanted)
            else:
                kept = self._kept  # type: ignore[assignment]
                self._kept = None
            keep = False
            try:
                position = self._send_chunk(assoc, chunk, emit, should_stop)
                kept.sent += position
                keep = (
                    self.keep_alive > 0
                    and position == len(chunk.instances)
                    and index == len(chunks) - 1
                    and assoc.is_established
                )
            except _ConnectionLost as lost:
                position, reason = lost.args
                log.warning("sending to %s: %s", self._where, reason)
                self._fail_rest(chunks[index:], position, reason, emit)
                return results
            finally:
                if keep:
                    kept.idle_since = time.monotonic()
                    self._kept = kept
                else:
                    _close(assoc)
            if position < len(chunk.instances):  # should_stop
                return results
        return results

    def _reuse(self, wanted: frozenset[tuple[str, str]], count: int) -> Association | None:
        """The kept association, if it is alive, fresh, proposed every context this
        chunk needs and has room left under ``batch_size``; else close it."""
        kept, self._kept = self._kept, None
        if kept is None:
            return None
        usable = (
            kept.assoc.is_established
            and time.monotonic() - kept.idle_since < self.keep_alive
            and wanted <= kept.proposed
            and kept.sent + count <= self.config.batch_size
        )
        if not usable:
            _close(kept.assoc)
            return None
        self._kept = kept
        return kept.assoc

    def abort(self) -> None:
        """From another thread: A-ABORT the association a ``send`` is blocked on (a
        shutdown must not wait out a hung peer's ``dimse_timeout``)."""
        active = self._active
        if active is not None and active.is_established:
            with contextlib.suppress(Exception):
                active.abort()

    def close(self) -> None:
        """Release the kept association, if any."""
        kept, self._kept = self._kept, None
        if kept is not None:
            _close(kept.assoc)

    def close_if_idle(self) -> None:
        """Release the kept association once it has been idle for ``keep_alive``."""
        kept = self._kept
        if kept is not None and time.monotonic() - kept.idle_since >= self.keep_alive:
            self.close()

    # -- internals -----------------------------------------------------------------

    @staticmethod
    def _fail_rest(
        chunks: list[_Chunk], start: int, reason: str, emit: Callable[[InstanceResult], None]
    ) -> None:
        """TRANSIENT for instance ``start`` of ``chunks[0]`` and everything after it."""
        for n, chunk in enumerate(chunks):
            for inst in chunk.instances[start if n == 0 else 0 :]:
                emit(InstanceResult(inst.key, Outcome.TRANSIENT, None, reason))

    def _send_chunk(
        self,
        assoc: Association,
        chunk: _Chunk,
        emit: Callable[[InstanceResult], None],
        should_stop: Callable[[], bool] | None,
    ) -> int:
        """Send one association's instances; return how many were handled.

        Raises ``_ConnectionLost(position, reason)`` when the association ends early.
        """
        accepted = {
            (str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in assoc.accepted_contexts
        }
        supported = {sop for sop, _ in accepted}
        self._active = assoc
        try:
            with _ReactorParking(assoc) as parking:
                return self._send_loop(
                    assoc, chunk, accepted, supported, parking, emit, should_stop
                )
        finally:
            self._active = None

    def _send_loop(
        self,
        assoc: Association,
        chunk: _Chunk,
        accepted: set[tuple[str, str]],
        supported: set[str],
        parking: _ReactorParking,
        emit: Callable[[InstanceResult], None],
        should_stop: Callable[[], bool] | None,
    ) -> int:
        msg_id = 0
        for position, inst in enumerate(chunk.instances):
            if should_stop is not None and should_stop():
                return position
            if inst.sop_class_uid not in supported:
                # Includes "accepted with no usable context": every instance fails
                # here without needing the (already aborted) association.
                emit(
                    InstanceResult(
                        inst.key,
                        Outcome.PERMANENT,
                        None,
                        f"destination does not support SOP class {_uid_label(inst.sop_class_uid)}",
                    )
                )
                continue
            if not assoc.is_established:
                raise _ConnectionLost(
                    position, _lost_reason(assoc, "association ended before sending")
                )
            msg_id = msg_id % 0xFFFF + 1
            parking.before_send()
            emit(self._send_one(assoc, inst, accepted, msg_id, position))
        return len(chunk.instances)

    def _send_one(
        self,
        assoc: Association,
        inst: OutgoingInstance,
        accepted: set[tuple[str, str]],
        msg_id: int,
        position: int,
    ) -> InstanceResult:
        sop, ts = inst.sop_class_uid, inst.transfer_syntax_uid
        payload: Path | Dataset
        if (sop, ts) in accepted:
            payload = inst.path
        else:
            target = next(
                (alt for alt in fallback_syntaxes(ts)[1:] if (sop, str(alt)) in accepted), None
            )
            if target is None:
                return InstanceResult(
                    inst.key,
                    Outcome.PERMANENT,
                    None,
                    f"destination refused {_uid_label(ts)} for {_uid_label(sop)} and no "
                    "conversion to an accepted transfer syntax is possible",
                )
            try:
                payload = _convert(inst, target)
            except _ConversionError as exc:
                return InstanceResult(inst.key, Outcome.PERMANENT, None, str(exc))

        started = time.monotonic()
        try:
            if isinstance(payload, Path):
                rsp = send_stored_file(assoc, payload, msg_id)
            else:
                rsp = as_store_response(assoc.send_c_store(payload, msg_id=msg_id))
        except OSError as exc:
            return InstanceResult(
                inst.key, Outcome.PERMANENT, None, f"cannot read stored file {inst.path}: {exc}"
            )
        except (ValueError, AttributeError) as exc:
            # No exact context for the file's real syntax (index and file disagree),
            # missing file meta, or a dataset pydicom cannot encode.
            return InstanceResult(inst.key, Outcome.PERMANENT, None, f"cannot send: {exc}")

        if rsp is None:
            elapsed = time.monotonic() - started
            timeout = self.config.dimse_timeout
            if timeout and elapsed >= timeout * 0.95:
                reason = f"no response within {timeout:g}s; association aborted"
                if assoc.is_established:
                    assoc.abort()
            else:
                reason = _lost_reason(assoc, "no C-STORE response")
            raise _ConnectionLost(position, reason)

        status = int(rsp.Status)
        message = describe_status(status)
        comment = rsp.ErrorComment
        if comment:
            message = f"{message}: {comment}"
        outcome = classify_status(status)
        log.debug("C-STORE %s -> %s", inst.sop_instance_uid, message)
        return InstanceResult(inst.key, outcome, status, message)


class _ConversionError(Exception):
    pass


@dataclass
class _KeptAssociation:
    """An association kept open between ``send`` calls (see ``keep_alive``)."""

    assoc: Association
    proposed: frozenset[tuple[str, str]]
    sent: int = 0
    idle_since: float = 0.0


def _convert(inst: OutgoingInstance, target: UID) -> Dataset:
    """Read the file and return a dataset pynetdicom can encode as ``target``.

    Encapsulated pixel data is decoded first. ``generate_instance_uid=False`` is
    essential: pydicom 3 otherwise gives the decompressed dataset a *new* SOP
    Instance UID, which would no longer match the index (or the C-STORE request).
    """
    ts = UID(inst.transfer_syntax_uid)
    try:
        ds = dcmread(inst.path)
    except Exception as exc:
        raise _ConversionError(f"cannot read stored file {inst.path}: {exc}") from exc
    if ts.is_encapsulated and "PixelData" in ds:
        from pydicom.pixels import get_decoder

        try:
            decoder = get_decoder(ts)
        except NotImplementedError:
            decoder = None
        if decoder is None or not decoder.is_available:
            missing = "; ".join(decoder.missing_dependencies) if decoder else ""
            raise _ConversionError(
                f"destination refused {_uid_label(ts)} and no decoder is available for it"
                + (f" ({missing})" if missing else "")
            )
        try:
            ds.decompress(generate_instance_uid=False)
        except Exception as exc:
            detail = " ".join(str(exc).split())
            raise _ConversionError(
                f"destination refused {_uid_label(ts)} and decoding failed: {detail}"
            ) from exc
    # Every source we convert is explicit VR little endian once read (decoded,
    # inflated or ELE to begin with). pynetdicom checks that the file meta matches
    # the dataset's encoding, then re-encodes to the accepted context: exact ELE if
    # accepted, else the "convertible" Implicit VR LE context (``target``).
    ds.file_meta.TransferSyntaxUID = _ELE
    log.debug("converted %s from %s for %s", inst.sop_instance_uid, ts.name, target.name)
    return ds


class _ReactorParking:
    """Keep pynetdicom's association reactor blocked while we send a batch.

    Why: ``send_c_store`` pauses the reactor thread by clearing an Event and
    waiting for ``_is_paused``, and sets the Event again when it returns. But
    ``_is_paused`` is still True from the previous pause while the woken reactor
    waits to be scheduled, so a back-to-back ``send_c_store`` proceeds at once; the
    reactor then runs one loop iteration and can take the next C-STORE-RSP off the
    DIMSE queue. We then wait ``dimse_timeout`` for a response that never comes and
    dcmtk drops the idle connection after 60 s (seen in about 1 run in 4 sending
    1000 small files to storescp; pynetdicom issue #435 describes the same race).

    How: clear the reactor's Event and wait until the reactor thread is among the
    Event's waiters. From then on it is blocked until that Event is set, so we give
    ``send_c_store`` a private Event to toggle instead (``_is_paused`` stays True, as
    it expects). On exit the real Event is restored and set, so the reactor resumes
    for release/abort handling and its thread ends normally. This also saves the
    reactor's 1 ms loop sleep per instance. If the reactor cannot be parked (thread
    gone, internals changed), :meth:`before_send` falls back to waiting for it to
    re-block before every send.
    """

    _LIMIT = 1.0

    def __init__(self, assoc: Association) -> None:
        self.assoc = assoc
        self.original = assoc._reactor_checkpoint
        self.parked = False

    def _wait_blocked(self) -> bool:
        checkpoint = self.original
        checkpoint.clear()
        waiters = getattr(getattr(checkpoint, "_cond", None), "_waiters", None)
        if waiters is None:
            return False
        deadline = time.monotonic() + self._LIMIT
        while self.assoc.is_alive() and time.monotonic() < deadline:
            if len(waiters) > 0:
                return True
            time.sleep(0.00005)
        return False

    def __enter__(self) -> _ReactorParking:
        if self.assoc.is_established and self._wait_blocked():
            self.assoc._reactor_checkpoint = threading.Event()
            self.parked = True
        return self

    def before_send(self) -> None:
        if not self.parked and self.assoc.is_established:
            self._wait_blocked()

    def __exit__(self, *exc_info: object) -> None:
        self.assoc._reactor_checkpoint = self.original
        self.original.set()


def _lost_reason(assoc: Association, what: str) -> str:
    """Best-effort reason why pynetdicom ended the association."""
    acse = assoc.acse
    try:
        if acse.is_aborted("a-abort"):
            return f"{what}: association aborted by peer (A-ABORT)"
        if acse.is_aborted("a-p-abort"):
            return f"{what}: connection closed by peer"
    except Exception:  # pragma: no cover - defensive, peeks at pynetdicom internals
        pass
    return f"{what}: association aborted or connection lost"


def _close(assoc: Association) -> None:
    """Release an established association (abort if that fails) and reap its thread."""
    try:
        if assoc.is_established:
            assoc.release()
        if assoc.is_established:
            assoc.abort()
    except Exception:  # pragma: no cover - never let cleanup mask the real error
        log.debug("error while closing association", exc_info=True)
        with contextlib.suppress(Exception):
            assoc.abort()
    _join(assoc)


def _join(assoc: Association) -> None:
    if assoc.is_alive() and assoc is not threading.current_thread():
        assoc.join(_JOIN_TIMEOUT)
