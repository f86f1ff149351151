#!/usr/bin/env python
"""How the operator surface's queries, claims and planning scale with the index: a
synthetic index of N instances (100 per study, every instance matched by one route and
delivered, one job per 10 instances over ~N/2 seconds of history), then the median of
3 runs of each control-plane call the dashboard and the API make; then every job
queued again (N/10 pending jobs) and the median of 3 claims (200 jobs) and of 3
planner batches (100 new instances, instance-level route).

    python bench/index_queries.py --instances 1000000
    python bench/index_queries.py --instances 1000000 --postgresql

``--postgresql`` puts the index on a PostgreSQL cluster the bench starts itself
(Debian's ``postgresql``, fsync on; tests/support/postgres.py). Not a test: run by
hand (building 1M rows takes about a minute on SQLite, a few on PostgreSQL).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from sqlalchemy import Engine, Table, update

from dicomrouter.config import parse_config
from dicomrouter.control import destinations, jobs, routes, status, studies
from dicomrouter.queue import JobStore, Planner
from dicomrouter.store import ObjectStore, create_index_engine
from dicomrouter.store.schema import instances, job_instances, route_matches
from dicomrouter.store.schema import jobs as jobs_table

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # for tests.support when run as a script

CHUNK = 10_000


def _instance(i: int, n: int, now: float, routed: int = 1) -> dict[str, Any]:
    return {
        "sop_instance_uid": f"1.2.{i}", "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
        "transfer_syntax_uid": "1.2.840.10008.1.2.1", "study_instance_uid": f"1.3.{i // 100}",
        "series_instance_uid": f"1.4.{i // 100}", "patient_id": f"P{i // 100 % 5000}",
        "patient_name": "DOE^J", "accession_number": f"A{i // 100}", "study_date": "20261122",
        "study_description": "CT HEAD", "modality": "CT", "path": f"x/{i}.dcm", "size": 9000,
        "received_at": now - (n - i) * 0.5, "calling_ae": "CT1", "called_ae": "R",
        "source_address": "127.0.0.1", "generation": 1, "routed": routed,
    }  # fmt: skip


def _insert(engine: Engine, table: Table, rows: Iterable[dict[str, Any]]) -> None:
    iterator = iter(rows)
    while chunk := list(itertools.islice(iterator, CHUNK)):
        with engine.begin() as conn:
            conn.execute(table.insert(), chunk)


def build(url: str, n: int) -> None:
    engine = create_index_engine(url)
    now = time.time()
    _insert(engine, instances, (_instance(i, n, now) for i in range(n)))
    _insert(
        engine,
        route_matches,
        (
            {
                "instance_id": i + 1,
                "route": "all",
                "generation": 1,
                "matched_at": now - (n - i) * 0.5,
            }
            for i in range(n)
        ),
    )
    count = n // 10
    _insert(
        engine,
        jobs_table,
        (
            {"destination": "pacs", "level": "study", "resource_uid": f"1.3.{j}",
             "study_instance_uid": f"1.3.{j}", "routes": "all", "state": "completed",
             "priority": 0, "attempts": 0, "next_attempt_at": now,
             "created_at": now - (count - j) * 5, "updated_at": now - (count - j) * 5,
             "finished_at": now}
            for j in range(count)
        ),
    )  # fmt: skip
    _insert(
        engine,
        job_instances,
        (
            {"job_id": i // 10 + 1, "instance_id": i + 1, "destination": "pacs",
             "generation": 1, "state": "completed", "status": 0,
             "updated_at": now - (n - i) * 0.5}
            for i in range(n)
        ),
    )  # fmt: skip
    _vacuum_analyze(engine)
    engine.dispose()


def _vacuum_analyze(engine: Engine) -> None:
    """PostgreSQL after a bulk load or a bulk update: statistics for the planner and
    no dead rows, as autovacuum would leave a live index (SQLite: as it is)."""
    if engine.dialect.name != "postgresql":
        return
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("VACUUM ANALYZE")


def _median_ms(call: Callable[[], Any], runs: int = 3) -> float:
    times = []
    for _ in range(runs):
        begin = time.perf_counter()
        call()
        times.append(time.perf_counter() - begin)
    return statistics.median(times) * 1000


def claim_and_plan(url: str, root: Path, n: int) -> dict[str, float]:
    """Every job queued again (pending, due), then claims and planner batches."""
    engine = create_index_engine(url, create=False)
    with engine.begin() as conn:
        conn.execute(
            update(jobs_table).values(state="pending", next_attempt_at=0, finished_at=None)
        )
        conn.execute(update(job_instances).values(state="pending"))
    _vacuum_analyze(engine)
    queue = JobStore(engine)
    claims = iter(range(3))
    claim_ms = _median_ms(lambda: queue.claim("pacs", f"bench-{next(claims)}", lease=60))
    config = parse_config(
        {
            "storage": {"path": str(root)},
            "destinations": {"pacs": {"ae_title": "P", "host": "127.0.0.1", "port": 4242}},
            "routes": [{"name": "all", "trigger": "instance", "to": ["pacs"]}],
        },
        environ={},
    )
    now = time.time()
    _insert(engine, instances, (_instance(n + i, n, now, routed=0) for i in range(300)))
    _vacuum_analyze(engine)
    planner = Planner(config, engine, ObjectStore(root, "bench"))
    plan_ms = _median_ms(planner.route_new_instances)
    engine.dispose()
    return {"claim 200 jobs": claim_ms, "plan 100 instances": plan_ms}


@contextlib.contextmanager
def index_url(root: Path, postgresql: bool) -> Iterator[str]:
    if not postgresql:
        yield f"sqlite:///{root / 'index.sqlite'}"
        return
    from tests.support.postgres import throwaway_cluster

    with throwaway_cluster(durable=True) as server, server.database("bench") as url:
        yield url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=1_000_000)
    parser.add_argument("--postgresql", action="store_true", help="index on PostgreSQL")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder, index_url(Path(folder), args.postgresql) as url:
        root = Path(folder)
        started = time.perf_counter()
        build(url, args.instances)
        print(f"built {args.instances} instances in {time.perf_counter() - started:.0f} s")
        config = parse_config(
            {
                "storage": {"path": str(root)},
                "destinations": {"pacs": {"ae_title": "P", "host": "127.0.0.1", "port": 4242}},
                "routes": [{"name": "all", "to": ["pacs"]}],
            },
            environ={},
        )
        ctx = SimpleNamespace(
            config=config,
            engine=create_index_engine(url, create=False),
            reader=create_index_engine(url, create=False, writer=False),
            store=ObjectStore(root, "bench"),
            started_at=time.time(),
            config_path=None,
        )
        now = time.time()
        calls: dict[str, Callable[[], Any]] = {
            "node_status": lambda: status.node_status(ctx),
            "throughput 1 h / 60 s": lambda: status.throughput(ctx.reader, now - 3600, 60),
            "throughput 7 d / 1 h": lambda: status.throughput(ctx.reader, now - 7 * 86400, 3600),
            "destination_summaries": lambda: destinations.destination_summaries(ctx),
            "route_summaries": lambda: routes.route_summaries(ctx),
            "route_history (50)": lambda: routes.route_history(ctx.reader, "all", 50),
            "search_studies (no filter)": lambda: studies.search_studies(ctx.reader, limit=50),
            "search_studies (accession)": lambda: studies.search_studies(
                ctx.reader, accession_number="A77", limit=50
            ),
            "search_jobs (no filter)": lambda: jobs.search_jobs(
                ctx.reader, jobs.JobFilter(), 50, 0
            ),
            "search_jobs (accession)": lambda: jobs.search_jobs(
                ctx.reader, jobs.JobFilter(accession_number="A77"), 50, 0
            ),
            "study_trace": lambda: studies.study_trace(ctx, "1.3.77"),
        }
        print(f"{'call':30} {'median ms':>10}")
        for name, call in calls.items():
            print(f"{name:30} {_median_ms(call):10.1f}")
        ctx.engine.dispose()
        ctx.reader.dispose()
        print(f"-- {args.instances // 10} jobs queued")
        for name, ms in claim_and_plan(url, root, args.instances).items():
            print(f"{name:30} {ms:10.1f}")


if __name__ == "__main__":
    main()
