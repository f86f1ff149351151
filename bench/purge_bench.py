#!/usr/bin/env python
"""Retention benchmark: the cost of a purge, and what it does to C-STORE latency.

Two parts:

A. **Purge cost.** An index and object store seeded with ``--objects`` delivered
   instances (tiny files, one study-level job per 1000 instances, every delivery
   completed), all due. Timed: a dry run, the purge itself (mark, move, check, in
   batches), and the history pruning of the same instances ``keep_history`` later.

B. **C-STORE latency while purging.** A running router (``python -m dicomrouter
   serve``) whose index holds ``--repeats`` groups of ``--group`` due instances.
   Interleaved legs per repeat: ``storescu`` sends ``--instances`` small images in
   one association alone (baseline), and again while a purge of one group runs in
   another process on the same index and storage (as the sweeper would). The time
   per instance is the storescu wall time divided by the instances sent; medians are
   reported, and their ratio. The purge runs as the sweeper runs it (paced and
   niced: ``retention.sweeper.in_background``), or at full speed with ``--by-hand``.
   The target: within 2x of the baseline.

Not a test (``tests/test_purge_bench.py`` only checks that it runs). See
``docs/benchmarks.md`` for numbers and the command.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # for tests.support when run as a script
if str(REPO / "src") not in sys.path:
    sys.path.insert(0, str(REPO / "src"))

from sqlalchemy import Engine, select  # noqa: E402

from dicomrouter.config import parse_config  # noqa: E402
from dicomrouter.retention import Purger  # noqa: E402
from dicomrouter.retention.prune import prune_history  # noqa: E402
from dicomrouter.store import ObjectStore, create_index_engine  # noqa: E402
from dicomrouter.store.schema import instances, job_instances, jobs  # noqa: E402
from tests.support.dcmtk import dcmtk_env, dcmtk_tool  # noqa: E402
from tests.support.router import RouterProcess  # noqa: E402
from tests.support.synth import make_small_study  # noqa: E402

DAY = 86400.0
PER_JOB = 1000
FILE_BYTES = 256


def seed(engine: Engine, store: ObjectStore, n: int, group: int, received_at: float) -> None:
    """``n`` delivered instances of ``group``, received (and delivered) at
    ``received_at``: rows, jobs, completed deliveries and tiny files. Cheap on
    purpose: bulk inserts, no fsync."""
    payload = b"\0" * FILE_BYTES
    rows = []
    for i in range(n):
        study = f"1.2.999.{group}.{i // PER_JOB}"
        series = f"{study}.1"
        sop = f"1.2.999.{group}.{i}.7"
        relative = f"{study}/{series}/{sop}.dcm"
        target = store.objects / relative
        if i % PER_JOB == 0:
            target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(payload)
        rows.append(
            {
                "sop_instance_uid": sop,
                "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
                "transfer_syntax_uid": "1.2.840.10008.1.2.1",
                "study_instance_uid": study,
                "series_instance_uid": series,
                "patient_id": f"P{group}",
                "patient_name": "BENCH^PURGE",
                "accession_number": "",
                "study_date": "20240101",
                "study_description": "",
                "modality": "CT",
                "path": relative,
                "size": FILE_BYTES,
                "received_at": received_at,
                "calling_ae": "BENCH",
                "called_ae": "DICOMROUTER",
                "source_address": "127.0.0.1",
                "generation": 1,
                "routed": 1,
            }
        )
    with engine.begin() as conn:
        conn.execute(instances.insert(), rows)
        ids = conn.execute(
            select(instances.c.id, instances.c.study_instance_uid)
            .where(instances.c.patient_id == f"P{group}")
            .order_by(instances.c.id)
        ).all()
        studies = sorted({row.study_instance_uid for row in ids})
        job_ids = dict(
            zip(
                studies,
                conn.execute(
                    jobs.insert().returning(jobs.c.id, sort_by_parameter_order=True),
                    [
                        {
                            "destination": "pacs",
                            "level": "study",
                            "resource_uid": study,
                            "study_instance_uid": study,
                            "routes": "all",
                            "state": "completed",
                            "next_attempt_at": received_at,
                            "created_at": received_at,
                            "updated_at": received_at,
                            "finished_at": received_at,
                        }
                        for study in studies
                    ],
                ).scalars(),
                strict=True,
            )
        )
        conn.execute(
            job_instances.insert(),
            [
                {
                    "job_id": job_ids[row.study_instance_uid],
                    "instance_id": row.id,
                    "destination": "pacs",
                    "generation": 1,
                    "state": "completed",
                    "status": 0,
                    "updated_at": received_at,
                }
                for row in ids
            ],
        )


def _config(storage: Path, **retention: Any) -> Any:
    return parse_config(
        {
            "storage": {"path": str(storage), "min_free_space": 0},
            "destinations": {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": 1}},
            "retention": retention,
        },
        environ={},
    )


def purge_cost(workdir: Path, n: int) -> dict[str, Any]:
    storage = workdir / "cost"
    config = _config(storage)
    store = ObjectStore(storage, "bench")
    store.prepare()
    engine = create_index_engine(config.database_url)
    started = time.perf_counter()
    long_ago = time.time() - 30 * DAY
    seed(engine, store, n, 0, long_ago)
    seeded_s = time.perf_counter() - started
    index_bytes = (storage / "index.sqlite").stat().st_size + _wal(storage)
    purger = Purger(config, engine, store)
    t0 = time.perf_counter()
    dry = purger.run(dry_run=True, scan_orphans=False)
    dry_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    report = purger.run(scan_orphans=False)
    purge_s = time.perf_counter() - t0
    assert report.purged == n == dry.purged, (report.purged, dry.purged, n)
    t0 = time.perf_counter()
    pruned = prune_history(engine, time.time() + 1)
    prune_s = time.perf_counter() - t0
    engine.dispose()
    shutil.rmtree(storage, ignore_errors=True)
    return {
        "objects": n,
        "seed_s": seeded_s,
        "index_bytes_per_instance": index_bytes / n,
        "dry_run_s": dry_s,
        "purge_s": purge_s,
        "purge_us_per_object": purge_s / n * 1e6,
        "history_prune_s": prune_s,
        "history_rows": pruned,
    }


def _wal(storage: Path) -> int:
    wal = storage / "index.sqlite-wal"
    return wal.stat().st_size if wal.exists() else 0


_PURGER = """
import sys, time
sys.path.insert(0, {src!r})
from dicomrouter.config import parse_config
from dicomrouter.retention import Purger
from dicomrouter.store import ObjectStore, create_index_engine
config = parse_config({config!r}, environ={{}})
purger = Purger(config, create_index_engine(config.database_url, create=False),
                ObjectStore(config.storage.path, config.node.name))
