"""The retention sweeper: a thread of the dispatch process that runs the purge every
``retention.interval`` (first at start-up, which also finishes what a killed run left).

Why the dispatch process: it already owns everything that writes decisions about
stored objects (planning, deliveries), it is restarted by the node if it dies (and
then recovers at once), and the receiving process stays free of any work but
receiving: a purge's file deletions never take CPU from a C-STORE's GIL.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable

from sqlalchemy import Engine

from dicomrouter.config import RouterConfig
from dicomrouter.observe import metrics
from dicomrouter.store import ObjectStore, audit, create_index_engine

from .purge import PurgeBusy, Purger, PurgeReport

log = logging.getLogger("dicomrouter.retention")

_STEP = 5.0  # seconds between looks at the clock (and at a reloaded interval)


def record(engine: Engine, report: PurgeReport, actor: str, source: str) -> None:
    """Audit a run that changed something (or any run a person asked for), and count it."""
    if not report.dry_run:
        metrics.purge_recorded(report.by_kind, report.purged_bytes)
    if report.did_something or actor != audit.SYSTEM:
        audit.record(
            engine,
            actor,
            "retention.purge" + (".dry_run" if report.dry_run else ""),
            "storage",
            source=source,
            detail={
                key: value
                for key, value in report.as_dict().items()
                if key not in ("free_space_target",)
            },
        )


#: Niceness of the sweeper thread: a purge is never urgent, a C-STORE always is.
NICENESS = 10


def in_background(purger: Purger) -> None:
    """Run ``purger`` as a background task from this thread on: it rests as long as
    each batch took (half the disk and CPU at most), and the thread is niced (Linux
    sets niceness per thread), so the receiver and the deliveries come first."""
    purger.pace = 1.0
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICENESS)


def durable_engine(engine: Engine) -> Engine:
    """An engine committing with synchronous=FULL: tombstones must be durable before
    files go (see Purger); the dispatch process's own engine commits with NORMAL."""
    if engine.dialect.name == "sqlite":
        return create_index_engine(str(engine.url), create=False)
    return engine


def recover_at_start(config: RouterConfig, engine: Engine, store: ObjectStore) -> int:
    """What a killed purge left (files in trash, runs without an end), finished under
    the purge lock before anything plans or sends: a row made live again whose new
    file a killed purge had moved into trash gets it back first. Returns how many
    files were handled (0 when another purge holds the lock: it recovered first)."""
    durable = durable_engine(engine)
    purger = Purger(config, durable, store)
    try:
        return purger.recover_exclusive()
    except PurgeBusy as exc:
        log.info("purge recovery at start-up skipped: %s", exc)
        return 0
    finally:
        purger.close()
        if durable is not engine:
            durable.dispose()


def sweep_forever(
    config: Callable[[], RouterConfig],
    engine: Engine,
    store: ObjectStore,
    stop: threading.Event,
) -> None:
    durable = durable_engine(engine)
    purger = Purger(config(), durable, store)
    in_background(purger)
    space_was_ok = True
    while not stop.is_set():
        purger.config = config()
        try:
            report = purger.run()
            target = purger.config.retention.free_space_target
            space_was_ok = target is None or (report.free_bytes or 0) >= target
        except PurgeBusy as exc:
            log.info("retention sweep skipped: %s", exc)
        except Exception:
            log.exception("retention sweep failed; next try in retention.interval")
        else:
            record(durable, report, audit.SYSTEM, "dispatch")
            if report.did_something:
                log.info(
                    "retention: purged %d object(s) (%d bytes, %d evicted for space), "
                    "%d orphaned file(s), %d history and %d audit row(s)",
                    report.purged,
                    report.purged_bytes,
                    report.evicted,
                    report.orphans,
                    report.history_rows,
                    report.audit_rows,
                )
        _wait(config, store, stop, space_was_ok)


def _wait(
    config: Callable[[], RouterConfig], store: ObjectStore, stop: threading.Event, space_ok: bool
) -> None:
    """Until the next run: ``retention.interval``, looked at in short steps (a reloaded
    shorter interval applies at once), or sooner when free space falls below
    ``free_space_target`` (one statvfs per step). After a run that could not bring
    free space back (nothing evictable left), only the interval wakes it."""
    started = time.monotonic()
    while time.monotonic() - started < config().retention.interval:
        if stop.wait(min(_STEP, config().retention.interval)):
            return
        target = config().retention.free_space_target
        if space_ok and target is not None and store.free_bytes() < target:
            log.info("free space below retention.free_space_target: sweeping now")
            return
