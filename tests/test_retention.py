"""Retention: what is deleted when, what never is, and the purge's crash safety.

Real index, real files, the real planner, job store, receiver code path and purger;
no network. Time is moved by running the purge with a later ``now``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import insert, select, text, update
from sqlalchemy.exc import DatabaseError

from dicomrouter.dicomnet import Peer
from dicomrouter.queue import states as S
from dicomrouter.receive.scp import OUT_OF_RESOURCES, SUCCESS, Receiver
from dicomrouter.store import InstanceIndex, ObjectStore, audit, create_index_engine
from dicomrouter.store.schema import (
    attempts,
    audit_log,
    instances,
    job_instances,
    jobs,
    purge_runs,
    route_matches,
    triggers,
)
from tests.support.retention import DAY, Choreography, Site
from tests.support.synth import make_study

STORAGE = {"min_free_space": 0}


def site(tmp_path: Path, **config: object) -> Site:
    config.setdefault("storage", {"path": str(tmp_path / "store"), **STORAGE})
    return Site(tmp_path, **config)


def test_delivered_objects_go_after_delete_delivered_after_and_leave_a_tombstone(
    tmp_path: Path,
) -> None:
    s = site(tmp_path)
    paths = s.receive(make_study(tmp_path / "in", 3))
    s.plan()
    s.settle()
    early = s.purge(days_later=6)
    assert early.purged == 0 and all(s.store.absolute(p).exists() for p in paths)
    report = s.purge(days_later=8)
    assert report.purged == 3 and report.by_kind == {"delivered": 3}
    assert not any(s.store.absolute(p).exists() for p in paths)
    assert list(s.store.trash.iterdir()) == []
    for row in s.rows().values():
        assert row.purged_at is not None
        assert "delivered to every destination" in row.purge_reason
    with s.engine.connect() as conn:
        run = conn.execute(select(purge_runs).order_by(purge_runs.c.id.desc())).first()
    assert run is not None and run.purged == 3 and run.ended_at is not None and run.error is None


def test_undelivered_objects_are_never_deleted_by_age_unless_configured(tmp_path: Path) -> None:
    s = site(tmp_path)
    failed = s.receive(make_study(tmp_path / "a", 2, prefix="A"))
    s.plan()
    s.settle(state=S.ITEM_FAILED)
    pending = s.receive(make_study(tmp_path / "b", 2, prefix="B"))
    s.plan()  # queued, never sent
    report = s.purge(days_later=3650)
    assert report.purged == 0
    assert report.undelivered == 4 and report.undelivered_bytes > 0
    assert all(s.store.absolute(p).exists() for p in failed + pending)

    policy = s.config.retention.model_copy(update={"delete_undelivered_after": 30 * DAY})
    s.purger.config = s.config.model_copy(update={"retention": policy})
    report = s.purge(days_later=31)
    assert report.purged == 4 and report.by_kind == {"undelivered": 4}
    # Their waiting deliveries failed, saying why: no open job points at a deleted file.
    assert s.open_deliveries_of_purged() == []
    with s.engine.connect() as conn:
        messages = set(
            conn.execute(
                select(job_instances.c.message).where(job_instances.c.state == S.ITEM_FAILED)
            ).scalars()
        )
    assert any(m and m.startswith("purged by retention on ") for m in messages)


def test_an_undelivered_object_a_worker_is_sending_is_not_purged(tmp_path: Path) -> None:
    s = site(tmp_path, retention={"delete_undelivered_after": "30d"})
    paths = s.receive(make_study(tmp_path / "in", 2))
    s.plan()
    claim = s.jobs.claim("pacs", "worker", lease=60)  # in progress, under a lease
    assert claim is not None and len(claim.items) == 2
    assert s.purge(days_later=31).purged == 0
    assert all(s.store.absolute(p).exists() for p in paths)
    with s.engine.connect() as conn:
        states = set(conn.execute(select(job_instances.c.state)).scalars())
    assert states == {S.ITEM_PENDING}
    # Once the claim is given back (the lease recovered), the policy applies again.
    with s.engine.begin() as conn:
        conn.execute(update(jobs).values(lease_expires_at=0))
    s.jobs.recover()
    assert s.purge(days_later=31).by_kind == {"undelivered": 2}
    assert s.open_deliveries_of_purged() == []


def test_a_pending_series_trigger_keeps_its_instances(tmp_path: Path) -> None:
    s = site(
        tmp_path,
        routes=[{"name": "series", "trigger": "series", "stable_after": "1h", "to": ["pacs"]}],
    )
    paths = s.receive(make_study(tmp_path / "in", 2))
    s.plan(fire=False)  # armed, waiting for the series to be quiet
    assert s.purge(days_later=100).purged == 0
    assert all(s.store.absolute(p).exists() for p in paths)
    s.planner.fire_stable_triggers(now=time.time() + 2 * 3600)
    s.settle()
    assert s.purge(days_later=100).purged == 2


def test_unrouted_objects_go_after_delete_unrouted_after(tmp_path: Path) -> None:
    s = site(tmp_path, routes=[{"name": "mr", "when": {"Modality": "MR"}, "to": ["pacs"]}])
    paths = s.receive(make_study(tmp_path / "in", 2, modality="CT"))
    s.plan()
    assert s.purge(days_later=6).purged == 0
    report = s.purge(days_later=8)
    assert report.by_kind == {"unrouted": 2}
    assert not any(s.store.absolute(p).exists() for p in paths)
    assert all("matched no route" in r.purge_reason for r in s.rows().values())


def test_a_late_instance_rearming_a_study_trigger_does_not_queue_purged_members(
    tmp_path: Path,
) -> None:
    s = site(
        tmp_path,
        routes=[
            {
                "name": "ct-study",
                "trigger": "study",
                "forward": "study",
                "when": {"Modality": "CT"},
                "to": ["pacs"],
            }
        ],
    )
    study_uid = "1.2.826.0.1.3680043.8.498.77"
    s.receive(make_study(tmp_path / "mr", 2, modality="MR", study_uid=study_uid, prefix="M"))
    s.plan()
    assert s.purge(days_later=8).by_kind == {"unrouted": 2}
    late = make_study(tmp_path / "ct", 1, modality="CT", study_uid=study_uid, prefix="C")
    s.receive(late)
    s.plan()
    queued = s.queued_sops()
    assert queued == {dcmread(late[0], stop_before_pixels=True).SOPInstanceUID}


def test_retrying_a_job_whose_instances_were_purged_fails_them_with_the_reason(
    tmp_path: Path,
) -> None:
    s = site(tmp_path)
    s.receive(make_study(tmp_path / "in", 2))
    s.plan()
    with s.engine.connect() as conn:
        job_ids = list(conn.execute(select(jobs.c.id)).scalars())
    assert s.jobs.cancel(job_ids) == len(job_ids)  # canceled: settled, so purgeable
    assert s.purge(days_later=8).purged == 2
    assert s.jobs.retry(job_ids) == len(job_ids)
    with s.engine.connect() as conn:
        items = conn.execute(select(job_instances)).all()
        states = set(conn.execute(select(jobs.c.state)).scalars())
    assert {item.state for item in items} == {S.ITEM_FAILED}
    assert all(item.message.startswith("purged by retention on ") for item in items)
    assert S.PENDING not in states
    # A claim never hands a worker a purged instance, even one queued behind our back.
    with s.engine.begin() as conn:
        conn.execute(update(job_instances).values(state=S.ITEM_PENDING))
        conn.execute(update(jobs).values(state=S.PENDING, next_attempt_at=0))
    claim = s.jobs.claim("pacs", "w", lease=60)
    assert claim is not None and claim.items == []
    assert s.open_deliveries_of_purged() == []


def test_history_and_audit_are_pruned_and_the_audit_log_stays_append_only(
    tmp_path: Path,
) -> None:
    s = site(tmp_path)
    s.receive(make_study(tmp_path / "in", 2))
    s.plan()
    s.settle()
    assert s.purge(days_later=8).purged == 2
    old = time.time() - 400 * DAY
    with s.engine.begin() as conn:
        conn.execute(insert(audit_log).values(at=old, actor="x", action="old.entry", detail="{}"))
    audit.record(s.engine, "x", "recent.entry")
    report = s.purge(days_later=8 + 91)
    assert report.history_rows > 0 and report.audit_rows == 1
    with s.engine.connect() as conn:
        for table in (instances, job_instances, route_matches, jobs, attempts):
            assert conn.execute(select(table)).first() is None, table.name
        actions = set(conn.execute(select(audit_log.c.action)).scalars())
    assert "old.entry" not in actions and "recent.entry" in actions
    for statement in ("DELETE FROM audit_log", "UPDATE audit_log SET actor = 'y'"):
        with pytest.raises(DatabaseError, match="append-only"), s.engine.begin() as conn:
            conn.execute(text(statement))


def test_orphaned_files_are_removed_and_live_ones_kept(tmp_path: Path) -> None:
    s = site(tmp_path)
    first = make_study(tmp_path / "in", 1)
    [old_path] = s.receive(first)
    # The same SOP Instance UID again, under another series: a new path, the old one left.
    ds = dcmread(first[0])
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.99"
    moved = tmp_path / "moved.dcm"
    ds.save_as(moved)
    [new_path] = s.receive([moved])
    assert new_path != old_path and s.store.absolute(old_path).exists()
    leftover = s.store.tmp / "partial.part"
    leftover.write_bytes(b"x")
    long_ago = time.time() - 2 * DAY
    for path in (s.store.absolute(old_path), s.store.absolute(new_path), leftover):
        os.utime(path, (long_ago, long_ago))
    report = s.purge(days_later=0, scan_orphans=True)
    assert report.orphans == 2
    assert not s.store.absolute(old_path).exists() and not leftover.exists()
    assert s.store.absolute(new_path).exists() and s.live_without_file() == []


def test_free_space_target_evicts_delivered_and_unrouted_oldest_first_never_undelivered(
    tmp_path: Path,
) -> None:
    s = site(tmp_path)
    delivered = s.receive(make_study(tmp_path / "d", 4, prefix="D"))
    s.plan()
    s.settle()
    undelivered = s.receive(make_study(tmp_path / "u", 2, prefix="U"))
    s.plan()  # queued, not sent
    sizes = {p: s.store.absolute(p).stat().st_size for p in delivered + undelivered}
    target = 10**9
    keep = delivered[-2:]  # evicting the two oldest is enough
    # Free space grows by what is deleted: the disk is "full" until all but the two
    # newest delivered objects (and the undelivered ones) are gone.
    allowance = sum(sizes[p] for p in undelivered + keep)

    def free_bytes() -> int:
        stored = sum(sizes[p] for p in sizes if s.store.absolute(p).exists())
        return target + allowance - stored

    s.store.free_bytes = free_bytes  # type: ignore[method-assign]
    s.purger.config = s.config.model_copy(
        update={"retention": s.config.retention.model_copy(update={"free_space_target": target})}
    )
    report = s.purge(days_later=0)
    assert report.evicted == 2
    assert [s.store.absolute(p).exists() for p in delivered] == [False, False, True, True]
    assert all(s.store.absolute(p).exists() for p in undelivered)
    reasons = {r.purge_reason for r in s.rows().values() if r.purged_at is not None}
    assert all("free_space_target" in reason for reason in reasons)
    # Nothing evictable left but the undelivered: they stay, whatever the target.
    s.store.free_bytes = lambda: 0  # type: ignore[method-assign]
    s.purge(days_later=0)
    assert all(s.store.absolute(p).exists() for p in undelivered)


def test_eviction_stops_when_deleting_does_not_raise_free_space(tmp_path: Path) -> None:
    """Deletes that never show as free space (snapshots, files held open, a disk
    something else is filling): one run evicts what was missing, not everything."""
    s = site(tmp_path)
    delivered = s.receive(make_study(tmp_path / "d", 20, prefix="D"))
    s.plan()
    s.settle()
    target = 10**9
    s.store.free_bytes = lambda: target - 1  # type: ignore[method-assign]
    s.purger.config = s.config.model_copy(
        update={"retention": s.config.retention.model_copy(update={"free_space_target": target})}
    )
    report = s.purge(days_later=0)
    assert report.evicted == 1
    assert [s.store.absolute(p).exists() for p in delivered] == [False] + [True] * 19
    # The next run tries again, one object's worth at a time.
    assert s.purge(days_later=0).evicted == 1


# -- the race with the receiver ----------------------------------------------------------

PEER = Peer("CT1", "DICOMROUTER", "127.0.0.1", 50000)


def _race(tmp_path: Path, script: list[tuple[str, str]]) -> tuple[Site, int, str, str]:
    """One delivered instance, due for purge; the receiver stores a new copy of the
    same SOP Instance UID (same path) while the purger deletes it, the two
    interleaved as ``script`` says. Returns the site, the receiver's status, the
    path and the new copy's StudyDescription."""
    s = site(tmp_path)
    original = make_study(tmp_path / "in", 1)
    [relative] = s.receive(original)
    s.plan()
    s.settle()
    ds = dcmread(original[0])
    ds.StudyDescription = "second copy"
    temp = s.store.tmp / "incoming.dcm"
    ds.save_as(temp)

    # The receiver as in the node process: its own store object and index engine.
    store = ObjectStore(s.store.root, s.store.node)
    engine = create_index_engine(s.config.database_url, create=False, busy_timeout_ms=0)
    index = InstanceIndex(engine)
    receiver = Receiver(s.config, store, index)
    choreo = Choreography({})

    real_commit, real_record = store.commit, index.record_generation

    def commit(*args: object, **kwargs: object) -> object:
        choreo.point("R", "begin")
        placed = real_commit(*args, **kwargs)  # type: ignore[arg-type]
        choreo.point("R", "committed")
        return placed

    def record(*args: object, **kwargs: object) -> int:
        generation = real_record(*args, **kwargs)  # type: ignore[arg-type]
        choreo.point("R", "recorded")
        return generation

    store.commit = commit  # type: ignore[method-assign]
    index.record_generation = record  # type: ignore[method-assign]
    s.purger.hook = lambda stage: choreo.point("P", stage)
    choreo.actors.update(
        R=lambda: receiver._store(PEER, ds.SOPInstanceUID, temp, None)[0],
        P=lambda: s.purge(days_later=8, scan_orphans=False),
    )
    choreo.play(script)
    receiver.stop()
    return s, choreo.results["R"], relative, "second copy"


