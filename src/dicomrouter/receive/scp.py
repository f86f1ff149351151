"""The C-STORE/C-ECHO service. Its one job: make each object durable, then say so.

The network layer (:mod:`dicomrouter.dicomnet`) streams each object into the
:class:`~.spool.Spool` that :meth:`Receiver.open_sink` opens under
``<storage>/tmp`` and calls :meth:`Receiver.on_store` on the association's thread;
the response is sent when it returns, so it does only this: parse the header,
validate, fsync and rename the file into place, commit the index row, answer.
Routing and delivery happen in another process, so a slow destination can never
slow a modality down.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from dicomrouter.config import RouterConfig
from dicomrouter.dicomnet import (
    AcceptorSettings,
    CommandField,
    Identity,
    Peer,
    Reply,
    Request,
    Server,
    Sink,
    Status,
    StoreRequest,
)
from dicomrouter.dicomnet.commitment import (
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
    STORAGE_COMMITMENT_PUSH,
)
from dicomrouter.dicomnet.constants import describe_status
from dicomrouter.dicomnet.server import Listener
from dicomrouter.observe import metrics
from dicomrouter.store import (
    IndexUnavailable,
    InstanceHeader,
    InstanceIndex,
    InvalidUID,
    ObjectStore,
    Provenance,
    StorageError,
    audit,
    missing_identity,
    read_header,
)
from dicomrouter.store.header import install_no_value_validation, read_identity
from dicomrouter.store.part10 import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION,
    encode_file_meta,
)
from dicomrouter.tls import ReloadableServerContext

from .contexts import (
    ACCEPTED_TRANSFER_SYNTAXES,
    STORAGE_SOP_CLASSES,
    VERIFICATION_SOP_CLASS,
    VERIFICATION_TRANSFER_SYNTAXES,
)
from .spool import Spool

log = logging.getLogger("dicomrouter.receive")

#: Rejected associations waiting to be written to the audit log, at most.
MAX_PENDING_AUDITS = 1000

#: Who we are in every association and File Meta.
IDENTITY = Identity(IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION)

SUCCESS = Status.SUCCESS
OUT_OF_RESOURCES = Status.OUT_OF_RESOURCES
CANNOT_UNDERSTAND = Status.CANNOT_UNDERSTAND
INVALID_UID = Status.INVALID_UID
UID_MISMATCH = Status.UID_MISMATCH

_VANISHED = "file removed by a concurrent purge before the receiver answered; not acknowledged"


def _networks(config: RouterConfig) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [ipaddress.ip_network(n, strict=False) for n in config.dicom.allowed_networks or []]


def _settings(config: RouterConfig, processes: int = 1) -> AcceptorSettings:
    """The acceptor's settings; with several receive processes, each admits its share
    of ``max_associations`` (rounded up)."""
    listener = config.dicom
    callers = listener.allowed_callers
    return AcceptorSettings(
        ae_title=config.ae_title,
        allowed_callers=None if callers is None else frozenset(callers),
        require_called_ae=listener.require_called_ae,
        max_pdu_size=listener.max_pdu_size,
        private_transfer_syntaxes=(
            tuple(ACCEPTED_TRANSFER_SYNTAXES) if listener.accept_private_sop_classes else ()
        ),
        max_associations=-(-listener.max_associations // processes),
        max_associations_per_host=listener.max_associations_per_host,
        acse_timeout=listener.acse_timeout,
        dimse_timeout=listener.dimse_timeout,
        network_timeout=listener.network_timeout,
    )


StatusAndComment = tuple[int, str | None]


class Receiver:
    """The DICOM listener; ``start()`` listens, ``stop()`` shuts down cleanly."""

    def __init__(
        self,
        config: RouterConfig,
        store: ObjectStore,
        index: InstanceIndex,
        audit_engine: Engine | None = None,
        on_event_report: Callable[[Request], Iterable[Reply]] | None = None,
        processes: int = 1,
    ):
        """``on_event_report`` answers N-EVENT-REPORTs (storage commitment reports
        of destinations calling back; the node passes queue.commitment's).
        ``processes`` > 1: this is one of that many receive processes sharing the
        ports (``SO_REUSEPORT``), each admitting its share of the associations."""
        self.config = config
        self.processes = processes
        self.on_event_report = on_event_report
        self.store = store
        self.index = index
        self._acceptor: Server | None = None
        self._tls: ReloadableServerContext | None = None
        self._settings = _settings(config, processes)
        # Per-association counts of stored / refused objects, for one log line each.
        self._tally: dict[Peer, tuple[int, int]] = {}
        self._tally_lock = threading.Lock()
        self._networks = _networks(config)
        # Rejections are audited by one background thread: never on an association's
        # thread or the accept loop (an index write there would delay other callers).
        self._audit_engine = audit_engine or index.engine
        self._auditor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="audit")
        self._audits_pending = 0
        self._audits_dropped = 0
        self._audits_dropped_logged = -60.0

    @property
    def address(self) -> tuple[str, int]:
        """Where the first listener is bound (the port is known once started)."""
        assert self._acceptor is not None
        return self._acceptor.address

    @property
    def listeners(self) -> list[Listener]:
        """The bound ports (none before ``start()``)."""
        return list(self._acceptor.listeners) if self._acceptor is not None else []

    @property
    def tls_address(self) -> tuple[str, int] | None:
        """Where the TLS listener is bound, if there is one."""
        assert self._acceptor is not None
        return next((x.address for x in self._acceptor.listeners if x.tls is not None), None)

    # -- set-up -----------------------------------------------------------------
    def apply(self, config: RouterConfig) -> None:
        """A reloaded configuration: callers, networks, AE title, limits and timeouts
        apply from the next association, storage policy from the next C-STORE.
        The TLS certificate, key and CAs are read again from their files (renewed
        certificates take effect at the next handshake; bad new files leave the old
        ones in service). Ports, ``bind``, the TLS file paths and ``storage.path``
        keep their values until a restart."""
        if self._tls is not None:
            self._tls.reload()
        self._networks = _networks(config)
        self._settings = _settings(config, self.processes)
        self.config = config

    def start(self) -> None:
        """Listen on the configured port. Objects stream to ``<storage>/tmp``."""
        install_no_value_validation()
        self.store.prepare()
        self.index.prepare()
        supported = dict.fromkeys(STORAGE_SOP_CLASSES, ACCEPTED_TRANSFER_SYNTAXES)
        supported[VERIFICATION_SOP_CLASS] = VERIFICATION_TRANSFER_SYNTAXES
        # Destinations report storage commitment on a new association, proposing
        # the SCP role for themselves (PS3.4 J.3.3): accepted, as are default roles.
        supported[STORAGE_COMMITMENT_PUSH] = [EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN]
        acceptor = Server(
            lambda: self._settings,
            self,
            supported,
            IDENTITY,
            roles={STORAGE_COMMITMENT_PUSH: (True, True)},
        )
        listener = self.config.dicom
        shared = self.processes > 1
        try:
            if listener.port is not None:  # `dicom.port: null`: no plain listener
                acceptor.listen(listener.bind, listener.port, reuse_port=shared)
            if listener.tls is not None:
                self._tls = ReloadableServerContext(
                    listener.tls.certificate,
                    listener.tls.private_key,
                    listener.tls.ca_certificates,
                    listener.tls.require_client_certificate,
                    name="dicom.tls",
                )
                acceptor.listen(
                    listener.bind, listener.tls.port, self._tls.context, reuse_port=shared
                )
        except BaseException:
            acceptor.stop()
            raise
        self._acceptor = acceptor
        log.info(
            "listening for DICOM as %s on %s",
            self.config.ae_title,
            ", ".join(self._describe(listener) for listener in acceptor.listeners),
        )

    @staticmethod
    def _describe(listener: Listener) -> str:
        host, port = listener.address
        return f"{host}:{port}" + (" (TLS)" if listener.tls is not None else "")

    def health(self) -> tuple[bool, str]:
        """For the receiver's heartbeat: (listening, what)."""
        acceptor = self._acceptor
        if acceptor is None or not acceptor.listening:
            return False, "the DICOM listener is not accepting connections"
        return True, "listening on " + ", ".join(map(self._describe, acceptor.listeners))

    def open_associations(self) -> int:
        """For the receiver's heartbeat (the nodes view): associations open now."""
        acceptor = self._acceptor
        return 0 if acceptor is None else acceptor.open_associations

    def stop(self) -> None:
        if self._acceptor is not None:
            self._acceptor.stop()
            self._acceptor = None
        self._auditor.shutdown(wait=True)

    # -- the network layer's handler (dicomnet.ServiceHandler) -------------------------
    def allow_connection(self, address: str) -> bool:
        networks = self._networks
        if not networks:
            return True
        try:
            allowed = any(ipaddress.ip_address(address) in network for network in networks)
        except ValueError:
            allowed = False
        if not allowed:
            log.warning("refused connection from %s: not in dicom.allowed_networks", address)
            self._audit_rejected("?", address, "source address not in dicom.allowed_networks")
        return allowed

    def on_rejected(self, peer: Peer, reason: str) -> None:
        self._audit_rejected(peer.calling_ae, peer.address, reason, peer.called_ae)

    def on_refused(self, address: str, reason: str, count: int) -> None:
        self._audit_rejected("?", address, reason, count=count)

    def on_established(self, peer: Peer) -> None:
        metrics.association_opened("inbound")

    def on_association_end(self, peer: Peer, aborted: bool) -> None:
        """One log line per association that sent objects: who, and what came of it."""
        metrics.association_closed("inbound")
        with self._tally_lock:
            stored, refused = self._tally.pop(peer, (0, 0))
        if stored or refused:
            log.info(
                "association from %s (%s%s) %s: %d stored, %d refused",
                peer.calling_ae,
                peer.address,
                ", TLS" if peer.secure else "",
                "aborted" if aborted else "released",
                stored,
                refused,
            )

    def open_sink(self, request: StoreRequest) -> Sink | StatusAndComment:
        """A spool file in ``<storage>/tmp`` that starts with the File Meta built
        from the request (nothing is parsed before the data set is complete)."""
        try:
            if not request.sop_instance_uid.isascii():
                raise UnicodeEncodeError("ascii", request.sop_instance_uid, 0, 1, "not a UID")
            meta = encode_file_meta(
                request.sop_class_uid, request.sop_instance_uid, request.transfer_syntax
            )
        except UnicodeEncodeError:
            return self._refused(request, (INVALID_UID, "Affected SOP Instance UID is not a UID"))
        try:
            return Spool(self.store.tmp, meta)
        except OSError as exc:
            log.error("cannot create a temporary file: %s", exc)
            return self._refused(request, (OUT_OF_RESOURCES, "storage error"))

    def on_store(self, request: StoreRequest, sink: Sink) -> StatusAndComment:
        assert isinstance(sink, Spool)
        peer = request.peer
        try:
            content = sink.finish()
        except OSError as exc:
            log.error("cannot write a received object: %s", exc)
            result: StatusAndComment = (OUT_OF_RESOURCES, "storage error")
        else:
            if sink.status is not None or sink.path is None:  # the last write failed
                result = sink.status or (OUT_OF_RESOURCES, "storage error")
            else:
                result = self._store(peer, request.sop_instance_uid, sink.path, content)
        ok = result[0] == SUCCESS
        if not ok:
            self._refused(request, result, counted=True)
        with self._tally_lock:
            stored, refused = self._tally.get(peer, (0, 0))
            self._tally[peer] = (stored + ok, refused + (not ok))
        return result

    def _refused(
        self, request: StoreRequest, result: StatusAndComment, counted: bool = False
    ) -> StatusAndComment:
        """One WARNING line per refused C-STORE: which object, from whom, the status
        (hex and meaning) and why, so a modality's 1000 refusals are 1000 greppable
        lines, not one count at the end of the association. Returns ``result``."""
        status, comment = result
        peer = request.peer
        if not counted:  # refused before on_store: count it as on_store does
            with self._tally_lock:
                stored, refused = self._tally.get(peer, (0, 0))
                self._tally[peer] = (stored, refused + 1)
        metrics.instance_refused(peer.calling_ae)
        log.warning(
            "refused C-STORE of %s from %s (%s%s): %s%s",
            request.sop_instance_uid or "?",
            peer.calling_ae,
            peer.address,
            ", TLS" if peer.secure else "",
            describe_status(status),
            f": {comment}" if comment else "",
        )
        return result

    def on_request(self, request: Request) -> Iterable[Reply]:
        """C-ECHO, and the storage commitment reports of destinations that call us
        back (N-EVENT-REPORT, recorded in the index before it is answered)."""
        if request.command_field == CommandField.C_ECHO_RQ and request.data_set is None:
            return [Reply(SUCCESS)]
        if (
            request.command_field == CommandField.N_EVENT_REPORT_RQ
            and self.on_event_report is not None
        ):
            return self.on_event_report(request)
        return [Reply(Status.UNRECOGNIZED_OPERATION, "only C-STORE and C-ECHO are provided")]

    def _audit_rejected(
        self, calling: str, address: str, reason: str, called: str = "", count: int = 1
    ) -> None:
        """Queue the audit row for a background thread. The queue is bounded: a flood
        of refused connections must not grow memory or the index without limit, so
        beyond ``MAX_PENDING_AUDITS`` rows waiting, rejections are counted in the log
        instead (once a minute)."""
        with self._tally_lock:
            if self._audits_pending >= MAX_PENDING_AUDITS:
                self._audits_dropped += 1
                now = time.monotonic()
                if now - self._audits_dropped_logged >= 60:
                    log.warning(
                        "%d rejected association(s) not audited: the audit queue is full "
                        "(%d waiting); latest from %s (%s)",
                        self._audits_dropped,
                        self._audits_pending,
                        address,
                        reason,
                    )
                    self._audits_dropped_logged = now
                    self._audits_dropped = 0
                return
            self._audits_pending += 1
        try:
            future = self._auditor.submit(
                audit.record,
                self._audit_engine,
                calling or "?",
                "dicom.association.rejected",
                called or self.config.ae_title,
                outcome="denied",
                source=address,
                detail={"reason": reason} if count == 1 else {"reason": reason, "count": count},
            )
        except RuntimeError:  # shutting down
            with self._tally_lock:
                self._audits_pending -= 1
            return
        future.add_done_callback(self._audit_done)

    def _audit_done(self, _future: object) -> None:
        with self._tally_lock:
            self._audits_pending -= 1

    def _store(
        self, peer: Peer, sop_instance_uid: str, temp_path: Path, content: bytes | bytearray | None
    ) -> StatusAndComment:
        """Make the object in ``temp_path`` durable and indexed, or say why not.
        ``content``, when given, is the whole file: its header is parsed from it."""
        try:
            if self.store.free_bytes() < self.config.storage.min_free_space:
                log.error("refusing C-STORE: free disk below storage.min_free_space")
                return OUT_OF_RESOURCES, "storage is full"
            try:
                if content is None:
                    dataset = read_header(temp_path, identity_only=True)
                else:
                    dataset = read_identity(content)
                missing = missing_identity(dataset)
                if missing:
                    log.warning(
                        "unreadable dataset from %s: no %s", peer.calling_ae, ", ".join(missing)
                    )
                    return CANNOT_UNDERSTAND, f"unreadable dataset: no {', '.join(missing)}"
                header = InstanceHeader.from_dataset(dataset)
            except InvalidUID as exc:
                log.warning("rejected instance from %s: %s", peer.calling_ae, exc)
                return INVALID_UID, str(exc)
            except Exception as exc:  # pydicom raises many types on garbage input
                log.warning("unreadable dataset from %s: %s", peer.calling_ae, exc)
                return CANNOT_UNDERSTAND, f"unreadable dataset: {exc}"
            if header.sop_instance_uid != sop_instance_uid:
                return UID_MISMATCH, "SOPInstanceUID differs from the C-STORE request"
            relative = self.store.relative_path(
                header.study_instance_uid, header.series_instance_uid, header.sop_instance_uid
            )
            size = len(content) if content is not None else os.stat(temp_path).st_size
            keep_first = self.config.storage.on_duplicate == "ignore"
            if keep_first:
                # Atomic create-if-absent: of two concurrent copies only one is placed.
                placed = self.store.commit(temp_path, relative, replace=False)
                if placed is None:
                    if self.index.exists(header.sop_instance_uid):
                        log.info(
                            "duplicate %s ignored (storage.on_duplicate)",
                            header.sop_instance_uid,
                        )
                        return SUCCESS, None
                    # A file nobody indexed (a crash before its index commit; its
                    # sender got no success): this copy takes its place.
                    self.store.commit(temp_path, relative)
            else:
                self.store.commit(temp_path, relative)
            provenance = Provenance(
                calling_ae=peer.calling_ae, called_ae=peer.called_ae, source_address=peer.address
            )
            generation = self.index.record_generation(
                header, relative, size, provenance, replace=not keep_first
            )
            if generation and not os.path.exists(self.store.absolute(relative)):
                # A purge of the previous copy took this one's file between its rename
                # and its index commit (see "purge crash-safety" in architecture.md):
                # not kept, so not acknowledged. One stat; the sender retries.
                self.index.retract(header.sop_instance_uid, generation, _VANISHED)
                log.warning(
                    "instance %s removed by a purge while being stored; asking %s to retry",
                    header.sop_instance_uid,
                    peer.calling_ae,
                )
                return OUT_OF_RESOURCES, "stored copy removed by retention; send again"
            metrics.instance_received(provenance.calling_ae, size)
            if generation > 1:
                log.info("instance %s received again: replaced", header.sop_instance_uid)
            return SUCCESS, None
        except StorageError as exc:
            log.error("cannot store instance: %s", exc)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                return OUT_OF_RESOURCES, "storage is full"
            return OUT_OF_RESOURCES, "storage error"
        except (IndexUnavailable, SQLAlchemyError) as exc:
            # The file may already be in place (a retry by the sender re-indexes it);
            # nothing refers to it until the index row is committed.
            log.error("cannot index instance: %s", exc)
            return OUT_OF_RESOURCES, "index unavailable"
