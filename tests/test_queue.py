"""Queue semantics at the index level: planning, dedup, follow-ups, leases, retries.

These run the real planner and job store on a real SQLite index and real files,
without the network, so each rule of the issue is checked precisely and fast.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from sqlalchemy import select

from dicomrouter.config import DicomDestinationConfig, parse_config
from dicomrouter.dispatch.worker import owner_prefix
from dicomrouter.queue import ItemResult, JobStore, Planner
from dicomrouter.queue import states as S
from dicomrouter.queue.views import job_detail, list_jobs
from dicomrouter.store import (
    InstanceHeader,
    InstanceIndex,
    ObjectStore,
    Provenance,
    create_index_engine,
    read_header,
)
from dicomrouter.store.schema import instances, job_instances, jobs
from tests.support.synth import make_study

DEST = {"ae_title": "PACS", "host": "127.0.0.1", "port": 4242}


class Pipeline:
    """Receive (minus the network) -> plan; the same calls the receiver makes."""

    def __init__(self, tmp_path: Path, config: dict[str, Any]):
        config.setdefault("storage", {"path": str(tmp_path / "store")})
        self.config = parse_config(config, environ={})
        self.store = ObjectStore(self.config.storage.path, self.config.node.name)
        self.store.prepare()
        self.engine = create_index_engine(self.config.database_url)
        self.index = InstanceIndex(self.engine)
        self.planner = Planner(self.config, self.engine, self.store)
        self.jobs = JobStore(self.engine)

    def receive(self, files: list[Path], calling_ae: str = "CT1") -> None:
        for file in files:
            header = InstanceHeader.from_dataset(read_header(file))
            temp = self.store.tmp / file.name
            shutil.copyfile(file, temp)
            relative = self.store.relative_path(
                header.study_instance_uid, header.series_instance_uid, header.sop_instance_uid
            )
            self.store.commit(temp, relative)
            self.index.record(
                header, relative, file.stat().st_size, Provenance(calling_ae, "R", "10.1.2.3")
            )

    def plan(self, later: float = 0.0) -> None:
        while self.planner.route_new_instances():
            pass
        self.planner.fire_stable_triggers(now=time.time() + later)

    def job_list(self, **filters: Any) -> list[dict[str, Any]]:
        return sorted(list_jobs(self.engine, limit=10_000, **filters), key=lambda j: j["id"])

    def members(self, job_id: int) -> set[str]:
        detail = job_detail(self.engine, job_id)
        assert detail is not None
        return {i["sop_instance_uid"] for i in detail["instances"]}


def uids(files: list[Path]) -> set[str]:
    return {dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files}


def route(**kwargs: Any) -> dict[str, Any]:
    return {"name": kwargs.pop("name", "r"), "to": kwargs.pop("to", ["pacs"]), **kwargs}


def test_instance_trigger_one_job_per_instance(tmp_path: Path) -> None:
    p = Pipeline(tmp_path, {"destinations": {"pacs": DEST}, "routes": [route()]})
    files = make_study(tmp_path / "in", 3)
    p.receive(files)
    p.plan()
    found = p.job_list()
    assert [(j["level"], j["state"], j["total"]) for j in found] == [("instance", "pending", 1)] * 3
    assert set().union(*(p.members(j["id"]) for j in found)) == uids(files)


def test_study_trigger_waits_for_stability_then_sends_whole_study(tmp_path: Path) -> None:
    config = {
        "destinations": {"research": DEST},
        "routes": [
            route(
                to=["research"],
                trigger="study",
                stable_after="30s",
                when={"Modality": "CT", "StudyDescription": {"contains": "HEAD"}},
            )
        ],
    }
    p = Pipeline(tmp_path, config)
    head = make_study(
        tmp_path / "in", 4, study_description="CT HEAD W/O", series_count=2, prefix="H"
    )
    chest = make_study(tmp_path / "in", 2, study_description="CT CHEST", prefix="C")
    p.receive(head + chest)
    p.plan()
    assert p.job_list() == []  # not stable yet
    p.plan(later=31)
    (job,) = p.job_list()
    assert (job["level"], job["destination"], job["routes"]) == ("study", "research", ["r"])
    assert p.members(job["id"]) == uids(head)


def test_matched_forward_sends_only_matching_instances(tmp_path: Path) -> None:
    config = {
        "destinations": {"pacs": DEST},
        "routes": [
            route(
                trigger="study",
                stable_after="1s",
                forward="matched",
                when={"SeriesDescription": {"contains": "KEY"}},
            )
        ],
    }
    p = Pipeline(tmp_path, config)
    files = make_study(tmp_path / "in", 10, series_count=2)
    key_file = files[0]
    ds = dcmread(key_file)
    ds.SeriesDescription = "KEY IMAGES"
    ds.save_as(key_file)
    p.receive(files)
    p.plan(later=2)
    (job,) = p.job_list()
    assert p.members(job["id"]) == uids([key_file])


def test_default_forward_sends_whole_study_for_one_matching_instance(tmp_path: Path) -> None:
    config = {
        "destinations": {"pacs": DEST},
        "routes": [
            route(
                trigger="study", stable_after="1s", when={"SeriesDescription": {"contains": "KEY"}}
            )
        ],
    }
    p = Pipeline(tmp_path, config)
    files = make_study(tmp_path / "in", 6)
    ds = dcmread(files[3])
    ds.SeriesDescription = "KEY IMAGES"
    ds.save_as(files[3])
    p.receive(files)
    p.plan(later=2)
    (job,) = p.job_list()
    assert p.members(job["id"]) == uids(files)


def test_two_routes_same_destination_deliver_once(tmp_path: Path) -> None:
    config = {
        "destinations": {"pacs": DEST},
        "routes": [
            route(name="a", trigger="study", stable_after="1s"),
            route(name="b", trigger="study", stable_after="1s", when={"Modality": "CT"}),
        ],
    }
    p = Pipeline(tmp_path, config)
    files = make_study(tmp_path / "in", 5)
    p.receive(files)
    p.plan(later=2)
    (job,) = p.job_list()
    assert job["routes"] == ["a", "b"]
    assert job["total"] == 5


def test_instance_and_study_routes_to_same_destination_do_not_double_send(tmp_path: Path) -> None:
    config = {
        "destinations": {"pacs": DEST},
        "routes": [route(name="each"), route(name="study", trigger="study", stable_after="1s")],
    }
    p = Pipeline(tmp_path, config)
    files = make_study(tmp_path / "in", 4)
    p.receive(files)
    p.plan(later=2)
    delivered = [m for j in p.job_list() for m in p.members(j["id"])]
    assert sorted(delivered) == sorted(uids(files))


def test_follow_up_sends_only_new_instances(tmp_path: Path) -> None:
    config = {"destinations": {"pacs": DEST}, "routes": [route(trigger="study", stable_after="1s")]}
    p = Pipeline(tmp_path, config)
    first = make_study(tmp_path / "in", 4, prefix="A")
    study_uid = dcmread(first[0]).StudyInstanceUID
    p.receive(first)
    p.plan(later=2)
    (job1,) = p.job_list()
    # The first job is being sent (claimed), so the follow-up cannot join it.
    claim = p.jobs.claim("pacs", "test:1", lease=60)
    assert claim is not None and claim.job_ids == [job1["id"]]
    late = make_study(tmp_path / "in", 3, study_uid=study_uid, prefix="B")
    p.receive(late)
    p.plan()
    assert len(p.job_list()) == 1  # re-armed, waiting for stability again
    p.plan(later=2)
    job1_now, job2 = p.job_list()
    assert p.members(job2["id"]) == uids(late)
    assert p.members(job1_now["id"]) == uids(first)


def test_waiting_job_absorbs_new_instances(tmp_path: Path) -> None:
    p = Pipeline(tmp_path, {"destinations": {"pacs": DEST}, "routes": [route(forward="study")]})
    files = make_study(tmp_path / "in", 3)
    p.receive(files[:1])
    p.plan()
    p.receive(files[1:])
    p.plan()
    (job,) = p.job_list()
    assert job["level"] == "study" and p.members(job["id"]) == uids(files)


def test_calling_ae_and_source_address_pseudo_keys(tmp_path: Path) -> None:
    config = {
        "destinations": {"pacs": DEST},
        "routes": [
            route(when={"CallingAETitle": {"in": ["CT1", "CT2"]}, "SourceAddress": "10.0.0.0/8"})
        ],
    }
    p = Pipeline(tmp_path, config)
    ok = make_study(tmp_path / "in", 2, prefix="OK")
    other = make_study(tmp_path / "in", 2, prefix="NO")
    p.receive(ok, calling_ae="CT2")
    p.receive(other, calling_ae="MR1")
    p.plan()
    delivered = set().union(*(p.members(j["id"]) for j in p.job_list()))
    assert delivered == uids(ok)


def test_overwrite_after_delivery_routes_the_new_copy_again(tmp_path: Path) -> None:
    p = Pipeline(tmp_path, {"destinations": {"pacs": DEST}, "routes": [route()]})
    files = make_study(tmp_path / "in", 1)
    p.receive(files)
    p.plan()
    claim = p.jobs.claim("pacs", "w", lease=60)
    _settle(p, claim, {}, count_attempt=True)
    p.receive(files)  # the same SOP Instance UID again
    p.plan()
    first, second = p.job_list()
    assert (first["state"], second["state"]) == (S.COMPLETED, S.PENDING)
    assert p.members(second["id"]) == uids(files)


def test_overwrite_while_queued_sends_the_newer_copy_once(tmp_path: Path) -> None:
    p = Pipeline(tmp_path, {"destinations": {"pacs": DEST}, "routes": [route()]})
    files = make_study(tmp_path / "in", 1)
    p.receive(files)
    p.plan()
    p.receive(files)
    p.plan()
    (job,) = p.job_list()
    claim = p.jobs.claim("pacs", "w", lease=60)
    assert claim is not None and len(claim.items) == 1


def test_send_window_schedules_jobs(tmp_path: Path) -> None:
    now = time.localtime()
    start = f"{(now.tm_hour + 2) % 24:02d}:00"
    end = f"{(now.tm_hour + 3) % 24:02d}:00"
    p = Pipeline(
        tmp_path,
        {"destinations": {"pacs": {**DEST, "send_window": f"{start}-{end}"}}, "routes": [route()]},
    )
    p.receive(make_study(tmp_path / "in", 1))
    p.plan()
    (job,) = p.job_list()
    assert job["state"] == S.SCHEDULED
    assert job["next_attempt_at"] > time.time() + 3600
    assert p.jobs.claim("pacs", "w", lease=10) is None


def test_pending_jobs_of_a_closed_window_become_scheduled(tmp_path: Path) -> None:
    """A job left pending when the window closed (a retry that fell due late, a claim
    stopped at closing time) is marked scheduled for the next opening, keeping a
    later retry time; while the window is open nothing changes."""
    now = time.localtime()
    closed = f"{(now.tm_hour + 2) % 24:02d}:00-{(now.tm_hour + 3) % 24:02d}:00"
    p = Pipeline(tmp_path, {"destinations": {"pacs": DEST}, "routes": [route()]})
    p.receive(make_study(tmp_path / "in", 2))
    p.plan()
    first, second = p.job_list()
    late = time.time() + 6 * 3600  # a retry due after the window has opened
    with p.engine.begin() as conn:
        conn.execute(jobs.update().where(jobs.c.id == second["id"]).values(next_attempt_at=late))
    always = DicomDestinationConfig(**DEST)
    assert p.jobs.defer_to_window("pacs", always, time.time()) == 0  # no window
    windowed = DicomDestinationConfig(**DEST, send_window=closed)  # type: ignore[arg-type]
    assert p.jobs.defer_to_window("pacs", windowed, time.time()) == 2
    after = {job["id"]: job for job in p.job_list()}
    assert {job["state"] for job in after.values()} == {S.SCHEDULED}
    opens = after[first["id"]]["next_attempt_at"]
    assert time.time() + 3600 < opens < time.time() + 3 * 3600
    assert after[second["id"]]["next_attempt_at"] == pytest.approx(late)
    assert p.jobs.defer_to_window("pacs", windowed, time.time()) == 0  # none pending now


def _settle(p: Pipeline, claim, states: dict[str, str], count_attempt: bool) -> None:  # type: ignore[no-untyped-def]
    results = [
        ItemResult(
            item.job_id,
            item.instance_id,
            states.get(item.sop_instance_uid, S.ITEM_COMPLETED),
            0xA700 if states.get(item.sop_instance_uid) == S.ITEM_PENDING else 0,
            "x",
        )
        for item in claim.items
    ]
    p.jobs.record_results(results)
    p.jobs.finish(
        claim,
        p.config.destinations["pacs"],
        count_attempt=count_attempt,
        unavailable_delay=5.0,
        message="0xA700 Out of resources",
        outcome="retry",
        sent=0,
        failed=0,
    )


def test_retry_resends_only_what_did_not_arrive_then_fails_after_max_attempts(
    tmp_path: Path,
) -> None:
    dest = {**DEST, "retry": {"max_attempts": 2, "initial_delay": "10s", "max_delay": "1m"}}
    p = Pipeline(tmp_path, {"destinations": {"pacs": dest}, "routes": [route(forward="study")]})
    files = make_study(tmp_path / "in", 3)
    p.receive(files)
    p.plan()
    claim = p.jobs.claim("pacs", "w", lease=60)
    assert claim is not None and len(claim.items) == 3
    bad = claim.items[0].sop_instance_uid
    _settle(p, claim, {bad: S.ITEM_PENDING}, count_attempt=True)
    (job,) = p.job_list()
    assert job["state"] == S.PENDING and job["attempts"] == 1
    assert 7 <= job["next_attempt_at"] - time.time() <= 13  # 10s +/- 20% jitter
    assert p.jobs.claim("pacs", "w", lease=60) is None  # backing off
    claim = p.jobs.claim("pacs", "w", lease=60, now=time.time() + 20)
    assert claim is not None and [i.sop_instance_uid for i in claim.items] == [bad]
    _settle(p, claim, {bad: S.ITEM_PENDING}, count_attempt=True)
    (job,) = p.job_list()
    assert job["state"] == S.FAILED and job["delivered"] == 2
    # Manual retry sends the failed instance only.
    assert p.jobs.retry([job["id"]]) == 1
    claim = p.jobs.claim("pacs", "w", lease=60)
    assert claim is not None and [i.sop_instance_uid for i in claim.items] == [bad]


def test_unreachable_destination_does_not_use_up_attempts(tmp_path: Path) -> None:
    dest = {**DEST, "retry": {"max_attempts": 1}}
    p = Pipeline(tmp_path, {"destinations": {"pacs": dest}, "routes": [route()]})
    p.receive(make_study(tmp_path / "in", 1))
    p.plan()
    for _ in range(5):
        claim = p.jobs.claim("pacs", "w", lease=60, now=time.time() + 3600)
        assert claim is not None
        p.jobs.finish(
            claim,
            p.config.destinations["pacs"],
            count_attempt=False,
            unavailable_delay=5.0,
            message="connection refused",
            outcome="unavailable",
            sent=0,
            failed=0,
        )
    (job,) = p.job_list()
    assert (job["state"], job["attempts"], job["connection_failures"]) == (S.PENDING, 0, 5)
    assert len(job_detail(p.engine, job["id"])["attempts"]) == 5  # type: ignore[index]
    assert p.jobs.retry([job["id"]]) == 1  # a manual retry starts both counts again
    (job,) = p.job_list()
    assert (job["attempts"], job["connection_failures"]) == (0, 0)


def test_warning_and_permanent_failure_states(tmp_path: Path) -> None:
    p = Pipeline(tmp_path, {"destinations": {"pacs": DEST}, "routes": [route(forward="study")]})
    files = make_study(tmp_path / "in", 2)
    p.receive(files)
    p.plan()
    claim = p.jobs.claim("pacs", "w", lease=60)
    assert claim is not None
    first, second = (i.sop_instance_uid for i in claim.items)
    _settle(p, claim, {first: S.ITEM_WARNING}, count_attempt=False)
    assert p.job_list()[0]["state"] == S.WARNING


def test_expired_lease_is_recovered_and_restart_reclaims_own_jobs(tmp_path: Path) -> None:
    p = Pipeline(tmp_path, {"destinations": {"pacs": DEST}, "routes": [route()]})
    p.receive(make_study(tmp_path / "in", 2))
    p.plan()
    assert p.jobs.claim("pacs", "nodeA:1:pacs:0", lease=60, max_jobs=1) is not None
    assert p.jobs.claim("pacs", "nodeB:1:pacs:0", lease=1, max_jobs=1) is not None
    assert p.jobs.recover() == 0
    assert p.jobs.recover(now=time.time() + 2) == 1  # nodeB's lease expired
    assert p.jobs.recover(owner_prefix="nodeA:") == 1  # nodeA restarted
    assert {j["state"] for j in p.job_list()} == {S.PENDING}


def test_a_restarted_node_reclaims_its_own_leases_only_whatever_its_name(tmp_path: Path) -> None:
    """``_`` is a LIKE wildcard: node ``a_b`` must not take node ``axb``'s leases
    (another node, alive, still sending them)."""
    p = Pipeline(
        tmp_path, {"node": {"name": "a_b"}, "destinations": {"pacs": DEST}, "routes": [route()]}
    )
    p.receive(make_study(tmp_path / "in", 2))
    p.plan()
    mine = owner_prefix(p.config)
    assert mine == "a_b:"
    assert p.jobs.claim("pacs", f"{mine}1:pacs:0", lease=60, max_jobs=1) is not None
    assert p.jobs.claim("pacs", "axb:1:pacs:0", lease=60, max_jobs=1) is not None
    assert p.jobs.recover(owner_prefix=mine) == 1
    states = {j["lease_owner"] or "": j["state"] for j in p.job_list()}
    assert states == {"": S.PENDING, "axb:1:pacs:0": S.IN_PROGRESS}


def test_cancel_and_retry(tmp_path: Path) -> None:
    p = Pipeline(tmp_path, {"destinations": {"pacs": DEST}, "routes": [route()]})
    p.receive(make_study(tmp_path / "in", 2))
    p.plan()
    ids = [j["id"] for j in p.job_list()]
    assert p.jobs.cancel(ids) == 2
    assert {j["state"] for j in p.job_list()} == {S.CANCELED}
    assert p.jobs.claim("pacs", "w", lease=60) is None
    assert p.jobs.cancel(ids) == 0  # already final
    assert p.jobs.retry(ids) == 2
    claim = p.jobs.claim("pacs", "w", lease=60)
    assert claim is not None and len(claim.items) == 2


def test_canceled_while_in_progress_is_noticed_on_renew(tmp_path: Path) -> None:
    p = Pipeline(tmp_path, {"destinations": {"pacs": DEST}, "routes": [route()]})
    p.receive(make_study(tmp_path / "in", 1))
    p.plan()
    claim = p.jobs.claim("pacs", "w", lease=60)
    assert claim is not None
    p.jobs.cancel(claim.job_ids)
    assert p.jobs.renew(claim, 60) == set(claim.job_ids)
    _settle(p, claim, {}, count_attempt=False)
    with p.engine.connect() as conn:
        assert conn.execute(select(jobs.c.state)).scalar_one() == S.CANCELED


@pytest.mark.parametrize("level", ["series", "patient"])
def test_forward_levels(tmp_path: Path, level: str) -> None:
    p = Pipeline(
        tmp_path,
        {
            "destinations": {"pacs": DEST},
            "routes": [route(forward=level, when={"SeriesNumber": 1})],
        },
    )
    files = make_study(tmp_path / "in", 4, series_count=2)
    p.receive(files)
    p.plan()
    (job,) = p.job_list()
    assert job["level"] == level
    series = {dcmread(f).SeriesNumber: [] for f in files}
    for f in files:
        series[dcmread(f).SeriesNumber].append(f)
    expected = uids(series[1]) if level == "series" else uids(files)
    assert p.members(job["id"]) == expected


def test_routes_at_different_levels_to_one_destination_queue_each_instance_once(
    tmp_path: Path,
) -> None:
    # Regression: the instance-level and series-level plans of one batch both named
    # the same instances for the same destination; the duplicate row broke the unique
    # key and wedged the planner on that batch forever.
    config = {
        "destinations": {"pacs": DEST},
        "routes": [route(name="each"), route(name="series", forward="series")],
    }
    p = Pipeline(tmp_path, config)
    files = make_study(tmp_path / "in", 4)
    p.receive(files)
    p.plan()
    delivered = [m for j in p.job_list() for m in p.members(j["id"])]
    assert sorted(delivered) == sorted(uids(files))
    with p.engine.connect() as conn:
        assert conn.execute(select(instances.c.id).where(instances.c.routed == 0)).all() == []


def test_study_and_series_forward_of_one_trigger_do_not_conflict(tmp_path: Path) -> None:
    config = {
        "destinations": {"pacs": DEST},
        "routes": [
            route(name="study", trigger="study", stable_after="1s", forward="study"),
            route(name="series", trigger="study", stable_after="1s", forward="series"),
        ],
    }
    p = Pipeline(tmp_path, config)
    files = make_study(tmp_path / "in", 4, series_count=2)
    p.receive(files)
    p.plan(later=2)
    delivered = [m for j in p.job_list() for m in p.members(j["id"])]
    assert sorted(delivered) == sorted(uids(files))


def test_claim_keeps_only_jobs_whose_instances_it_loaded(tmp_path: Path) -> None:
    # Regression: jobs claimed beyond the item limit used up attempts without a send.
    p = Pipeline(tmp_path, {"destinations": {"pacs": DEST}, "routes": [route()]})
    p.receive(make_study(tmp_path / "in", 15))
    p.plan()
    claim = p.jobs.claim("pacs", "w", lease=60, max_items=10)
    assert claim is not None and len(claim.job_ids) == 10 and len(claim.items) == 10
    rest = [j for j in p.job_list() if j["id"] not in claim.job_ids]
    assert [(j["state"], j["lease_owner"], j["attempts"]) for j in rest] == [
        ("pending", None, 0)
    ] * 5


def test_a_job_cut_by_the_item_limit_continues_without_an_attempt(tmp_path: Path) -> None:
    p = Pipeline(tmp_path, {"destinations": {"pacs": DEST}, "routes": [route(forward="study")]})
    p.receive(make_study(tmp_path / "in", 3))
    p.plan()
    claim = p.jobs.claim("pacs", "w", lease=60, max_items=2)
    assert claim is not None and len(claim.items) == 2
    p.jobs.record_results(
        [ItemResult(i.job_id, i.instance_id, S.ITEM_COMPLETED, 0, "ok") for i in claim.items]
    )
    p.jobs.finish(
        claim,
        p.config.destinations["pacs"],
        count_attempt=True,
        unavailable_delay=0.0,
        message="",
        outcome="completed",
        sent=2,
        failed=0,
        transient_jobs=set(),
    )
    (job,) = p.job_list()
    assert (job["state"], job["attempts"], job["delivered"]) == (S.PENDING, 0, 2)
    assert job["next_attempt_at"] <= time.time()
    claim = p.jobs.claim("pacs", "w", lease=60)
    assert claim is not None and len(claim.items) == 1


def test_renew_reports_a_lease_lost_to_recovery(tmp_path: Path) -> None:
    p = Pipeline(tmp_path, {"destinations": {"pacs": DEST}, "routes": [route()]})
    p.receive(make_study(tmp_path / "in", 1))
    p.plan()
    first = p.jobs.claim("pacs", "w1", lease=1)
    assert first is not None and p.jobs.renew(first, 1) == set()
    assert p.jobs.recover(now=time.time() + 5) == 1  # w1 looked dead
    second = p.jobs.claim("pacs", "w2", lease=60)
    assert second is not None and second.job_ids == first.job_ids
    assert p.jobs.renew(first, 60) == set(first.job_ids)  # w1 must stop sending
    assert p.jobs.renew(second, 60) == set()


def test_give_up_fails_only_jobs_untouched_for_the_whole_window(tmp_path: Path) -> None:
    """give_up counts time a job waited untouched: new instances joining a waiting
    job, or a retry, restart its clock."""
    p = Pipeline(tmp_path, {"destinations": {"pacs": DEST}, "routes": [route(forward="study")]})
    files = make_study(tmp_path / "in", 3)
    p.receive(files[:1])
    p.plan()
    (job,) = p.job_list()
    with p.engine.begin() as conn:  # queued two hours ago
        conn.execute(jobs.update().values(updated_at=time.time() - 7200))
    p.receive(files[1:])
    p.plan()  # two new instances join the waiting job
    assert p.jobs.give_up("pacs", time.time() - 3600, "gave up") == ([], 0)
    failed, undelivered = p.jobs.give_up("pacs", time.time() + 1, "gave up: test")
    assert failed == [job["id"]] and undelivered == 3
    (after,) = p.job_list()
    assert after["state"] == "failed" and after["last_error"] == "gave up: test"


def test_give_up_waits_for_the_outage_not_the_job_age(tmp_path: Path) -> None:
    """The worker gives up only after a failed probe, once the destination itself has
    been unreachable for give_up_after, and never while an operator paused it."""
    from types import SimpleNamespace

    from dicomrouter.dispatch.worker import DestinationWorker

    calls: list[float] = []
    health = SimpleNamespace(
        paused_since=time.time() - 60,
        unreachable=True,
        last_error="down",
        database_time=time.time,  # one machine: the database's clock is this one
    )
    fake = SimpleNamespace(
        dest=SimpleNamespace(give_up_after=3600.0),
        dest_name="pacs",
        health=health,
        jobs=SimpleNamespace(give_up=lambda name, since, reason: (calls.append(since), ([], 0))[1]),
    )
    DestinationWorker._give_up_if_due(fake)  # type: ignore[arg-type]
    assert calls == []  # down for a minute: old jobs are not failed yet
    health.paused_since = time.time() - 7200
    health.unreachable = False  # paused by an operator, or answering again
    DestinationWorker._give_up_if_due(fake)  # type: ignore[arg-type]
    assert calls == []
    health.unreachable = True
    DestinationWorker._give_up_if_due(fake)  # type: ignore[arg-type]
    assert len(calls) == 1 and abs(calls[0] - (time.time() - 3600)) < 5


def test_a_successful_probe_pulls_backed_off_jobs_forward(tmp_path: Path) -> None:
    """Jobs waiting out a long backoff (e.g. after 0xA700 from the destination) are
    due at once when a probe of the paused destination succeeds, not in 10 minutes."""
    from types import SimpleNamespace

    from dicomrouter.dispatch.worker import DestinationWorker

    p = Pipeline(tmp_path, {"destinations": {"pacs": DEST}, "routes": [route()]})
    p.receive(make_study(tmp_path / "in", 2))
    p.plan()
    with p.engine.begin() as conn:
        conn.execute(jobs.update().values(next_attempt_at=time.time() + 600))
    resumed: list[bool] = []
    fake = SimpleNamespace(
        dest=p.config.destinations["pacs"],
        dest_name="pacs",
        sender=SimpleNamespace(probe=lambda: None),  # the destination answers
        health=SimpleNamespace(resume=lambda: resumed.append(True)),
        jobs=p.jobs,
    )
    DestinationWorker._probe(fake)  # type: ignore[arg-type]
    assert resumed == [True]
    due = [job["next_attempt_at"] for job in p.job_list()]
    assert due and all(at <= time.time() for at in due), due


@pytest.mark.parametrize("backlog", [1, 1000], ids=["backlog", "few_due"])
def test_a_claim_takes_the_most_urgent_due_jobs_oldest_first(
    tmp_path: Path, backlog: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whichever index the claim reads (a backlog: ix_jobs_waiting in claim order;
    a few due: ix_jobs_claim, sorted), it takes the same jobs: due ones, the most
    urgent first, then the oldest; jobs backing off are passed over."""
    from dicomrouter.queue import jobs as queue_jobs

    monkeypatch.setattr(queue_jobs, "BACKLOG", backlog)
    p = Pipeline(tmp_path, {"destinations": {"pacs": DEST}, "routes": [route()]})
    p.receive(make_study(tmp_path / "in", 8))
    p.plan()
    ids = [job["id"] for job in p.job_list()]
    priorities = [0, 10, -10, 10, 0, 10, 0, 0]
    backing_off = {ids[3], ids[6]}
    with p.engine.begin() as conn:
        for job_id, priority in zip(ids, priorities, strict=True):
            later = time.time() + 600 if job_id in backing_off else 0.0
            conn.execute(
                jobs.update()
                .where(jobs.c.id == job_id)
                .values(priority=priority, next_attempt_at=later)
            )
    claim = p.jobs.claim("pacs", "w", lease=60, max_jobs=4)
    assert claim is not None
    assert sorted(claim.job_ids) == sorted([ids[1], ids[5], ids[0], ids[4]])
    rest = p.jobs.claim("pacs", "w2", lease=60, max_jobs=4)
    assert rest is not None and sorted(rest.job_ids) == sorted([ids[7], ids[2]])
    assert p.jobs.claim("pacs", "w3", lease=60) is None