RACES = {
    # purge marks; the whole new copy arrives before the file is moved: the move takes
    # the new copy, the check sees a live row and puts it back.
    "receive-between-mark-and-move": [("P", "marked"), ("R", "done"), ("P", "done")],
    # the old copy is in trash; the new one lands in place and is kept.
    "receive-between-move-and-check": [("P", "moved"), ("R", "done"), ("P", "done")],
    # the new file is in place but not yet indexed when the purge runs through: the
    # purge deletes it (the row is still the purged generation); the receiver's check
    # after its commit sees the file gone and does not acknowledge.
    "purge-between-rename-and-index-commit": [("R", "committed"), ("P", "done"), ("R", "done")],
    "move-between-rename-and-index-commit": [
        ("P", "marked"),
        ("R", "committed"),
        ("P", "moved"),
        ("R", "done"),
        ("P", "done"),
    ],
    "move-between-index-commit-and-check": [
        ("P", "marked"),
        ("R", "recorded"),
        ("P", "moved"),
        ("R", "done"),
        ("P", "done"),
    ],
    "old-copy-moved-new-copy-placed-before-check": [
        ("P", "moved"),
        ("R", "committed"),
        ("P", "done"),
        ("R", "done"),
    ],
}


@pytest.mark.parametrize("script", list(RACES.values()), ids=list(RACES))
def test_an_acknowledged_copy_is_never_purged_whatever_the_interleaving(
    tmp_path: Path, script: list[tuple[str, str]]
) -> None:
    s, status, relative, description = _race(tmp_path, script)
    assert status in (SUCCESS, OUT_OF_RESOURCES)
    [row] = s.rows().values()
    if status == SUCCESS:
        # Acknowledged: live, with the new copy's file in place.
        assert row.purged_at is None and row.generation == 2
        assert dcmread(s.store.absolute(relative)).StudyDescription == description
    else:
        # Not acknowledged: the sender sends again. Never a live row without its file.
        assert row.purged_at is not None
    assert s.live_without_file() == []
    assert list(s.store.trash.iterdir()) == []


