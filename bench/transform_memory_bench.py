#!/usr/bin/env python
"""Router memory through a tag-only pipeline: one large study routed end to end by a
real ``dicomrouter serve``, with and without a transform, the RSS of its processes
sampled all along.

Issue 12's bar: "Transforms that do not touch pixel data never decode it. A 2 GB
study through a tag-only pipeline keeps the router's memory flat." Two legs, each a
fresh router and a fresh dcmtk ``storescp``, the same study sent by one ``storescu``
(one association), interleaved (the order alternates every round):

- **byte-for-byte**: ``routes: [{name: all, trigger: instance, to: [dest]}]``; the
  router sends each stored file as received;
- **tag-only pipeline**: the same route with ``transform: tagfix`` (``set``
  InstitutionName, ``replace`` AccessionNumber ``^0+`` → ``""``, ``remove``
  OperatorsName): the dispatch worker writes a transformed copy of each instance
  (header parsed, pixel data copied raw with ``os.sendfile``) and sends that.

Every 0.5 s the script reads ``VmRSS`` from ``/proc/<pid>/status`` of the node (the
``serve`` process) and of its children, told apart by their command line
(``python -m dicomrouter.children dispatch``) or, for the HTTP process forked from
the node, its process name. It reports, per process, the RSS
when idle (before the send), the median and the peak during the transfer, and the CPU
seconds each used during the transfer (``/proc/<pid>/stat``). The clock runs from
``storescu``'s start to the last file written by storescp (as in ``run_bench.py``).

At the end of each run, before storescp's folder is removed: every SOP Instance UID
arrived; in the pipeline leg every file has the new InstitutionName and AccessionNumber
(in the byte-for-byte leg, the old ones); for a sample of files, Pixel Data is
byte-equal to the source file's.

Disk: the study exists three times (source, router storage, destination), plus one
outgoing copy. The script checks free space first and refuses with a hint to pass a
smaller ``--size-gb``.

    PYTHONPATH=src python3 bench/transform_memory_bench.py --size-gb 2 --rounds 2
    PYTHONPATH=src python3 bench/transform_memory_bench.py --size-gb 0.02 --rounds 1
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
for entry in (str(REPO), str(BENCH)):
    if entry not in sys.path:
        sys.path.insert(0, entry)  # tests.support and run_bench when run as a script

from run_bench import (  # noqa: E402
    ROUTER_AET,
    BenchError,
    _children,
    router,
    send_and_wait,
    storescp,
    timeout_for,
)

from tests.support.synth import LARGE_SHAPE, instances_for_bytes, iter_study  # noqa: E402

MB = 1_000_000
SAMPLE_INTERVAL = 0.5
PIXEL_SAMPLE = 25
PIPELINE = [
    {"set": {"InstitutionName": "General Hospital"}},
    {"replace": {"AccessionNumber": {"pattern": "^0+", "with": ""}}},
    {"remove": ["OperatorsName"]},
]
LEGS = ("byte-for-byte", "tag-only pipeline")
ROLES = ("node", "dispatch", "http")


# --------------------------------------------------------------------------- /proc


def vm_rss(pid: int) -> int | None:
    """VmRSS of ``pid`` in bytes, or None if it is gone."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return None


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` so far (0 if it is gone)."""
    with contextlib.suppress(OSError, IndexError, ValueError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return 0.0


def router_pids(node: int) -> dict[str, int]:
    """The node and its children by role: from their command lines, or for those
    forked from the node (http, receiver-N), from their process names."""
    pids = {"node": node}
    for child in _children(node):
        with contextlib.suppress(OSError):
            argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
            if b"dicomrouter.children" in argv:
                role = argv[argv.index(b"dicomrouter.children") + 1].decode()
            else:
                role = Path(f"/proc/{child}/comm").read_text().strip()
            pids[role] = child
    return pids


class Sampler:
    """VmRSS of each of the router's processes every :data:`SAMPLE_INTERVAL` s."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.samples: dict[str, list[int]] = {role: [] for role in pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        for role, pid in self.pids.items():
            rss = vm_rss(pid)
            if rss is not None:
                self.samples[role].append(rss)

    def _run(self) -> None:
        while True:
            self._sample()
            if self._stop.wait(SAMPLE_INTERVAL):
                return

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sample()


# --------------------------------------------------------------------------- router


# --------------------------------------------------------------------------- runs


@dataclass
class Run:
    leg: str
    seconds: float
    idle: dict[str, int]
    samples: dict[str, list[int]]
    cpu: dict[str, float]
    verified: str


@dataclass
class Study:
    folder: Path
    instances: int
    size: int


def generate(folder: Path, size_gb: float) -> Study:
    n = instances_for_bytes(int(size_gb * 1e9), *LARGE_SHAPE)
    started = time.perf_counter()
    for _ in iter_study(
        folder,
        n,
        rows=LARGE_SHAPE[0],
        cols=LARGE_SHAPE[1],
        accession_number="000123",
        series_count=max(1, n // 500),
    ):
        pass
    size = sum(p.stat().st_size for p in folder.iterdir())
    print(
        f"generated {n} instances, {size / MB:.0f} MB in {time.perf_counter() - started:.1f} s",
        file=sys.stderr,
    )
    return Study(folder, n, size)


def verify(study: Study, outdir: Path, transform: bool) -> str:
    """Every instance arrived, with the pipeline's tags (or the original ones), and
    the Pixel Data of a sample is byte-equal to the source's."""
    sources = {}
    for path in study.folder.iterdir():
        ds = dcmread(path, stop_before_pixels=True)
        sources[str(ds.SOPInstanceUID)] = path
    received: dict[str, Path] = {}
    expected = ("General Hospital", "123") if transform else (None, "000123")
    for path in outdir.iterdir():
        ds = dcmread(path, stop_before_pixels=True)
        got = (ds.get("InstitutionName"), ds.get("AccessionNumber"))
        if got != expected:
            raise BenchError(f"{path.name}: InstitutionName, AccessionNumber {got} not {expected}")
        if transform and "OperatorsName" in ds:
            raise BenchError(f"{path.name}: OperatorsName kept")
        received[str(ds.SOPInstanceUID)] = path
    if set(received) != set(sources):
        raise BenchError(
            f"{len(set(sources) - set(received))} instances missing at the destination"
        )
    sample = random.Random(0).sample(sorted(received), min(PIXEL_SAMPLE, len(received)))
    for uid in sample:
        if dcmread(received[uid]).PixelData != dcmread(sources[uid]).PixelData:
            raise BenchError(f"{uid}: Pixel Data differs from the source's")
    tags = "new tags" if transform else "original tags"
    return f"{len(received)}/{len(sources)} arrived, {tags} in all, pixels equal in {len(sample)}"


def run_leg(workdir: Path, study: Study, leg: str, timeout: float) -> Run:
    transform = leg == "tag-only pipeline"
    name = "pipeline" if transform else "plain"
    with (
        storescp(workdir, name) as (dest_port, outdir),
        router(workdir, name, dest_port, pipeline=PIPELINE if transform else None) as (
            port,
            node,
        ),
    ):
        pids = router_pids(node)
        missing = [role for role in ROLES if role not in pids]
        if missing:
            raise BenchError(f"router processes not found: {missing} (have {pids})")
        time.sleep(1.0)  # settle after readiness
        idle = {role: vm_rss(pid) or 0 for role, pid in pids.items()}
        cpu_before = {role: cpu_seconds(pid) for role, pid in pids.items()}
        os.sync()
        with Sampler(pids) as sampler:
            seconds = send_and_wait(
                ROUTER_AET, port, [study.folder], outdir, study.instances, timeout
            )
        cpu = {role: cpu_seconds(pid) - cpu_before[role] for role, pid in pids.items()}
        verified = verify(study, outdir, transform)
    return Run(leg, seconds, idle, sampler.samples, cpu, verified)


# --------------------------------------------------------------------------- report


def report(study: Study, runs: list[Run], size_gb: float, note: str) -> None:
    print(
        f"\n{study.instances} instances × {LARGE_SHAPE[0]}x{LARGE_SHAPE[1]}x16, "
        f"{study.size / MB:.0f} MB (--size-gb {size_gb}), one storescu, "
        f"RSS sampled every {SAMPLE_INTERVAL} s{note}\n"
    )
    print(
        "| round | leg | s | instances/s | MB/s | node RSS idle / median / peak MB "
        "| dispatch RSS idle / median / peak MB | http peak MB | CPU s node / dispatch | samples |"
    )
    print("| ---: | --- | ---: | ---: | ---: | --- | --- | ---: | --- | ---: |")
    for n, run in enumerate(runs):

        def rss(role: str, run: Run = run) -> str:
            samples = run.samples.get(role) or [0]
            return (
                f"{run.idle.get(role, 0) / MB:.0f} / {statistics.median(samples) / MB:.0f} "
                f"/ {max(samples) / MB:.0f}"
            )

        print(
            f"| {n // len(LEGS) + 1} | {run.leg} | {run.seconds:.1f} "
            f"| {study.instances / run.seconds:.0f} | {study.size / MB / run.seconds:.0f} "
            f"| {rss('node')} | {rss('dispatch')} "
            f"| {max(run.samples.get('http') or [0]) / MB:.0f} "
            f"| {run.cpu.get('node', 0):.1f} / {run.cpu.get('dispatch', 0):.1f} "
            f"| {len(run.samples.get('dispatch', []))} |"
        )
    print()
    by_leg = {leg: [r for r in runs if r.leg == leg] for leg in LEGS}
    if all(by_leg.values()):
        med = {leg: statistics.median(r.seconds for r in rs) for leg, rs in by_leg.items()}
        peak = {leg: max(max(r.samples["dispatch"]) for r in rs) for leg, rs in by_leg.items()}
        print(
            f"median s: byte-for-byte {med[LEGS[0]]:.1f}, pipeline {med[LEGS[1]]:.1f}; "
            f"throughput pipeline / byte-for-byte {med[LEGS[0]] / med[LEGS[1]]:.2f}; "
            f"dispatch peak RSS pipeline − byte-for-byte "
            f"{(peak[LEGS[1]] - peak[LEGS[0]]) / MB:+.0f} MB"
        )
    for run in runs:
        print(f"- {run.leg}: {run.verified}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=2.0, help="study size (default 2)")
    parser.add_argument("--rounds", type=int, default=1, help="rounds of both legs")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch parent (/tmp)")
    parser.add_argument("--timeout", type=float, default=None, help="per run, seconds")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = parser.parse_args(argv)

    parent = args.workdir or Path(tempfile.gettempdir())
    need = args.size_gb * 1e9 * 3.2
    free = shutil.disk_usage(parent).free
    if free < need:
        print(
            f"not enough disk in {parent}: {free / 1e9:.1f} GB free, "
            f"{need / 1e9:.1f} GB needed (source, router storage, destination); "
            "pass a smaller --size-gb",
            file=sys.stderr,
        )
        return 2
    note = f"; {free / 1e9:.0f} GB free in {parent} at the start"
    workdir = Path(tempfile.mkdtemp(prefix="transform-memory-bench-", dir=parent))
    try:
        study = generate(workdir / "study", args.size_gb)
        timeout = timeout_for(study.instances, study.size, args.timeout)
        runs = []
        for r in range(args.rounds):
            for leg in LEGS if r % 2 == 0 else tuple(reversed(LEGS)):
                run = run_leg(workdir, study, leg, timeout)
                runs.append(run)
                print(
                    f"round {r + 1} {leg}: {run.seconds:.1f} s, dispatch peak "
                    f"{max(run.samples['dispatch']) / MB:.0f} MB",
                    file=sys.stderr,
                )
        report(study, runs, args.size_gb, note)
    except BenchError as exc:
        print(f"failed: {exc}", file=sys.stderr)
        return 1
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
