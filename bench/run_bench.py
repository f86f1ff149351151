#!/usr/bin/env python
"""End-to-end routing benchmark: dcmtk direct vs Orthanc auto-routing vs dicomrouter.

Why this shape: a router's cost is what it adds between a sender and a receiver, so
every path starts at the same ``storescu`` and ends at the same ``storescp``, and the
clock runs from ``storescu`` start until the final ``storescp`` has written the last
file (we poll its output folder). Three paths per dataset:

a. ``storescu -> storescp``: the ceiling (no intermediary);
b. ``storescu -> Orthanc -> storescp``: the peer, a Lua ``OnStoredInstance`` script that
   forwards every instance with ``SendToModality`` (per-instance, like our
   ``trigger: instance`` routes);
c. ``storescu -> dicomrouter -> storescp``: ``python -m dicomrouter serve``;
d. ``storescu +tls -> dicomrouter (dicom.tls listener) -> storescp``: the same router,
   received over DICOM TLS (mutual, with a throwaway PKI), forwarded in plain;
e. ``storescu +tls -> storescp +tls``: what TLS costs dcmtk alone, for reference;
f. ``storescu -> dicomrouter -> storescp`` with the index on PostgreSQL (leg
   ``router_pg``, not in the default legs): a durable cluster the bench starts itself
   (Debian's ``postgresql``, fsync on), a new database per run.

Every dcmtk tool and Orthanc gets ``TCP_NODELAY=1`` (see docs: without it Nagle's
algorithm dominates the numbers). Every server is started fresh for each repeat, so no
run profits from a previous run's state, and legs are interleaved within a repeat so
slow drift of the machine affects them alike. Medians are reported.

This is a benchmark, not a test: run it by hand, see ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # for tests.support when run as a script

from tests.support.dcmtk import dcmtk_env, dcmtk_tool, free_port  # noqa: E402
from tests.support.orthanc import Orthanc, orthanc_executable  # noqa: E402
from tests.support.postgres import Postgres, postgres_bin, throwaway_cluster  # noqa: E402
from tests.support.synth import (  # noqa: E402
    LARGE_SHAPE,
    SMALL_SHAPE,
    instances_for_bytes,
    iter_study,
)

# Wide enough for the tables when piped (rich falls back to 80 columns without a tty).
console = Console() if sys.stdout.isatty() else Console(width=120)

DEST_AET = "DEST"
ORTHANC_AET = "ORTHANC"
ROUTER_AET = "DICOMROUTER"
SCU_AET = "BENCHSCU"
POLL_INTERVAL = 0.02
RSS_INTERVAL = 0.2
MB = 1_000_000

LUA_FORWARD = """
-- Per-instance auto-routing: forward each stored instance to the destination.
function OnStoredInstance(instanceId, tags, metadata, origin)
  SendToModality(instanceId, 'dest')
end
"""

LEGS = {
    "direct": "a. direct",
    "orthanc": "b. Orthanc (Lua)",
    "router": "c. dicomrouter",
    "router_tls": "d. dicomrouter, TLS in",
    "direct_tls": "e. direct, TLS",
    "router_pg": "f. dicomrouter, PostgreSQL index",
    "router_p2": "g. dicomrouter, 2 receive processes",
}
TLS_LEGS = ("router_tls", "direct_tls")
DEFAULT_LEGS = "direct,orthanc,router,router_tls,direct_tls"


class BenchError(RuntimeError):
    """A leg failed: a peer died, answered an error, or a wait timed out."""


# --------------------------------------------------------------------------- tools


def _env() -> dict[str, str]:
    return dcmtk_env()  # TCP_NODELAY=1, or Nagle's algorithm dominates the numbers


def echo(aet: str, port: int, timeout: float = 5.0, options: Sequence[str] = ()) -> bool:
    """One C-ECHO with dcmtk's echoscu (``options``: e.g. ``+tls ...``); True if the
    peer answered."""
    try:
        result = subprocess.run(
            [dcmtk_tool("echoscu"), "-aet", SCU_AET, "-aec", aet, "-to", "2", "-ta", "2"]
            + ["-td", "2", *options, "127.0.0.1", str(port)],
            env=_env(),
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return False
    return result.returncode == 0


def wait_echo(
    aet: str,
    port: int,
    proc: subprocess.Popen[bytes],
    timeout: float,
    what: str,
    options: Sequence[str] = (),
) -> None:
    """Poll C-ECHO until ``proc``'s server answers; fail fast if it exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{what} exited with code {proc.returncode} during startup")
        if echo(aet, port, options=options):
            return
        time.sleep(0.1)
    raise BenchError(f"{what} did not answer C-ECHO within {timeout:.0f}s")


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float, what: str) -> None:
    """Poll an HTTP readiness probe until it answers 200; fail fast if ``proc`` exits.

    Why not C-ECHO alone for the router: its receiver answers as soon as it listens,
    while its dispatch and HTTP processes are still importing; a run started then
    would time our startup (two Python imports competing for the CPU with the
    transfer), not our routing. ``/readyz`` answers only once the HTTP process, the
    last child started, is up, which the node starts after dispatch is ready.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{what} exited with code {proc.returncode} during startup")
        # 503 (not ready) raises HTTPError, an OSError: keep polling
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as response:
            if response.status == 200:
                return
        time.sleep(0.1)
    raise BenchError(f"{what} was not ready ({url}) within {timeout:.0f}s")


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    """SIGTERM, wait, then SIGKILL this process (and its own process group)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # started with start_new_session
            proc.wait(timeout=timeout)