def test_the_receiver_answers_a700_when_a_purge_took_its_file(tmp_path: Path) -> None:
    s, status, _, _ = _race(tmp_path, RACES["purge-between-rename-and-index-commit"])
    assert status == OUT_OF_RESOURCES
    [row] = s.rows().values()
    assert row.generation == 2 and "concurrent purge" in row.purge_reason


# -- kill -9 during a purge ------------------------------------------------------------

_CHILD = """
import os, signal, sys, time
sys.path.insert(0, {src!r})
import dicomrouter.retention.purge as purge
from dicomrouter.config import parse_config
from dicomrouter.retention import Purger
from dicomrouter.store import ObjectStore, create_index_engine
purge.BATCH = 3
config = parse_config({config!r}, environ={{}})
engine = create_index_engine(config.database_url, create=False)
purger = Purger(config, engine, ObjectStore(config.storage.path, config.node.name))
stage, nth = {stage!r}, {nth!r}
seen = {{}}
def hook(name):
    seen[name] = seen.get(name, 0) + 1
    if name == stage and seen[name] == nth:
        os.kill(os.getpid(), signal.SIGKILL)
purger.hook = hook
print("ready", flush=True)
purger.run(now=time.time() + {later!r}, scan_orphans=True)
"""


def _kill_site(tmp_path: Path) -> tuple[Site, list[str]]:
    s = site(
        tmp_path,
        retention={"delete_undelivered_after": "30d"},
    )
    delivered = s.receive(make_study(tmp_path / "d", 7, prefix="D"))
    s.plan()
    s.settle()
    waiting = s.receive(make_study(tmp_path / "w", 5, prefix="W"))
    s.plan()  # pending jobs: the purge must fail them with the files it deletes
    orphan = s.store.objects / "1.2.3" / "4.5.6" / "7.8.9.dcm"
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"orphan")
    os.utime(orphan, (time.time() - 2 * DAY,) * 2)
    return s, delivered + waiting


