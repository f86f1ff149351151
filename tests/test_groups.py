"""Groups (``type: group``) at the index level: the real planner and job store on a
real SQLite index, as in test_queue.py. Which member each study goes to (failover,
round_robin, least_queued), that a study stays on one member, and what moving the
waiting work of a paused member does."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from sqlalchemy import insert, select, update

from dicomrouter.config import ConfigError, GroupDestinationConfig, load_config_text
from dicomrouter.config.lint import lint
from dicomrouter.queue import ItemResult, groups
from dicomrouter.queue import states as S
from dicomrouter.store.schema import (
    destination_state,
    group_affinity,
    instances,
    job_instances,
    jobs,
)
from tests.support.synth import make_study
from tests.test_queue import Pipeline, route

M1 = {"ae_title": "M1", "host": "127.0.0.1", "port": 4001}
M2 = {"ae_title": "M2", "host": "127.0.0.1", "port": 4002}
M3 = {"ae_title": "M3", "host": "127.0.0.1", "port": 4003}


def pipeline(tmp_path: Path, strategy: str = "failover", **extra: Any) -> Pipeline:
    config: dict[str, Any] = {
        "destinations": {
            "m1": M1,
            "m2": M2,
            "pair": {"type": "group", "members": ["m1", "m2"], "strategy": strategy},
        },
        "routes": [route(to=["pair"])],
    }
    config.update(extra)
    return Pipeline(tmp_path, config)


def study(tmp_path: Path, n: int, prefix: str) -> list[Path]:
    return make_study(tmp_path / "in", n, prefix=prefix)


def study_uid(files: list[Path]) -> str:
    return str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


def sops(files: list[Path]) -> set[str]:
    return {dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files}


def where(p: Pipeline, files: list[Path]) -> dict[str, set[str]]:
    """destination -> SOP Instance UIDs of ``files``' study queued or delivered there
    (pending, in progress or delivered)."""
    found: dict[str, set[str]] = {}
    for job in p.job_list(study_uid=study_uid(files)):
        if job["state"] == S.CANCELED:
            continue
        found.setdefault(job["destination"], set()).update(p.members(job["id"]))
    return found


def set_state(p: Pipeline, name: str, state: str = "paused", admin: int = 0) -> None:
    with p.engine.begin() as conn:
        exists = conn.execute(
            select(destination_state.c.name).where(destination_state.c.name == name)
        ).first()
        values = {"state": state, "admin_paused": admin, "updated_at": time.time()}
        if exists:
            conn.execute(
                update(destination_state).where(destination_state.c.name == name).values(values)
            )
        else:
            conn.execute(insert(destination_state).values(name=name, **values))


def deliver(p: Pipeline, dest: str, max_jobs: int) -> set[str]:
    """A worker of ``dest`` claims ``max_jobs`` jobs and delivers them; returns what
    it delivered."""
    claim = p.jobs.claim(dest, "w", lease=60, max_jobs=max_jobs)
    assert claim is not None
    p.jobs.record_results(
        [ItemResult(i.job_id, i.instance_id, S.ITEM_COMPLETED, 0, "") for i in claim.items]
    )
    p.jobs.finish(
        claim,
        p.config.destinations[dest],
        count_attempt=True,
        unavailable_delay=5.0,
        message="",
        outcome="completed",
        sent=len(claim.items),
        failed=0,
    )
    return {i.sop_instance_uid for i in claim.items}


def move(p: Pipeline) -> list[groups.GroupMove]:
    return groups.move_waiting(p.engine, p.config, time.time())


def queue_directly(tmp_path: Path, member: str, files: list[Path]) -> None:
    """Queue ``files`` for ``member`` by a direct route, as a configuration before a
    reload did: a group's member is never sent to directly under one configuration
    (refused at load), but what an earlier one queued is still there."""
    before = Pipeline(
        tmp_path,
        {"destinations": {"m1": M1, "m2": M2, "m3": M3}, "routes": [route(to=[member])]},
    )
    before.receive(files)
    before.plan()


# -- choosing a member -------------------------------------------------------------


def test_failover_sends_every_study_to_the_first_member_that_is_up(tmp_path: Path) -> None:
    p = pipeline(tmp_path)
    a, b = study(tmp_path, 3, "A"), study(tmp_path, 2, "B")
    p.receive(a + b)
    p.plan()
    assert where(p, a) == {"m1": sops(a)} and where(p, b) == {"m1": sops(b)}
    assert {job["via_group"] for job in p.job_list()} == {"pair"}
    set_state(p, "m1", "paused")  # unreachable: probed
    c = study(tmp_path, 2, "C")
    p.receive(c)
    p.plan()
    assert where(p, c) == {"m2": sops(c)}
    set_state(p, "m1", "ok")  # back: new studies go to the first again
    d = study(tmp_path, 1, "D")
    p.receive(d)
    p.plan()
    assert where(p, d) == {"m1": sops(d)}


def test_an_operator_pause_or_a_disabled_member_counts_as_down(tmp_path: Path) -> None:
    p = pipeline(tmp_path)
    set_state(p, "m1", "ok", admin=1)
    a = study(tmp_path, 2, "A")
    p.receive(a)
    p.plan()
    assert where(p, a) == {"m2": sops(a)}
    q = pipeline(
        tmp_path / "q",
        destinations={
            "m1": {**M1, "enabled": False},
            "m2": M2,
            "pair": {"type": "group", "members": ["m1", "m2"]},
        },
    )
    b = study(tmp_path, 1, "B")
    q.receive(b)
    q.plan()
    assert where(q, b) == {"m2": sops(b)}


def test_round_robin_alternates_studies_and_keeps_each_whole(tmp_path: Path) -> None:
    p = pipeline(tmp_path, "round_robin")
    studies = [study(tmp_path, 3, prefix) for prefix in "ABCD"]
    for files in studies:  # one planning pass each, as studies arrive one after another
        p.receive(files)
        p.plan()
    placed = [where(p, files) for files in studies]
    assert placed == [
        {"m1": sops(studies[0])},
        {"m2": sops(studies[1])},
        {"m1": sops(studies[2])},
        {"m2": sops(studies[3])},
    ]


def test_round_robin_skips_a_member_that_is_down_and_its_turn_is_persisted(
    tmp_path: Path,
) -> None:
    p = pipeline(
        tmp_path,
        "round_robin",
        destinations={
            "m1": M1,
            "m2": M2,
            "m3": M3,
            "trio": {"type": "group", "members": ["m1", "m2", "m3"], "strategy": "round_robin"},
        },
        routes=[route(to=["trio"])],
    )
    a = study(tmp_path, 1, "A")
    p.receive(a)
    p.plan()
    set_state(p, "m2", "paused")
    b = study(tmp_path, 1, "B")
    p.receive(b)
    p.plan()
    # A fresh planner (a restart) continues the rotation from the index.
    p.planner = type(p.planner)(p.config, p.engine, p.store)
    c = study(tmp_path, 1, "C")
    p.receive(c)
    p.plan()
    assert [set(where(p, s)) for s in (a, b, c)] == [{"m1"}, {"m3"}, {"m1"}]


def test_least_queued_chooses_the_member_with_the_fewest_waiting_instances(
    tmp_path: Path,
) -> None:
    p = pipeline(tmp_path, "least_queued")
    busy = make_study(tmp_path / "in", 4, prefix="X", patient_id="BUSY")
    p.receive(busy)
    p.plan()
    assert where(p, busy) == {"m1": sops(busy)}  # both empty: the first member
    a, b = study(tmp_path, 2, "A"), study(tmp_path, 5, "B")
    p.receive(a)
    p.plan()
    assert where(p, a) == {"m2": sops(a)}  # m1 has 4 waiting, m2 none
    p.receive(b)
    p.plan()
    assert where(p, b) == {"m2": sops(b)}  # m1: 4, m2: 2
    c = study(tmp_path, 1, "C")
    p.receive(c)
    p.plan()
    assert where(p, c) == {"m1": sops(c)}  # m1: 4, m2: 7


def test_least_queued_counts_what_one_pass_assigns(tmp_path: Path) -> None:
    p = pipeline(tmp_path, "least_queued")
    a, b = study(tmp_path, 3, "A"), study(tmp_path, 3, "B")
    p.receive(a + b)
    p.plan()  # one pass: the second study sees the first's instances
    assert {*where(p, a), *where(p, b)} == {"m1", "m2"}


def test_least_queued_counts_late_instances_of_known_studies_in_the_same_pass(
    tmp_path: Path,
) -> None:
    p = pipeline(tmp_path, "least_queued")
    x = study(tmp_path, 1, "X")
    p.receive(x)
    p.plan()
    assert deliver(p, "m1", max_jobs=10) == sops(x)  # m1: nothing waiting
    queue_directly(tmp_path, "m2", make_study(tmp_path / "in", 2, prefix="B"))  # m2: 2
    late = make_study(tmp_path / "in", 5, prefix="L", study_uid=study_uid(x))
    y = study(tmp_path, 1, "Y")
    p.receive(late + y)
    p.plan()  # one pass: X's 5 late instances go to m1 first, then Y is placed
    assert where(p, x + late) == {"m1": sops(x + late)}
    assert where(p, y) == {"m2": sops(y)}


def test_a_study_keeps_its_member_for_instances_that_arrive_later(tmp_path: Path) -> None:
    p = pipeline(tmp_path, "round_robin")
    uid = "1.2.826.0.1.3680043.8.498.424242"
    first = make_study(tmp_path / "in", 2, prefix="A", study_uid=uid)
    p.receive(first)
    p.plan()
    others = [study(tmp_path, 2, prefix) for prefix in "BC"]
    for files in others:
        p.receive(files)
        p.plan()
    later = make_study(tmp_path / "in", 3, prefix="L", study_uid=uid)
    p.receive(later)
    p.plan()  # m2's turn, but the study is on m1
    assert where(p, first + later) == {"m1": sops(first + later)}
    assert [where(p, files) for files in others] == [
        {"m2": sops(others[0])},
        {"m1": sops(others[1])},
    ]


def test_a_study_trigger_sends_the_whole_study_to_one_member(tmp_path: Path) -> None:
    p = pipeline(tmp_path, "round_robin", routes=[route(to=["pair"], trigger="study")])
    a = make_study(tmp_path / "in", 6, prefix="A", series_count=3)
    p.receive(a)
    p.plan(later=120)
    (job,) = p.job_list()
    assert (job["destination"], job["level"], job["via_group"]) == ("m1", "study", "pair")
    assert p.members(job["id"]) == sops(a)


def test_with_no_member_up_work_waits_on_the_strategys_member(tmp_path: Path) -> None:
    p = pipeline(tmp_path)
    set_state(p, "m1", "paused")
    set_state(p, "m2", "paused")
    a = study(tmp_path, 2, "A")
    p.receive(a)
    p.plan()
    assert where(p, a) == {"m1": sops(a)}
    assert move(p) == []  # nowhere to move to
    set_state(p, "m2", "ok")
    (moved,) = move(p)
    assert (moved.source, moved.target, moved.moved) == ("m1", "m2", 2)
    assert where(p, a) == {"m2": sops(a)}


# -- moving the waiting work of a paused member -------------------------------------


def test_a_paused_members_waiting_study_moves_whole_to_the_next_member(tmp_path: Path) -> None:
    p = pipeline(tmp_path)
    a = study(tmp_path, 5, "A")
    p.receive(a)
    p.plan()
    delivered = deliver(p, "m1", max_jobs=2)  # two of five instances reached m1
    assert len(delivered) == 2
    set_state(p, "m1", "paused")
    (moved,) = move(p)
    assert (moved.group, moved.source, moved.target) == ("pair", "m1", "m2")
    assert (moved.moved, moved.resent) == (3, 2)
    # m2 gets the whole study (the part m1 already had too); m1 keeps its part.
    placed = where(p, a)
    assert placed == {"m2": sops(a), "m1": delivered}
    canceled = [j for j in p.job_list(study_uid=study_uid(a)) if j["state"] == S.CANCELED]
    assert len(canceled) == 3
    assert {j["last_error"] for j in canceled} == {"moved to m2 (group pair: m1 is paused)"}
    assert {j["via_group"] for j in p.job_list(destination="m2")} == {"pair"}
    with p.engine.connect() as conn:
        member = conn.execute(
            select(group_affinity.c.member).where(
                group_affinity.c.study_instance_uid == study_uid(a)
            )
        ).scalar()
    assert member == "m2"
    # Idempotent: nothing is left waiting for m1.
    assert move(p) == []
    assert where(p, a) == {"m2": sops(a), "m1": delivered}
    # The study's later instances follow it to m2, even once m1 is back.
    set_state(p, "m1", "ok")
    later = make_study(tmp_path / "in", 2, prefix="L", study_uid=study_uid(a))
    p.receive(later)
    p.plan()
    assert where(p, a + later) == {"m2": sops(a + later), "m1": delivered}


def test_a_study_delivered_before_its_member_went_down_follows_its_late_instances(
    tmp_path: Path,
) -> None:
    """Nothing waits for m1 (it had the whole study) when a late instance of the
    study arrives while m1 is down: the planner moves the study to m2, whole."""
    p = pipeline(tmp_path)
    a = study(tmp_path, 3, "A")
    p.receive(a)
    p.plan()
    assert deliver(p, "m1", max_jobs=10) == sops(a)
    set_state(p, "m1", "paused")
    assert move(p) == []  # nothing waits for m1
    later = make_study(tmp_path / "in", 1, prefix="L", study_uid=study_uid(a))
    p.receive(later)
    p.plan()
    assert where(p, a + later) == {"m1": sops(a), "m2": sops(a + later)}


def test_a_late_instance_waits_with_its_study_while_a_claim_is_on_the_wire(
    tmp_path: Path,
) -> None:
    """Paused by an operator while a batch is being sent (it finishes): the study
    stays on m1 until the claim settles, then moves whole, what that claim delivered
    included."""
    p = pipeline(tmp_path)
    a = study(tmp_path, 3, "A")
    p.receive(a)
    p.plan()
    claim = p.jobs.claim("m1", "w", lease=60, max_jobs=1)
    assert claim is not None
    set_state(p, "m1", "ok", admin=1)
    later = make_study(tmp_path / "in", 1, prefix="L", study_uid=study_uid(a))
    p.receive(later)
    p.plan()
    assert where(p, a + later) == {"m1": sops(a + later)}
    assert move(p) == []
    p.jobs.record_results(
        [ItemResult(i.job_id, i.instance_id, S.ITEM_COMPLETED, 0, "") for i in claim.items]
    )
    p.jobs.finish(claim, p.config.destinations["m1"], True, 5.0, "", "completed", 1, 0)
    (moved,) = move(p)
    assert (moved.moved, moved.resent) == (3, 1)
    assert where(p, a + later) == {
        "m1": {i.sop_instance_uid for i in claim.items},
        "m2": sops(a + later),
    }


def test_what_failed_on_the_old_member_gets_a_try_on_the_new_one(tmp_path: Path) -> None:
    p = pipeline(tmp_path, routes=[route(to=["pair"], trigger="study", stable_after="0s")])
    a = study(tmp_path, 3, "A")
    p.receive(a)
    p.plan(later=1)
    claim = p.jobs.claim("m1", "w", lease=60)
    assert claim is not None
    first, *rest = claim.items
    p.jobs.record_results(
        [ItemResult(first.job_id, first.instance_id, S.ITEM_FAILED, 0xC000, "refused")]
        + [ItemResult(i.job_id, i.instance_id, S.ITEM_PENDING, 0xA700, "busy") for i in rest]
    )
    p.jobs.finish(claim, p.config.destinations["m1"], True, 5.0, "busy", "retry", 0, 1)
    assert {j["state"] for j in p.job_list()} == {S.PENDING}  # a retry is due
    set_state(p, "m1", "paused")
    (moved,) = move(p)
    assert (moved.moved, moved.resent) == (2, 1)
    assert where(p, a)["m2"] == sops(a)


def test_moving_follows_the_strategy(tmp_path: Path) -> None:
    p = pipeline(
        tmp_path,
        destinations={
            "m1": M1,
            "m2": M2,
            "m3": M3,
            "trio": {"type": "group", "members": ["m1", "m2", "m3"], "strategy": "least_queued"},
        },
        routes=[route(to=["trio"])],
    )
    queue_directly(tmp_path, "m2", make_study(tmp_path / "in", 3, prefix="X"))
    a = study(tmp_path, 2, "A")
    p.receive(a)
    p.plan()
    assert where(p, a) == {"m1": sops(a)}
    set_state(p, "m1", "ok", admin=1)  # paused by an operator
    (moved,) = move(p)
    assert moved.target == "m3"  # m2 has 3 waiting, m3 none
    assert where(p, a) == {"m3": sops(a)}


def test_moving_to_a_member_that_already_has_the_instances_sends_them_once(
    tmp_path: Path,
) -> None:
    a = study(tmp_path, 3, "A")
    queue_directly(tmp_path, "m2", a)
    p = pipeline(tmp_path)
    with p.engine.begin() as conn:  # received again after the reload: planned again
        conn.execute(update(instances).values(routed=0))
    p.plan()
    assert where(p, a) == {"m1": sops(a), "m2": sops(a)}
    deliver(p, "m1", max_jobs=1)
    set_state(p, "m1", "paused")
    (moved,) = move(p)  # no unique-key error: what m2 has already is dropped
    assert moved.target == "m2"
    with p.engine.connect() as conn:
        rows = conn.execute(
            select(job_instances.c.instance_id).where(job_instances.c.destination == "m2")
        ).all()
    assert len(rows) == 3  # one delivery per instance
    assert where(p, a)["m2"] == sops(a)


def test_a_study_with_a_claim_in_flight_moves_once_the_claim_is_settled(
    tmp_path: Path,
) -> None:
    p = pipeline(tmp_path)
    a = study(tmp_path, 3, "A")
    p.receive(a)
    p.plan()
    claim = p.jobs.claim("m1", "w", lease=60, max_jobs=1)
    assert claim is not None
    set_state(p, "m1", "paused")
    assert move(p) == []  # one of its jobs is on the wire to m1
    p.jobs.release(claim)
    (moved,) = move(p)
    assert (moved.moved, moved.resent) == (3, 0)
    assert where(p, a) == {"m2": sops(a)}


def test_a_study_moves_back_whole_when_its_new_member_is_paused(tmp_path: Path) -> None:
    p = pipeline(tmp_path)
    a = study(tmp_path, 3, "A")
    p.receive(a)
    p.plan()
    set_state(p, "m1", "paused")
    move(p)
    set_state(p, "m1", "ok")
    set_state(p, "m2", "paused")
    (back,) = move(p)
    assert (back.source, back.target, back.moved) == ("m2", "m1", 3)
    assert where(p, a) == {"m1": sops(a)}


def _direct_to_m1(tmp_path: Path) -> Pipeline:
    """m1 outside any group, sent to directly; ``pair`` groups m2 and m3."""
    return pipeline(
        tmp_path,
        destinations={
            "m1": M1,
            "m2": M2,
            "m3": M3,
            "pair": {"type": "group", "members": ["m2", "m3"]},
        },
        routes=[route(to=["m1"])],
    )


def test_direct_jobs_of_a_paused_member_do_not_move(tmp_path: Path) -> None:
    p = _direct_to_m1(tmp_path)
    a = study(tmp_path, 2, "A")
    p.receive(a)
    p.plan()
    set_state(p, "m1", "paused")
    assert move(p) == []
    assert where(p, a) == {"m1": sops(a)}
    assert {j["via_group"] for j in p.job_list()} == {None}


# -- configuration ------------------------------------------------------------------


def _load(text: str) -> Any:
    return load_config_text(text, "t.yaml", Path("."))


def _errors(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        _load(text)
    return [str(e) for e in caught.value.errors]


_MEMBERS = "m1: {ae_title: A, host: h, port: 1}, m2: {type: folder, path: /tmp}"


@pytest.mark.parametrize(
    ("group", "expected"),
    [
        (
            "{type: group, members: [m1, x]}",
            "destinations.pair.members[1]: unknown destination 'x' (known: m1, m2)",
        ),
        ("{type: group, members: [m1, m1]}", "destinations.pair.members[1]: 'm1' is listed twice"),
        (
            "{type: group, members: [m1, pair]}",
            "destinations.pair.members[1]: 'pair' is a group: a group's members are not groups",
        ),
        ("{type: group, members: []}", "destinations.pair.members: List should have at least 1"),
        ("{type: group}", "destinations.pair.members: required key is missing"),
        (
            "{type: group, members: [m1], strategy: random}",
            "destinations.pair.strategy: Input should be 'failover', 'round_robin' or",
        ),
        (
            "{type: group, members: [m1], retry: {max_attempts: 2}}",
            "destinations.pair.retry: a group sends nothing itself: set this on its members",
        ),
        (
            "{type: group, members: [m1], transfer_syntax: rle}",
            "destinations.pair.transfer_syntax: a group sends nothing itself",
        ),
        ("{type: group, members: [m1], ae_title: X}", "destinations.pair.ae_title: unknown key"),
    ],
)
def test_group_errors_name_the_key(group: str, expected: str) -> None:
    found = _errors(f"destinations: {{{_MEMBERS}, pair: {group}}}")
    assert any(expected in e for e in found), found


def test_a_member_belongs_to_one_group_and_is_not_sent_to_directly() -> None:
    """A member's queue holds each instance once, whichever route put it there: a
    move away from a paused member would take a second group's or a direct route's
    delivery with it, so both are refused, naming the key and the way out."""
    shared = _errors(
        f"destinations: {{{_MEMBERS}, g1: {{type: group, members: [m1, m2]}}, "
        "g2: {type: group, members: [m2, m1]}}\n"
        "routes: [{name: a, to: [g1]}, {name: b, to: [g2]}]"
    )
    assert any(
        "destinations.g2.members[1]: 'm1' is already a member of group 'g1'" in e for e in shared
    ), shared
    direct = _errors(
        f"destinations: {{{_MEMBERS}, pair: {{type: group, members: [m1, m2]}}}}\n"
        "routes: [{name: a, to: [pair]}, {name: b, to: [m1]}]"
    )
    assert any(
        "routes[1] (b).to[0]: 'm1' is a member of group 'pair': send to the group, or give "
        "the direct route a destination of its own" in e
        for e in direct
    ), direct


def test_a_group_is_a_destination_routes_name_and_its_members_are_used() -> None:
    config = _load(
        f"destinations: {{{_MEMBERS}, pair: {{type: group, members: [m2, m1]}}}}\n"
        "routes: [{name: r, to: [pair]}]"
    )
    pair = config.destinations["pair"]
    assert isinstance(pair, GroupDestinationConfig)
    assert pair.strategy == "failover" and pair.workers == 0
    assert pair.address == "failover over m2, m1"
    assert set(config.senders) == {"m1", "m2"} and set(config.groups) == {"pair"}
    assert not [f for f in lint(config) if "not used" in f.message]


def test_moving_jobs_by_hand_to_a_group_is_refused(tmp_path: Path) -> None:
    from dicomrouter.control.errors import Invalid
    from dicomrouter.control.jobs import move_jobs

    p = _direct_to_m1(tmp_path)
    p.receive(study(tmp_path, 1, "A"))
    p.plan()
    with pytest.raises(Invalid, match="'pair' is a group: move the jobs to one of its members"):
        move_jobs(p.engine, p.config.destinations, "m1", "pair")
    with p.engine.connect() as conn:
        assert conn.execute(select(jobs.c.destination)).scalars().all() == ["m1"]


def test_a_group_cannot_be_echoed_or_paused_its_members_can(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from dicomrouter.control.destinations import echo_destination, pause
    from dicomrouter.control.errors import Invalid

    p = pipeline(tmp_path)
    ctx = SimpleNamespace(config=p.config, engine=p.engine, reader=p.engine)
    with pytest.raises(Invalid, match=r"'pair' is a group: echo its members instead \(m1, m2\)"):
        echo_destination(p.config, "pair")
    with pytest.raises(Invalid, match="'pair' is a group: pause or resume its members instead"):
        pause(ctx, "pair", actor="test")
    assert pause(ctx, "m1", actor="test")["state"] == "paused"


def test_the_trace_and_job_views_say_which_member_got_what_through_which_group(
    tmp_path: Path,
) -> None:
    from types import SimpleNamespace

    from dicomrouter.control.jobs import job_detail, search_jobs
    from dicomrouter.control.studies import study_trace

    p = pipeline(tmp_path)
    a = study(tmp_path, 2, "A")
    p.receive(a)
    p.plan()
    set_state(p, "m1", "paused")
    move(p)
    ctx = SimpleNamespace(config=p.config, engine=p.engine, reader=p.engine, store=p.store)
    trace = study_trace(ctx, study_uid(a))
    assert trace is not None
    queued = [(e["destination"], e["via_group"]) for e in trace["events"] if e["kind"] == "queued"]
    assert queued == [("m1", "pair")] * 2 + [("m2", "pair")] * 2  # one job per instance
    canceled = [e for e in trace["events"] if e["kind"] == "canceled"]
    assert {e["message"] for e in canceled} == {"moved to m2 (group pair: m1 is paused)"}
    _, listed = search_jobs(p.engine)
    assert {(j["destination"], j["via_group"]) for j in listed} == {("m1", "pair"), ("m2", "pair")}
    detail = job_detail(p.engine, listed[0]["id"])
    assert detail is not None and detail["via_group"] == "pair"


@pytest.mark.sqlite_only
def test_an_index_from_schema_7_upgrades_its_jobs_are_direct(tmp_path: Path) -> None:
    import sqlite3

    from dicomrouter.store import create_index_engine
    from dicomrouter.store.schema import SCHEMA_VERSION

    url = f"sqlite:///{tmp_path / 'index.sqlite'}"
    create_index_engine(url).dispose()
    with sqlite3.connect(tmp_path / "index.sqlite") as raw:  # as schema 7 made it
        raw.execute("DROP TABLE group_affinity")
        raw.execute("DROP TABLE group_rotation")
        raw.execute("ALTER TABLE jobs DROP COLUMN via_group")
        raw.execute(
            "INSERT INTO jobs (id, destination, level, resource_uid, study_instance_uid, routes,"
            " transform, state, priority, attempts, connection_failures, next_attempt_at,"
            " created_at, updated_at) VALUES (1, 'pacs', 'study', '1.2', '1.2', 'r', '',"
            " 'pending', 0, 0, 0, 0, 0, 0)"
        )
        raw.execute("UPDATE meta_info SET value = '7' WHERE key = 'schema'")
        raw.execute("UPDATE alembic_version SET version_num = '0007'")
    engine = create_index_engine(url)
    with engine.connect() as conn:
        assert conn.execute(select(jobs.c.id, jobs.c.via_group)).all() == [(1, None)]
        assert conn.execute(select(group_affinity)).all() == []
        version = conn.exec_driver_sql("SELECT value FROM meta_info WHERE key='schema'").scalar()
    assert version == str(SCHEMA_VERSION)  # 0008 ran, and every later revision


def test_the_dashboard_and_the_api_show_the_group(tmp_path: Path) -> None:
    from tests.support.api import api_env
    from tests.support.seed import Seeder

    env = api_env(
        tmp_path,
        {
            "destinations": {
                "m1": M1,
                "m2": M2,
                "pair": {"type": "group", "members": ["m1", "m2"]},
            },
            "routes": [route(to=["pair"], trigger="study", stable_after="0s")],
        },
    )
    seed = Seeder(env, tmp_path / "in")
    files = seed.receive_study(2)
    seed.plan()
    (job,) = env.viewer.get("/api/v1/jobs").json()["items"]
    assert (job["destination"], job["via_group"]) == ("m1", "pair")
    assert env.viewer.get(f"/api/v1/jobs/{job['id']}").json()["via_group"] == "pair"
    assert "via group pair" in env.viewer.get(f"/jobs/{job['id']}").text
    assert "via pair" in env.viewer.get("/jobs").text
    trace = env.viewer.get(f"/studies/{study_uid(files)}").text
    assert "via group <b>pair</b>" in trace
    destinations = env.operator.get("/destinations").text
    assert "failover over m1, m2" in destinations
    assert 'action="/destinations/m1/pause"' in destinations
    assert 'action="/destinations/pair/pause"' not in destinations
    refused = env.operator.post("/api/v1/destinations/pair/pause")
    assert refused.status_code == 422 and "is a group" in refused.text


def test_a_group_dumped_with_every_key_loads_again() -> None:
    import yaml

    config = _load(f"destinations: {{{_MEMBERS}, pair: {{type: group, members: [m1, m2]}}}}")
    again = _load(yaml.safe_dump(config.model_dump(mode="json")))
    assert again.destinations["pair"] == config.destinations["pair"]


def test_a_groups_state_and_queue_are_its_members(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from dicomrouter.control.destinations import destination_detail

    p = pipeline(tmp_path)
    p.receive(study(tmp_path, 3, "A"))
    p.plan()
    ctx = SimpleNamespace(config=p.config, engine=p.engine, reader=p.engine)

    def pair() -> tuple[str, int]:
        detail = destination_detail(ctx, "pair")
        assert detail is not None and detail["kind"] == "group"
        return detail["state"], detail["queue"]["pending"]

    assert pair() == ("ok", 3)  # three instance jobs of m1, through the group
    set_state(p, "m1", "paused")
    assert pair() == ("ok", 3)  # m2 is up
    set_state(p, "m2", "ok", admin=1)
    assert pair() == ("probing", 3)  # m1 comes back by itself once a probe answers
    set_state(p, "m1", "ok", admin=1)
    assert pair() == ("paused", 3)
