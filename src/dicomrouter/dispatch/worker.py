"""One delivery worker: claims jobs for one destination and sends them.

A destination gets ``workers`` workers (``max_associations`` for DICOM,
``max_workers`` for the other kinds), each a thread with its own sender (made by the
registry for the destination's kind), so a hung destination only ever blocks its
own workers.

``max_associations`` is a limit across all nodes sharing the index: a claim is
refused while that many owners (workers, on any node) hold live leases on the
destination (``JobStore.claim``). An association kept open between claims
(``keep_alive``) would hold a slot of the peer that no lease shows, so a DICOM worker
keeps one only while no other node dispatches from the index (SQLite: never;
PostgreSQL: no other node's dispatch heartbeat, checked every few seconds). Otherwise
the association is released before the lease is (``send`` returns with it closed),
and a worker with an association open always holds a lease. (Storage commitment's
N-ACTION, after the claim settles, and the C-ECHO probe of a paused destination open
short associations of their own: not counted.)
"""

from __future__ import annotations

import logging
import os
import threading
import time
from datetime import datetime

from pydicom.uid import UID, generate_uid
from sqlalchemy import Engine, select

from dicomrouter.config import (
    BaseDestinationConfig,
    DicomDestinationConfig,
    RouterConfig,
    format_duration,
)
from dicomrouter.config.models import StorageCommitmentConfig
from dicomrouter.destinations import (
    DestinationUnavailable,
    InstanceResult,
    Outcome,
    OutgoingInstance,
    SenderOptions,
    VerificationNotSupported,
    create_sender,
)
from dicomrouter.destinations.commitment import REFUSED, UNAVAILABLE, request_commitment
from dicomrouter.destinations.dicom import DicomSender
from dicomrouter.dicomnet.commitment import Reference
from dicomrouter.observe import metrics
from dicomrouter.queue import Claim, ItemResult, JobStore, QueuedInstance, commitment
from dicomrouter.queue import states as S
from dicomrouter.store import ObjectStore, heartbeat
from dicomrouter.store.dialect import SQLITE, database_now
from dicomrouter.store.schema import process_heartbeats

from .health import DestinationHealth
from .transforming import Chain, Transforms, preparer

log = logging.getLogger("dicomrouter.dispatch")

_ITEM_STATE = {
    Outcome.SUCCESS: S.ITEM_COMPLETED,
    Outcome.WARNING: S.ITEM_WARNING,
    Outcome.PERMANENT: S.ITEM_FAILED,
    Outcome.TRANSIENT: S.ITEM_PENDING,
}
_FLUSH_EVERY = 0.5  # seconds between persisting per-instance results
_KEEP_ALIVE = 2.0  # seconds an idle association is kept for the next claim
_RENEW_EVERY = 2.0  # seconds between lease renewals (and cancel checks) during a send
_DEFER_EVERY = 30.0  # seconds between marking waiting jobs scheduled while the window is closed
#: A node whose dispatch process heartbeated this recently (the database's time; wide,
#: as heartbeats carry the node's own clock) shares the destinations' slots.
_NODE_SEEN_WITHIN = 600.0


def skip_reason(dest: BaseDestinationConfig, name: str, sop_class_uid: str) -> str | None:
    """Why ``dest`` does not take this SOP class (``sop_classes``), or None."""
    classes = dest.sop_classes
    if classes is None:
        return None
    if sop_class_uid in classes.exclude:
        return (
            f"skipped: {_class_label(sop_class_uid)} is excluded by destinations.{name}.sop_classes"
        )
    if classes.include is not None and sop_class_uid not in classes.include:
        return (
            f"skipped: {_class_label(sop_class_uid)} is not in "
            f"destinations.{name}.sop_classes.include"
        )
    return None


def _class_label(uid: str) -> str:
    name = UID(uid).name
    return f"{name} ({uid})" if name and name != uid else uid


def owner_prefix(config: RouterConfig) -> str:
    """Lease owners are ``<node.name>:<pid>:<destination>:<worker>``: a restarted
    node reclaims its own leases by this prefix, never another node's (a node name
    has no colon)."""
    return f"{config.node.name}:"