def _check_invariants(s: Site) -> None:
    assert s.live_without_file() == []
    assert s.open_deliveries_of_purged() == []


def _run_child(tmp_path: Path, s: Site, stage: str, nth: int) -> subprocess.Popen[str]:
    src = str(Path(__file__).resolve().parents[1] / "src")
    config = s.settings()
    code = _CHILD.format(src=src, config=config, stage=stage, nth=nth, later=31 * DAY)
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)


@pytest.mark.parametrize(
    ("stage", "nth"),
    [("marked", 1), ("moved", 2), ("checked", 3), ("orphan-moved", 1)],
)
def test_kill_9_at_any_step_of_a_purge_leaves_nothing_inconsistent(
    tmp_path: Path, stage: str, nth: int
) -> None:
    s, paths = _kill_site(tmp_path)
    child = _run_child(tmp_path, s, stage, nth)
    child.wait(120)
    assert child.returncode == -signal.SIGKILL
    _check_invariants(s)
    # The next run finishes the job: trash empty, every due object gone, the
    # interrupted run recorded as such, and still nothing inconsistent.
    report = s.purge(days_later=31, scan_orphans=True)
    assert report.recovered >= 0
    _check_invariants(s)
    assert list(s.store.trash.iterdir()) == []
    assert not any(s.store.absolute(p).exists() for p in paths)
    assert all(row.purged_at is not None for row in s.rows().values())
    with s.engine.connect() as conn:
        errors = list(conn.execute(select(purge_runs.c.error)).scalars())
    assert "interrupted (process stopped)" in errors


