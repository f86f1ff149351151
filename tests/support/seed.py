"""Fill an API test's index through the real pipeline code, so the numbers are real.

Files are written to the object store and recorded by ``InstanceIndex`` exactly as
the receiver does, planned by the real ``Planner``, and deliveries are settled by
``JobStore.claim`` / ``record_results`` / ``finish`` as a dispatch worker does,
without the network.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from dicomrouter.queue import ItemResult, JobStore, Planner
from dicomrouter.queue import states as S
from dicomrouter.store import (
    InstanceHeader,
    InstanceIndex,
    ObjectStore,
    Provenance,
    read_header,
)
from tests.support.api import ApiEnv
from tests.support.synth import make_study


def store_as_receiver(
    store: ObjectStore, index: InstanceIndex, files: list[Path], provenance: Provenance
) -> list[str]:
    """Write ``files`` into the object store and index them as the receiver does
    (through ``tmp/``, the durable commit, then the index row); returns their
    relative paths. A file already held becomes the next generation."""
    paths = []
    for file in files:
        header = InstanceHeader.from_dataset(read_header(file))
        temp = store.tmp / f"in-{file.name}"
        shutil.copyfile(file, temp)
        relative = store.relative_path(
            header.study_instance_uid, header.series_instance_uid, header.sop_instance_uid
        )
        store.commit(temp, relative)
        index.record(header, relative, file.stat().st_size, provenance)
        paths.append(relative)
    return paths


class Seeder:
    def __init__(self, env: ApiEnv, workdir: Path):
        self.env = env
        self.workdir = workdir
        self.index = InstanceIndex(env.engine)
        self.planner = Planner(env.config, env.engine, env.store)
        self.jobs = JobStore(env.engine)
        self._studies = 0

    def receive_study(self, n: int = 2, calling_ae: str = "CT1", **options: Any) -> list[Path]:
        """Make a synthetic study, store and index it as the receiver would."""
        self._studies += 1
        files = make_study(
            self.workdir / f"study{self._studies}", n, prefix=f"S{self._studies}", **options
        )
        provenance = Provenance(calling_ae, "ROUTER", "10.0.0.9")
        store_as_receiver(self.env.store, self.index, files, provenance)
        return files

    def plan(self) -> None:
        while self.planner.route_new_instances():
            pass
        self.planner.fire_stable_triggers(now=10**10)

    def deliver(self, destination: str, fail: bool = False, max_jobs: int = 1000) -> list[int]:
        """Claim the destination's due jobs and settle them: every instance delivered,
        or every instance refused for good (0xC000). Returns the job ids."""
        claim = self.jobs.claim(destination, "test-worker", lease=60, max_jobs=max_jobs)
        if claim is None:
            return []
        state = S.ITEM_FAILED if fail else S.ITEM_COMPLETED
        status = 0xC000 if fail else 0x0000
        message = "refused: cannot understand" if fail else ""
        self.jobs.record_results(
            [ItemResult(i.job_id, i.instance_id, state, status, message) for i in claim.items]
        )
        n = len(claim.items)
        self.jobs.finish(
            claim,
            self.env.config.destinations[destination],
            count_attempt=True,
            unavailable_delay=0.0,
            message=message,
            outcome="failed" if fail else "completed",
            sent=0 if fail else n,
            failed=n if fail else 0,
        )
        return list(claim.job_ids)

    def unreachable(self, destination: str, reason: str = "connection refused") -> list[int]:
        """A worker could not connect: jobs go back to wait, with the error."""
        claim = self.jobs.claim(destination, "test-worker", lease=60)
        if claim is None:
            return []
        self.jobs.finish(
            claim,
            self.env.config.destinations[destination],
            count_attempt=False,
            unavailable_delay=30.0,
            message=reason,
            outcome="unavailable",
            sent=0,
            failed=0,
        )
        return list(claim.job_ids)