def count_files(folder: Path) -> int:
    """Number of regular files directly in ``folder`` (storescp writes flat)."""
    try:
        with os.scandir(folder) as entries:
            return sum(1 for entry in entries if entry.is_file(follow_symlinks=False))
    except FileNotFoundError:
        return 0


# --------------------------------------------------------------------------- TLS

_PKI: dict[Path, Any] = {}


def bench_pki(workdir: Path) -> Any:
    """The throwaway PKI of this run (``tests/support/pki.py``: a CA, a server and a
    client certificate), made once under ``workdir`` on first use."""
    if workdir not in _PKI:
        from tests.support.pki import make_pki  # needs ``cryptography``

        _PKI[workdir] = make_pki(workdir / "pki")
    return _PKI[workdir]


def tls_options(certificate: Path, key: Path, ca: Path) -> list[str]:
    """dcmtk's TLS options: our key and certificate, the CA we trust. Peers must
    present a certificate (dcmtk's default ``--require-peer-cert``)."""
    return ["+tls", str(key), str(certificate), "+cf", str(ca)]


def client_tls_options(workdir: Path) -> list[str]:
    """``storescu``/``echoscu`` as the PKI's client."""
    pki = bench_pki(workdir)
    return tls_options(pki.client_cert, pki.client_key, pki.ca_cert)


