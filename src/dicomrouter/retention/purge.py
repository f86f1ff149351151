"""The purge: delete stored objects retention no longer needs, crash-safely.

Each batch goes through three steps (the argument is in docs/architecture.md,
"Purge crash-safety"):

1. **mark**: one write transaction re-checks that each candidate is still due
   (under the write lock, so the planner cannot queue it meanwhile) and records the
   tombstone (``purged_at``, ``purge_reason``) for exactly the generation it saw;
2. **move**: each file is renamed into ``<storage>/trash/`` (same filesystem);
3. **check**: the rows are read again. A row that is still that purged generation
   has its trash file unlinked; one the receiver made live again meanwhile (the
   same SOP Instance UID received again, same path) gets its file back, linked
   into place only if no newer copy is there.

A batch interrupted by an exception (or Ctrl-C) after moving files checks them
before the exception goes on. A kill at any point leaves: a tombstone whose file is
still in place (removed by the next run's recovery of interrupted runs), or a file in
trash (restored or removed by the recovery the dispatch process runs at start-up,
before planning or sending, and every run does first). A file in trash may belong to
a row received again and acknowledged after the mark: that row lacks its file from
the kill until that recovery (docs/architecture.md, "Kills"). Otherwise nothing live
loses its file: the receiver checks its file is still there after its index commit
(one stat) and answers 0xA700 if a purge took it (see ``Receiver._store``).

Only one purge runs at a time per storage folder (``<storage>/.purge.lock``): the
sweeper in the dispatch process and ``dicomrouter purge`` exclude each other. Several
nodes sharing the folder and a PostgreSQL index also exclude each other through the
index (the ``retention purge`` advisory lock, ``store/leadership.py``), which a file
lock on shared storage cannot be trusted to do: each node's sweeper tries, one
purges, the others skip that round. A node killed mid-purge frees the lock with its
session, and the next purge, on any node, recovers what it left.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, bindparam, func, select, tuple_, update

from dicomrouter.config import RouterConfig
from dicomrouter.queue import states as S
from dicomrouter.store import ObjectStore, create_index_engine
from dicomrouter.store.leadership import Leadership
from dicomrouter.store.schema import instances, job_instances, purge_runs

from . import policy
from .prune import prune_audit, prune_history

log = logging.getLogger("dicomrouter.retention")

#: Instances marked per write transaction: short, so a C-STORE never waits long
#: behind a purge for the index's write lock.
BATCH = 200
#: Files untouched for less than this are never taken as orphans: a transfer may be
#: between its rename into ``objects/`` and its index commit.
MIN_ORPHAN_GRACE = 3600.0
#: Seconds between two walks of ``objects/`` for orphaned files by the sweeper.
ORPHAN_SCAN_EVERY = 86400.0
#: One eviction run deletes at most the bytes missing at its start plus this fraction.
EVICT_MARGIN = 0.1


#: Oldest first, in the order of ``ix_instances_live`` (no sort needed).
_LIVE_KEY = (instances.c.received_at, instances.c.size, instances.c.id)
_LIVE_ORDER = tuple_(*_LIVE_KEY)


class PurgeBusy(RuntimeError):
    """Another purge holds this storage folder's purge lock."""


@dataclass
class PurgeReport:
    """What one run did (or, ``dry_run``, would do), and what it saw afterwards."""

    started_at: float
    dry_run: bool = False
    ended_at: float = 0.0
    purged: int = 0
    purged_bytes: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    evicted: int = 0
    orphans: int = 0
    recovered: int = 0
    history_rows: int = 0
    audit_rows: int = 0
    stored: int = 0
    stored_bytes: int = 0
    eligible: int = 0
    eligible_bytes: int = 0
    undelivered: int = 0
    undelivered_bytes: int = 0
    free_bytes: int | None = None
    free_space_target: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @property
    def did_something(self) -> bool:
        return bool(
            self.purged or self.orphans or self.recovered or self.history_rows or self.audit_rows
        )


