"""Three nodes on one PostgreSQL and one shared folder: kill -9 one in the middle of
dispatch (issue 14's failure test).

storescu sends two studies to two of the nodes; every node plans and delivers to one
storescp. The destination is paused while deliveries are in flight, so every node's
workers hold leases; the node holding the most undelivered instances is killed -9.
Its leases expire (a short ``dispatch.lease``), another node delivers what it held,
and every acknowledged instance arrives, as sent. Delivery is at least once: the
duplicates are counted, and each must be one the killed node held undelivered (it
may have sent it without recording so): that set is the bound. Restarted, the
killed node rejoins without planning anything again. No instance is ever set aside
by planners colliding (``routed = -1``, the ``unplanned`` table).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pydicom import dcmread
from sqlalchemy import func, select

from dicomrouter.store.heartbeat import INTERVAL as HEARTBEAT_INTERVAL
from dicomrouter.store.schema import (
    attempts,
    instances,
    job_instances,
    jobs,
    process_heartbeats,
    unplanned,
)
from tests.support.cluster import Cluster, Leases, PausableStoreSCP
from tests.support.dcmtk import HOST, free_port
from tests.support.router import wait_until
from tests.support.synth import make_study

STUDY_SIZE = 100  # two studies: 200 small instances in all
LEASE = 6.0  # seconds; short, so the killed node's jobs come back soon


def _config(pacs_port: int) -> dict[str, Any]:
    return {
        "destinations": {
            "pacs": {
                "ae_title": "PACS",
                "host": HOST,
                "port": pacs_port,
                # Across the nodes once max_associations is a cluster-wide limit.
                "max_associations": 3,
                # Small claims: several workers on several nodes share the queue.
                "batch_size": 10,
                "retry": {"initial_delay": "1s", "max_delay": "2s"},
                "probe_interval": "1s",
            }
        },
        "routes": [{"name": "all", "trigger": "instance", "to": ["pacs"]}],
        "dispatch": {"lease": f"{LEASE}s"},
        # The HTTP process neither receives nor delivers: without it, three nodes
        # start in half the time on a small machine.
        "http": {"enabled": False},
    }


def _state(cluster: Cluster) -> dict[str, Any]:
    """What a rejoining node must leave as it is: every job, every instance's
    planning, every delivery row, and nothing set aside."""
    with cluster.index.connect() as conn:
        return {
            "jobs": sorted(conn.execute(select(jobs.c.id, jobs.c.state, jobs.c.attempts)).all()),
            "instances": sorted(
                conn.execute(
                    select(instances.c.id, instances.c.routed, instances.c.generation)
                ).all()
            ),
            "deliveries": conn.execute(select(func.count()).select_from(job_instances)).scalar(),
            "unplanned": conn.execute(select(func.count()).select_from(unplanned)).scalar(),
        }


def _job_states(cluster: Cluster) -> dict[str, int]:
    with cluster.index.connect() as conn:
        return dict(conn.execute(select(jobs.c.state, func.count()).group_by(jobs.c.state)).all())


def _second_heartbeat(cluster: Cluster, node: str, since: float) -> bool:
    """The node's dispatch process has beaten twice since ``since``: it has been
    planning (every poll interval) for a heartbeat interval at least."""
    with cluster.index.connect() as conn:
        row = conn.execute(
            select(process_heartbeats.c.started_at, process_heartbeats.c.heartbeat_at).where(
                process_heartbeats.c.node == node, process_heartbeats.c.role == "dispatch"
            )
        ).first()
    return (
        row is not None
        and row.started_at >= since
        and row.heartbeat_at >= row.started_at + HEARTBEAT_INTERVAL
    )


def test_a_node_killed_in_the_middle_of_dispatch_loses_nothing(
    tmp_path: Path, postgres_url: str, dcmtk: None
) -> None:
    studies = [
        make_study(tmp_path / "in", STUDY_SIZE, prefix="A", patient_id="CLUSTER1"),
        make_study(tmp_path / "in", STUDY_SIZE, prefix="B", patient_id="CLUSTER2"),
    ]
    sent = {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID): f for s in studies for f in s}
    pacs = PausableStoreSCP(free_port(), "PACS", tmp_path / "pacs")
    cluster = Cluster(tmp_path / "cluster", postgres_url, _config(pacs.port))
    a, b, _ = cluster.names
    with pacs, cluster:
        # Two modalities, two nodes; all three nodes plan and deliver.
        with ThreadPoolExecutor(2) as senders:
            sending = [
                senders.submit(cluster[a].send, studies[0]),
                senders.submit(cluster[b].send, studies[1]),
            ]
            # Deliveries under way: hold them where they are.
            wait_until(lambda: len(pacs.received_files()) >= 30, 60, 0.02, "first deliveries")
            pacs.pause()
            for result in (f.result() for f in sending):
                assert result.returncode == 0, result.stderr  # all acknowledged
        holders = wait_until(
            lambda: {n: h for n, h in cluster.leases().items() if h.pending}, 30, 0.2, "leases"
        )
        victim = max(holders, key=lambda n: len(holders[n].pending))
        cluster[victim].kill()
        after = cluster.leases().get(victim)
        assert after is not None, f"{victim}'s leases were taken back before the kill was seen"
        # What it held when it died: read before (the destination paused, its workers
        # wait for a response) and after the kill (in case one claimed meanwhile).
        held = Leases(
            victim, holders[victim].jobs | after.jobs, holders[victim].pending | after.pending
        )
        pacs.resume()
        print(
            f"\nkilled {victim}, holding {len(held.jobs)} job(s) with {len(held.pending)} "
            f"undelivered instance(s); other holders: "
            + ", ".join(f"{n}: {len(h.pending)}" for n, h in holders.items() if n != victim)
        )

        # Its leases expire; the others deliver what it held, and everything else.
        try:
            wait_until(lambda: set(_job_states(cluster)) == {"completed"}, 90, 0.5, "all jobs")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; jobs by state: {_job_states(cluster)}") from None
        received = pacs.received()
        missing = set(sent) - set(received)
        assert not missing, f"{len(missing)} acknowledged instance(s) never arrived"
        assert set(received) == set(sent)
        with cluster.index.connect() as conn:
            interrupted = conn.execute(
                select(attempts.c.job_id).where(
                    attempts.c.job_id.in_(held.jobs), attempts.c.outcome == "interrupted"
                )
            ).all()
        assert interrupted, "the killed node's jobs were not taken back from its lease"
        for uid in list(held.pending)[:3] + list(sent)[:2]:  # as sent, byte for byte
            original = dcmread(sent[uid])
            for copy in pacs.files_of(uid):
                arrived = dcmread(copy)
                # Every element (group 0002, the file's meta, is storescp's own).
                assert list(arrived) == list(original), f"{uid}: differs from what was sent"
                assert arrived.PixelData == original.PixelData

        # At least once: a duplicate is only ever something the killed node held.
        duplicates = {uid: n - 1 for uid, n in received.items() if n > 1}
        print(
            f"duplicates: {sum(duplicates.values())} instance(s) received twice, of "
            f"{len(sent)} sent; bound: {len(held.pending)} (held undelivered by {victim})"
        )
        assert set(duplicates) <= held.pending, "a duplicate the killed node did not hold"
        assert max(received.values()) <= 2

        # The killed node rejoins: it plans nothing again and sends nothing again.
        before, files_before = _state(cluster), len(pacs.received_files())
        assert before["unplanned"] == 0
        assert all(routed != -1 for _, routed, _ in before["instances"]), "set aside"
        restarted_at = time.time()
        cluster[victim].start()
        wait_until(
            lambda: _second_heartbeat(cluster, victim, restarted_at - 1),
            60,
            0.5,
            f"{victim} planning again",
        )
        assert _state(cluster) == before
        assert len(pacs.received_files()) == files_before
        assert len(before["instances"]) == len(sent)
        for name, log in cluster.logs().items():
            assert "set aside" not in log, f"{name} set instances aside:\n{log[-3000:]}"