def tls_unavailable() -> str | None:
    """Why the TLS legs cannot run (no ``cryptography`` for the PKI, or a dcmtk built
    without OpenSSL), or ``None``."""
    try:
        import cryptography  # noqa: F401
    except ImportError:
        return "the cryptography package is not installed (needed for the test PKI)"
    try:
        out = subprocess.run(
            [dcmtk_tool("storescu"), "--version"], capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return f"storescu --version: {exc}"
    if "openssl" not in out.lower():
        return "dcmtk's storescu is built without OpenSSL (no +tls)"
    return None


# --------------------------------------------------------------------------- memory


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` across all its threads (Linux /proc)."""
    kids: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/children") as fh:
                kids.extend(int(k) for k in fh.read().split())
    return kids


def _tree(pid: int) -> Iterator[int]:
    """``pid`` and all its descendants, each once."""
    stack, seen = [pid], set()
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        yield current
        stack.extend(_children(current))


def tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` plus all its descendants (0 if it is gone)."""
    page = os.sysconf("SC_PAGE_SIZE")
    total = 0
    for current in _tree(pid):
        with (
            contextlib.suppress(OSError, IndexError, ValueError),
            open(f"/proc/{current}/statm") as fh,
        ):
            total += int(fh.read().split()[1]) * page
    return total


def tree_pss(pid: int) -> int:
    """Proportional set size of ``pid`` plus all its descendants: shared pages (the
    Python interpreter, numpy's libraries...) counted once across the tree, not once
    per process as a sum of RSS does. 0 where /proc/PID/smaps_rollup is unreadable."""
    total = 0
    for current in _tree(pid):
        with (
            contextlib.suppress(OSError, IndexError, ValueError),
            open(f"/proc/{current}/smaps_rollup") as fh,
        ):
            for line in fh:
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    break
    return total


class RssSampler:
    """Samples the RSS (summed over a process tree) every 0.2 s in a thread and keeps
    the peak; with ``pss=True`` also the peak of the tree's PSS.

    Why sampling and not ``ru_maxrss``: the server is not our child's child in every
    leg, it runs many processes/threads, and we want the peak *during the transfer*,
    not during startup.
    """

    def __init__(self, pid: int | None, interval: float = RSS_INTERVAL, pss: bool = False) -> None:
        self.pid = pid
        self.interval = interval
        self.pss = pss
        self.peak = 0
        self.peak_pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            if self.pid is not None:
                self.peak = max(self.peak, tree_rss(self.pid))
                if self.pss:
                    self.peak_pss = max(self.peak_pss, tree_pss(self.pid))
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if self.pid is not None:
            self.peak = max(self.peak, tree_rss(self.pid))


# --------------------------------------------------------------------------- peers


@contextlib.contextmanager
def storescp(
    workdir: Path, name: str, fork: bool = False, tls: bool = False
) -> Iterator[tuple[int, Path]]:
    """A fresh destination ``storescp`` writing into an empty folder; ``fork``: one
    process per association (dcmtk's storescp otherwise serves one at a time);
    ``tls``: DICOM TLS only, with the PKI's server certificate, requiring the client's."""
    port = free_port()
    options: list[str] = []
    if tls:
        pki = bench_pki(workdir)
        options = tls_options(pki.server_cert, pki.server_key, pki.ca_cert)
    outdir = workdir / f"{name}-out"
    shutil.rmtree(outdir, ignore_errors=True)
    outdir.mkdir(parents=True)
    log = open(workdir / f"{name}-storescp.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [dcmtk_tool("storescp"), "-aet", DEST_AET, "-od", str(outdir), "-dhl"]
        + ["-ta", "30", "-td", "60"]
        + (["--fork"] if fork else [])
        + options
        + [str(port)],
        env=_env(),
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        client = client_tls_options(workdir) if tls else []
        wait_echo(DEST_AET, port, proc, 15, "storescp", client)
        yield port, outdir
    finally:
        stop_process(proc, timeout=5)
        log.close()
        shutil.rmtree(outdir, ignore_errors=True)


@contextlib.contextmanager
def router(
    workdir: Path,
    name: str,
    dest_port: int,
    tls: bool = False,
    pipeline: list[dict[str, Any]] | None = None,
    destination: dict[str, Any] | None = None,
    database: str | None = None,
    processes: int = 1,
) -> Iterator[tuple[int, int]]:
    """A fresh ``python -m dicomrouter serve`` forwarding everything to ``dest_port``.
    Yields (the port to send to, the router's pid). With ``tls``, that port is a
    ``dicom.tls`` listener (the PKI's server certificate, client certificates
    required); the plain port stays, for the C-ECHO readiness check. With
    ``pipeline`` (transform steps), the route sends through it. ``destination``
    replaces the DICOM destination (another kind: ``dest_port`` is then unused).
    ``database``: the index's URL (default: SQLite in the storage folder).
    ``processes``: ``dicom.processes`` (the legs but ``router_p2`` pin 1, the
    single receiver they always measured, whatever the machine's default)."""
    port, http_port = free_port(), free_port()
    storage = workdir / f"{name}-router-storage"
    shutil.rmtree(storage, ignore_errors=True)
    dicom: dict[str, Any] = {"port": port, "bind": "127.0.0.1", "processes": processes}
    send_port = port
    if tls:
        pki = bench_pki(workdir)
        send_port = free_port()
        dicom["tls"] = {
            "port": send_port,
            "certificate": str(pki.server_cert),
            "private_key": str(pki.server_key),
            "ca_certificates": str(pki.ca_cert),
            "require_client_certificate": True,
        }
    config = {
        "ae_title": ROUTER_AET,
        "dicom": dicom,
        "http": {"port": http_port, "bind": "127.0.0.1"},  # as shipped: HTTP runs too
        "storage": {"path": str(storage)},
        "destinations": {
            "dest": destination or {"ae_title": DEST_AET, "host": "127.0.0.1", "port": dest_port}
        },
        "routes": [{"name": "all", "trigger": "instance", "to": ["dest"]}],
        "log_level": "WARNING",
    }
    if pipeline is not None:
        config["transforms"] = {"bench": pipeline}
        config["routes"][0]["transform"] = "bench"
    if database is not None:
        config["database"] = database
    config_path = workdir / f"{name}-router.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    log_path = workdir / f"{name}-router.log"
    log = open(log_path, "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "dicomrouter", "serve", "--config", str(config_path)],
        cwd=workdir,
        env=_env(),
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        try:
            wait_echo(ROUTER_AET, port, proc, 30, "dicomrouter")
            wait_ready(f"http://127.0.0.1:{http_port}/readyz", proc, 30, "dicomrouter")
            if tls:
                wait_echo(
                    ROUTER_AET,
                    send_port,
                    proc,
                    30,
                    "dicomrouter (TLS)",
                    client_tls_options(workdir),
                )
        except BenchError as exc:
            tail = log_path.read_text(errors="replace").splitlines()[-5:]
            raise BenchError(f"{exc}: {' | '.join(tail)}") from exc
        yield send_port, proc.pid
    finally:
        stop_process(proc)
        log.close()
        shutil.rmtree(storage, ignore_errors=True)


def router_unavailable() -> str | None:
    """Why ``python -m dicomrouter serve`` cannot run yet, or ``None`` if it can."""
    try:
        result = subprocess.run(
            [sys.executable, "-m", "dicomrouter", "serve", "--help"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return "`python -m dicomrouter serve --help` timed out"
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines()
        if not lines:
            return f"exit code {result.returncode}"
        # "/path/to/python: No module named ..." -> "No module named ..."
        return lines[-1].removeprefix(f"{sys.executable}: ")
    return None


# --------------------------------------------------------------------------- runs


def send_and_wait(
    called_aet: str,
    port: int,
    sources: list[Path],
    outdir: Path,
    expected: int,
    timeout: float,
    options: Sequence[str] = (),
) -> float:
    """Run one storescu per folder of ``sources`` (one association each, all at once,
    as several modalities would) and time until ``outdir`` is full.

    The end is the later of the last storescu's exit and the last file appearing at
    the final destination, so for the direct leg it includes the last response, and
    for routed legs the last forwarded file.
    """
    command = [dcmtk_tool("storescu"), "-aet", SCU_AET, "-aec", called_aet]
    command += ["-to", "10", "-ta", "30", "-td", "60", "+sd", "+r", *options]
    command += ["127.0.0.1", str(port)]
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            [*command, str(source)],
            env=_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for source in sources
    ]
    deadline = time.monotonic() + timeout
    running = set(procs)
    exited_at: float | None = None
    full_at: float | None = None
    try:
        while True:
            now = time.perf_counter()
            for proc in [p for p in running if p.poll() is not None]:
                running.discard(proc)
                if proc.returncode != 0:
                    output = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
                    tail = " | ".join(output.strip().splitlines()[-3:])
                    raise BenchError(f"storescu exit code {proc.returncode}: {tail}")
            if exited_at is None and not running:
                exited_at = now
            if full_at is None and count_files(outdir) >= expected:
                full_at = now
            if exited_at is not None and full_at is not None:
                return max(exited_at, full_at) - start
            if time.monotonic() > deadline:
                raise BenchError(
                    f"timeout after {timeout:.0f}s: {count_files(outdir)}/{expected} delivered"
                )
            time.sleep(POLL_INTERVAL)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
            if proc.stdout:
                proc.stdout.close()


def run_direct(
    workdir: Path, sources: list[Path], n: int, timeout: float
) -> tuple[float, int | None]:
    with storescp(workdir, "direct", fork=len(sources) > 1) as (dest_port, outdir):
        return send_and_wait(DEST_AET, dest_port, sources, outdir, n, timeout), None


def run_orthanc(
    workdir: Path, sources: list[Path], n: int, timeout: float
) -> tuple[float, int | None]:
    with storescp(workdir, "orthanc", fork=len(sources) > 1) as (dest_port, outdir):
        peer_dir = workdir / "orthanc-peer"
        shutil.rmtree(peer_dir, ignore_errors=True)
        peer = Orthanc(
            peer_dir,
            aet=ORTHANC_AET,
            modalities={"dest": (DEST_AET, "127.0.0.1", dest_port)},
            lua=LUA_FORWARD,
        )
        try:
            with peer:
                with RssSampler(peer.pid) as rss:
                    seconds = send_and_wait(
                        ORTHANC_AET, peer.dicom_port, sources, outdir, n, timeout
                    )
                return seconds, rss.peak
        finally:
            shutil.rmtree(peer_dir, ignore_errors=True)


def run_router(
    workdir: Path,
    sources: list[Path],
    n: int,
    timeout: float,
    memory: dict[str, int] | None = None,
    tls: bool = False,
    database: str | None = None,
    processes: int = 1,
) -> tuple[float, int | None]:
    """``memory``, when given, receives the peak PSS of the router's processes too;
    ``tls``: storescu sends over DICOM TLS to the router's ``dicom.tls`` listener (the
    router still forwards in plain to the same storescp). ``database``: the index.
    ``processes``: its ``dicom.processes``."""
    name = "router_pg" if database else "router_tls" if tls else "router"
    name += f"_p{processes}" if processes > 1 else ""
    options = client_tls_options(workdir) if tls else []
    with (
        storescp(workdir, name, fork=len(sources) > 1) as (dest_port, outdir),
        router(
            workdir,
            name,
            dest_port,
            tls=tls,
            database=database,
            processes=processes,
        ) as (
            port,
            pid,
        ),
        RssSampler(pid, pss=memory is not None) as rss,
    ):
        seconds = send_and_wait(ROUTER_AET, port, sources, outdir, n, timeout, options)
    if memory is not None:
        memory["peak_pss_bytes"] = rss.peak_pss
    return seconds, rss.peak


def run_router_tls(
    workdir: Path, sources: list[Path], n: int, timeout: float
) -> tuple[float, int | None]:
    return run_router(workdir, sources, n, timeout, tls=True)


def run_direct_tls(
    workdir: Path, sources: list[Path], n: int, timeout: float
) -> tuple[float, int | None]:
    """``storescu +tls -> storescp +tls`` (mutual TLS, as dcmtk requires by default)."""
    options = client_tls_options(workdir)
    with storescp(workdir, "direct_tls", fork=len(sources) > 1, tls=True) as (dest_port, outdir):
        return send_and_wait(DEST_AET, dest_port, sources, outdir, n, timeout, options), None


def run_router_p2(
    workdir: Path, sources: list[Path], n: int, timeout: float
) -> tuple[float, int | None]:
    """The router leg with two receive processes sharing the port."""
    return run_router(workdir, sources, n, timeout, processes=2)


#: The PostgreSQL server of the ``router_pg`` leg (main() starts it when selected).
_POSTGRES: list[Postgres] = []


def run_router_pg(
    workdir: Path, sources: list[Path], n: int, timeout: float
) -> tuple[float, int | None]:
    """The router leg with its index on PostgreSQL (a durable cluster of the bench's
    own, fsync on; a new database per run, created before the clock starts)."""
    with _POSTGRES[0].database("bench") as url:
        return run_router(workdir, sources, n, timeout, database=url)


RUNNERS = {
    "direct": run_direct,
    "orthanc": run_orthanc,
    "router": run_router,
    "router_tls": run_router_tls,
    "direct_tls": run_direct_tls,
    "router_pg": run_router_pg,
    "router_p2": run_router_p2,
}

# Throughput ratios reported (first / second): the router against its ceiling and its
# peer, and what TLS costs the router and dcmtk.
RATIOS = (
    ("router", "direct"),
    ("router", "orthanc"),
    ("orthanc", "direct"),
    ("router_tls", "router"),
    ("direct_tls", "direct"),
    ("router_pg", "router"),
    ("router_p2", "direct"),
    ("router_p2", "orthanc"),
    ("router_p2", "router"),
)


@dataclass
class LegResult:
    """All repeats of one path for one dataset."""

    leg: str
    status: str = "ok"
    seconds: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    peak_rss_bytes: int | None = None
    median_s: float | None = None
    instances_per_s: float | None = None
    mb_per_s: float | None = None

    def finish(self, instances: int, total_bytes: int) -> None:
        if self.failures and not self.status.startswith("unavailable"):
            runs = len(self.seconds) + len(self.failures)
            self.status = f"failed {len(self.failures)}/{runs}: {self.failures[0]}"
        if self.seconds:
            self.median_s = statistics.median(self.seconds)
            self.instances_per_s = instances / self.median_s
            self.mb_per_s = total_bytes / MB / self.median_s


@dataclass
class DatasetResult:
    name: str
    instances: int
    total_bytes: int
    legs: dict[str, LegResult] = field(default_factory=dict)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def timeout_for(instances: int, total_bytes: int, override: float | None) -> float:
    """Generous but bounded (60 s + 10 inst/s + 2 MB/s), so a dead peer never hangs us."""
    return override if override else 60.0 + instances / 10 + total_bytes / (2 * MB)


def split(source: Path, senders: int) -> list[Path]:
    """``source`` as ``senders`` folders of consecutive files (series stay together
    as far as the split allows), for one storescu each."""
    if senders <= 1:
        return [source]
    files = sorted(p for p in source.iterdir() if p.is_file())
    parts = [source / f"sender-{k + 1}" for k in range(senders)]
    for k, part in enumerate(parts):
        part.mkdir()
        for path in files[k * len(files) // senders : (k + 1) * len(files) // senders]:
            path.rename(part / path.name)
    return parts


def bench_dataset(
    name: str,
    source: Path,
    legs: dict[str, str | None],
    repeats: int,
    workdir: Path,
    timeout: float | None,
    senders: int = 1,
) -> DatasetResult:
    """Run every available leg ``repeats`` times, interleaved, on one dataset."""
    n = sum(1 for p in source.iterdir() if p.is_file())
    total = folder_bytes(source)
    sources = split(source, senders)
    result = DatasetResult(name if senders == 1 else f"{name} ×{senders}", n, total)
    limit = timeout_for(n, total, timeout)
    for leg, unavailable in legs.items():
        result.legs[leg] = LegResult(
            leg, status=f"unavailable: {unavailable}" if unavailable else "ok"
        )
    for repeat in range(1, repeats + 1):
        for leg, leg_result in result.legs.items():
            if leg_result.status != "ok":
                continue
            os.sync()  # flush the previous run's writes so they do not bill this one
            try:
                seconds, peak = RUNNERS[leg](workdir, sources, n, limit)
            except BenchError as exc:
                # One failed repeat does not void the others; the report shows both.
                leg_result.failures.append(str(exc))
                console.print(f"  [red]{name:>6} {leg:<10} #{repeat}: {exc}[/red]")
                continue
            leg_result.seconds.append(seconds)
            if peak is not None:
                leg_result.peak_rss_bytes = max(leg_result.peak_rss_bytes or 0, peak)
            rss = f", peak RSS {peak / MB:.0f} MB" if peak else ""
            console.print(
                f"  {name:>6} {leg:<10} #{repeat}: {seconds:7.2f} s  "
                f"({n / seconds:7.1f} inst/s, {total / MB / seconds:6.1f} MB/s{rss})"
            )
    for leg_result in result.legs.values():
        leg_result.finish(n, total)
    return result


def generate(folder: Path, n: int, shape: tuple[int, int], label: str) -> Path:
    started = time.perf_counter()
    for _ in iter_study(folder, n, rows=shape[0], cols=shape[1], series_count=max(1, n // 500)):
        pass
    size = folder_bytes(folder)
    console.print(
        f"[dim]generated {label}: {n} instances, {size / MB:.1f} MB "
        f"in {time.perf_counter() - started:.1f} s[/dim]"
    )
    return folder


# --------------------------------------------------------------------------- report


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def ratio(a: LegResult | None, b: LegResult | None) -> float | None:
    """Throughput ratio a/b (1.0 = as fast; below 1 = a is slower)."""
    if a is None or b is None or not a.instances_per_s or not b.instances_per_s:
        return None
    return a.instances_per_s / b.instances_per_s


def print_report(results: list[DatasetResult], huge: dict[str, Any] | None, repeats: int) -> None:
    table = Table(title=f"End-to-end routing, median of {repeats} (storescu start → last file)")
    for column in ("Dataset", "Path", "Median s", "Inst/s", "MB/s", "Peak RSS MB", "Runs (s)"):
        table.add_column(column, justify="left" if column in ("Dataset", "Path") else "right")
    table.caption = (
        "a. storescu → storescp   b. storescu → Orthanc (Lua OnStoredInstance → SendToModality)"
        " → storescp   c. storescu → dicomrouter serve → storescp   d. storescu +tls →"
        " dicomrouter (dicom.tls) → storescp   e. storescu +tls → storescp +tls"
    )
    notes: dict[str, str] = {}
    for ds in results:
        label = f"{ds.name}: {ds.instances} × {ds.total_bytes / ds.instances / 1000:.1f} KB"
        for index, (leg, res) in enumerate(ds.legs.items()):
            runs = " ".join(f"{s:.2f}" for s in res.seconds)
            if res.status != "ok":
                kind = res.status.split(":", 1)[0]
                notes[f"{ds.name}/{leg}"] = res.status
                runs = f"{runs} [yellow]{kind} (see below)[/yellow]".strip()
            rss = res.peak_rss_bytes / MB if res.peak_rss_bytes else None
            table.add_row(
                label if index == 0 else "",
                LEGS[leg],
                _fmt(res.median_s, ".2f"),
                _fmt(res.instances_per_s, ".1f"),
                _fmt(res.mb_per_s, ".1f"),
                _fmt(rss, ".0f"),
                runs,
            )
        table.add_section()
    console.print(table)
    for key, status in notes.items():
        console.print(f"[yellow]{key}: {status}[/yellow]")

    ratios = Table(title="Throughput ratios (1.00 = as fast; below 1 = first one slower)")
    ratios.add_column("Dataset", justify="right")
    for a, b in RATIOS:
        ratios.add_column(f"{a} / {b}", justify="right")
    for ds in results:
        legs = ds.legs
        ratios.add_row(ds.name, *(_fmt(ratio(legs.get(a), legs.get(b)), ".2f") for a, b in RATIOS))
    console.print(ratios)

    if huge is not None:
        if huge["status"] != "ok":
            console.print(f"Flat-memory run ({huge['target_gb']} GB): {huge['status']}")
        else:
            ref = huge["reference_peak_rss_bytes"]
            console.print(
                f"Flat-memory run: {huge['instances']} instances, {huge['bytes'] / MB:.0f} MB "
                f"through the router in {huge['seconds']:.1f} s "
                f"({huge['instances_per_s']:.1f} inst/s, {huge['mb_per_s']:.1f} MB/s); "
                f"peak RSS {huge['peak_rss_bytes'] / MB:.0f} MB summed over its processes "
                f"(PSS {(huge.get('peak_pss_bytes') or 0) / MB:.0f} MB) vs "
                f"{_fmt(ref / MB if ref else None, '.0f')} MB for the {huge['reference']} dataset"
            )


def router_code() -> str:
    """Where ``python -m dicomrouter`` imports the router from (``PYTHONPATH`` decides,
    and the router's processes inherit it), with that tree's commit if it is a git
    checkout: a before/after comparison must know which code ran."""
    try:
        out = subprocess.run(
            [sys.executable, "-c", "import dicomrouter; print(dicomrouter.__file__)"],
            env=_env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        return f"? ({exc})"
    tree = Path(out).resolve().parents[2]  # <tree>/src/dicomrouter/__init__.py
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(
            ["git", "-C", str(tree), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(tree), "status", "--porcelain", "--", "src"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        return f"{out} ({commit}{', modified' if dirty else ''})"
    return out


def machine_info() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    versions: dict[str, str] = {}
    for tool, command in (
        ("dcmtk", [dcmtk_tool("storescu"), "--version"]),
        ("orthanc", [orthanc_executable() or "Orthanc", "--version"]),
    ):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(command, capture_output=True, text=True, timeout=10).stdout
            versions[tool] = out.strip().splitlines()[0] if out.strip() else "?"
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "network": "loopback 127.0.0.1",
        "load_average": os.getloadavg(),
        "dicomrouter": router_code(),
        **versions,
    }


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--small", type=int, default=1000, help="small (64x64) instances; 0 skips")
    parser.add_argument("--large", type=int, default=300, help="large (512x512) instances; 0 skips")
    parser.add_argument("--repeats", type=int, default=3, help="repeats per leg (median reported)")
    parser.add_argument("--huge-gb", type=float, default=0.0, help="flat-memory run size; 0 skips")
    parser.add_argument(
        "--legs",
        default=DEFAULT_LEGS,
        help=f"comma-separated subset of: {DEFAULT_LEGS}",
    )
    parser.add_argument(
        "--senders",
        type=int,
        default=1,
        help="concurrent storescu per run, each with its share of the dataset (default 1)",
    )
    parser.add_argument(
        "--huge-processes", type=int, default=1, help="dicom.processes of the flat-memory run"
    )
    parser.add_argument("--json", type=Path, help="also write results as JSON here")
    parser.add_argument("--workdir", type=Path, help="scratch parent folder (default: /tmp)")
    parser.add_argument("--timeout", type=float, help="per-run timeout in seconds")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        for tool in ("storescu", "storescp", "echoscu"):
            dcmtk_tool(tool)
    except FileNotFoundError as exc:
        console.print(f"[red]{exc}[/red]")
        return 2
    wanted = [leg.strip() for leg in args.legs.split(",") if leg.strip()]
    unknown = set(wanted) - set(LEGS)
    if unknown:
        console.print(f"[red]unknown legs: {', '.join(sorted(unknown))}[/red]")
        return 2
    legs: dict[str, str | None] = {}
    no_router = (
        router_unavailable() if {"router", "router_tls", "router_p2"} & set(wanted) else None
    )
    no_tls = tls_unavailable() if set(TLS_LEGS) & set(wanted) else None
    for leg in wanted:
        if leg == "orthanc":
            legs[leg] = None if orthanc_executable() else "Orthanc not installed"
        elif leg in ("router", "router_p2"):
            legs[leg] = no_router
        elif leg == "router_tls":
            legs[leg] = no_router or no_tls
        elif leg == "direct_tls":
            legs[leg] = no_tls
        elif leg == "router_pg":
            legs[leg] = no_router or (None if postgres_bin() else "PostgreSQL not installed")
        else:
            legs[leg] = None
    for leg, reason in legs.items():
        if reason:
            console.print(f"[yellow]{leg}: unavailable: {reason}[/yellow]")

    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="dicomrouter-bench-", dir=args.workdir))
    info = machine_info()
    console.print(
        f"[dim]{info['cpus']} CPUs ({info['cpu_model']}), {info['platform']}, "
        f"{info.get('dcmtk', '')}, {info.get('orthanc', '')}; scratch {workdir}[/dim]"
    )
    load = " ".join(f"{x:.2f}" for x in info["load_average"])
    console.print(f"[dim]dicomrouter: {info['dicomrouter']}; load average {load}[/dim]")
    results: list[DatasetResult] = []
    huge: dict[str, Any] | None = None
    cluster = contextlib.ExitStack()
    try:
        if "router_pg" in legs and legs["router_pg"] is None:
            _POSTGRES.append(cluster.enter_context(throwaway_cluster(durable=True)))
        for name, n, shape in (
            ("small", args.small, SMALL_SHAPE),
            ("large", args.large, LARGE_SHAPE),
        ):
            if n <= 0:
                continue
            source = generate(workdir / f"src-{name}", n, shape, name)
            results.append(
                bench_dataset(name, source, legs, args.repeats, workdir, args.timeout, args.senders)
            )
            shutil.rmtree(source, ignore_errors=True)
        if args.huge_gb > 0:
            huge = run_huge(args, legs.get("router", "router leg not selected"), workdir, results)
    finally:
        cluster.close()
        if args.keep:
            console.print(f"[dim]kept {workdir}[/dim]")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    print_report(results, huge, args.repeats)
    if args.json:
        payload = {
            "machine": info,
            "command": " ".join(
                [Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]
            ),
            "repeats": args.repeats,
            "senders": args.senders,
            "datasets": [
                {**asdict(ds), "legs": {k: asdict(v) for k, v in ds.legs.items()}} for ds in results
            ],
            "ratios": {
                ds.name: {f"{a}/{b}": ratio(ds.legs.get(a), ds.legs.get(b)) for a, b in RATIOS}
                for ds in results
            },
            "huge": huge,
        }
        args.json.write_text(json.dumps(payload, indent=2), encoding="utf-8")
        console.print(f"[dim]wrote {args.json}[/dim]")
    return 0


def run_huge(
    args: argparse.Namespace,
    unavailable: str | None,
    workdir: Path,
    results: list[DatasetResult],
) -> dict[str, Any]:
    """Route one ~N GB study through the router once and compare its peak RSS.

    A store-and-forward router should stream: its memory must not grow with study size.
    The reference is the router's peak RSS on the large dataset.
    """
    reference = next((ds for ds in results if ds.name == "large"), None) or (
        results[-1] if results else None
    )
    ref_leg = reference.legs.get("router") if reference else None
    report: dict[str, Any] = {
        "target_gb": args.huge_gb,
        "status": "ok",
        "reference": reference.name if reference else None,
        "reference_peak_rss_bytes": ref_leg.peak_rss_bytes if ref_leg else None,
    }
    if unavailable:
        report["status"] = f"unavailable: {unavailable}"
        return report
    n = instances_for_bytes(int(args.huge_gb * 1e9), *LARGE_SHAPE)
    source = generate(workdir / "src-huge", n, LARGE_SHAPE, "huge")
    try:
        total = folder_bytes(source)
        os.sync()
        memory: dict[str, int] = {}
        seconds, peak = run_router(
            workdir,
            [source],
            n,
            timeout_for(n, total, args.timeout),
            memory=memory,
            processes=args.huge_processes,
        )
    except BenchError as exc:
        report["status"] = f"failed: {exc}"
        return report
    finally:
        shutil.rmtree(source, ignore_errors=True)
    report.update(
        processes=args.huge_processes,
        instances=n,
        bytes=total,
        seconds=seconds,
        instances_per_s=n / seconds,
        mb_per_s=total / MB / seconds,
        peak_rss_bytes=peak,
        peak_pss_bytes=memory.get("peak_pss_bytes"),
    )
    console.print(
        f"  huge router: {seconds:.1f} s, peak RSS {(peak or 0) / MB:.0f} MB "
        f"(summed over processes), peak PSS {memory.get('peak_pss_bytes', 0) / MB:.0f} MB"
    )
    return report


if __name__ == "__main__":
    sys.exit(main())
