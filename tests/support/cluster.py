"""Several router nodes on one index and one storage folder, as real processes.

The failure tests of several nodes (issue 14) need what a site runs: N
``dicomrouter serve`` processes (:class:`RouterProcess`), each with its own
``node.name``, DICOM port, HTTP port, configuration file and log, all on the same
PostgreSQL database and the same storage folder (docs/deployment.md, "Topologies").
On one machine the shared folder is a plain directory: what NFS must add to make it
shared between machines is in the same document.

Also here: a ``storescp`` destination that serves every node at once (``--fork``),
keeps every copy it receives (``+uf``: a duplicate is a second file, not an
overwrite) and can be paused and resumed (SIGSTOP/SIGCONT), so a test can hold
deliveries in the middle; and a read of the index's leases per node.
"""

from __future__ import annotations

import copy
import os
import signal
import subprocess
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from sqlalchemy import Engine, and_, select

from .dcmtk import StoreSCP
from .router import RouterProcess


@dataclass(frozen=True)
class Leases:
    """What one node holds in the queue: its in-progress jobs, and the instances of
    those jobs not yet recorded as delivered (sent or not: a kill leaves both kinds)."""

    node: str
    jobs: frozenset[int]
    pending: frozenset[str]  # SOP Instance UIDs


def owner_node(lease_owner: str) -> str:
    """The node of a lease owner, ``<node>:<pid>:<destination>:<worker>`` (a node
    name has no colon: ``node.name`` allows letters, digits, ``.``, ``_``, ``-``)."""
    return lease_owner.partition(":")[0]


def with_application_name(url: str, name: str) -> str:
    """A PostgreSQL URL whose connections say which node opened them
    (``pg_stat_activity.application_name``), as docs/deployment.md advises."""
    if not url.startswith("postgres") or "application_name=" in url:
        return url
    return f"{url}{'&' if '?' in url else '?'}application_name={name}"


class Cluster:
    """``with Cluster(workdir, database_url, config, names) as cluster:`` starts one
    node per name and stops them all afterwards.

    ``config`` is what every node shares (destinations, routes, dispatch...); each
    node gets ``node.name``, ``database`` and ``storage.path`` (``<workdir>/shared``)
    on top, and :class:`RouterProcess` gives it free DICOM and HTTP ports.
    """

    def __init__(
        self,
        workdir: Path,
        database_url: str,
        config: dict[str, Any],
        names: Sequence[str] = ("node-a", "node-b", "node-c"),
    ):
        if len(set(names)) != len(names):
            raise ValueError(f"node names must differ: {list(names)}")
        self.workdir = Path(workdir)
        self.database_url = database_url
        self.storage = self.workdir / "shared"
        self.nodes: dict[str, RouterProcess] = {}
        for name in names:
            node_config = copy.deepcopy(config)
            node_config["node"] = {**node_config.get("node", {}), "name": name}
            node_config["database"] = with_application_name(database_url, name)
            node_config.setdefault("storage", {})["path"] = str(self.storage)
            self.nodes[name] = RouterProcess(self.workdir / name, node_config)
        self._index: Engine | None = None

    def __getitem__(self, name: str) -> RouterProcess:
        return self.nodes[name]

    def __iter__(self) -> Iterator[RouterProcess]:
        return iter(self.nodes.values())

    @property
    def names(self) -> list[str]:
        return list(self.nodes)

    def start(self, timeout: float = 90.0) -> Cluster:
        """Start every node at once (each waits until it is ready); if one fails, the
        others are stopped and the error raised."""
        with ThreadPoolExecutor(len(self.nodes)) as pool:
            futures = [pool.submit(node.start, timeout) for node in self]
            errors = [f.exception() for f in futures]
        failed = [e for e in errors if e is not None]
        if failed:
            self.stop()
            raise failed[0]
        return self

    def stop(self) -> None:
        """Stop every node that runs (SIGTERM, in parallel: stops overlap)."""
        with ThreadPoolExecutor(len(self.nodes)) as pool:
            list(pool.map(lambda node: node.stop(), self))
        if self._index is not None:
            self._index.dispose()
            self._index = None

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def logs(self) -> dict[str, str]:
        return {name: node.log() for name, node in self.nodes.items()}

    # -- the shared index, read from outside ------------------------------------------
    @property
    def index(self) -> Engine:
        """A read-only engine on the shared index (no write lock taken)."""
        if self._index is None:
            from dicomrouter.store import create_index_engine

            self._index = create_index_engine(self.database_url, create=False, writer=False)
        return self._index

    def leases(self) -> dict[str, Leases]:
        """Per node, the jobs it holds ``in_progress`` and their undelivered
        instances, read from the index in one transaction."""
        from dicomrouter.store.schema import instances, job_instances, jobs

        held: dict[str, set[int]] = {}
        pending: dict[str, set[str]] = {}
        with self.index.connect() as conn:
            for row in conn.execute(
                select(jobs.c.id, jobs.c.lease_owner).where(jobs.c.state == "in_progress")
            ):
                held.setdefault(owner_node(row.lease_owner or ""), set()).add(row.id)
            for row in conn.execute(
                select(jobs.c.lease_owner, instances.c.sop_instance_uid)
                .join(job_instances, job_instances.c.job_id == jobs.c.id)
                .join(instances, instances.c.id == job_instances.c.instance_id)
                .where(and_(jobs.c.state == "in_progress", job_instances.c.state == "pending"))
            ):
                pending.setdefault(owner_node(row.lease_owner or ""), set()).add(
                    row.sop_instance_uid
                )
        return {
            node: Leases(node, frozenset(ids), frozenset(pending.get(node, ())))
            for node, ids in held.items()
        }


class PausableStoreSCP(StoreSCP):
    """dcmtk ``storescp`` serving several associations at once (``--fork``: one
    child per association, as several nodes deliver in parallel), writing every
    copy it receives to a file of its own (``+uf``), so a duplicate is counted, not
    overwritten. :meth:`pause` freezes it and every child (SIGSTOP): associations in
    progress wait for their next response, new ones wait in the listen backlog;
    :meth:`resume` lets them all go on."""

    def __init__(self, port: int, aet: str, outdir: Path):
        super().__init__(port, aet, outdir, accept="all", extra_args=["--fork", "+uf"])
        self._parsed: dict[Path, str | None] = {}

    def _family(self) -> list[int]:
        assert self.process is not None
        pids = [self.process.pid]
        result = subprocess.run(
            ["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True
        )
        pids += [int(pid) for pid in result.stdout.split()]
        return pids

    def pause(self) -> None:
        """The parent first (no new child forks meanwhile), then its children."""
        for pid in self._family():
            _signal(pid, signal.SIGSTOP)

    def resume(self) -> None:
        """The children first, then the parent."""
        for pid in reversed(self._family()):
            _signal(pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.process is not None:
            self.resume()
        super().stop()

    def received(self) -> Counter[str]:
        """How many times each SOP Instance UID was received (a file each). A file
        being written (its dataset incomplete) is not counted until it is whole."""
        from pydicom import dcmread
        from pydicom.errors import InvalidDicomError

        counts: Counter[str] = Counter()
        for path in self.received_files():
            uid = self._parsed.get(path)
            if uid is None:
                try:
                    uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
                except (InvalidDicomError, EOFError, AttributeError, OSError):
                    continue
                self._parsed[path] = uid
            counts[uid] += 1
        return counts

    def files_of(self, uid: str) -> list[Path]:
        """The files received with SOP Instance UID ``uid`` (after :meth:`received`)."""
        return [path for path, parsed in self._parsed.items() if parsed == uid]


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass  # an association's child that just ended