def dispatching_elsewhere(engine: Engine, node: str) -> bool:
    """Whether another node's dispatch process shares this index (it heartbeated
    lately): then an idle association would hold a slot its claims cannot see."""
    with engine.connect() as conn:
        since = database_now(conn) - _NODE_SEEN_WITHIN
        row = conn.execute(
            select(process_heartbeats.c.node)
            .where(
                process_heartbeats.c.role == heartbeat.DISPATCH,
                process_heartbeats.c.node != node,
                process_heartbeats.c.heartbeat_at > since,
            )
            .limit(1)
        ).first()
    return row is not None


class DestinationWorker(threading.Thread):
    def __init__(
        self,
        name: str,
        index: int,
        config: RouterConfig,
        jobs: JobStore,
        store: ObjectStore,
        health: DestinationHealth,
        stop: threading.Event,
        transforms: Transforms,
    ):
        super().__init__(name=f"dispatch-{name}-{index}", daemon=True)
        self.dest_name = name
        self.index = index
        self.config = config
        self.dest: BaseDestinationConfig = config.destinations[name]
        self.jobs = jobs
        self.store = store
        self.health = health
        self.stop_event = stop
        self.transforms = transforms
        self.owner = f"{owner_prefix(config)}{os.getpid()}:{name}:{index}"
        self.sender = create_sender(
            self.dest, SenderOptions(calling_ae=config.ae_title, keep_alive=_KEEP_ALIVE, name=name)
        )
        self.current_claim: Claim | None = None
        self._deferred_at = 0.0
        self._nodes_checked = -heartbeat.INTERVAL

    def run(self) -> None:
        poll = self.config.dispatch.poll_interval
        while not self.stop_event.is_set():
            try:
                worked = self._tick()
            except Exception:  # never let one bad batch kill the worker
                log.exception("dispatch worker %s failed; continuing", self.name)
                worked = False
            if not worked:
                self.sender.close_if_idle()
                self.stop_event.wait(poll)
        self.sender.close()

    def _tick(self) -> bool:
        if not self.dest.enabled:
            return False
        if self.health.paused:
            if self.index == 0 and self.health.probe_due():
                self._probe()
            return False
        window = self.dest.send_window
        if window is not None and not window.contains(datetime.now()):
            self._defer_to_window()
            return False
        self._share_slots()
        claim = self.jobs.claim(
            self.dest_name,
            self.owner,
            self.config.dispatch.lease,
            max_items=max(self.dest.batch_size, 1) * 5,
            max_owners=self.dest.workers,
        )
        if claim is None:
            return False
        self.current_claim = claim
        try:
            self._deliver(claim)
        finally:
            self.current_claim = None
        return True

    def _share_slots(self) -> None:
        """Between claims, keep the association open only while no other node can
        take its slot (see the module docstring). An idle HTTP connection holds no
        slot of a peer: DICOMweb keeps its own."""
        if not isinstance(self.sender, DicomSender) or self.jobs.engine.dialect.name == SQLITE:
            return
        now = time.monotonic()
        if now - self._nodes_checked < heartbeat.INTERVAL:
            return
        self._nodes_checked = now
        shared = dispatching_elsewhere(self.jobs.engine, self.config.node.name)
        self.sender.keep_alive = 0.0 if shared else _KEEP_ALIVE

    def _defer_to_window(self) -> None:
        """While the window is closed, mark what waits for it ``scheduled`` (first
        worker only, at most every ``_DEFER_EVERY`` seconds: one short write)."""
        now = time.time()
        if self.index != 0 or now - self._deferred_at < _DEFER_EVERY:
            return
        self._deferred_at = now
        deferred = self.jobs.defer_to_window(self.dest_name, self.dest)
        if deferred:
            log.info(
                "destination %s: %d job(s) scheduled for the next send window",
                self.dest_name,
                deferred,
            )

    def abandon(self) -> None:
        """Shutdown while a send is blocked: abort the association and hand the jobs
        back (a restart would reclaim them anyway; this makes it immediate)."""
        claim = self.current_claim
        self.sender.abort()
        if claim is not None:
            self.jobs.release(claim)

    def _give_up_if_due(self) -> None:
        """``give_up_after``, checked right after a probe failed (so never while the
        destination answers, nor while an operator paused it): once it has been
        unreachable that long, fail the jobs that have also waited that long
        untouched (a retry by hand, or new instances joining a job, restart a job's
        clock). Only the first worker of the destination probes, so only it runs this."""
        limit = self.dest.give_up_after
        since = self.health.paused_since
        if limit is None or since is None or not self.health.unreachable:
            return
        now = self.health.database_time()  # paused_since and updated_at are in it
        if now - since < limit:
            return
        reason = (
            f"gave up: destination unreachable and job waiting for more than "
            f"{format_duration(limit)} ({self.health.last_error or 'no answer'})"
        )
        failed, undelivered = self.jobs.give_up(self.dest_name, now - limit, reason)
        for _ in range(undelivered):
            metrics.delivery_result(self.dest_name, "permanent", None)
        if failed:
            log.warning(
                "destination %s: %d job(s) failed after %s unreachable (give_up_after)",
                self.dest_name,
                len(failed),
                format_duration(limit),
            )

    def _probe(self) -> None:
        try:
            self.sender.probe()
        except VerificationNotSupported:
            pass  # it answered: up, but without support for the check (C-ECHO)
        except Exception as exc:
            self.health.probe_failed(str(exc))
            log.info("probe of %s failed: %s", self.dest_name, exc)
            self._give_up_if_due()
            return
        self.health.resume()
        self.jobs.wake_destination(self.dest_name, self.dest)

    def _outgoing(
        self, claim: Claim
    ) -> tuple[dict[int, QueuedInstance], list[OutgoingInstance], list[ItemResult]]:
        """The claim's instances to send, and results decided without sending:
        skipped (the destination does not take the SOP class) or waiting (their
        pipeline is not configured any more)."""
        by_key: dict[int, QueuedInstance] = {}
        batch: list[OutgoingInstance] = []
        settled: list[ItemResult] = []
        chains: dict[str, Chain | str] = {}
        for key, item in enumerate(claim.items):
            skip = skip_reason(self.dest, self.dest_name, item.sop_class_uid)
            if skip is not None:
                settled.append(
                    ItemResult(item.job_id, item.instance_id, S.ITEM_SKIPPED, None, skip)
                )
                continue
            chain = chains.get(item.transform)
            if chain is None:
                chain = chains[item.transform] = self.transforms.chain(
                    item.transform, self.dest.transform
                )
            if isinstance(chain, str):
                settled.append(
                    ItemResult(item.job_id, item.instance_id, S.ITEM_PENDING, None, chain)
                )
                continue
            source = self.store.absolute(item.path)
            by_key[key] = item
            batch.append(
                OutgoingInstance(
                    key=key,
                    path=source,
                    sop_class_uid=item.sop_class_uid,
                    sop_instance_uid=item.sop_instance_uid,
                    transfer_syntax_uid=item.transfer_syntax_uid,
                    prepare=preparer(
                        chain, item, source, self.transforms.workdir, self.transforms.recorder
                    ),
                )
            )
        return by_key, batch, settled

    def _deliver(self, claim: Claim) -> None:
        generation = self.transforms.generation
        by_key, batch, settled = self._outgoing(claim)
        # Held by a pipeline that cannot run: the job waits (see _hold), unsent.
        held = {r.job_id: r.message for r in settled if r.state == S.ITEM_PENDING}
        self.jobs.record_results(settled)
        buffer = _Results(self.jobs)
        counts = {"sent": 0, "failed": 0}
        per_job: dict[int, list[int]] = {}  # job id -> [sent, failed]
        errors: dict[int, str] = {}  # job id -> its last failure, never another job's
        renewer = _LeaseRenewer(self.jobs, claim, self.config.dispatch.lease, buffer)

        def on_result(result: InstanceResult) -> None:
            item = by_key[result.key]
            state = _ITEM_STATE[result.outcome]
            metrics.delivery_result(self.dest_name, result.outcome, item.received_at)
            tally = per_job.setdefault(item.job_id, [0, 0])
            if result.held:
                held.setdefault(item.job_id, result.message)
            elif state in (S.ITEM_COMPLETED, S.ITEM_WARNING):
                counts["sent"] += 1
                tally[0] += 1
            else:
                tally[1] += 1
                counts["failed"] += 1
                errors[item.job_id] = result.message
            buffer.add(
                ItemResult(
                    item.job_id,
                    item.instance_id,
                    state,
                    result.status,
                    result.message,
                    sent_as=result.sent_as,
                    sent_uid=result.sent_uid,
                )
            )

        def should_stop() -> bool:
            if self.stop_event.is_set() or renewer.stop_sending:
                # Canceled jobs, or jobs whose lease was lost: stop between instances.
                # The claim's other jobs go back to pending and continue at once.
                return True
            if self.transforms.generation != generation:
                return True  # transforms changed: the rest goes out under the new ones
            window = self.dest.send_window
            return window is not None and not window.contains(datetime.now())

        renewer.start()
        try:
            results = self.sender.send(batch, on_result=on_result, should_stop=should_stop)
        except DestinationUnavailable as exc:
            renewer.stop()
            buffer.flush()
            if counts["sent"]:
                self.health.record_success()  # it took some before it stopped
            self.health.record_unreachable(str(exc), pause_now=exc.pause)
            self.jobs.finish(
                claim,
                self.dest,
                count_attempt=False,
                job_counts={job: (s, f) for job, (s, f) in per_job.items()},
                unavailable_delay=self.health.unavailable_delay(),
                message=str(exc),
                outcome="unavailable",
                sent=0,
                failed=0,
            )
            return
        except Exception as exc:
            renewer.stop()
            buffer.flush()
            log.exception("unexpected error sending to %s", self.dest_name)
            self.jobs.finish(
                claim,
                self.dest,
                count_attempt=True,
                unavailable_delay=0.0,
                message=f"internal error: {exc}",
                outcome="retry",
                sent=counts["sent"],
                failed=counts["failed"],
            )
            return
        renewer.stop()
        buffer.flush()
        if batch and (counts["sent"] or not results):
            self.health.record_success()
        self._hold(claim, held)
        transient_jobs = {
            by_key[r.key].job_id
            for r in results
            if r.outcome is Outcome.TRANSIENT and by_key[r.key].job_id not in held
        }
        interrupted = len(results) < len(batch)
        outcome = (
            "retry"
            if transient_jobs
            else "interrupted"
            if interrupted
            else "failed"
            if counts["failed"]
            else "completed"
        )
        self.jobs.finish(
            claim,
            self.dest,
            count_attempt=True,
            transient_jobs=transient_jobs,
            job_counts={job: (s, f) for job, (s, f) in per_job.items()},
            unavailable_delay=0.0,
            message="",
            job_messages=errors,
            outcome=outcome,
            sent=counts["sent"],
            failed=counts["failed"],
        )
        if self._commitment() is not None:
            self._commit(
                [
                    commitment.Delivery(
                        by_key[r.key].job_id,
                        by_key[r.key].instance_id,
                        by_key[r.key].sop_class_uid,
                        r.sent_uid or by_key[r.key].sop_instance_uid,
                    )
                    for r in results
                    if r.outcome in (Outcome.SUCCESS, Outcome.WARNING) and not r.held
                ]
            )

    def _commitment(self) -> StorageCommitmentConfig | None:
        """The destination's storage commitment settings, when it asks for it (a
        DICOM destination only)."""
        dest = self.dest
        if isinstance(dest, DicomDestinationConfig) and dest.storage_commitment.enabled:
            return dest.storage_commitment
        return None

    def _commit(self, deliveries: list[commitment.Delivery]) -> None:
        """Storage commitment of what this batch delivered: the transaction is in the
        index before the N-ACTION goes out (the report may come at once, to the
        receiver); a destination that refuses is recorded as such, and one that
        cannot be reached leaves it pending until its timeout."""
        settings = self._commitment()
        if not deliveries or settings is None or not isinstance(self.sender, DicomSender):
            return
        engine = self.jobs.engine
        uid = generate_uid()
        # The batch's association, kept for the next one, is released first: a peer
        # serving one association at a time (dcmtk's storescp) would never answer
        # a second one while it is open.
        self.sender.close()
        try:
            commitment.open_transaction(engine, uid, self.dest_name, deliveries, settings.timeout)
            known = commitment.policies(self.config.destinations)
            attempt = request_commitment(
                self.sender,
                uid,
                [Reference(d.sop_class_uid, d.sop_instance_uid) for d in deliveries],
                lambda request: commitment.serve_report(engine, request, known),
                settings.wait,
            )
            if attempt.outcome == REFUSED:
                commitment.end_transaction(
                    engine, uid, commitment.REFUSED, attempt.message, commitment.WARN_ONLY
                )
            elif attempt.outcome == UNAVAILABLE:
                log.warning(
                    "destination %s: %s; commitment stays pending until its timeout",
                    self.dest_name,
                    attempt.message,
                )
            else:
                log.info("destination %s: %s", self.dest_name, attempt.message)
        except Exception:
            log.exception("storage commitment with %s failed", self.dest_name)

    def _hold(self, claim: Claim, held: dict[int, str]) -> None:
        """Jobs whose transforms cannot run go back without using up an attempt, so
        a missing secret or a removed pipeline makes deliveries wait, however long,
        never fail on their own nor go out untransformed."""
        if not held:
            return
        self.jobs.hold(claim, held, self.dest)
        log.warning(
            "destination %s: %d job(s) held, their transforms cannot run: %s",
            self.dest_name,
            len(held),
            next(iter(held.values())),
        )


