"""Routing history for API tests, made by the real receive, plan and settle code.

``receive`` stores and indexes files as the receiver does (``ObjectStore.commit`` then
``InstanceIndex.record``, with a chosen sender and reception time), ``plan`` runs the
real ``Planner`` (stable triggers fire at once), and ``settle`` claims a
destination's jobs and records per-instance outcomes as a dispatch worker does.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from dicomrouter.queue import ItemResult, JobStore, Planner
from dicomrouter.queue import states as S
from dicomrouter.store import InstanceHeader, InstanceIndex, Provenance, read_header
from tests.support.api import ApiEnv

DEST = {"ae_title": "PACS", "host": "127.0.0.1", "port": 4242}


def receive(
    env: ApiEnv,
    files: list[Path],
    calling_ae: str = "CT1",
    address: str = "10.1.2.3",
    received_at: float | None = None,
) -> None:
    for file in files:
        header = InstanceHeader.from_dataset(read_header(file))
        temp = env.store.tmp / file.name
        shutil.copyfile(file, temp)
        relative = env.store.relative_path(
            header.study_instance_uid, header.series_instance_uid, header.sop_instance_uid
        )
        env.store.commit(temp, relative)
        InstanceIndex(env.engine).record(
            header,
            relative,
            file.stat().st_size,
            Provenance(calling_ae, env.config.ae_title, address),
            received_at=received_at,
        )


def plan(env: ApiEnv) -> None:
    planner = Planner(env.ctx.config, env.engine, env.store)
    while planner.route_new_instances():
        pass
    planner.fire_stable_triggers(now=10**10)


def settle(env: ApiEnv, destination: str, ok: bool = True) -> list[int]:
    """Claim the destination's jobs; deliver every instance, or fail it for good."""
    jobs = JobStore(env.engine)
    claim = jobs.claim(destination, "test-worker", lease=60)
    assert claim is not None, f"no job for {destination}"
    state, status = (S.ITEM_COMPLETED, 0) if ok else (S.ITEM_FAILED, 0xC000)
    message = "" if ok else "0xC000 cannot understand"
    jobs.record_results(
        [ItemResult(i.job_id, i.instance_id, state, status, message) for i in claim.items]
    )
    jobs.finish(
        claim,
        env.config.destinations[destination],
        count_attempt=True,
        unavailable_delay=0.0,
        message=message,
        outcome="completed" if ok else "failed",
        sent=len(claim.items) if ok else 0,
        failed=0 if ok else len(claim.items),
    )
    return claim.job_ids