if {background!r}:
    from dicomrouter.retention.sweeper import in_background
    in_background(purger)  # as the sweeper runs it
print("purging", flush=True)
t0 = time.perf_counter()
report = purger.run(now={now!r}, scan_orphans=False)
print("done", report.purged, time.perf_counter() - t0, flush=True)
"""


def _storescu(port: int, folder: Path) -> float:
    command = [dcmtk_tool("storescu"), "-aet", "BENCHSCU", "-aec", "DICOMROUTER"]
    command += ["-to", "10", "-ta", "30", "-td", "60", "+sd", "+r", "127.0.0.1", str(port)]
    t0 = time.perf_counter()
    result = subprocess.run(
        [*command, str(folder)], env=dcmtk_env(), capture_output=True, text=True, timeout=600
    )
    took = time.perf_counter() - t0
    if result.returncode != 0:
        raise RuntimeError(f"storescu failed: {result.stdout[-500:]} {result.stderr[-500:]}")
    return took


def latency(
    workdir: Path, group: int, repeats: int, sent: int, by_hand: bool = False
) -> dict[str, Any]:
    storage = workdir / "latency" / "data"
    storage.mkdir(parents=True, exist_ok=True)
    # The router's own sweeper must not take the groups: far thresholds, one run a year.
    far = {
        "delete_delivered_after": "100000d",
        "delete_unrouted_after": "100000d",
        "interval": "365d",
    }
    config = _config(storage, **far)
    store = ObjectStore(storage, "bench")
    store.prepare()
    engine = create_index_engine(config.database_url)
    base = time.time() - 1000 * DAY
    for g in range(repeats):
        seed(engine, store, group, g + 1, base + g * 10 * DAY)
    engine.dispose()
    batches = [
        make_small_study(workdir / "send" / f"leg{k}", sent, prefix=f"L{k}")
        for k in range(2 * repeats)
    ]
    folders = [files[0].parent for files in batches]
    purge_config = json.loads(
        _config(
            storage, delete_delivered_after="7d", delete_unrouted_after="100000d"
        ).model_dump_json()
    )
    src = str(REPO / "src")
    baseline: list[float] = []
    during: list[float] = []
    purges: list[dict[str, float]] = []
    router = RouterProcess(
        workdir / "latency",
        {
            "storage": {"path": str(storage), "min_free_space": 0},
            "retention": far,
        },
    )
    with router:
        _wait_first_sweep(config.database_url)
        for g in range(repeats):
            legs = ["baseline", "purge"] if g % 2 == 0 else ["purge", "baseline"]
            for leg in legs:
                folder = folders[2 * g + (leg == "purge")]
                if leg == "baseline":
                    baseline.append(_storescu(router.port, folder) / sent)
                    continue
                now = base + g * 10 * DAY + 7 * DAY + 1
                code = _PURGER.format(src=src, config=purge_config, now=now, background=not by_hand)
                proc = subprocess.Popen(
                    [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True
                )
                assert proc.stdout is not None
                assert proc.stdout.readline().strip() == "purging"
                t0 = time.perf_counter()
                took = _storescu(router.port, folder)
                stored_until = time.perf_counter() - t0
                line = proc.stdout.readline().split()
                proc.wait(600)
                during.append(took / sent)
                purges.append(
                    {
                        "purged": float(line[1]),
                        "purge_s": float(line[2]),
                        "storescu_s": stored_until,
                    }
                )
    base_median = statistics.median(baseline)
    during_median = statistics.median(during)
    return {
        "group": group,
        "repeats": repeats,
        "instances_per_leg": sent,
        "baseline_ms_per_instance": [v * 1000 for v in baseline],
        "during_purge_ms_per_instance": [v * 1000 for v in during],
        "baseline_median_ms": base_median * 1000,
        "during_purge_median_ms": during_median * 1000,
        "ratio": during_median / base_median,
        # Per repeat, the two legs ran back to back: their ratio cancels slow drift of
        # a shared machine better than the ratio of the medians.
        "paired_ratios": [d / b for d, b in zip(during, baseline, strict=True)],
        "median_paired_ratio": statistics.median(
            d / b for d, b in zip(during, baseline, strict=True)
        ),
        "purges": purges,
        "purge_outlasted_storescu": all(p["purge_s"] >= p["storescu_s"] for p in purges),
        "purge": "by hand (full speed)" if by_hand else "as the sweeper (paced, niced)",
    }


def _wait_first_sweep(url: str, timeout: float = 120.0) -> None:
    """The router's sweeper runs once at start-up (and holds the purge lock meanwhile)."""
    from dicomrouter.store.schema import purge_runs

    engine = create_index_engine(url, create=False)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            with engine.connect() as conn:
                if conn.execute(
                    select(purge_runs.c.id).where(purge_runs.c.ended_at.is_not(None))
                ).first():
                    return
            time.sleep(0.2)
    finally:
        engine.dispose()
    raise RuntimeError("the router's first retention sweep did not finish")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--objects", type=int, default=100_000, help="part A: objects purged")
    parser.add_argument("--group", type=int, default=20_000, help="part B: objects per purge")
    parser.add_argument("--repeats", type=int, default=3, help="part B: legs of each kind")
    parser.add_argument("--instances", type=int, default=200, help="part B: images per leg")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch parent folder")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--skip-latency", action="store_true", help="part A only")
    parser.add_argument(
        "--by-hand",
        action="store_true",
        help="part B: purge at full speed, as 'dicomrouter purge' does (default: as the "
        "sweeper does, paced and niced)",
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("TCP_NODELAY", "1")
    scratch = Path(tempfile.mkdtemp(prefix="dicomrouter-purge-bench-", dir=args.workdir))
    try:
        results: dict[str, Any] = {"cost": purge_cost(scratch, args.objects)}
        cost = results["cost"]
        print(
            f"A. purge of {cost['objects']} objects: {cost['purge_s']:.2f} s "
            f"({cost['purge_us_per_object']:.0f} us/object); dry run {cost['dry_run_s']:.2f} s; "
            f"history pruning {cost['history_prune_s']:.2f} s ({cost['history_rows']} rows); "
            f"index {cost['index_bytes_per_instance']:.0f} bytes/instance"
        )
        if not args.skip_latency:
            results["latency"] = latency(
                scratch, args.group, args.repeats, args.instances, by_hand=args.by_hand
            )
            lat = results["latency"]
            print(
                f"B. C-STORE, {lat['instances_per_leg']} small instances per leg, "
                f"{lat['repeats']} legs each: "
                f"baseline {lat['baseline_median_ms']:.2f} ms/instance, "
                f"while purging {lat['group']} objects {lat['during_purge_median_ms']:.2f} "
                f"ms/instance; ratio {lat['ratio']:.2f}, "
                f"median paired ratio {lat['median_paired_ratio']:.2f} "
                f"(purge outlasted every leg: {lat['purge_outlasted_storescu']})"
            )
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
