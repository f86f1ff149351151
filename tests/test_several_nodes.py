"""Several nodes on one index: what the queue guarantees when every node plans,
fires triggers and claims (issue 14).

Each "node" here is its own engine, planner and job store on the same index (and
its own lease owner), as two router nodes on one PostgreSQL would be; the tests run
on both databases, since the same code serialises SQLite's processes. The clock
tests need a server with a clock of its own: PostgreSQL only.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from dicomrouter.queue import ItemResult, JobStore
from dicomrouter.queue import states as S
from dicomrouter.store.dialect import database_now
from dicomrouter.store.schema import instances, job_instances, jobs, triggers, unplanned
from tests.support.router import wait_until
from tests.support.synth import make_study
from tests.test_queue import DEST, Pipeline, route

HOUR = 3600.0


def _nodes(tmp_path: Path, config: dict[str, Any]) -> tuple[Pipeline, Pipeline]:
    """Two nodes on one index (same storage folder, so the same database)."""
    first = Pipeline(tmp_path, dict(config))
    return first, Pipeline(tmp_path, dict(config))


def _count(p: Pipeline, table: Any, *where: Any) -> int:
    with p.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table).where(*where)).scalar())


# -- planning and triggers ---------------------------------------------------------------


def test_two_planners_on_the_same_batch_plan_it_once_and_fire_its_trigger_once(
    tmp_path: Path,
) -> None:
    """Node B reads the batch, node A plans it (and fires its study trigger) before
    B takes the write lock: B plans nothing, sets nothing aside, re-arms nothing."""
    config = {
        "destinations": {"pacs": DEST, "archive": {**DEST, "ae_title": "ARCH"}},
        "routes": [
            route(name="now", to=["pacs"]),
            route(name="whole", to=["archive"], trigger="study", stable_after="30s"),
        ],
    }
    a, b = _nodes(tmp_path, config)
    files = make_study(tmp_path / "in", 5)
    a.receive(files)

    read = threading.Event()
    a_done = threading.Event()
    b_prepare = b.planner.loops.prepare

    def prepare_after_a(*args: Any) -> None:
        # B has read its batch (and headers) and is about to take the write lock.
        read.set()
        assert a_done.wait(60)
        b_prepare(*args)

    b.planner.loops.prepare = prepare_after_a  # type: ignore[method-assign]
    planned_by_b: list[int] = []
    thread = threading.Thread(target=lambda: planned_by_b.append(b.planner.route_new_instances()))
    thread.start()
    assert read.wait(60)
    planned_by_a = a.planner.route_new_instances()
    fired = a.planner.fire_stable_triggers(now=time.time() + 60)
    a_done.set()
    thread.join(60)
    b.planner.loops.prepare = b_prepare  # type: ignore[method-assign]
    fired += b.planner.fire_stable_triggers(now=time.time() + 120)
    fired += a.planner.fire_stable_triggers(now=time.time() + 180)

    assert planned_by_a + planned_by_b[0] == len(files)
    assert fired == 1
    assert _count(a, instances, instances.c.routed != 1) == 0
    assert _count(a, unplanned) == 0
    assert _count(a, job_instances, job_instances.c.destination == "pacs") == len(files)
    assert _count(a, job_instances, job_instances.c.destination == "archive") == len(files)
    assert _count(a, jobs, jobs.c.destination == "archive") == 1
    assert _count(a, triggers, triggers.c.pending == 1) == 0


def test_planners_and_firers_of_two_nodes_running_at_once(tmp_path: Path) -> None:
    """Both nodes loop (plan in small batches, fire triggers) while instances arrive:
    each instance is planned once, none is set aside, each study fires once."""
    config = {
        "destinations": {"pacs": DEST, "archive": {**DEST, "ae_title": "ARCH"}},
        "routes": [
            route(name="now", to=["pacs"]),
            route(name="whole", to=["archive"], trigger="study", stable_after="1s"),
        ],
    }
    a, b = _nodes(tmp_path, config)
    studies = [make_study(tmp_path / "in", 12, prefix=f"S{n}") for n in range(3)]
    planned = {"a": 0, "b": 0}
    fired = {"a": 0, "b": 0}
    stop = threading.Event()
    errors: list[BaseException] = []

    def node(name: str, p: Pipeline) -> None:
        try:
            while not stop.is_set():
                planned[name] += p.planner.route_new_instances(limit=4)
                fired[name] += p.planner.fire_stable_triggers(now=time.time() + 60)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=node, args=item) for item in (("a", a), ("b", b))]
    for thread in threads:
        thread.start()
    for files in studies:
        a.receive(files)
    deadline = time.monotonic() + 120
    while _count(a, instances, instances.c.routed == 0) and time.monotonic() < deadline:
        time.sleep(0.05)
    # One more pass each after the last arrival, then stop.
    time.sleep(0.5)
    stop.set()
    for thread in threads:
        thread.join(60)
    fired["a"] += a.planner.fire_stable_triggers(now=time.time() + 60)

    total = sum(len(files) for files in studies)
    assert errors == []
    assert planned["a"] + planned["b"] == total
    assert _count(a, unplanned) == 0
    assert _count(a, instances, instances.c.routed != 1) == 0
    assert _count(a, job_instances, job_instances.c.destination == "pacs") == total
    assert _count(a, job_instances, job_instances.c.destination == "archive") == total
    # Each study fired once at least; a fire after a late instance only sends the rest.
    assert fired["a"] + fired["b"] >= len(studies)
    assert _count(a, triggers, triggers.c.pending == 1) == 0


# -- the association limit across nodes ---------------------------------------------------


def test_a_destination_limit_of_one_holds_across_two_nodes(tmp_path: Path) -> None:
    """Node B's worker gets nothing while node A's holds a live lease; it gets the
    work once A lets go, or once A's lease has expired (A died)."""
    config = {"destinations": {"pacs": {**DEST, "max_associations": 1}}, "routes": [route()]}
    a, b = _nodes(tmp_path, config)
    a.receive(make_study(tmp_path / "in", 4))
    a.plan()
    first = a.jobs.claim("pacs", "nodeA:1:pacs:0", lease=60, max_jobs=1, max_owners=1)
    assert first is not None
    assert b.jobs.claim("pacs", "nodeB:2:pacs:0", lease=60, max_owners=1) is None
    # The holder itself may take more (a worker's one slot).
    again = a.jobs.claim("pacs", "nodeA:1:pacs:0", lease=60, max_jobs=1, max_owners=1)
    assert again is not None
    for claim in (first, again):
        a.jobs.release(claim)
    taken = b.jobs.claim("pacs", "nodeB:2:pacs:0", lease=-1, max_jobs=1, max_owners=1)
    assert taken is not None  # its lease is already expired: it counts for nobody
    assert a.jobs.claim("pacs", "nodeA:1:pacs:0", lease=60, max_jobs=1, max_owners=1)


