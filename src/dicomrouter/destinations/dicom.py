"""Deliver stored instances to a DICOM C-STORE SCP.

Throughput comes from these choices (measured: docs/benchmarks.md; the protocol side
in docs/architecture.md, "Sending"):

* associations are reused for a whole batch (renewed every ``batch_size``
  instances, split when more than 128 presentation contexts are needed), and kept
  open for ``keep_alive`` seconds for the next batch;
* files are streamed from disk without being decoded, which requires the accepted
  presentation context to carry exactly the file's transfer syntax, so every context
  offers a single transfer syntax;
* our own requestor (:mod:`dicomrouter.dicomnet`): no polling threads, ``TCP_NODELAY``.

Only when the destination refuses the stored transfer syntax is the file parsed:
encapsulated (compressed) pixel data is decoded with pydicom's pixel backends and
the dataset is sent as Explicit (or Implicit) VR Little Endian.

A destination with a ``transfer_syntax`` (not ``as-received``) is offered, for each
instance, that syntax first, then the file's own, then Explicit VR Little Endian
(:func:`proposed_syntaxes`). When the peer accepts the chosen one, the file is read
and transcoded (:mod:`dicomrouter.transforms.transcode`), one instance at a time; an
instance that cannot be transcoded (no Pixel Data, a codec missing, pixels a
lossless encode would change) goes in the next accepted syntax of the chain, and
the reason is logged and added to its result's message. Details:
docs/transforms.md ("Transfer syntax per destination").
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from dicomrouter.config.models import DicomDestinationConfig
from dicomrouter.dicomnet.negotiation import MAX_CONTEXTS
from dicomrouter.store.header import install_no_value_validation
from dicomrouter.tls import TlsError, client_context
from dicomrouter.transforms.transcode import (
    TranscodeError,
    can_transcode,
    encode_dataset,
    transcode,
)

from .association import (
    VERIFICATION,
    AssociationLost,
    AssociationRejected,
    CannotConnect,
    OutboundAssociation,
    Response,
    Timeouts,
    TlsClient,
    open_association,
    store_file,
)
from .outgoing import InstanceResult, OutgoingInstance, annotate, prepared
from .sender import DestinationUnavailable, VerificationNotSupported
from .status import Outcome, classify_status, describe_status

log = logging.getLogger(__name__)


_ELE = ExplicitVRLittleEndian
_ILE = ImplicitVRLittleEndian


def _tls_client(config: DicomDestinationConfig) -> TlsClient | None:
    """The destination's TLS context (BCP 195), read from its files for each new
    association, so renewed certificates are used from the next one (a millisecond
    or two per association, which carries a whole batch)."""
    if config.tls is None:
        return None
    settings = config.tls
    context = client_context(
        settings.ca_certificates,
        settings.certificate,
        settings.private_key,
        settings.verify_hostname,
    )
    return TlsClient(context, server_hostname=config.host)


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


def proposed_syntaxes(transfer_syntax: str, target: str = "") -> tuple[UID, ...]:
    """Transfer syntaxes to propose for a file stored in ``transfer_syntax`` to a
    destination that asks for ``target`` ("" for as received), best first.

    With a target: the target (if this file can be transcoded to it here), then the
    file's own syntax (streamed unchanged), then Explicit VR Little Endian (if the
    file can be converted to it), then the rest of :func:`fallback_syntaxes`.
    """
    received = fallback_syntaxes(transfer_syntax)
    if not target or UID(target) == UID(transfer_syntax):
        return received
    chain: list[UID] = []
    if can_transcode(transfer_syntax, target):
        chain.append(UID(target))
    chain.append(UID(transfer_syntax))
    if _ELE in received or can_transcode(transfer_syntax, _ELE):
        chain.append(_ELE)
    chain.extend(received[1:])
    return tuple(dict.fromkeys(chain))


def _uid_label(uid: str) -> str:
    name = UID(uid).name
    return f"{name} ({uid})" if name and name != uid else uid


@dataclass
class _Chunk:
    """Instances sent over one association and the contexts it proposes."""

    instances: list[OutgoingInstance]
    contexts: list[tuple[str, str]]


def plan_associations(
    batch: Sequence[OutgoingInstance], batch_size: int, target: str = ""
) -> list[_Chunk]:
    """Split ``batch`` (in order) into associations of at most ``batch_size`` instances
    and at most :data:`MAX_CONTEXTS` presentation contexts (one per (SOP class,
    transfer syntax), never several syntaxes in one context). ``target`` is the
    destination's transfer syntax ("" for as received): see :func:`proposed_syntaxes`."""
    chunks: list[_Chunk] = []
    current: _Chunk | None = None
    seen: set[tuple[str, str]] = set()
    for inst in batch:
        needed = [
            (inst.sop_class_uid, str(ts))
            for ts in proposed_syntaxes(inst.transfer_syntax_uid, target)
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
    """Send batches of stored instances to one DICOM destination (the
    :class:`~.sender.Sender` of ``type: dicom``).

    ``send`` may be called from several threads when ``keep_alive`` is 0 (each call
    opens its own association); with ``keep_alive`` the sender belongs to one thread.
    """

    def __init__(
        self, config: DicomDestinationConfig, calling_ae: str, keep_alive: float = 0.0
    ) -> None:
        """``keep_alive`` > 0 keeps the last association open that many seconds after
        ``send`` returns, so the next batch with the same (SOP class, transfer syntax)
        pairs reuses it: with instance-level routing a worker sends many small batches
        in a row, and opening an association for each one costs more than sending.
        Call :meth:`close` when done."""
        self.config = config
        self.calling_ae = config.calling_ae_title or calling_ae
        self.keep_alive = keep_alive
        self.timeouts = Timeouts(
            config.connect_timeout,
            config.acse_timeout,
            config.dimse_timeout,
            config.network_timeout,
        )
        self._target = config.transfer_syntax_uid
        self._kept: _KeptAssociation | None = None
        self._active: OutboundAssociation | None = None
        install_no_value_validation()  # pydicom only ever warned, on converted data sets

    @property
    def _where(self) -> str:
        c = self.config
        return f"{c.ae_title}@{c.host}:{c.port}"

    def _associate(self, proposed: list[tuple[str, str]]) -> OutboundAssociation:
        """Open an association or raise :class:`DestinationUnavailable`.

        An association that was accepted with no presentation context accepted is
        returned (``contexts`` empty) so the caller can fail instances one by one.
        """
        cfg = self.config
        try:
            tls = _tls_client(cfg)
        except TlsError as exc:  # a renewal half done: wait as for an unreachable peer
            raise DestinationUnavailable(f"TLS files of {self._where}: {exc}") from None
        try:
            return open_association(
                cfg.host,
                cfg.port,
                self.calling_ae,
                cfg.ae_title,
                proposed,
                self.timeouts,
                tls,
            )
        except CannotConnect as exc:
            if exc.tls:
                raise DestinationUnavailable(f"cannot connect to {self._where}: {exc}") from None
            raise DestinationUnavailable(
                f"cannot connect to {self._where} (refused, unreachable or no answer "
                f"within {cfg.connect_timeout:g}s): {exc}"
            ) from None
        except AssociationRejected as exc:
            raise DestinationUnavailable(
                f"association {exc.kind} by {self._where}: {exc.detail}",
                transient=not exc.permanent,
            ) from None
        except AssociationLost as exc:
            raise DestinationUnavailable(f"association with {self._where} failed: {exc}") from None
        except (ValueError, OSError) as exc:  # invalid address, too many contexts...
            raise DestinationUnavailable(f"cannot associate with {self._where}: {exc}") from None

    # -- public API --------------------------------------------------------------

    def echo(self) -> None:
        """C-ECHO the destination; raise :class:`DestinationUnavailable` on failure.

        Used by the dispatcher to probe a paused destination cheaply.
        """
        assoc = self._associate([(VERIFICATION, str(_ILE))])
        try:
            if not assoc.contexts:
                raise VerificationNotSupported(
                    f"{self._where} accepted the association but not the Verification SOP Class",
                    transient=False,
                )
            try:
                rsp = assoc.echo()
            except AssociationLost as exc:
                raise DestinationUnavailable(
                    f"no C-ECHO response from {self._where}: {exc}"
                ) from None
            if rsp.status != 0x0000:
                raise DestinationUnavailable(
                    f"C-ECHO to {self._where} failed: {describe_status(rsp.status)}"
                )
        finally:
            assoc.release()

    def probe(self) -> None:
        """The :class:`~.sender.Sender` probe: a C-ECHO (:meth:`echo`)."""
        self.echo()

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

        chunks = plan_associations(batch, self.config.batch_size, self._target)
        for index, chunk in enumerate(chunks):
            if should_stop is not None and should_stop():
                return results
            wanted = frozenset(chunk.contexts)
            kept = self._reuse(wanted, len(chunk.instances))
            if kept is None:
                try:
                    kept = _KeptAssociation(self._associate(chunk.contexts), wanted)
                except DestinationUnavailable as exc:
                    if index == 0:
                        raise
                    log.warning("%s", exc)
                    self._fail_rest(chunks[index:], 0, str(exc), emit)
                    return results
            assoc = kept.assoc
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
                    assoc.release()
            if position < len(chunk.instances):  # should_stop
                return results
        return results

    def _reuse(self, wanted: frozenset[tuple[str, str]], count: int) -> _KeptAssociation | None:
        """The kept association, if it is alive, fresh, proposed every context this
        chunk needs and has room left under ``batch_size``; else release it."""
        kept, self._kept = self._kept, None
        if kept is None:
            return None
        usable = (
            time.monotonic() - kept.idle_since < self.keep_alive
            and wanted <= kept.proposed
            and kept.sent + count <= self.config.batch_size
            and kept.assoc.is_established
        )
        if not usable:
            kept.assoc.release()
            return None
        return kept

    def abort(self) -> None:
        """From another thread: A-ABORT the association a ``send`` is blocked on (a
        shutdown must not wait out a hung peer's ``dimse_timeout``)."""
        active = self._active
        if active is not None:
            active.abort()

    def close(self) -> None:
        """Release the kept association, if any."""
        kept, self._kept = self._kept, None
        if kept is not None:
            kept.assoc.release()

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
        assoc: OutboundAssociation,
        chunk: _Chunk,
        emit: Callable[[InstanceResult], None],
        should_stop: Callable[[], bool] | None,
    ) -> int:
        """Send one association's instances; return how many were handled.

        Raises ``_ConnectionLost(position, reason)`` when the association ends early.
        """
        supported = {sop for sop, _ in assoc.contexts}
        self._active = assoc
        try:
            msg_id = 0
            for position, inst in enumerate(chunk.instances):
                if should_stop is not None and should_stop():
                    return position
                if inst.sop_class_uid not in supported:
                    # Includes "accepted with no usable context": every instance
                    # fails here without using the association.
                    emit(
                        InstanceResult(
                            inst.key,
                            Outcome.PERMANENT,
                            None,
                            "destination does not support SOP class "
                            f"{_uid_label(inst.sop_class_uid)}",
                        )
                    )
                    continue
                msg_id = msg_id % 0xFFFF + 1
                with prepared(inst) as ready:
                    if isinstance(ready, InstanceResult):
                        emit(ready)
                        continue
                    result = self._send_one(assoc, ready, msg_id, position)
                    annotate(result, inst, ready)
                    emit(result)
            return len(chunk.instances)
        finally:
            self._active = None

    def _send_one(
        self, assoc: OutboundAssociation, inst: OutgoingInstance, msg_id: int, position: int
    ) -> InstanceResult:
        sop, ts = inst.sop_class_uid, inst.transfer_syntax_uid
        sent_uid, sent_ts = inst.sop_instance_uid, ts
        notes: list[str] = []
        try:
            if self._target and UID(self._target) != UID(ts):
                accepted = [
                    alt
                    for alt in proposed_syntaxes(ts, self._target)
                    if (sop, str(alt)) in assoc.contexts
                ]
                if not accepted or accepted[0] != UID(self._target):
                    notes.append(f"destination refused {_uid_label(self._target)}")
                else:
                    try:
                        data, sent_uid = _transcoded(inst, self._target, self.config.allow_lossy)
                    except TranscodeError as exc:
                        log.info(
                            "%s not sent in %s: %s",
                            inst.sop_instance_uid,
                            _uid_label(self._target),
                            exc,
                        )
                        notes.append(f"not sent in {_uid_label(self._target)}: {exc}")
                    else:
                        sent_ts = self._target
                        rsp = assoc.store_bytes(data, sop, sent_uid, sent_ts, msg_id)
                        del data
                        return self._result(inst, rsp, sent_uid, sent_ts, notes)
            if (sop, ts) in assoc.contexts:
                rsp = store_file(assoc, inst.path, msg_id)
            else:
                target = next(
                    (alt for alt in fallback_syntaxes(ts)[1:] if (sop, str(alt)) in assoc.contexts),
                    None,
                )
                if target is None:
                    return InstanceResult(
                        inst.key,
                        Outcome.PERMANENT,
                        None,
                        _with_notes(
                            f"destination refused {_uid_label(ts)} for {_uid_label(sop)} and "
                            "no conversion to an accepted transfer syntax is possible",
                            notes,
                        ),
                    )
                try:
                    data = _encode(_convert(inst, target), target)
                except _ConversionError as exc:
                    return InstanceResult(
                        inst.key, Outcome.PERMANENT, None, _with_notes(str(exc), notes)
                    )
                sent_ts = str(target)
                rsp = assoc.store_bytes(data, sop, inst.sop_instance_uid, sent_ts, msg_id)
        except AssociationLost as exc:
            raise _ConnectionLost(position, str(exc)) from None
        except OSError as exc:
            return InstanceResult(
                inst.key, Outcome.PERMANENT, None, f"cannot read stored file {inst.path}: {exc}"
            )
        except ValueError as exc:
            # No exact context for the file's real syntax (index and file disagree),
            # or no usable File Meta.
            return InstanceResult(inst.key, Outcome.PERMANENT, None, f"cannot send: {exc}")
        return self._result(inst, rsp, inst.sop_instance_uid, sent_ts, notes)

    @staticmethod
    def _result(
        inst: OutgoingInstance, rsp: Response, sent_uid: str, sent_ts: str, notes: list[str]
    ) -> InstanceResult:
        message = describe_status(rsp.status)
        if rsp.comment:
            message = f"{message}: {rsp.comment}"
        if notes:
            message = _with_notes(f"{message}; sent in {_uid_label(sent_ts)}", notes)
        log.debug("C-STORE %s -> %s", sent_uid, message)
        return InstanceResult(
            inst.key,
            classify_status(rsp.status),
            rsp.status,
            message,
            sent_uid=sent_uid if sent_uid != inst.sop_instance_uid else None,
            sent_transfer_syntax_uid=sent_ts,
        )