def test_kill_9_at_random_moments_of_a_purge(tmp_path: Path) -> None:
    s, paths = _kill_site(tmp_path)
    for delay in (0.05, 0.15, 0.3):
        child = _run_child(tmp_path, s, "never", 0)
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        time.sleep(delay)  # a random point of the run, not an assertion about time
        child.kill()
        child.wait(60)
        _check_invariants(s)
    s.purge(days_later=31, scan_orphans=True)
    _check_invariants(s)
    assert list(s.store.trash.iterdir()) == []
    assert not any(s.store.absolute(p).exists() for p in paths)


def _second_copy(tmp_path: Path, original: Path) -> Path:
    ds = dcmread(original)
    ds.StudyDescription = "second copy"
    copy = tmp_path / "second.dcm"
    ds.save_as(copy)
    return copy


def test_dispatch_start_up_restores_what_a_killed_purge_moved_before_planning_or_sending(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The purge marked generation 1, a new copy was received in full (live as
    generation 2, acknowledged), the purge moved the new file into trash and was
    killed before its check: the state is built as the kill leaves it."""
    from dicomrouter.dispatch import service
    from dicomrouter.retention import sweeper

    s = site(tmp_path)
    original = make_study(tmp_path / "in", 1)
    [relative] = s.receive(original)
    s.plan()
    s.settle()
    with s.engine.begin() as conn:
        conn.execute(insert(purge_runs).values(started_at=time.time(), actor="system"))
        conn.execute(update(instances).values(purged_at=time.time(), purge_reason="x"))
    s.receive([_second_copy(tmp_path, original[0])])
    assert s.purger._to_trash(relative) is not None
    assert s.live_without_file() != [] and s.rows()[next(iter(s.rows()))].generation == 2

    seen: list[tuple[str, list[str]]] = []
    monkeypatch.setattr(
        service.Dispatcher,
        "_plan_loop",
        lambda self: seen.append(("planner", s.live_without_file())),
    )
    monkeypatch.setattr(
        service.Dispatcher,
        "_start_destination",
        lambda self, name, config: seen.append(("workers", s.live_without_file())),
    )
    monkeypatch.setattr(sweeper, "sweep_forever", lambda *args: None)
    dispatcher = service.Dispatcher(s.config, s.engine, s.store)
    dispatcher.start()
    dispatcher.stop()
    assert sorted(seen) == [("planner", []), ("workers", [])]
    assert dcmread(s.store.absolute(relative)).StudyDescription == "second copy"
    assert list(s.store.trash.iterdir()) == []


class _Interrupt(Exception):
    pass


@pytest.mark.parametrize("interrupt", [_Interrupt, KeyboardInterrupt])
def test_a_purge_interrupted_after_moving_files_checks_them_before_it_raises(
    tmp_path: Path, interrupt: type[BaseException]
) -> None:
    """An exception (or Ctrl-C in 'dicomrouter purge') between move and check: a
    row made live again meanwhile has its file back once the purge has raised."""
    s = site(tmp_path)
    original = make_study(tmp_path / "in", 1)
    [relative] = s.receive(original)
    s.plan()
    s.settle()
    copy = _second_copy(tmp_path, original[0])

    def hook(stage: str) -> None:
        if stage == "marked":
            s.receive([copy])  # received again in full: live, generation 2
        elif stage == "moved":
            raise interrupt()

    s.purger.hook = hook
    with pytest.raises(interrupt):
        s.purge(days_later=8, scan_orphans=False)
    [row] = s.rows().values()
    assert row.purged_at is None and row.generation == 2
    assert s.live_without_file() == []
    assert dcmread(s.store.absolute(relative)).StudyDescription == "second copy"
    assert list(s.store.trash.iterdir()) == []


def test_emptied_folders_go_and_a_receiver_that_cached_them_still_stores(tmp_path: Path) -> None:
    s = site(tmp_path, retention={"delete_delivered_after": "0s"})
    files = make_study(tmp_path / "in", 2)
    [first, _] = s.receive(files)  # s.store now caches the series folder as existing
    s.plan()
    s.settle()
    assert s.purge(days_later=0).purged == 2
    series = s.store.absolute(first).parent
    long_ago = time.time() - 2 * DAY
    for folder in (series, series.parent):
        os.utime(folder, (long_ago, long_ago))
    s.purge(days_later=0, scan_orphans=True)
    assert not series.parent.exists()
    # The same series again, through the store that still has the folder cached.
    ds = dcmread(files[0])
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.12345"
    again = tmp_path / "again.dcm"
    ds.save_as(again)
    [relative] = s.receive([again])
    assert s.store.absolute(relative).exists() and s.live_without_file() == []


def test_with_on_duplicate_ignore_a_purged_instance_received_again_is_stored_again(
    tmp_path: Path,
) -> None:
    s = site(
        tmp_path,
        storage={"path": str(tmp_path / "store"), "min_free_space": 0, "on_duplicate": "ignore"},
    )
    files = make_study(tmp_path / "in", 1)
    s.receive(files)
    s.plan()
    s.settle()
    assert s.purge(days_later=8).purged == 1
    receiver = Receiver(s.config, ObjectStore(s.store.root, s.store.node), InstanceIndex(s.engine))
    temp = s.store.tmp / "again.dcm"
    temp.write_bytes(files[0].read_bytes())
    sop = dcmread(files[0], stop_before_pixels=True).SOPInstanceUID
    assert receiver._store(PEER, sop, temp, None)[0] == SUCCESS
    receiver.stop()
    [row] = s.rows().values()
    assert row.purged_at is None and row.generation == 2 and row.routed == 0
    assert s.live_without_file() == []


def test_a_copy_the_receiver_retracted_is_never_planned(tmp_path: Path) -> None:
    s = site(tmp_path)
    files = make_study(tmp_path / "in", 2)
    s.receive(files)
    retracted = dcmread(files[0], stop_before_pixels=True).SOPInstanceUID
    # What the receiver does when a purge took its file before it answered (0xA700).
    s.index.retract(retracted, 1, "file removed by a concurrent purge")
    s.plan()
    queued = s.queued_sops()
    assert queued == {dcmread(files[1], stop_before_pixels=True).SOPInstanceUID}
    assert s.open_deliveries_of_purged() == []


@pytest.mark.sqlite_only  # about SQLite's query plan
def test_purge_batches_walk_the_live_index_in_order_without_sorting(tmp_path: Path) -> None:
    """Each batch seeks past the last one in ix_instances_live's own order: a sort
    would evaluate every remaining candidate for every batch (quadratic)."""
    from sqlalchemy import tuple_

    from dicomrouter.retention import policy
    from dicomrouter.retention.purge import _LIVE_KEY, _LIVE_ORDER

    s = site(tmp_path)
    cutoffs = policy.Cutoffs.at(s.config.retention, time.time())
    queries = [
        select(instances.c.id)
        .where(policy.due(cutoffs), tuple_(0.0, 0, 0) < _LIVE_ORDER)
        .order_by(*_LIVE_KEY)
        .limit(200),
        select(instances.c.id).where(policy.evictable()).order_by(*_LIVE_KEY).limit(200),
    ]
    for query in queries:
        sql = str(query.compile(s.engine, compile_kwargs={"literal_binds": True}))
        with s.engine.connect() as conn:
            plan = " | ".join(row[3] for row in conn.execute(text("EXPLAIN QUERY PLAN " + sql)))
        assert "ix_instances_live" in plan and "TEMP B-TREE" not in plan, plan


def test_history_pruning_removes_the_fired_triggers_of_what_is_gone(tmp_path: Path) -> None:
    s = site(
        tmp_path,
        routes=[{"name": "study", "trigger": "study", "stable_after": "1s", "to": ["pacs"]}],
    )
    s.receive(make_study(tmp_path / "a", 2, prefix="A"))
    s.plan()
    s.settle()
    kept = s.receive(make_study(tmp_path / "b", 1, prefix="B"))
    s.plan()  # a second study, still waiting for delivery: its history stays
    assert s.purge(days_later=8).purged == 2
    s.purge(days_later=8 + 91)
    with s.engine.connect() as conn:
        studies = set(conn.execute(select(triggers.c.uid)).scalars())
        left = set(conn.execute(select(instances.c.path)).scalars())
    assert left == set(kept)
    assert studies == {s.rows()[next(iter(s.rows()))].study_instance_uid}
