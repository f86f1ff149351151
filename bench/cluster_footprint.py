#!/usr/bin/env python
"""What one node of a cluster costs: memory per process and PostgreSQL connections,
for docs/deployment.md "Sizing".

N nodes (tests/support/cluster.py: real ``dicomrouter serve`` processes, one
PostgreSQL, one shared folder) route to one dcmtk ``storescp``; one ``storescu`` per
node sends it a study of small instances, all at once. Every 0.5 s the script reads,
for each process of each node (the node, and the children its log names: dispatch,
http, receivers), PSS from ``/proc/<pid>/smaps_rollup`` and RSS from
``/proc/<pid>/status``, and counts the PostgreSQL connections of each node
(``pg_stat_activity`` by ``application_name``, which the harness sets to the node's
name). It reports each at idle (before the sends) and at its peak (until every job
completed), how much the database grew per instance routed (``pg_database_size``),
and checks that every instance arrived.

    PYTHONPATH=src python3 bench/cluster_footprint.py --nodes 2 --instances 300
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # tests.support when run as a script

from sqlalchemy import func, select, text  # noqa: E402

from dicomrouter.store.schema import jobs  # noqa: E402
from tests.support.cluster import Cluster, PausableStoreSCP  # noqa: E402
from tests.support.dcmtk import HOST, free_port  # noqa: E402
from tests.support.postgres import throwaway_cluster  # noqa: E402
from tests.support.router import wait_until  # noqa: E402
from tests.support.synth import make_study  # noqa: E402

_STARTED = re.compile(r"(\S+) process started \(pid (\d+)\)")


def _kb(path: str, field: str) -> int:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def processes(cluster: Cluster) -> dict[tuple[str, str], int]:
    """(node, role) -> pid, the children as each node's log last named them."""
    found: dict[tuple[str, str], int] = {}
    for name, node in cluster.nodes.items():
        assert node.process is not None
        found[(name, "node")] = node.process.pid
        for role, pid in _STARTED.findall(node.log()):
            found[(name, role)] = int(pid)
    return found


def connections(cluster: Cluster) -> dict[str, int]:
    with cluster.index.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT application_name, count(*) FROM pg_stat_activity "
                "WHERE datname = current_database() GROUP BY application_name"
            )
        ).all()
    return {str(name): int(count) for name, count in rows}


def database_size(cluster: Cluster) -> int:
    with cluster.index.connect() as conn:
        return int(conn.execute(text("SELECT pg_database_size(current_database())")).scalar_one())


class Sampler(threading.Thread):
    def __init__(self, cluster: Cluster):
        super().__init__(daemon=True)
        self.cluster = cluster
        self.peak_pss: dict[tuple[str, str], int] = defaultdict(int)
        self.peak_rss: dict[tuple[str, str], int] = defaultdict(int)
        self.peak_conn: dict[str, int] = defaultdict(int)
        self.done = threading.Event()

    def sample(self) -> tuple[dict[tuple[str, str], tuple[int, int]], dict[str, int]]:
        memory = {
            key: (_kb(f"/proc/{pid}/smaps_rollup", "Pss"), _kb(f"/proc/{pid}/status", "VmRSS"))
            for key, pid in processes(self.cluster).items()
        }
        return memory, connections(self.cluster)

    def run(self) -> None:
        while not self.done.wait(0.5):
            memory, conns = self.sample()
            for key, (pss, rss) in memory.items():
                self.peak_pss[key] = max(self.peak_pss[key], pss)
                self.peak_rss[key] = max(self.peak_rss[key], rss)
            for name, count in conns.items():
                self.peak_conn[name] = max(self.peak_conn[name], count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--instances", type=int, default=300, help="per node")
    args = parser.parse_args()
    names = [f"node-{chr(ord('a') + i)}" for i in range(args.nodes)]
    with (
        tempfile.TemporaryDirectory(prefix="cluster-footprint-") as tmp,
        throwaway_cluster(durable=True) as server,
        server.database("footprint") as url,
    ):
        work = Path(tmp)
        studies = [
            make_study(work / "in", args.instances, prefix=f"S{i}", patient_id=f"FOOT{i}")
            for i in range(args.nodes)
        ]
        pacs = PausableStoreSCP(free_port(), "PACS", work / "pacs")
        config = {
            "destinations": {
                "pacs": {"ae_title": "PACS", "host": HOST, "port": pacs.port, "max_associations": 4}
            },
            "routes": [{"name": "all", "trigger": "instance", "to": ["pacs"]}],
        }
        cluster = Cluster(work / "cluster", url, config, names)
        with pacs, cluster:
            sampler = Sampler(cluster)
            time.sleep(6)  # a heartbeat and the first planning passes: idle
            idle_memory, idle_conns = sampler.sample()
            idle_size = database_size(cluster)
            sampler.start()
            started = time.monotonic()
            with ThreadPoolExecutor(args.nodes) as pool:
                results = list(
                    pool.map(lambda p: p[0].send(p[1]), zip(cluster, studies, strict=True))
                )
            assert all(r.returncode == 0 for r in results), [r.stderr for r in results]

            def settled() -> bool:
                with cluster.index.connect() as conn:
                    states = dict(
                        conn.execute(
                            select(jobs.c.state, func.count()).group_by(jobs.c.state)
                        ).all()
                    )
                return set(states) == {"completed"} and sum(states.values()) == len(
                    sum(studies, [])
                )

            wait_until(settled, 600, 0.5, "every job completed")
            elapsed = time.monotonic() - started
            sampler.done.set()
            sampler.join()
            assert len(pacs.received()) == args.nodes * args.instances, "instances missing"
            grown = database_size(cluster) - idle_size
        print(
            f"\n{args.nodes} nodes, {args.instances} small instances sent to each, "
            f"routed in {elapsed:.1f} s\n"
        )
        print("| node | process | PSS idle MB | PSS peak MB | RSS idle MB | RSS peak MB |")
        print("| --- | --- | --- | --- | --- | --- |")
        for key in sorted(idle_memory):
            pss, rss = idle_memory[key]
            print(
                f"| {key[0]} | {key[1]} | {pss / 1024:.0f} | {sampler.peak_pss[key] / 1024:.0f} "
                f"| {rss / 1024:.0f} | {sampler.peak_rss[key] / 1024:.0f} |"
            )
        print("\n| node | PostgreSQL connections idle | peak |")
        print("| --- | --- | --- |")
        for name in names:
            print(f"| {name} | {idle_conns.get(name, 0)} | {sampler.peak_conn.get(name, 0)} |")
        total = args.nodes * args.instances
        print(
            f"\nindex: +{grown / 1024:.0f} KB for {total} instances routed "
            f"({grown / total / 1024:.1f} KB each: instance, route match, job, delivery, attempt)"
        )


if __name__ == "__main__":
    main()