def test_two_dispatchers_never_hold_two_claims_on_a_one_association_destination(
    tmp_path: Path,
) -> None:
    """Two nodes, two workers each (more than the limit: a worker of a node whose
    configuration was changed, being retired), all claiming and settling as fast as
    they can: never two claims held at once."""
    config = {"destinations": {"pacs": {**DEST, "max_associations": 1}}, "routes": [route()]}
    a, b = _nodes(tmp_path, config)
    a.receive(make_study(tmp_path / "in", 40))
    a.plan()
    dest = a.config.destinations["pacs"]
    holding = 0
    peak = 0
    claims = 0
    lock = threading.Lock()
    errors: list[BaseException] = []

    def worker(store: JobStore, owner: str) -> None:
        nonlocal holding, peak, claims
        try:
            while True:
                claim = store.claim("pacs", owner, lease=60, max_jobs=1, max_owners=1)
                if claim is None:
                    if not _count(a, jobs, jobs.c.state.in_(S.OPEN_STATES)):
                        return
                    time.sleep(0.01)
                    continue
                with lock:
                    holding += 1
                    claims += 1
                    peak = max(peak, holding)
                time.sleep(0.01)  # "sending"
                with lock:
                    holding -= 1
                store.record_results(
                    [
                        ItemResult(item.job_id, item.instance_id, S.ITEM_COMPLETED, 0, "stored")
                        for item in claim.items
                    ]
                )
                store.finish(claim, dest, True, 0.0, "", "completed", len(claim.items), 0)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [
        threading.Thread(target=worker, args=(p.jobs, f"{node}:{n}:pacs:{n}"))
        for node, p in (("nodeA", a), ("nodeB", b))
        for n in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert errors == []
    assert claims == 40
    assert peak == 1
    assert _count(a, jobs, jobs.c.state == S.COMPLETED) == 40


# -- the database's clock ------------------------------------------------------------------


@pytest.fixture
def skewed(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Set this process's clock off by some seconds (time.time only: what a node's
    wrong wall clock changes)."""
    real = time.time

    def skew(seconds: float) -> None:
        monkeypatch.setattr(time, "time", lambda: real() + seconds)

    yield skew


def _pg_pipeline(tmp_path: Path, postgres_url: str, **dest: Any) -> Pipeline:
    return Pipeline(
        tmp_path,
        {
            "database": postgres_url,
            "destinations": {"pacs": {**DEST, **dest}},
            "routes": [route()],
        },
    )


def test_a_node_whose_clock_runs_ahead_takes_no_live_lease(
    tmp_path: Path, postgres_url: str, skewed: Any
) -> None:
    p = _pg_pipeline(tmp_path, postgres_url)
    p.receive(make_study(tmp_path / "in", 2))
    p.plan()
    held = p.jobs.claim("pacs", "nodeB:1:pacs:0", lease=60, max_jobs=1)
    retried = p.jobs.claim("pacs", "nodeB:1:pacs:1", lease=60, max_jobs=1)
    assert held is not None and retried is not None
    _retry_later(p, retried)
    skewed(+HOUR)
    assert p.jobs.recover() == 0  # B's lease has a minute left, in the database's time
    # Nor does it claim early what is not due yet (the retry backs off for seconds).
    assert p.jobs.claim("pacs", "nodeA:1:pacs:0", lease=60) is None
    with p.engine.connect() as conn:
        state = conn.execute(select(jobs.c.state).where(jobs.c.id == held.job_ids[0])).scalar()
    assert state == S.IN_PROGRESS


def _retry_later(p: Pipeline, claim: Any) -> None:
    """Settle ``claim`` as a transient failure: its jobs back off (retry.delay)."""
    dest = p.config.destinations["pacs"]
    p.jobs.finish(
        claim, dest, True, 0.0, "peer busy", "retry", 0, 0, transient_jobs=set(claim.job_ids)
    )


def test_a_node_whose_clock_runs_behind_recovers_expired_leases(
    tmp_path: Path, postgres_url: str, skewed: Any
) -> None:
    p = _pg_pipeline(tmp_path, postgres_url)
    p.receive(make_study(tmp_path / "in", 2))
    p.plan()
    dead = p.jobs.claim("pacs", "nodeB:1:pacs:0", lease=-1, max_jobs=1)  # expired already
    assert dead is not None
    skewed(-HOUR)
    assert p.jobs.recover() == 1
    # A retry it schedules is due in the server's time, not an hour early for the
    # other nodes.
    claim = p.jobs.claim("pacs", "nodeA:1:pacs:0", lease=60)
    assert claim is not None and claim.job_ids
    _retry_later(p, claim)
    skewed(0)
    assert p.jobs.claim("pacs", "nodeC:1:pacs:0", lease=60) is None


def test_a_node_whose_clock_runs_ahead_does_not_fire_a_study_early(
    tmp_path: Path, postgres_url: str, skewed: Any
) -> None:
    """``stable_after`` is measured in the database's time on every node."""
    p = Pipeline(
        tmp_path,
        {
            "database": postgres_url,
            "destinations": {"pacs": DEST},
            "routes": [route(trigger="study", stable_after="10m")],
        },
    )
    p.receive(make_study(tmp_path / "in", 2))
    while p.planner.route_new_instances():
        pass
    skewed(+HOUR)
    assert p.planner.fire_stable_triggers() == 0
    assert p.job_list() == []


def test_a_node_whose_clock_is_off_is_up_while_it_beats_and_down_once_silent(
    tmp_path: Path, postgres_url: str, skewed: Any
) -> None:
    """Heartbeats are judged by the database's clock: node B, an hour behind, is up
    (and ready) while it beats; node C, an hour ahead, is down once it has been
    silent for longer than STALE_AFTER, not an hour later."""
    from dicomrouter.control import nodes
    from dicomrouter.store import heartbeat

    p = _pg_pipeline(tmp_path, postgres_url)
    for name, offset in (("nodeB", -HOUR), ("nodeC", +HOUR)):
        skewed(offset)
        for role in heartbeat.REQUIRED_ROLES:
            heartbeat.beat(p.engine, name, role, time.time(), True, "")
        assert all(c.ok for c in heartbeat.check(p.engine, name))  # the node's readiness
    skewed(0)  # node A looks
    view = {n.name: n.state for n in nodes.list_nodes(p.engine).nodes}
    assert view == {"nodeB": nodes.UP, "nodeC": nodes.UP}
    with p.engine.connect() as conn:
        later = database_now(conn) + heartbeat.STALE_AFTER + 1
    view = {n.name: n.state for n in nodes.list_nodes(p.engine, later).nodes}
    assert view == {"nodeB": nodes.DOWN, "nodeC": nodes.DOWN}


def test_a_node_whose_clock_runs_ahead_does_not_give_up_early(
    tmp_path: Path, postgres_url: str, skewed: Any
) -> None:
    """``give_up_after`` counts from ``paused_since``, in the database's time: a node
    an hour ahead does not fail the jobs of a destination unreachable for a moment."""
    from dicomrouter.dispatch.health import DestinationHealth
    from dicomrouter.dispatch.transforming import Transforms
    from dicomrouter.dispatch.worker import DestinationWorker

    p = _pg_pipeline(tmp_path, postgres_url, give_up_after="30m")
    p.receive(make_study(tmp_path / "in", 2))
    p.plan()
    health = DestinationHealth("pacs", p.config.destinations["pacs"], p.engine)
    health.record_unreachable("connection refused", pause_now=True)
    worker = DestinationWorker(
        "pacs",
        0,
        p.config,
        p.jobs,
        p.store,
        health,
        threading.Event(),
        Transforms(p.config, p.engine, p.store.root / "outgoing"),
    )
    skewed(+HOUR)
    health._checked = 0.0  # the worker's next look at the shared row
    worker._give_up_if_due()
    assert _count(p, jobs, jobs.c.state == S.FAILED) == 0
    assert _count(p, jobs, jobs.c.state.in_(S.WAITING_STATES)) > 0


def test_a_worker_cut_off_from_the_index_stops_sending_before_its_lease_runs_out(
    tmp_path: Path,
) -> None:
    """A node that cannot renew its lease (the index unreachable, here locked) stops
    sending the claim before the lease can run out: after that, another node takes
    the jobs, and the two would send them at once."""
    import sqlite3

    from dicomrouter.dispatch.worker import _LeaseRenewer, _Results
    from dicomrouter.store import create_index_engine
    from dicomrouter.store.dialect import WRITE_LOCK_KEY, dedicated_connection

    p = Pipeline(tmp_path, {"destinations": {"pacs": DEST}, "routes": [route()]})
    p.receive(make_study(tmp_path / "in", 2))
    p.plan()
    jobs_store = JobStore(create_index_engine(p.config.database_url, busy_timeout_ms=0))
    claim = jobs_store.claim("pacs", "nodeA:1:pacs:0", lease=0.9)
    assert claim is not None
    renewer = _LeaseRenewer(jobs_store, claim, 0.9, _Results(jobs_store))
    # Every renewal now fails (SQLite: locked) or waits (PostgreSQL: the write lock).
    if p.engine.dialect.name == "sqlite":
        blocker = sqlite3.connect(p.config.database_url.removeprefix("sqlite:///"))
        blocker.execute("BEGIN IMMEDIATE")
    else:
        blocker = dedicated_connection(p.engine, "test blocker")
        blocker.execute(f"SELECT pg_advisory_lock({WRITE_LOCK_KEY})")
    try:
        renewer.start()
        wait_until(lambda: renewer.stop_sending, 30, 0.05, "the renewer stops the send")
    finally:
        blocker.close()  # the lock goes with it
        renewer.stop()
        jobs_store.engine.dispose()


def test_a_dashboard_session_lives_on_every_node_whatever_their_clocks(
    tmp_path: Path, postgres_url: str, skewed: Any
) -> None:
    """Behind a load balancer a session started on one node is checked on the
    others: one whose clock runs an hour ahead neither refuses it as expired nor
    deletes it (and the others) when someone logs in there."""
    from dicomrouter.control import sessions

    p = _pg_pipeline(tmp_path, postgres_url)
    token = sessions.start(p.engine, "alice", 1800)
    skewed(+HOUR)
    assert sessions.start(p.engine, "bob", 1800)
    live = sessions.find(p.engine, token)
    assert live is not None and live.user == "alice"


def test_recovery_by_prefix_takes_only_this_nodes_leases(tmp_path: Path) -> None:
    """A restarted node takes its own leases back at once, never another node's whose
    name the prefix would match as a pattern (``_`` is a LIKE wildcard)."""
    config = {"destinations": {"pacs": DEST}, "routes": [route()]}
    p = Pipeline(tmp_path, config)
    p.receive(make_study(tmp_path / "in", 2))
    p.plan()
    mine = p.jobs.claim("pacs", "node_1:10:pacs:0", lease=60, max_jobs=1)
    theirs = p.jobs.claim("pacs", "nodeX1:20:pacs:0", lease=60, max_jobs=1)
    assert mine is not None and theirs is not None
    assert p.jobs.recover(owner_prefix="node_1:") == 1
    with p.engine.connect() as conn:
        state = conn.execute(select(jobs.c.state).where(jobs.c.id == theirs.job_ids[0])).scalar()
    assert state == S.IN_PROGRESS


# -- end to end: a real peer counts the associations ----------------------------------------


def _established(port: int) -> int:
    """TCP connections accepted on ``port`` and open now (see :func:`_connections`)."""
    return len(_connections(port))


def _connections(port: int) -> set[int]:
    """The client ports of the TCP connections to ``port`` on 127.0.0.1 that are
    established (the peer's side of each association), asked of the kernel by
    sock_diag (netlink; what ``ss`` uses), which filters by port in one pass.

    Not a snapshot all the same: a thread of this process may close one connection
    and open the next while the kernel walks its table, and both then show as
    established. (/proc/net/tcp, a page per read() and 7 ms a listing here, did
    that often.) A connection shown in two listings in a row was established all
    the time between them (a connection is established once, for one stretch):
    :class:`_Sampler` counts those."""
    states = 1 << 1  # TCP_ESTABLISHED
    request = struct.pack("=BBBBI", socket.AF_INET, socket.IPPROTO_TCP, 0, 0, states)
    request += struct.pack(">HH", port, 0) + bytes(32) + struct.pack("=IQ", 0, 2**64 - 1)
    dump = 0x1 | 0x300  # NLM_F_REQUEST | NLM_F_DUMP
    message = struct.pack("=IHHII", 16 + len(request), 20, dump, 1, 0) + request
    found: set[int] = set()
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 4) as diag:  # NETLINK_SOCK_DIAG
        diag.sendto(message, (0, 0))
        while True:
            data, offset = diag.recv(1 << 16), 0
            while offset < len(data):
                length, kind = struct.unpack_from("=IH", data, offset)
                if kind == 3:  # NLMSG_DONE
                    return found
                if kind == 2:  # NLMSG_ERROR
                    raise OSError("sock_diag refused the request")
                state = data[offset + 17]  # inet_diag_msg after the 16-byte header
                local, remote = struct.unpack_from(">HH", data, offset + 20)
                if state == 1 and local == port:
                    found.add(remote)
                offset += (length + 3) & ~3