def _with_notes(message: str, notes: list[str]) -> str:
    return f"{message} ({'; '.join(notes)})" if notes else message


def _transcoded(inst: OutgoingInstance, target: str, allow_lossy: bool) -> tuple[bytes, str]:
    """The stored file transcoded to ``target``, encoded for a C-STORE, and the SOP
    Instance UID it now has. The decoded image lives only inside this call."""
    try:
        ds = dcmread(inst.path)
    except Exception as exc:
        raise TranscodeError(f"cannot read stored file {inst.path}: {exc}") from exc
    transcode(ds, target, allow_lossy=allow_lossy)
    return encode_dataset(ds), str(ds.SOPInstanceUID)


class _ConversionError(Exception):
    pass


@dataclass
class _KeptAssociation:
    """An association kept open between ``send`` calls (see ``keep_alive``)."""

    assoc: OutboundAssociation
    proposed: frozenset[tuple[str, str]]
    sent: int = 0
    idle_since: float = 0.0


def _convert(inst: OutgoingInstance, target: UID) -> Dataset:
    """Read the file and return a dataset that :func:`_encode` can write as ``target``.

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
    # inflated or ELE to begin with); _encode writes it in the accepted context's
    # syntax: exact ELE if accepted, else the "convertible" Implicit VR LE (``target``).
    ds.file_meta.TransferSyntaxUID = _ELE
    log.debug("converted %s from %s for %s", inst.sop_instance_uid, ts.name, target.name)
    return ds


def _encode(dataset: Dataset, target: UID) -> bytes:
    """``dataset`` (explicit VR little endian once read) encoded in ``target``."""
    from pynetdicom.dsutils import encode

    try:
        data = encode(dataset, target == _ILE, True)
    except Exception as exc:
        raise _ConversionError(f"cannot encode the converted data set: {exc}") from exc
    if data is None:
        raise _ConversionError("cannot encode the converted data set")
    return data