def test_waking_a_destination_writes_only_the_jobs_that_wait_for_something(
    tmp_path: Path,
) -> None:
    """A resume brings forward what backs off and what waits for a send window;
    a job due already is left as it is (on a long queue, rewriting every waiting job
    held the write lock for seconds)."""
    p = Pipeline(tmp_path, {"destinations": {"pacs": DEST}, "routes": [route()]})
    p.receive(make_study(tmp_path / "in", 3))
    p.plan()
    due, backing_off, scheduled = p.job_list()
    with p.engine.begin() as conn:
        conn.execute(
            jobs.update()
            .where(jobs.c.id == backing_off["id"])
            .values(next_attempt_at=time.time() + 600)
        )
        conn.execute(
            jobs.update()
            .where(jobs.c.id == scheduled["id"])
            .values(state=S.SCHEDULED, next_attempt_at=time.time() - 60)
        )
    assert p.jobs.wake_destination("pacs", p.config.destinations["pacs"]) == 2
    after = {job["id"]: job for job in p.job_list()}
    assert {job["state"] for job in after.values()} == {S.PENDING}
    assert all(job["next_attempt_at"] <= time.time() for job in after.values())
    assert after[due["id"]]["updated_at"] == pytest.approx(due["updated_at"])
    assert after[due["id"]]["next_attempt_at"] == pytest.approx(due["next_attempt_at"])
    assert p.jobs.wake_destination("pacs", p.config.destinations["pacs"]) == 0


