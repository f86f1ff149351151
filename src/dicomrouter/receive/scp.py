"""The C-STORE/C-ECHO service. Its one job: make each object durable, then say so.

The ``EVT_C_STORE`` handler runs in the association's thread and the response is
sent when it returns, so it does only this: parse the header of the file
pynetdicom streamed to ``<storage>/tmp``, validate, fsync and rename it into
place, commit the index row, answer. Routing and delivery happen in another
process, so a slow destination can never slow a modality down.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, _config, evt
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from dicomrouter.config import RouterConfig
from dicomrouter.control import audit
from dicomrouter.net import (
    install_fast_file_meta,
    install_fast_store_response,
    install_low_latency_reactors,
    install_no_value_validation,
    install_tcp_nodelay,
)
from dicomrouter.observe import metrics
from dicomrouter.store import (
    IndexUnavailable,
    InstanceHeader,
    InstanceIndex,
    InvalidUID,
    ObjectStore,
    Provenance,
    Recorded,
    StorageError,
    missing_identity,
    read_header,
)

from .contexts import ACCEPTED_TRANSFER_SYNTAXES, STORAGE_SOP_CLASSES, VERIFICATION_SOP_CLASS

log = logging.getLogger("dicomrouter.receive")

#: Rejected associations waiting to be written to the audit log, at most.
MAX_PENDING_AUDITS = 1000

# DIMSE statuses we answer (PS3.4 Annex B.2.3).
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000
INVALID_UID = 0xC001
UID_MISMATCH = 0xC002


def _networks(config: RouterConfig) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [ipaddress.ip_network(n, strict=False) for n in config.dicom.allowed_networks or []]


def _status(code: int, comment: str) -> Dataset:
    response = Dataset()
    response.Status = code
    response.ErrorComment = comment[:64]
    return response


class Receiver:
    """Owns the pynetdicom AE; ``start()`` listens, ``stop()`` shuts down cleanly."""

    def __init__(
        self,
        config: RouterConfig,
        store: ObjectStore,
        index: InstanceIndex,
        audit_engine: Engine | None = None,
    ):
        self.config = config
        self.store = store
        self.index = index
        self._server: ThreadedAssociationServer | None = None
        # Per-association counts of stored / refused objects, for one log line each.
        self._tally: dict[int, tuple[int, int]] = {}
        self._tally_lock = threading.Lock()
        self._networks = _networks(config)
        # Rejections are audited by one background thread: never on an association's
        # thread or the accept loop (an index write there would delay other callers).
        self._audit_engine = audit_engine or index.engine
        self._auditor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="audit")
        self._audits_pending = 0
        self._audits_dropped = 0
        self._audits_dropped_logged = -60.0

    # -- set-up -----------------------------------------------------------------
    @staticmethod
    def _configure_ae(ae: AE, config: RouterConfig) -> None:
        """The AE settings pynetdicom reads for each new association."""
        listener = config.dicom
        ae.maximum_pdu_size = listener.max_pdu_size
        ae.maximum_associations = listener.max_associations
        ae.acse_timeout = listener.acse_timeout
        ae.dimse_timeout = listener.dimse_timeout
        ae.network_timeout = listener.network_timeout
        ae.require_called_aet = listener.require_called_ae
        ae.require_calling_aet = list(listener.allowed_callers or [])

    def apply(self, config: RouterConfig) -> None:
        """A reloaded configuration: callers, networks, AE title, limits and timeouts
        apply from the next association, storage policy from the next C-STORE.
        ``dicom.port``/``bind`` and ``storage.path`` keep their values until a restart."""
        self._networks = _networks(config)
        self.config = config
        server = self._server
        if server is not None:
            server.ae_title = config.ae_title
            self._configure_ae(server.ae, config)

    def _build_ae(self) -> AE:
        ae = AE(ae_title=self.config.ae_title)
        self._configure_ae(ae, self.config)
        ae.add_supported_context(VERIFICATION_SOP_CLASS)
        for sop_class in STORAGE_SOP_CLASSES:
            ae.add_supported_context(sop_class, ACCEPTED_TRANSFER_SYNTAXES)
        return ae

    def start(self) -> None:
        """Listen on the configured port. Objects stream to ``<storage>/tmp``."""
        install_tcp_nodelay()
        install_low_latency_reactors()
        install_no_value_validation()
        install_fast_file_meta()
        install_fast_store_response()
        _config.STORE_RECV_CHUNKED_DATASET = True
        # pynetdicom creates its temporary files in tempfile's folder: make that our
        # tmp folder on the storage filesystem so a file is renamed, never copied.
        tempfile.tempdir = str(self.store.tmp)
        self.store.prepare()
        self.index.prepare()
        ae = self._build_ae()
        handlers: list[Any] = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_ECHO, lambda event: SUCCESS),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_RELEASED, self._on_association_end),
            (evt.EVT_ABORTED, self._on_association_end),
            *metrics.association_handlers("inbound"),
        ]
        address = (self.config.dicom.bind, self.config.dicom.port)
        server = ae.start_server(address, block=False, evt_handlers=handlers)
        if server is not None:  # always: a reload may set dicom.allowed_networks
            server.verify_request = self._verify_source  # type: ignore[method-assign]
        self._server = server
        log.info("listening for DICOM as %s on %s:%s", self.config.ae_title, *address)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        self._auditor.shutdown(wait=True)

    # -- handlers ---------------------------------------------------------------
    def _verify_source(self, request: Any, client_address: Any) -> bool:
        networks = self._networks
        if not networks:
            return True
        host = client_address[0] if isinstance(client_address, tuple) else str(client_address)
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            allowed = False
        else:
            allowed = any(address in network for network in networks)
        if not allowed:
            log.warning("refused connection from %s: not in dicom.allowed_networks", host)
            self._audit_rejected("?", host, "source address not in dicom.allowed_networks")
        return allowed

    def _on_rejected(self, event: evt.Event) -> None:
        requestor = event.assoc.requestor
        calling = str(requestor.ae_title).strip()
        called = str(getattr(requestor.primitive, "called_ae_title", "") or "").strip()
        log.warning(
            "rejected association from %s (%s:%s) calling %s",
            requestor.ae_title,
            requestor.address,
            requestor.port,
            called or event.assoc.acceptor.ae_title,
        )
        # The same checks, in pynetdicom's order (the last failing one is the reason).
        listener = self.config.dicom
        reason = "rejected"
        if listener.allowed_callers is not None and calling not in listener.allowed_callers:
            reason = "calling AE title not in dicom.allowed_callers"
        if listener.require_called_ae and called and called != self.config.ae_title:
            reason = f"called AE title {called!r} is not {self.config.ae_title!r}"
        if len(event.assoc.ae.active_associations) > listener.max_associations:
            reason = "dicom.max_associations reached"
        self._audit_rejected(calling, str(requestor.address), reason, called)

    def _audit_rejected(self, calling: str, address: str, reason: str, called: str = "") -> None:
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
                detail={"reason": reason},
            )
        except RuntimeError:  # shutting down
            with self._tally_lock:
                self._audits_pending -= 1
            return
        future.add_done_callback(self._audit_done)

    def _audit_done(self, _future: object) -> None:
        with self._tally_lock:
            self._audits_pending -= 1

    def _on_association_end(self, event: evt.Event) -> None:
        """One log line per association that sent objects: who, and what came of it."""
        with self._tally_lock:
            stored, refused = self._tally.pop(id(event.assoc), (0, 0))
        if stored or refused:
            requestor = event.assoc.requestor
            log.info(
                "association from %s (%s) %s: %d stored, %d refused",
                str(requestor.ae_title).strip(),
                requestor.address,
                "aborted" if event.event is evt.EVT_ABORTED else "released",
                stored,
                refused,
            )

    def _on_store(self, event: evt.Event) -> int | Dataset:
        result = self._store(event)
        ok = result == SUCCESS
        if not ok:
            metrics.instance_refused(str(event.assoc.requestor.ae_title).strip())
        with self._tally_lock:
            stored, refused = self._tally.get(id(event.assoc), (0, 0))
            self._tally[id(event.assoc)] = (stored + ok, refused + (not ok))
        return result

    def _store(self, event: evt.Event) -> int | Dataset:
        request: Any = event.request
        temp_path = Path(event.dataset_path)
        assoc = event.assoc
        try:
            if self.store.free_bytes() < self.config.storage.min_free_space:
                log.error("refusing C-STORE: free disk below storage.min_free_space")
                return _status(OUT_OF_RESOURCES, "storage is full")
            try:
                dataset = read_header(temp_path, identity_only=True)
                missing = missing_identity(dataset)
                if missing:
                    log.warning(
                        "unreadable dataset from %s: no %s",
                        assoc.requestor.ae_title,
                        ", ".join(missing),
                    )
                    return _status(
                        CANNOT_UNDERSTAND, f"unreadable dataset: no {', '.join(missing)}"
                    )
                header = InstanceHeader.from_dataset(dataset)
            except InvalidUID as exc:
                log.warning("rejected instance from %s: %s", assoc.requestor.ae_title, exc)
                return _status(INVALID_UID, str(exc))
            except Exception as exc:  # pydicom raises many types on garbage input
                log.warning("unreadable dataset from %s: %s", assoc.requestor.ae_title, exc)
                return _status(CANNOT_UNDERSTAND, f"unreadable dataset: {exc}")
            if header.sop_instance_uid != str(request.AffectedSOPInstanceUID).strip("\x00 "):
                return _status(UID_MISMATCH, "SOPInstanceUID differs from the C-STORE request")
            relative = self.store.relative_path(
                header.study_instance_uid, header.series_instance_uid, header.sop_instance_uid
            )
            size = temp_path.stat().st_size
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
                        return SUCCESS
                    # A file nobody indexed (a crash before its index commit; its
                    # sender got no success): this copy takes its place.
                    self.store.commit(temp_path, relative)
            else:
                self.store.commit(temp_path, relative)
            provenance = Provenance(
                calling_ae=str(assoc.requestor.ae_title).strip(),
                called_ae=str(assoc.acceptor.ae_title).strip(),
                source_address=str(assoc.requestor.address),
            )
            recorded = self.index.record(header, relative, size, provenance, replace=not keep_first)
            metrics.instance_received(provenance.calling_ae, size)
            if recorded is Recorded.OVERWRITTEN:
                log.info("instance %s received again: replaced", header.sop_instance_uid)
            return SUCCESS
        except StorageError as exc:
            log.error("cannot store instance: %s", exc)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                return _status(OUT_OF_RESOURCES, "storage is full")
            return _status(OUT_OF_RESOURCES, "storage error")
        except (IndexUnavailable, SQLAlchemyError) as exc:
            # The file may already be in place (a retry by the sender re-indexes it);
            # nothing refers to it until the index row is committed.
            log.error("cannot index instance: %s", exc)
            return _status(OUT_OF_RESOURCES, "index unavailable")
        finally:
            # pynetdicom unlinks the temp file after we return; on success it was
            # renamed away already. Remove it here too so rejects never linger.
            if temp_path.exists():
                try:
                    os.unlink(temp_path)
                except OSError:
                    pass
