"""Run dicomrouter as a real process (``python -m dicomrouter serve``) in tests.

Tests drive it from the outside, like a PACS administrator would: a YAML file, the
DICOM port, the CLI (``queue list --json``), signals. Nothing here reaches into the
router's internals, so a test passes only if the product works as shipped.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

from . import stop_process
from .dcmtk import HOST, dcmtk_env, dcmtk_tool, echo, free_port

AE_TITLE = "DICOMROUTER"
READY_LINE = "dicomrouter ready"  # logged by the node once every process has started


def wait_until(
    predicate: Callable[[], Any], timeout: float, interval: float = 0.1, message: str = "condition"
) -> Any:
    """Poll ``predicate`` until it returns a truthy value; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


def storescu(
    files: Sequence[Path | str],
    port: int,
    aet: str = AE_TITLE,
    calling: str = "STORESCU",
    extra: Sequence[str] = (),
    timeout: float = 300,
) -> subprocess.CompletedProcess[str]:
    """Send files with dcmtk ``storescu`` over one association (TCP_NODELAY set)."""
    command = [dcmtk_tool("storescu"), "-aet", calling, "-aec", aet, *extra, HOST, str(port)]
    command += [str(f) for f in files]
    return subprocess.run(command, capture_output=True, text=True, env=dcmtk_env(), timeout=timeout)


def node_children(node: int) -> dict[str, int]:
    """Role -> pid of a node's live child processes: ``dispatch`` and ``http`` (by
    their command line) and the receive processes forked from the node (by their
    process name, ``receiver-N``)."""
    pids = subprocess.run(["pgrep", "-P", str(node)], capture_output=True, text=True).stdout
    roles = {}
    for pid in pids.split():
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            name = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:  # gone meanwhile
            continue
        if b"dicomrouter.children" in argv:
            name = argv[argv.index(b"dicomrouter.children") + 1].decode()
        roles[name] = int(pid)
    return roles


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still "exists"; it holds no ports.
    try:
        return Path(f"/proc/{pid}/status").read_text().find("State:\tZ") < 0
    except OSError:
        return False


class RouterProcess:
    """``with RouterProcess(tmp_path, config) as router:`` starts and stops a router.

    ``config`` is the YAML mapping; ``dicom.port`` and ``storage.path`` are filled in
    when absent. ``kill()`` is a SIGKILL (crash), ``stop()`` a SIGTERM (clean stop).
    """

    def __init__(
        self,
        workdir: Path,
        config: dict[str, Any],
        answers: Callable[[], bool] | None = None,
        env: Mapping[str, str] | None = None,
    ):
        """``answers`` tells when DICOM is up (default: a plain C-ECHO to
        ``dicom.port``; a router with ``dicom.port: null`` needs its own). ``env``
        adds environment variables (a transform's secret...)."""
        self.env = dict(env or {})
        self.answers = answers or (lambda: echo(self.port, self.ae_title, timeout=2))
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config = json.loads(json.dumps(config))
        self.config.setdefault("ae_title", AE_TITLE)
        self.config.setdefault("dicom", {}).setdefault("port", free_port())
        self.config.setdefault("storage", {}).setdefault("path", str(self.workdir / "data"))
        self.config.setdefault("dispatch", {}).setdefault("poll_interval", "50ms")
        self.config.setdefault("http", {}).setdefault("port", free_port())
        self.config_path = self.workdir / "dicomrouter.yaml"
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        self.log_path = self.workdir / "router.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def port(self) -> int:
        return int(self.config["dicom"]["port"])

    @property
    def ae_title(self) -> str:
        return str(self.config["ae_title"])

    @property
    def storage(self) -> Path:
        return Path(self.config["storage"]["path"])

    def files_under(self, folder: str) -> list[Path]:
        """The files in ``<storage>/<folder>`` (``tmp``, ``outgoing``: one folder per
        node inside), however deep."""
        return sorted(p for p in (self.storage / folder).rglob("*") if p.is_file())

    def start(self, timeout: float = 60.0, wait_ready: bool = True) -> RouterProcess:
        """Start and wait until the node says it is ready: DICOM answers C-ECHO and the
        child processes (dispatch, HTTP) have started. ``wait_ready=False`` returns as
        soon as DICOM answers, while the children may still be starting."""
        ready_before = self.log().count(READY_LINE) if self.log_path.exists() else 0
        log = open(self.log_path, "ab")  # noqa: SIM115 - kept open for the child
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dicomrouter", "serve", "--config", str(self.config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **self.env, "PYTHONUNBUFFERED": "1"},
        )
        log.close()
        deadline = time.monotonic() + timeout
        while not self.answers():
            if self.process.poll() is not None:
                raise RuntimeError(f"router exited with {self.process.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"router did not answer C-ECHO in {timeout}s:\n{self.log()}")
            time.sleep(0.2)
        while wait_ready and self.log().count(READY_LINE) <= ready_before:
            if self.process.poll() is not None:
                raise RuntimeError(f"router exited with {self.process.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"router did not become ready in {timeout}s:\n{self.log()}")
            time.sleep(0.1)
        return self

    def kill(self) -> None:
        """Crash: SIGKILL the node (its dispatch child dies with it)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(30)
        self._wait_port_free()

    def stop(self, timeout: float = 60.0) -> int | None:
        """Clean stop with SIGTERM; returns the exit code."""
        if self.process is None:
            return None
        code = stop_process(self.process, timeout)
        self._wait_port_free()
        return code

    def _wait_port_free(self, timeout: float = 30.0) -> None:
        """Wait until no process of this router is left: the node (its command line
        names our config file) and the children it logged (they die with it, but
        may need a moment to notice)."""
        children = {int(pid) for pid in re.findall(r"process started \(pid (\d+)\)", self.log())}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = subprocess.run(["pgrep", "-f", str(self.config_path)], capture_output=True)
            if result.returncode != 0 and not any(_alive(pid) for pid in children):
                return
            time.sleep(0.1)

    def __enter__(self) -> RouterProcess:
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

    # -- the CLI against this router's index ------------------------------------------
    def cli(self, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-m", "dicomrouter", *args],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"dicomrouter {' '.join(args)} failed:\n{result.stderr}")
        return result

    def jobs(self, **filters: str) -> list[dict[str, Any]]:
        args = ["queue", "list", "--config", str(self.config_path), "--json", "--limit", "100000"]
        for key, value in filters.items():
            args += [f"--{key}", value]
        return list(json.loads(self.cli(*args, check=True).stdout)["jobs"])

    def wait_jobs(
        self,
        predicate: Callable[[list[dict[str, Any]]], bool],
        timeout: float,
        message: str = "jobs",
    ) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = []

        def check() -> bool:
            nonlocal result
            result = self.jobs()
            return predicate(result)

        try:
            wait_until(check, timeout, interval=0.3, message=message)
        except AssertionError as exc:
            raise AssertionError(
                f"{exc}; last jobs: {result}\nlog:\n{self.log()[-3000:]}"
            ) from None
        return result

    def send(
        self, files: Sequence[Path | str], calling: str = "STORESCU", extra: Sequence[str] = ()
    ) -> subprocess.CompletedProcess[str]:
        return storescu(files, self.port, self.ae_title, calling=calling, extra=extra)


def all_settled(jobs: list[dict[str, Any]]) -> bool:
    return bool(jobs) and all(
        j["state"] in ("completed", "warning", "failed", "canceled") for j in jobs
    )
