#!/usr/bin/env python
"""How the operator surface's queries scale with the index: a synthetic index of N
instances (100 per study, every instance matched by one route and delivered, one job
per 10 instances over ~N/2 seconds of history), then the median of 3 runs of each
control-plane call the dashboard and the API make.

    python bench/index_queries.py --instances 1000000

Not a test: run by hand (building 1M rows takes about a minute).
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from dicomrouter.config import parse_config
from dicomrouter.control import destinations, jobs, routes, status, studies
from dicomrouter.store import ObjectStore, create_index_engine

INSERT_INSTANCE = (
    "INSERT INTO instances (sop_instance_uid, sop_class_uid, transfer_syntax_uid, "
    "study_instance_uid, series_instance_uid, patient_id, patient_name, accession_number, "
    "study_date, study_description, modality, path, size, received_at, calling_ae, "
    "called_ae, source_address, generation, routed) "
    "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
)
INSERT_JOB = (
    "INSERT INTO jobs (destination, level, resource_uid, study_instance_uid, routes, state, "
    "priority, attempts, next_attempt_at, created_at, updated_at, finished_at) "
    "VALUES (?,?,?,?,?,?,?,?,?,?,?,?)"
)


def build(path: Path, n: int) -> None:
    create_index_engine(f"sqlite:///{path}").dispose()
    db = sqlite3.connect(path)
    now = time.time()
    db.executemany(
        INSERT_INSTANCE,
        (
            (f"1.2.{i}", "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1", f"1.3.{i // 100}",
             f"1.4.{i // 100}", f"P{i // 100 % 5000}", "DOE^J", f"A{i // 100}", "20261122",
             "CT HEAD", "CT", f"x/{i}.dcm", 9000, now - (n - i) * 0.5, "CT1", "R",
             "127.0.0.1", 1, 1)
            for i in range(n)
        ),
    )  # fmt: skip
    db.executemany(
        "INSERT INTO route_matches VALUES (?,?,?,?)",
        ((i + 1, "all", 1, now - (n - i) * 0.5) for i in range(n)),
    )
    count = n // 10
    db.executemany(
        INSERT_JOB,
        (
            ("pacs", "study", f"1.3.{j}", f"1.3.{j}", "all", "completed", 0, 0, now,
             now - (count - j) * 5, now - (count - j) * 5, now)
            for j in range(count)
        ),
    )  # fmt: skip
    db.executemany(
        "INSERT INTO job_instances VALUES (?,?,?,?,?,?,?,?)",
        ((i // 10 + 1, i + 1, "pacs", 1, "completed", 0, None, now - (n - i) * 0.5)
         for i in range(n)),
    )  # fmt: skip
    db.commit()
    db.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=1_000_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        started = time.perf_counter()
        build(root / "index.sqlite", args.instances)
        print(f"built {args.instances} instances in {time.perf_counter() - started:.0f} s")
        config = parse_config(
            {
                "storage": {"path": str(root)},
                "destinations": {"pacs": {"ae_title": "P", "host": "127.0.0.1", "port": 4242}},
                "routes": [{"name": "all", "to": ["pacs"]}],
            },
            environ={},
        )
        url = f"sqlite:///{root / 'index.sqlite'}"
        ctx = SimpleNamespace(
            config=config,
            engine=create_index_engine(url, create=False),
            reader=create_index_engine(url, create=False, writer=False),
            store=ObjectStore(root),
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
            times = []
            for _ in range(3):
                begin = time.perf_counter()
                call()
                times.append(time.perf_counter() - begin)
            print(f"{name:30} {statistics.median(times) * 1000:10.1f}")


if __name__ == "__main__":
    main()
