"""Retention beside the other "no silent loss" features: instances set aside by the
planner (``unplanned``) and instances held by a loop guard (``loop_events``).

Each is an instance nobody has decided about yet, so retention keeps it; once
purged anyway (``delete_undelivered_after``), its rows go with its tombstone.
"""

from __future__ import annotations

import time
from pathlib import Path

from sqlalchemy import select, update

from dicomrouter.queue import unplanned as unplanned_queue
from dicomrouter.store.schema import instances, loop_events, unplanned
from tests.support.retention import DAY, Site
from tests.support.synth import make_study


def _site(tmp_path: Path, **config: object) -> Site:
    config.setdefault("storage", {"path": str(tmp_path / "store"), "min_free_space": 0})
    return Site(tmp_path, **config)


def _hold(site: Site, sop_uid: str) -> None:
    """Record a loop hold on the instance, as queue/loops.py does when it comes back."""
    row = site.rows()[sop_uid]
    with site.engine.begin() as conn:
        conn.execute(
            loop_events.insert().values(
                kind="held",
                instance_id=row.id,
                generation=row.generation,
                sop_instance_uid=row.sop_instance_uid,
                study_instance_uid=row.study_instance_uid,
                destination="pacs",
                at=time.time(),
                reason="came back from pacs",
            )
        )


def _set_aside(site: Site, sop_uid: str) -> None:
    """Set the instance aside as the planner does when its plan cannot be written."""
    row = site.rows()[sop_uid]
    with site.engine.begin() as conn:
        unplanned_queue.set_aside(conn, row.id, row.generation, "disk full", time.time())


def test_an_instance_held_as_a_loop_is_kept_until_released(tmp_path: Path) -> None:
    # Unrouted objects would go after a day: the held one must not.
    s = _site(tmp_path, routes=[], retention={"delete_unrouted_after": "1d"})
    held, free = s.receive(make_study(tmp_path / "in", 2))
    s.plan()
    sop_held = next(u for u, r in s.rows().items() if r.path == held)
    _hold(s, sop_held)
    report = s.purge(days_later=30)
    assert report.purged == 1 and report.undelivered == 1
    assert s.store.absolute(held).exists() and not s.store.absolute(free).exists()
    with s.engine.begin() as conn:
        conn.execute(update(loop_events).values(released_at=time.time(), released_by="op"))
    assert s.purge(days_later=30).purged == 1
    assert not s.store.absolute(held).exists()


def test_a_set_aside_instance_is_kept_and_its_rows_go_with_its_tombstone(
    tmp_path: Path,
) -> None:
    s = _site(tmp_path, retention={"delete_undelivered_after": "30d"})
    [path] = s.receive(make_study(tmp_path / "in", 1))
    [sop_uid] = s.rows()
    _set_aside(s, sop_uid)
    _hold(s, sop_uid)
    assert s.purge(days_later=10).purged == 0  # undelivered: kept by age
    assert s.store.absolute(path).exists()
    assert s.purge(days_later=31).purged == 1  # delete_undelivered_after
    # The planner's retry finds nothing to plan and stops retrying it.
    assert s.planner.retry_unplanned(now=time.time() + 31 * DAY) == 0
    with s.engine.connect() as conn:
        assert conn.execute(select(unplanned)).first() is None
    tombstone = s.rows()[sop_uid]
    assert tombstone.purged_at is not None
    # History pruning deletes the tombstone, and its loop decisions with it (a row
    # referring to it would otherwise make the delete fail on its foreign key).
    with s.engine.begin() as conn:
        conn.execute(
            unplanned.insert().values(
                instance_id=tombstone.id,
                generation=tombstone.generation,
                attempts=1,
                first_failed_at=time.time(),
                next_attempt_at=time.time() + DAY,
                last_error="left behind",
            )
        )
    report = s.purge(days_later=31 + 91)
    assert report.history_rows > 0
    with s.engine.connect() as conn:
        for table in (instances, unplanned, loop_events):
            assert conn.execute(select(table)).first() is None, table.name