@dataclass(frozen=True)
class _Doomed:
    id: int
    generation: int
    path: str
    size: int
    kind: str


class Purger:
    """Deletes what the ``retention`` policy says may go (see the module docstring).

    ``engine`` must commit durably (``synchronous=FULL``): a tombstone lost to a
    power cut after its file was unlinked would leave a live row without a file.
    """

    def __init__(self, config: RouterConfig, engine: Engine, store: ObjectStore):
        self.config = config
        self.engine = engine
        self.store = store
        # Reads without the write lock (PostgreSQL: without the advisory lock every
        # transaction of the writer engine takes).
        self.reader = create_index_engine(
            engine.url.render_as_string(hide_password=False), create=False, writer=False
        )
        #: Called after each step of a batch ("marked", "moved", "checked") and of an
        #: orphan removal ("orphan-moved"): tests inject interleavings and crashes here.
        self.hook: Callable[[str], None] = lambda stage: None
        self._last_orphan_scan = -ORPHAN_SCAN_EVERY
        #: Rest this fraction of the time each batch took before the next one (the
        #: sweeper: 1.0), leaving disk and CPU to the receiver; 0 for a purge by hand.
        self.pace = 0.0

    # -- the run ---------------------------------------------------------------------
    def close(self) -> None:
        """Close the reader's connections (a purge run from the API or at start-up
        makes a Purger for one pass)."""
        self.reader.dispose()

    def run(
        self,
        *,
        dry_run: bool = False,
        actor: str = "system",
        now: float | None = None,
        scan_orphans: bool | None = None,
    ) -> PurgeReport:
        """One retention pass: recover what a killed pass left, purge what is due,
        evict for free space, remove orphans (``scan_orphans``; None: at the first
        run and then every ``ORPHAN_SCAN_EVERY``: it walks every folder), prune
        history and audit. Raises :class:`PurgeBusy` when another purge is running."""
        now = time.time() if now is None else now
        policy_config = self.config.retention
        report = PurgeReport(started_at=time.time(), dry_run=dry_run)
        report.free_space_target = policy_config.free_space_target
        cutoffs = policy.Cutoffs.at(policy_config, now)
        if scan_orphans is None:
            scan_orphans = time.monotonic() - self._last_orphan_scan >= ORPHAN_SCAN_EVERY
        with self._exclusive():
            if dry_run:
                self._dry_run(report, cutoffs, scan_orphans)
                report.ended_at = time.time()
                return report
            report.recovered = self.recover()
            run_id = self._begin_run(report, actor)
            try:
                self._purge_due(report, cutoffs)
                self._evict(report)
                if scan_orphans:
                    report.orphans = self.remove_orphans()
                    self._last_orphan_scan = time.monotonic()
                report.history_rows = prune_history(self.engine, now - policy_config.keep_history)
                report.audit_rows = prune_audit(self.engine, now - policy_config.keep_audit)
                self._snapshot(report, cutoffs)
            except BaseException as exc:
                self._end_run(run_id, report, error=f"{type(exc).__name__}: {exc}")
                raise
            self._end_run(run_id, report)
        return report

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        self.store.prepare()
        with open(self.store.root / ".purge.lock", "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise PurgeBusy(
                    f"a purge of {self.store.root} is already running (the sweeper, or "
                    "another 'dicomrouter purge'); try again when it has finished"
                ) from None
            # Across nodes: the index's lock (always ours on SQLite: one node).
            across = Leadership(self.engine, "retention purge", announce=False)
            if not across.check():
                raise PurgeBusy(
                    "a purge is running on another node sharing this index (or the index "
                    "cannot be reached); try again when it has finished"
                )
            try:
                yield  # the locks go with the file and the session (and the process)
            finally:
                across.release()

    def _begin_run(self, report: PurgeReport, actor: str) -> int:
        with self.engine.begin() as conn:
            return int(
                conn.execute(
                    purge_runs.insert()
                    .values(started_at=report.started_at, actor=actor[:128])
                    .returning(purge_runs.c.id)
                ).scalar_one()
            )

    def _end_run(self, run_id: int, report: PurgeReport, error: str | None = None) -> None:
        report.ended_at = time.time()
        values = {
            name: getattr(report, name)
            for name in (
                "ended_at",
                "purged",
                "purged_bytes",
                "evicted",
                "orphans",
                "history_rows",
                "audit_rows",
                "stored",
                "stored_bytes",
                "eligible",
                "eligible_bytes",
                "undelivered",
                "undelivered_bytes",
            )
        }
        with self.engine.begin() as conn:
            conn.execute(
                update(purge_runs)
                .where(purge_runs.c.id == run_id)
                .values(**values, error=None if error is None else error[:2000])
            )

    # -- due and evicted objects ----------------------------------------------------
    def _purge_due(self, report: PurgeReport, cutoffs: policy.Cutoffs) -> None:
        condition = policy.due(cutoffs)
        kind = policy.due_kind(cutoffs)
        after: tuple[float, int, int] | None = None
        while True:
            query = select(
                instances.c.id,
                instances.c.generation,
                instances.c.path,
                instances.c.size,
                instances.c.received_at,
                kind.label("kind"),
            ).where(condition)
            # The order and the row value follow ix_instances_live (purged_at,
            # received_at, size, then the rowid): each batch seeks past the last one.
            # Another order sorts every remaining candidate for each batch: quadratic.
            if after is not None:
                query = query.where(tuple_(*after) < _LIVE_ORDER)
            with self.reader.connect() as conn:
                rows = conn.execute(query.order_by(*_LIVE_KEY).limit(BATCH)).all()
            if not rows:
                return
            after = (rows[-1].received_at, rows[-1].size, rows[-1].id)
            self._purge([row.id for row in rows], condition, kind, report, evicted=False)

    def _evict(self, report: PurgeReport) -> None:
        """Below ``free_space_target``: delivered and unrouted objects, oldest first,
        until free space is back above it, at most the bytes missing at the start plus
        ``EVICT_MARGIN`` of them. Stops early when a batch did not raise free space
        (deletes not showing yet: snapshots, files held open; or something else is
        filling the disk): the next run tries again, instead of this one evicting
        everything evictable."""
        target = self.config.retention.free_space_target
        if target is None:
            return
        free = self.store.free_bytes()
        if free >= target:
            return
        missing = target - free
        budget = missing + int(missing * EVICT_MARGIN)
        condition = policy.evictable()
        while budget > 0:
            with self.reader.connect() as conn:
                rows = conn.execute(
                    select(instances.c.id, instances.c.size)
                    .where(condition)
                    .order_by(*_LIVE_KEY)
                    .limit(BATCH)
                ).all()
            if not rows:
                log.warning(
                    "free space (%d bytes) below retention.free_space_target (%d) and "
                    "nothing left that may be evicted: everything stored is undelivered",
                    free,
                    target,
                )
                return
            wanted = min(target - free, budget)
            chosen: list[int] = []
            for row in rows:
                if wanted <= 0:
                    break
                chosen.append(row.id)
                wanted -= int(row.size)
            before = report.purged_bytes
            self._purge(chosen, condition, policy.kind, report, evicted=True)
            budget -= report.purged_bytes - before
            now_free = self.store.free_bytes()
            if now_free >= target:
                return
            if now_free <= free:
                log.warning(
                    "free space (%d bytes) did not rise after evicting objects for "
                    "retention.free_space_target (%d): deleted files may not show as "
                    "free space yet (snapshots, files held open) or something else is "
                    "filling the disk; stopping, the next run tries again",
                    now_free,
                    target,
                )
                return
            free = now_free
        log.warning(
            "evicted the %d bytes missing at the start of this run (plus margin) and free "
            "space (%d bytes) is still below retention.free_space_target (%d); the next "
            "run continues",
            missing,
            free,
            target,
        )

    def _purge(
        self,
        ids: Sequence[int],
        condition: Any,
        kind: Any,
        report: PurgeReport,
        evicted: bool,
    ) -> None:
        """Mark, move, check (see the module docstring) the ``ids`` still matching
        ``condition`` under the write lock."""
        began = time.monotonic()
        now = time.time()
        with self.engine.begin() as conn:
            doomed = [
                _Doomed(row.id, row.generation, row.path, row.size, row.kind)
                for row in conn.execute(
                    select(
                        instances.c.id,
                        instances.c.generation,
                        instances.c.path,
                        instances.c.size,
                        kind.label("kind"),
                    ).where(instances.c.id.in_(list(ids)), condition)
                )
            ]
            if not doomed:
                return
            conn.execute(
                update(instances)
                .where(
                    instances.c.id == bindparam("b_id"),
                    instances.c.generation == bindparam("b_gen"),
                    instances.c.purged_at.is_(None),
                )
                .values(purged_at=now, purge_reason=bindparam("b_reason")),
                [
                    {
                        "b_id": d.id,
                        "b_gen": d.generation,
                        "b_reason": policy.reason(d.kind, self.config.retention, evicted),
                    }
                    for d in doomed
                ],
            )
            undelivered = [d.id for d in doomed if d.kind == policy.UNDELIVERED]
            if undelivered:
                # Their waiting deliveries can never be sent now: fail them, with why.
                conn.execute(
                    update(job_instances)
                    .where(
                        job_instances.c.instance_id.in_(undelivered),
                        job_instances.c.state == S.ITEM_PENDING,
                    )
                    .values(state=S.ITEM_FAILED, message=S.purged_message(now), updated_at=now)
                )
        self.hook("marked")
        moved: dict[int, tuple[_Doomed, Path | None]] = {}
        try:
            for d in doomed:
                # Listed before the rename: an interrupt just after it still finds it.
                moved[d.id] = (d, self._trash_path(d.path))
                moved[d.id] = (d, self._to_trash(d.path))
            self.hook("moved")
        finally:
            # Interrupted too (an exception, Ctrl-C): what was moved is checked now, so
            # a row made live meanwhile never waits for the next run to get its file.
            self._settle(moved)
        self.hook("checked")
        if self.pace > 0:
            time.sleep(self.pace * (time.monotonic() - began))
        for d in doomed:
            report.purged += 1
            report.purged_bytes += d.size
            report.by_kind[d.kind] = report.by_kind.get(d.kind, 0) + 1
        if evicted:
            report.evicted += len(doomed)
        log.info("purged %d object(s)%s", len(doomed), " (evicted for space)" if evicted else "")

    # -- files -------------------------------------------------------------------------
    def _trash_path(self, relative: str) -> Path:
        return self.store.trash / relative.replace("/", "+")

    def _to_trash(self, relative: str) -> Path | None:
        """Rename the object at ``relative`` into trash; None if it was not there."""
        target = self._trash_path(relative)
        try:
            os.rename(self.store.absolute(relative), target)
        except FileNotFoundError:
            return None
        return target

    def _settle(self, moved: dict[int, tuple[_Doomed, Path | None]]) -> None:
        """Step 3: unlink what is still a tombstone of the generation marked; give
        back the file of a row the receiver made live again."""
        if not any(path for _, path in moved.values()):
            return
        with self.reader.connect() as conn:
            now_rows = {
                row.id: row
                for row in conn.execute(
                    select(
                        instances.c.id,
                        instances.c.generation,
                        instances.c.path,
                        instances.c.purged_at,
                    ).where(instances.c.id.in_(list(moved)))
                )
            }
        for instance_id, (doomed, trashed) in moved.items():
            if trashed is None or not trashed.exists():
                continue
            row = now_rows.get(instance_id)
            if row is not None and row.purged_at is None and row.path == doomed.path:
                self._restore(trashed, doomed.path)
            else:
                trashed.unlink(missing_ok=True)

    def _restore(self, trashed: Path, relative: str) -> None:
        """Put a file back, unless a newer copy already took its place."""
        final = self.store.absolute(relative)
        final.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(trashed, final)
        except FileExistsError:
            pass
        trashed.unlink(missing_ok=True)
        log.info("kept %s: received again while it was being purged", relative)

    def _live_paths(self, relatives: Sequence[str]) -> set[str]:
        """Which of ``relatives`` a live row points at now."""
        sops = {rel.rsplit("/", 1)[-1].removesuffix(".dcm"): rel for rel in relatives}
        found: set[str] = set()
        keys = list(sops)
        with self.reader.connect() as conn:
            for start in range(0, len(keys), 500):
                for row in conn.execute(
                    select(instances.c.path).where(
                        instances.c.sop_instance_uid.in_(keys[start : start + 500]),
                        instances.c.purged_at.is_(None),
                    )
                ):
                    found.add(row.path)
        return {rel for rel in relatives if rel in found}

    def _remove_unreferenced(self, relatives: Sequence[str]) -> int:
        """Remove files no live row points at, with the same move-then-check steps
        as a purge (a row made live meanwhile keeps its file)."""
        if not relatives:
            return 0
        moved: dict[str, Path | None] = {}
        try:
            for rel in relatives:
                moved[rel] = self._trash_path(rel)  # as in _purge
                moved[rel] = self._to_trash(rel)
            self.hook("orphan-moved")
        except BaseException:
            self._check_unreferenced(moved)  # as in _purge: never left for the next run
            raise
        return self._check_unreferenced(moved)

    def _check_unreferenced(self, moved: dict[str, Path | None]) -> int:
        live_now = self._live_paths([rel for rel, path in moved.items() if path is not None])
        removed = 0
        for rel, trashed in moved.items():
            if trashed is None or not trashed.exists():
                continue
            if rel in live_now:
                self._restore(trashed, rel)
            else:
                trashed.unlink(missing_ok=True)
                removed += 1
        return removed

    # -- recovery and orphans -----------------------------------------------------------
    def recover(self) -> int:
        """Finish what a killed purge left: files in trash go back where a live row
        needs them, or away; tombstones of an interrupted run whose files are still
        in place lose them. Returns how many files were handled."""
        handled = 0
        entries = [entry for entry in self.store.trash.iterdir() if entry.is_file()]
        if entries:
            relatives = {entry.name.replace("+", "/"): entry for entry in entries}
            live_now = self._live_paths(list(relatives))
            for rel, entry in relatives.items():
                if rel in live_now:
                    self._restore(entry, rel)
                else:
                    entry.unlink(missing_ok=True)
                handled += 1
        with self.reader.connect() as conn:
            interrupted = conn.execute(
                select(purge_runs.c.id, purge_runs.c.started_at).where(
                    purge_runs.c.ended_at.is_(None)
                )
            ).all()
        for run in interrupted:
            handled += self._finish_interrupted(run)
        if handled:
            log.warning("recovered %d file(s) left by an interrupted purge", handled)
        return handled

    def recover_exclusive(self) -> int:
        """:meth:`recover` under the purge lock (the dispatch process at start-up,
        before its planner and workers run). Raises :class:`PurgeBusy`."""
        with self._exclusive():
            return self.recover()

    def _finish_interrupted(self, run: Any) -> int:
        with self.reader.connect() as conn:
            paths = list(
                conn.execute(
                    select(instances.c.path).where(
                        instances.c.purged_at >= run.started_at,
                        instances.c.purged_at.is_not(None),
                    )
                ).scalars()
            )
        present = [rel for rel in paths if self.store.absolute(rel).exists()]
        removed = self._remove_unreferenced(present)
        with self.engine.begin() as conn:
            conn.execute(
                update(purge_runs)
                .where(purge_runs.c.id == run.id, purge_runs.c.ended_at.is_(None))
                .values(ended_at=time.time(), error="interrupted (process stopped)")
            )
        return removed

    def _orphan_grace(self) -> float:
        dicom = self.config.dicom
        return max(MIN_ORPHAN_GRACE, 4 * max(dicom.network_timeout, dicom.dimse_timeout))

    def find_orphans(self) -> list[str]:
        """Files in ``objects/`` no live row points at and untouched for the grace
        time: the old path of an object received again under another study or
        series, a copy whose index commit never happened. Empty folders idle as long
        are removed on the way."""
        cutoff = time.time() - self._orphan_grace()
        orphans: list[str] = []
        for study in _subdirs(self.store.objects):
            try:  # before we remove its empty series, which touches it
                study_idle = study.stat().st_mtime <= cutoff
            except OSError:
                continue
            for series in _subdirs(study):
                files = {}
                for entry in os.scandir(series):
                    if entry.name.endswith(".dcm") and entry.is_file(follow_symlinks=False):
                        files[f"{study.name}/{series.name}/{entry.name}"] = entry
                if not files:
                    _remove_if_idle(series, cutoff)
                    continue
                with self.reader.connect() as conn:
                    live_paths = set(
                        conn.execute(
                            select(instances.c.path).where(
                                instances.c.series_instance_uid == series.name,
                                instances.c.purged_at.is_(None),
                            )
                        ).scalars()
                    )
                for rel, entry in files.items():
                    if rel not in live_paths and entry.stat().st_mtime <= cutoff:
                        orphans.append(rel)
            if study_idle:
                _remove_if_idle(study, float("inf"))
        return orphans

    def remove_orphans(self) -> int:
        """Orphaned object files and stale ``tmp/`` leftovers (of every node), removed."""
        removed = self._remove_unreferenced(self.find_orphans())
        removed += self.store.sweep_every_tmp(older_than=self._orphan_grace())
        if removed:
            log.info("removed %d orphaned file(s)", removed)
        return removed

    # -- reporting ---------------------------------------------------------------------
    def _snapshot(self, report: PurgeReport, cutoffs: policy.Cutoffs) -> None:
        """What is stored, still due (eligible), and kept because undelivered."""
        with self.reader.connect() as conn:
            stored = conn.execute(
                select(func.count(), func.coalesce(func.sum(instances.c.size), 0)).where(
                    policy.live
                )
            ).one()
            eligible = conn.execute(
                select(func.count(), func.coalesce(func.sum(instances.c.size), 0)).where(
                    policy.due(cutoffs)
                )
            ).one()
            kept = conn.execute(
                select(func.count(), func.coalesce(func.sum(instances.c.size), 0)).where(
                    policy.is_undelivered
                )
            ).one()
        report.stored, report.stored_bytes = int(stored[0]), int(stored[1])
        report.eligible, report.eligible_bytes = int(eligible[0]), int(eligible[1])
        report.undelivered, report.undelivered_bytes = int(kept[0]), int(kept[1])
        try:
            report.free_bytes = self.store.free_bytes()
        except OSError:
            report.free_bytes = None

    def _dry_run(self, report: PurgeReport, cutoffs: policy.Cutoffs, orphans: bool) -> None:
        with self.reader.connect() as conn:
            kind = policy.due_kind(cutoffs).label("kind")
            for row in conn.execute(
                select(kind, func.count(), func.coalesce(func.sum(instances.c.size), 0))
                .where(policy.due(cutoffs))
                .group_by(kind)
            ):
                report.by_kind[row[0]] = int(row[1])
                report.purged += int(row[1])
                report.purged_bytes += int(row[2])
        self._snapshot(report, cutoffs)
        if orphans:
            report.orphans = len(self.find_orphans())


def _remove_if_idle(folder: Path, cutoff: float) -> None:
    """Remove an empty study or series folder nothing was added to since ``cutoff``
    (one per study would otherwise pile up for ever). ``rmdir`` only ever removes an
    empty folder; a receiver that had it cached makes it again (``ObjectStore.commit``)."""
    try:
        if folder.stat().st_mtime <= cutoff:
            folder.rmdir()
    except OSError:
        pass  # not empty, or already gone: both fine


def _subdirs(folder: Path) -> list[Path]:
    try:
        return [Path(e.path) for e in os.scandir(folder) if e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return []
