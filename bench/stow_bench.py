#!/usr/bin/env python
"""STOW-RS throughput: our ``type: dicomweb`` destination against Orthanc's own STOW
client, on the same study, to the same kind of server.

Issue 13: "A benchmark leg compares us with Orthanc's own STOW client
(``/dicom-web/servers/{name}/stow``) on the same study." Every round starts fresh
servers and runs both legs, in alternating order, so slow drift of the machine
affects them alike:

- **router**: ``storescu`` (one association) sends the study to a fresh
  ``dicomrouter serve`` whose route (``trigger: instance``) goes to a ``type:
  dicomweb`` destination, a fresh Orthanc B with its DICOMweb plugin. The clock runs
  from ``storescu``'s start until B holds every instance (its ``/statistics``, polled
  every 50 ms): the router receives, stores, and STOWs while it receives.
- **queued**: the router's STOW alone. The same router receives the study for a
  destination with ``enabled: false``; once every instance is queued, the file is
  changed to ``enabled: true`` and the router reloaded (SIGHUP). The clock runs from
  the SIGHUP (the reload counts against us) until B holds every instance. All the
  study goes to the sender as one batch, in requests of 10.
- **orthanc**: the same ``storescu`` sends the study to a fresh Orthanc A (DICOM),
  whose DICOMweb plugin knows B as server ``b``; once A holds it all, ``POST
  /dicom-web/servers/b/stow`` with the study (synchronous). Reported: the receive,
  the STOW alone (from the POST until B holds everything: Orthanc's client against
  the queued leg; ``first``: until B holds a first instance, in both), and their
  sum (against the router leg: a study arrives by DICOM and leaves by STOW-RS;
  Orthanc's client is called per study, once it is stored).

Both clients use 10 instances or 10 MB per request (Orthanc's defaults, ours too)
and one connection. After each leg, B must hold every SOP Instance UID, and a sample
of its files must carry the source's data set byte for byte. The router legs also
report the resident memory of the router's processes (node, dispatch, HTTP: the sum
of their RSS, sampled every 0.2 s): when idle before the transfer and its peak during
it. ``--instances 1 --rows 12288`` sends one 302 MB instance (alone in its request):
the dispatch process streams it from disk.

    PYTHONPATH=src python3 bench/stow_bench.py                     # ~2-3 minutes
    PYTHONPATH=src python3 bench/stow_bench.py --instances 1000 --rows 512 --rounds 5

This is a benchmark, not a test: run it by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydicom import dcmread

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
for entry in (str(REPO), str(BENCH)):
    if entry not in sys.path:
        sys.path.insert(0, entry)  # tests.support and run_bench when run as a script

from run_bench import (  # noqa: E402
    MB,
    BenchError,
    RssSampler,
    _env,
    console,
    folder_bytes,
    machine_info,
    router,
    tree_rss,
)

from tests.support.dcmtk import dcmtk_tool  # noqa: E402
from tests.support.orthanc import PLUGIN_FOLDER, Orthanc  # noqa: E402
from tests.support.synth import iter_study  # noqa: E402

PLUGIN = "libOrthancDicomWeb.so"
POLL = 0.05


def dicomweb_orthanc(workdir: Path, servers: dict[str, str] | None = None) -> Orthanc:
    web: dict[str, object] = {"Enable": True, "Root": "/dicom-web/"}
    if servers:
        web["Servers"] = {name: [url] for name, url in servers.items()}
    return Orthanc(workdir, plugins=(PLUGIN,), extra_config={"DicomWeb": web}, concurrent_jobs=1)


def storescu(aet: str, port: int, source: Path) -> subprocess.Popen[bytes]:
    command = [dcmtk_tool("storescu"), "-aet", "BENCHSCU", "-aec", aet, "-to", "10"]
    command += ["-ta", "30", "-td", "60", "+sd", "+r", "127.0.0.1", str(port), str(source)]
    return subprocess.Popen(
        command,
        env=_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def wait_count(
    peer: Orthanc, n: int, timeout: float, proc: subprocess.Popen[bytes] | None
) -> float:
    """Poll until ``peer`` holds ``n`` instances (and ``proc`` exited); the moment."""
    deadline = time.monotonic() + timeout
    exited = proc is None
    while True:
        now = time.perf_counter()
        if proc is not None and not exited and proc.poll() is not None:
            exited = True
            if proc.returncode != 0:
                out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
                raise BenchError(f"storescu exit {proc.returncode}: {out.strip()[-300:]}")
        if exited and peer.instance_count() >= n:
            return now
        if time.monotonic() > deadline:
            raise BenchError(f"timeout: {peer.instance_count()}/{n} on {peer.aet}")
        time.sleep(POLL)


def wait_first(peer: Orthanc, timeout: float) -> float:
    """Poll until ``peer`` holds an instance; the moment."""
    deadline = time.monotonic() + timeout
    while peer.instance_count() == 0:
        if time.monotonic() > deadline:
            raise BenchError(f"timeout: nothing on {peer.aet}")
        time.sleep(POLL / 5)
    return time.perf_counter()


def check_arrived(peer: Orthanc, source: Path, sample: int = 10) -> None:
    """``peer`` holds every instance of ``source``, a sample byte for byte (data set)."""
    files = sorted(source.iterdir())
    if peer.instance_count() != len(files):
        raise BenchError(f"{peer.instance_count()} instances on B, {len(files)} sent")
    for path in random.sample(files, min(sample, len(files))):
        found = peer.find_sop(str(dcmread(path, stop_before_pixels=True).SOPInstanceUID))
        if found is None:
            raise BenchError(f"{path.name} did not arrive")
        if _data_set(peer.get_instance_file(found)) != _data_set(path.read_bytes()):
            raise BenchError(f"{path.name} arrived different")


def _data_set(raw: bytes) -> bytes:
    return raw[144 + struct.unpack("<I", raw[140:144])[0] :]


def leg_router(workdir: Path, source: Path, n: int, timeout: float) -> dict[str, float]:
    with dicomweb_orthanc(workdir / "b") as b:
        dest = {"type": "dicomweb", "url": f"{b.url}/dicom-web"}
        with router(workdir, "stow", 0, destination=dest) as (port, pid):
            idle = tree_rss(pid)
            with RssSampler(pid) as rss:
                start = time.perf_counter()
                end = wait_count(b, n, timeout, storescu("DICOMROUTER", port, source))
        check_arrived(b, source)
    return {"total": end - start, "rss_idle_mb": idle / MB, "rss_peak_mb": rss.peak / MB}


def leg_queued(workdir: Path, source: Path, n: int, timeout: float) -> dict[str, float]:
    """The router's STOW alone: the study is received and queued for a disabled
    destination, which a reload (SIGHUP) then enables; the clock runs from the
    SIGHUP (the reload's own time counts against us) until B holds everything."""
    with dicomweb_orthanc(workdir / "b") as b:
        dest = {"type": "dicomweb", "url": f"{b.url}/dicom-web", "enabled": False}
        with router(workdir, "queued", 0, destination=dest) as (port, pid):
            config_path = workdir / "queued-router.yaml"
            proc = storescu("DICOMROUTER", port, source)
            if proc.wait(timeout) != 0:
                raise BenchError(f"storescu exit {proc.returncode}")
            wait_jobs(config_path, n, timeout)
            config = yaml.safe_load(config_path.read_text())
            config["destinations"]["dest"]["enabled"] = True
            config_path.write_text(yaml.safe_dump(config, sort_keys=False))
            idle = tree_rss(pid)
            with RssSampler(pid) as rss:
                start = time.perf_counter()
                os.kill(pid, signal.SIGHUP)
                first = wait_first(b, timeout)
                end = wait_count(b, n, timeout, None)
        check_arrived(b, source)
    return {
        "first": first - start,
        "stow": end - start,
        "rss_idle_mb": idle / MB,
        "rss_peak_mb": rss.peak / MB,
    }


def wait_jobs(config_path: Path, n: int, timeout: float) -> None:
    """Until the router has queued a job for each of the ``n`` instances."""
    deadline = time.monotonic() + timeout
    command = [sys.executable, "-m", "dicomrouter", "queue", "list", "--config", str(config_path)]
    command += ["--json", "--limit", "100000"]
    while time.monotonic() < deadline:
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        if len(json.loads(out)["jobs"]) >= n:
            return
        time.sleep(0.2)
    raise BenchError(f"the router did not queue {n} jobs in {timeout:.0f}s")


def leg_orthanc(workdir: Path, source: Path, n: int, timeout: float) -> dict[str, float]:
    with dicomweb_orthanc(workdir / "b") as b:
        servers = {"b": f"{b.url}/dicom-web/"}
        with dicomweb_orthanc(workdir / "a", servers) as a:
            start = time.perf_counter()
            received = wait_count(a, n, timeout, storescu(a.aet, a.dicom_port, source))
            [study] = a.studies()
            posted = time.perf_counter()
            stow = threading.Thread(
                target=a.post_json,
                args=("/dicom-web/servers/b/stow", {"Resources": [study], "Synchronous": True}),
                kwargs={"timeout": timeout},
            )
            stow.start()
            first = wait_first(b, timeout)
            end = wait_count(b, n, timeout, None)
            stow.join(timeout)
        check_arrived(b, source)
    return {
        "first": first - posted,
        "receive": received - start,
        "stow": end - posted,
        "total": received - start + end - posted,
    }


def _show(key: str, value: float, n: int) -> str:
    if key.endswith("_mb"):
        return f"{key} {value:.0f} MB"
    return f"{key} {value:.2f} s" + ("" if key == "first" else f" ({n / value:.0f} inst/s)")


@dataclass
class Runs:
    times: dict[str, list[float]] = field(default_factory=dict)

    def add(self, leg: str, values: dict[str, float]) -> None:
        for part, seconds in values.items():
            self.times.setdefault(f"{leg}.{part}", []).append(seconds)

    def median(self, key: str) -> float:
        return statistics.median(self.times[key])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--instances", type=int, default=200, help="instances in the study")
    parser.add_argument("--rows", type=int, default=512, help="image rows and columns")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (both legs each)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per leg at most")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder")
    args = parser.parse_args(argv)
    if not (Path(PLUGIN_FOLDER) / PLUGIN).exists():
        console.print("Orthanc's DICOMweb plugin is missing: apt-get install orthanc-dicomweb")
        return 2
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="stow-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    source = workdir / "study"
    shutil.rmtree(source, ignore_errors=True)
    for _ in iter_study(source, args.instances, rows=args.rows, cols=args.rows):
        pass
    n, size = args.instances, folder_bytes(source)
    info = machine_info()
    console.print(
        f"study: {n} instances, {size / MB:.1f} MB; {info['cpus']} CPUs, "
        f"load {info['load_average']}; {info['orthanc']}; router {info['dicomrouter']}"
    )
    legs: dict[str, Callable[[Path, Path, int, float], dict[str, float]]] = {
        "router": leg_router,
        "queued": leg_queued,
        "orthanc": leg_orthanc,
    }
    runs = Runs()
    try:
        for number in range(args.rounds):
            order = list(legs) if number % 2 == 0 else list(reversed(legs))
            for name in order:
                scratch = workdir / f"{name}-{number}"
                values = legs[name](scratch, source, n, args.timeout)
                shutil.rmtree(scratch, ignore_errors=True)
                runs.add(name, values)
                parts = ", ".join(_show(k, v, n) for k, v in values.items())
                console.print(f"round {number + 1} {name:<8} {parts}")
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    console.print(f"\nmedians of {args.rounds} rounds ({n} instances, {size / MB:.0f} MB):")
    for key in sorted(runs.times):
        if key.endswith("_mb"):
            console.print(f"  {key:<16} {runs.median(key):7.0f} MB  (the router's processes)")
            continue
        if key.endswith(".first"):
            console.print(f"  {key:<16} {runs.median(key):7.2f} s  (a first instance on B)")
            continue
        seconds = runs.median(key)
        rate = f"{n / seconds:7.1f} inst/s  {size / MB / seconds:6.1f} MB/s"
        console.print(f"  {key:<16} {seconds:7.2f} s  {rate}")
    ours, theirs = runs.median("router.total"), runs.median("orthanc.total")
    stow, queued = runs.median("orthanc.stow"), runs.median("queued.stow")
    console.print(f"STOW alone, router / orthanc: {stow / queued:.2f}x the throughput")
    steady = [
        (runs.median(f"{leg}.stow") - runs.median(f"{leg}.first")) for leg in ("queued", "orthanc")
    ]
    if n > 1 and min(steady) > 0:
        console.print(
            f"STOW after the first instance arrived, router / orthanc: "
            f"{steady[1] / steady[0]:.2f}x ({steady[0]:.2f} s against {steady[1]:.2f} s)"
        )
    console.print(f"storescu to B, router / orthanc: {theirs / ours:.2f}x the throughput")
    return 0


if __name__ == "__main__":
    sys.exit(main())
