"""Destination health shared by several nodes on one index: failures seen by any node
count together, a pause or a resume written by one is obeyed by all, and one node at
a time probes a paused destination (the ``probe_owner`` lease), another taking over
when its lease runs out. Two :class:`DestinationHealth` objects on two engines with
two owners stand for two nodes (run on both databases)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import Engine, select

from dicomrouter.config import parse_config
from dicomrouter.dispatch.health import PAUSED, DestinationHealth
from dicomrouter.store import create_index_engine
from dicomrouter.store.schema import destination_state
from tests.support.router import wait_until


@dataclass
class Nodes:
    a: DestinationHealth
    b: DestinationHealth
    engine: Engine

    def row(self) -> dict[str, object]:
        with self.engine.connect() as conn:
            found = conn.execute(
                select(destination_state).where(destination_state.c.name == "pacs")
            ).one()
        return dict(found._mapping)


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[Nodes]:
    config = parse_config(
        {
            "storage": {"path": str(tmp_path / "data")},
            "destinations": {
                "pacs": {
                    "ae_title": "PACS",
                    "host": "127.0.0.1",
                    "port": 104,
                    "pause_after_failures": 3,
                    "probe_interval": "1s",
                }
            },
        },
        environ={},
    )
    config.storage.path.mkdir(parents=True)
    first = create_index_engine(config.database_url)
    second = create_index_engine(config.database_url, create=False)
    dest = config.destinations["pacs"]
    yield Nodes(
        DestinationHealth("pacs", dest, first, owner="node-a"),
        DestinationHealth("pacs", dest, second, owner="node-b"),
        first,
    )
    first.dispose()
    second.dispose()


def test_failures_on_two_nodes_pause_it_for_both(nodes: Nodes) -> None:
    nodes.a.record_unreachable("connection refused")
    nodes.b.record_unreachable("connection refused")
    assert not nodes.b.paused and nodes.b.failures == 2  # counted across nodes
    nodes.a.record_unreachable("connection refused")  # the third, wherever it is seen
    assert nodes.a.paused and nodes.row()["state"] == PAUSED
    wait_until(lambda: nodes.b.paused, 3, interval=0.05, message="node b sees the pause")
    assert nodes.b.unreachable and nodes.b.last_error == "connection refused"


def test_one_node_probes_and_another_takes_over_when_its_lease_runs_out(nodes: Nodes) -> None:
    for health in (nodes.a, nodes.b, nodes.a):
        health.record_unreachable("connection refused")
    # The first probe is due one interval after the pause; node a takes the lease.
    wait_until(nodes.a.probe_due, 5, interval=0.05, message="the first probe")
    assert nodes.row()["probe_owner"] == "node-a"
    assert not nodes.b.probe_due()  # a's lease lives: b never probes meanwhile
    nodes.a.probe_failed("still refused")
    # a goes on probing every interval, renewing its lease each time; b stays out.
    wait_until(nodes.a.probe_due, 5, interval=0.05, message="a's next probe")
    assert not nodes.b.probe_due()
    assert nodes.row()["probe_owner"] == "node-a"
    # a dies (it probes no more): its lease runs out and b takes over.
    wait_until(nodes.b.probe_due, 10, interval=0.05, message="b takes the probe over")
    assert nodes.row()["probe_owner"] == "node-b"
    assert not nodes.a.probe_due()  # back, a finds b's lease and leaves it alone


def test_a_resume_by_the_prober_is_seen_by_every_node(nodes: Nodes) -> None:
    for health in (nodes.a, nodes.b, nodes.b):
        health.record_unreachable("connection refused")
    wait_until(lambda: nodes.a.paused and nodes.b.paused, 3, interval=0.05, message="paused")
    wait_until(nodes.b.probe_due, 5, interval=0.05, message="b probes")
    nodes.b.resume()
    assert not nodes.b.paused
    wait_until(lambda: not nodes.a.paused, 3, interval=0.05, message="a sees the resume")
    row = nodes.row()
    assert (row["state"], row["consecutive_failures"], row["probe_owner"]) == ("ok", 0, None)
    # The count starts again from zero on every node.
    nodes.a.record_unreachable("refused")
    assert not nodes.a.paused and nodes.a.failures == 1