class _Sampler:
    """Samples the connections to ``port`` (but those in ``ignore``)."""

    def __init__(self, port: int, ignore: set[int]) -> None:
        self.port, self.ignore, self.last = port, ignore, set[int]()
        self.seen = 0  # the most in one listing (it sees associations at all)

    def open_together(self) -> int:
        """How many were open at one instant: those established in this listing and
        the previous one (all of them were, at the moment between the two)."""
        now = _connections(self.port) - self.ignore
        together, self.last = len(now & self.last), now
        self.seen = max(self.seen, len(now))
        return together


def test_two_nodes_open_one_association_at_a_time_to_a_one_association_peer(
    tmp_path: Path, postgres_url: str, dcmtk: None
) -> None:
    """Two nodes' workers (real DICOM senders, their own engines and lease owners)
    send one study to storescp with ``max_associations: 1``. storescp forks a child
    per association, so it would take two at once; a sampler counts the open ones:
    never two, and every instance arrives. (An association kept open between claims
    would be one the other node's lease count cannot see: on a shared index a worker
    keeps none.)"""
    from dicomrouter.dispatch.health import DestinationHealth
    from dicomrouter.dispatch.transforming import Transforms
    from dicomrouter.dispatch.worker import DestinationWorker
    from tests.support.dcmtk import StoreSCP, free_port, sop_uids

    scp = StoreSCP(free_port(), "PACS", tmp_path / "pacs", extra_args=["--fork"])
    dest = {"ae_title": "PACS", "host": "127.0.0.1", "port": scp.port}
    config = {
        "database": postgres_url,
        "destinations": {"pacs": {**dest, "max_associations": 1, "batch_size": 3}},
        "routes": [route()],
    }
    a, b = _nodes(tmp_path, config)
    files = make_study(tmp_path / "in", 30)
    a.receive(files)
    a.plan()
    stop = threading.Event()
    workers = [
        DestinationWorker(
            "pacs",
            index,
            p.config,
            p.jobs,
            p.store,
            DestinationHealth("pacs", p.config.destinations["pacs"], p.engine),
            stop,
            Transforms(p.config, p.engine, p.store.root / "outgoing"),
        )
        for index, p in enumerate((a, b))
    ]
    assert workers[0].owner != workers[1].owner
    _heartbeat_of_another_node(a)  # node B's dispatch process beats
    for p in (a, b):
        # A worker claims again the moment it settles a claim; a pause before each
        # claim lets the other node's worker, polling, take its turns.
        p.jobs.claim = _after_a_pause(p.jobs.claim)  # type: ignore[method-assign]
    peak = 0
    with scp:
        # Nothing open once the readiness echo ended (its connection, if left, aside).
        sampler = _Sampler(scp.port, ignore=_connections(scp.port))
        for worker in workers:
            worker.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            peak = max(peak, sampler.open_together())
            if _count(a, jobs, jobs.c.state.in_(S.OPEN_STATES)) == 0:
                break
            time.sleep(0.0005)
        stop.set()
        for worker in workers:
            worker.join(30)
        received = scp.received_sops()
        associations = scp.association_count()
    assert received == sop_uids(files)
    assert peak <= 1 and sampler.seen >= 1
    assert associations >= 2  # claims of 15 instances at most (batch_size x 5)