def test_a_job_interrupted_three_times_in_a_row_fails_instead_of_looping(tmp_path: Path) -> None:
    """An object that kills the dispatch process mid-send must not be claimed again
    after every restart for ever (holding up every destination): each recovered
    lease is an 'interrupted' attempt, and the third in a row fails the job, its
    undelivered instances with it. A finished attempt in between resets the count."""
    from dicomrouter.queue.jobs import MAX_INTERRUPTIONS

    p = Pipeline(tmp_path, {"destinations": {"pacs": DEST}, "routes": [route()]})
    p.receive(make_study(tmp_path / "in", 1))
    p.plan()

    def crash_during_delivery() -> None:
        claim = p.jobs.claim("pacs", "nodeA:111:pacs:0", lease=60)
        assert claim is not None
        assert p.jobs.recover(owner_prefix="nodeA:") == 1  # the restarted process

    crash_during_delivery()
    crash_during_delivery()
    claim = p.jobs.claim("pacs", "nodeA:112:pacs:0", lease=60)
    assert claim is not None
    p.jobs.finish(  # a delivery that ended normally, if unsuccessfully
        claim, p.config.destinations["pacs"], count_attempt=True, unavailable_delay=0.0,
        message="refused", outcome="retry", sent=0, failed=0,
    )  # fmt: skip
    with p.engine.begin() as conn:  # due again now
        conn.execute(jobs.update().values(next_attempt_at=time.time() - 1))
    for _ in range(MAX_INTERRUPTIONS - 1):
        crash_during_delivery()
        (job,) = p.job_list()
        assert job["state"] == "pending", job
    crash_during_delivery()
    (job,) = p.job_list()
    assert job["state"] == "failed"
    assert "interrupted 3 times in a row" in job["last_error"]
    assert job["attempts"] == 6  # five interruptions and the finished attempt
    with p.engine.connect() as conn:
        states = conn.execute(select(job_instances.c.state)).scalars().all()
    assert states == ["failed"]
    assert p.jobs.claim("pacs", "nodeA:113:pacs:0", lease=60) is None
    assert p.jobs.retry([job["id"]]) == 1  # by hand, once the cause is fixed