class _Results:
    """Per-instance results of a claim, written to the index at most every
    ``_FLUSH_EVERY`` seconds as they come, and by the lease renewer between results:
    a peer that answers some instances and then stalls would otherwise leave those
    answered unrecorded until the next answer, and a node killed meanwhile would
    have them sent again by the node taking over its jobs."""

    def __init__(self, jobs: JobStore) -> None:
        self.jobs = jobs
        self._lock = threading.Lock()
        self._pending: list[ItemResult] = []
        self._flushed_at = time.monotonic()

    def add(self, result: ItemResult) -> None:
        with self._lock:
            self._pending.append(result)
            due = time.monotonic() - self._flushed_at >= _FLUSH_EVERY
        if due:
            self.flush()

    def flush(self) -> None:
        """Write what is pending (one transaction; nothing when nothing is). Under the
        lock: a flush that returns has every earlier result written, whichever thread
        wrote it, so the claim is settled only after all of them."""
        with self._lock:
            pending, self._pending = self._pending, []
            self._flushed_at = time.monotonic()
            if pending:
                try:
                    self.jobs.record_results(pending)
                except BaseException:
                    self._pending[:0] = pending  # written by the next flush
                    raise


class _LeaseRenewer(threading.Thread):
    """Keeps a claim's lease alive while it is being sent, whatever the peer does.

    Renewing from the send loop would stop while a response is awaited, and a lease
    shorter than a DIMSE timeout would then expire under a live send. Every renewal
    also reports jobs canceled meanwhile or no longer ours, so the send stops soon;
    so does a lease it could not renew in time (this node cut off from the index):
    another node takes the jobs once it runs out, and they must not go out twice at
    once. Each renewal first writes the results not written yet (:class:`_Results`).
    """

    def __init__(self, jobs: JobStore, claim: Claim, lease: float, results: _Results):
        super().__init__(name="lease-renewer", daemon=True)
        self.jobs = jobs
        self.claim = claim
        self.lease = lease
        self.results = results
        self.interval = min(lease / 3, _RENEW_EVERY)
        self._lost = False  # jobs canceled or no longer ours
        #: time.monotonic() when the lease last ran ``lease`` from then, at the latest
        #: (the start of the last renewal that went through; the claim's before that).
        self.renewed = time.monotonic()
        self._done = threading.Event()

    @property
    def stop_sending(self) -> bool:
        """Stop between instances: jobs were lost, or the lease was not renewed for
        so long that it may run out before the next renewal (a renewal failing or
        hanging: this node cut off from the index), after which another node sends
        them too."""
        return self._lost or time.monotonic() - self.renewed >= self.lease - self.interval

    def run(self) -> None:
        while not self._done.wait(self.interval):
            attempt = time.monotonic()
            try:
                self.results.flush()
                if self.jobs.renew(self.claim, self.lease):
                    self._lost = True
                self.renewed = attempt
            except Exception:
                log.exception("lease renewal failed; retrying")

    def stop(self) -> None:
        self._done.set()
        if self.is_alive():
            self.join(5)