def _after_a_pause(claim: Any) -> Any:
    def paused(*args: Any, **kwargs: Any) -> Any:
        time.sleep(0.08)
        return claim(*args, **kwargs)

    return paused


def _heartbeat_of_another_node(p: Pipeline, node: str = "nodeB") -> None:
    from dicomrouter.store.heartbeat import DISPATCH
    from dicomrouter.store.schema import process_heartbeats

    now = time.time()
    with p.engine.begin() as conn:
        conn.execute(
            process_heartbeats.insert().values(
                node=node, role=DISPATCH, pid=1, started_at=now, heartbeat_at=now, ok=1, detail=""
            )
        )


def test_a_single_node_on_postgresql_keeps_its_association_between_claims(
    tmp_path: Path, postgres_url: str, dcmtk: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Alone on the index, a DICOM worker reuses its association for the next claim,
    as on SQLite; once another node's dispatch process heartbeats, it releases it
    before its lease."""
    from dicomrouter.dispatch import worker as worker_module
    from dicomrouter.dispatch.health import DestinationHealth
    from dicomrouter.dispatch.transforming import Transforms
    from dicomrouter.dispatch.worker import DestinationWorker
    from dicomrouter.store.heartbeat import INTERVAL
    from tests.support.dcmtk import StoreSCP, free_port

    monkeypatch.setattr(worker_module, "_KEEP_ALIVE", 3600.0)  # no race with the clock
    scp = StoreSCP(free_port(), "PACS", tmp_path / "pacs")
    p = Pipeline(
        tmp_path,
        {
            "database": postgres_url,
            "destinations": {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": scp.port}},
            "routes": [route()],
        },
    )
    worker = DestinationWorker(
        "pacs",
        0,
        p.config,
        p.jobs,
        p.store,
        DestinationHealth("pacs", p.config.destinations["pacs"], p.engine),
        threading.Event(),
        Transforms(p.config, p.engine, p.store.root / "outgoing"),
    )
    opened = []
    with scp:
        echoes = scp.association_count()
        for n in range(2):
            p.receive(make_study(tmp_path / "in", 2, prefix=f"A{n}"))
            p.plan()
            assert worker._tick()
            opened.append((scp.association_count() - echoes, _established(scp.port)))
        _heartbeat_of_another_node(p)
        worker._nodes_checked -= INTERVAL  # the worker's next look at the heartbeats
        p.receive(make_study(tmp_path / "in", 2, prefix="B"))
        p.plan()
        assert worker._tick()
        opened.append((scp.association_count() - echoes, _established(scp.port)))
        worker.sender.close()
    # (associations so far, open now) after each claim
    assert opened == [(1, 1), (1, 1), (2, 0)]
