"""Run dcmtk tools as real peers in tests.

Kept small and generic so other test modules can reuse it. Two traps handled here:

* ``storescp``/``echoscu`` on ``PATH`` may be pynetdicom's Python console scripts
  (pynetdicom installs apps with the same names); :func:`dcmtk_tool` finds the real
  dcmtk binary by checking ``--version``.
* Debian's dcmtk leaves Nagle's algorithm on unless ``TCP_NODELAY=1`` is in the
  environment, which adds ~40 ms per message (docs/benchmarks.md), so every
  tool is started with :func:`dcmtk_env`.
"""

from __future__ import annotations

import functools
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Literal

from . import stop_process

HOST = "127.0.0.1"


@functools.cache
def dcmtk_tool(name: str) -> str:
    """Absolute path of the dcmtk executable ``name`` (not pynetdicom's namesake)."""
    dirs = os.environ.get("PATH", "").split(os.pathsep) + ["/usr/bin", "/usr/local/bin"]
    for directory in dirs:
        candidate = shutil.which(name, path=directory)
        if not candidate:
            continue
        try:
            out = subprocess.run(
                [candidate, "--version"], capture_output=True, text=True, timeout=10
            ).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        if "dcmtk" in out.lower():
            return candidate
    raise FileNotFoundError(f"dcmtk {name} not found (apt-get install dcmtk)")


def have_dcmtk() -> bool:
    try:
        dcmtk_tool("storescp")
        dcmtk_tool("echoscu")
    except FileNotFoundError:
        return False
    return True


def dcmtk_env() -> dict[str, str]:
    return {**os.environ, "TCP_NODELAY": "1"}


def sop_uids(files: Sequence[Path]) -> set[str]:
    """SOP Instance UIDs of DICOM files (header only)."""
    from pydicom import dcmread

    return {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files}


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def echo(port: int, aet: str, timeout: float = 5.0) -> bool:
    """True when a dcmtk ``echoscu`` to ``aet`` on 127.0.0.1:``port`` succeeds."""
    try:
        result = subprocess.run(
            [dcmtk_tool("echoscu"), "-to", str(max(1, int(timeout))), "-aec", aet, HOST, str(port)],
            capture_output=True,
            env=dcmtk_env(),
            timeout=timeout + 5,
        )
    except subprocess.TimeoutExpired:
        return False
    return result.returncode == 0


class StoreSCP:
    """dcmtk ``storescp`` on 127.0.0.1 as a context manager.

    ``accept="all"`` passes ``+xa`` (every transfer syntax dcmtk knows, compressed
    included); ``"uncompressed"`` keeps storescp's default (Explicit/Implicit VR
    Little Endian and Explicit VR Big Endian only).

    ``bit_preserving=True`` adds ``+B`` so tests can compare the received dataset
    bytes with what was sent; storescp then streams each file to its final name
    while it is still arriving, so only read files after the C-STORE completed.
    Without it a file is written once the whole dataset has arrived.
    Verbose output goes to ``log_path``; :meth:`association_count` counts the
    associations it reports.
    """

    def __init__(
        self,
        port: int,
        aet: str,
        outdir: Path,
        accept: Literal["all", "uncompressed"] = "all",
        extra_args: Sequence[str] = (),
        bit_preserving: bool = False,
    ) -> None:
        self.port = port
        self.aet = aet
        self.outdir = Path(outdir)
        self.accept = accept
        self.extra_args = list(extra_args)
        self.bit_preserving = bit_preserving
        self.log_path = self.outdir.parent / f"storescp-{port}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, ready_timeout: float = 15.0) -> StoreSCP:
        self.outdir.mkdir(parents=True, exist_ok=True)
        args = [dcmtk_tool("storescp"), "-v", "-dhl", "-od", str(self.outdir), "-aet", self.aet]
        if self.bit_preserving:
            args.append("+B")
        if self.accept == "all":
            args.append("+xa")
        args += self.extra_args + [str(self.port)]
        log = open(self.log_path, "wb")  # noqa: SIM115 - handed to the child process
        try:
            self.process = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, env=dcmtk_env()
            )
        finally:
            log.close()
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"storescp exited: {self.log_path.read_text(errors='replace')}")
            if self.answers():
                return self
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"storescp not ready on port {self.port}")

    def answers(self) -> bool:
        """Whether it answers a C-ECHO (readiness)."""
        return echo(self.port, self.aet, timeout=2)

    def stop(self) -> None:
        stop_process(self.process, 10)
        self.process = None

    def __enter__(self) -> StoreSCP:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def association_count(self) -> int:
        """Associations received so far, including the readiness C-ECHOs."""
        return self.log().count("Association Received")

    def store_requests(self) -> int:
        """C-STORE requests received so far, duplicates included (from the log)."""
        return self.log().count("Received Store Request")

    def received_sops(self) -> set[str]:
        """SOP Instance UIDs of the files received so far.

        storescp writes each file under its final name, so a poll can meet one that is
        still being written: that file is not received yet, and the next poll counts it.
        """
        from pydicom import dcmread
        from pydicom.errors import InvalidDicomError

        uids: set[str] = set()
        for path in self.received_files():
            try:
                uids.add(str(dcmread(path, stop_before_pixels=True).SOPInstanceUID))
            except (InvalidDicomError, EOFError, AttributeError, OSError):
                continue
        return uids

    def received_files(self) -> list[Path]:
        """Files storescp wrote so far, sorted by name."""
        return sorted(p for p in self.outdir.iterdir() if p.is_file())