def test_a_worker_marks_waiting_jobs_scheduled_while_its_window_is_closed() -> None:
    """The first worker of a destination, at most every 30 s; the others never."""
    from types import SimpleNamespace

    from dicomrouter.dispatch.worker import DestinationWorker

    now = time.localtime()
    closed = f"{(now.tm_hour + 2) % 24:02d}:00-{(now.tm_hour + 3) % 24:02d}:00"
    calls: list[str] = []
    fake = SimpleNamespace(
        dest=DicomDestinationConfig(**DEST, send_window=closed),  # type: ignore[arg-type]
        dest_name="pacs",
        index=0,
        _deferred_at=0.0,
        health=SimpleNamespace(paused=False),
        jobs=SimpleNamespace(defer_to_window=lambda name, dest: calls.append(name) or 0),
    )
    fake._defer_to_window = lambda: DestinationWorker._defer_to_window(fake)  # type: ignore[arg-type]
    assert DestinationWorker._tick(fake) is False  # type: ignore[arg-type]
    assert DestinationWorker._tick(fake) is False  # type: ignore[arg-type]
    assert calls == ["pacs"]  # once, not every tick
    fake._deferred_at -= 31
    DestinationWorker._tick(fake)  # type: ignore[arg-type]
    assert calls == ["pacs", "pacs"]
    fake.index, fake._deferred_at = 1, 0.0
    DestinationWorker._tick(fake)  # type: ignore[arg-type]
    assert calls == ["pacs", "pacs"]
