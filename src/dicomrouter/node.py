"""Run a router node: the receiver in this process; dispatch and HTTP in child processes.

Separate processes because pynetdicom is pure Python and both receiving and sending
are CPU-bound on the GIL (field notes: parallel associations in one process gave no
gain, separate processes do); the HTTP service is kept out of the receiver's GIL
for the same reason. They share nothing but the index and the files, which is also
what makes a crash of any one harmless: the index is the truth. This process
supervises the children and restarts one that dies.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

from dicomrouter.config import RouterConfig
from dicomrouter.dispatch import Dispatcher
from dicomrouter.observe.metrics import enable_multiprocess
from dicomrouter.receive import Receiver
from dicomrouter.store import InstanceIndex, ObjectStore, create_index_engine

log = logging.getLogger("dicomrouter")

_PR_SET_PDEATHSIG = 1
_SWEEP_EVERY = 60.0


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)-7s %(processName)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    if level != "DEBUG":
        # pynetdicom's default handlers format every PDU and DIMSE message for the
        # log even when nothing is logged: about 10% of the receive path's CPU.
        from pynetdicom import _config

        _config.LOG_HANDLER_LEVEL = "none"


def _die_with_parent() -> None:
    """Linux: if the parent is killed (even with SIGKILL), take this process down too."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


def _dispatch_main(
    config: RouterConfig, config_path: Path | None, ready: multiprocessing.synchronize.Event
) -> None:
    _die_with_parent()
    configure_logging(config.log_level)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    engine = create_index_engine(config.database_url)
    store = ObjectStore(config.storage.path)
    dispatcher = Dispatcher(config, engine, store)
    dispatcher.start()
    ready.set()
    stop.wait()
    dispatcher.stop()
    logging.shutdown()
    # pynetdicom's DUL threads are not daemons: one blocked on a hung peer would keep
    # the process alive until its timeout. Everything that matters is in the index.
    os._exit(0)


def _http_main(
    config: RouterConfig, config_path: Path | None, ready: multiprocessing.synchronize.Event
) -> None:
    _die_with_parent()
    configure_logging(config.log_level)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    from dicomrouter.api.server import serve_http

    serve_http(config, config_path, on_ready=ready.set)
    logging.shutdown()
    os._exit(0)


class _Child:
    """A supervised child process: started with a readiness handshake, restarted with
    backoff when it dies (up to every 5 min for one that keeps dying)."""

    def __init__(self, name: str, target: Any, args: tuple[Any, ...]):
        self.name, self.target, self.args = name, target, args
        self.process: multiprocessing.process.BaseProcess | None = None
        self._restart_delay, self._last_restart, self._next_restart = 1.0, 0.0, 0.0

    def start(self) -> None:
        context = multiprocessing.get_context("spawn")
        ready = context.Event()
        self.process = context.Process(
            target=self.target, args=(*self.args, ready), name=self.name, daemon=False
        )
        self.process.start()
        deadline = time.monotonic() + 60
        while not ready.wait(0.2):
            if not self.process.is_alive():
                raise RuntimeError(
                    f"{self.name} process exited during start-up ({self.process.exitcode})"
                )
            if time.monotonic() > deadline:
                self.process.kill()
                raise RuntimeError(f"{self.name} process did not start within 60 s")

    def alive(self) -> bool:
        return self.process is not None and self.process.is_alive()

    def signal(self, signum: int) -> None:
        if self.process is not None and self.process.pid and self.alive():
            os.kill(self.process.pid, signum)

    def stop(self, timeout: float = 30.0) -> None:
        if self.process is not None and self.process.is_alive():
            self.process.terminate()  # SIGTERM: finish what is in hand, release jobs
            self.process.join(timeout)
            if self.process.is_alive():
                self.process.kill()

    def supervise(self) -> None:
        """Restart the child if it died. The index holds the work, so a new dispatch
        process resumes it (reclaiming its leases); receiving goes on regardless."""
        if self.process is None or self.process.is_alive():
            return
        now = time.monotonic()
        if now < self._next_restart:
            return
        quick_failure = now - self._last_restart < 60
        self._restart_delay = min(self._restart_delay * 2, 300.0) if quick_failure else 1.0
        self._last_restart, self._next_restart = now, now + self._restart_delay
        log.error(
            "%s process exited unexpectedly (%s); restarting it",
            self.name,
            self.process.exitcode,
        )
        try:
            self.start()
        except RuntimeError as exc:
            log.error("%s", exc)


class Node:
    def __init__(self, config: RouterConfig, config_path: Path | None = None):
        self.config = config
        self.config_path = config_path
        self.store = ObjectStore(config.storage.path)
        self.store.prepare()
        self.store.lock()
        # Before any child starts: they inherit the variable that turns it on.
        enable_multiprocess(self.store.root / ".metrics")
        create_index_engine(config.database_url).dispose()  # create, check or upgrade
        # The receiver retries a locked index itself, with sub-millisecond sleeps.
        self.engine = create_index_engine(config.database_url, create=False, busy_timeout_ms=0)
        self.receiver = Receiver(config, self.store, InstanceIndex(self.engine))
        self.children = [_Child("dispatch", _dispatch_main, (config, config_path))]
        if config.http.enabled:
            self.children.append(_Child("http", _http_main, (config, config_path)))

    def start(self) -> None:
        """Listen first (a port in use fails fast, with nothing else started), then
        start the child processes."""
        swept = self.store.sweep_tmp()
        if swept:
            log.info("removed %d partial file(s) left by interrupted transfers", swept)
        self.receiver.start()
        try:
            for child in self.children:
                child.start()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        self.receiver.stop()
        for child in self.children:
            child.stop()
        self.engine.dispose()

    def _sweep_aborted_transfers(self) -> None:
        """Remove partial files of transfers aborted mid-instance. A file still being
        received is written to continuously, so one untouched for longer than the
        network timeout belongs to an association that is gone."""
        idle = 2 * max(self.config.dicom.network_timeout, self.config.dicom.dimse_timeout)
        removed = self.store.sweep_tmp(older_than=idle)
        if removed:
            log.info("removed %d partial file(s) of aborted transfers", removed)

    def serve_forever(self) -> None:
        """Run until SIGTERM/SIGINT; a child process that dies is restarted."""
        stop = threading.Event()

        def on_signal(signum: int, frame: FrameType | None) -> None:
            log.info("received signal %d: shutting down", signum)
            stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        try:
            self.start()
            log.info("dicomrouter ready")
            last_sweep = time.monotonic()
            while not stop.wait(1.0):
                if time.monotonic() - last_sweep >= _SWEEP_EVERY:
                    self._sweep_aborted_transfers()
                    last_sweep = time.monotonic()
                for child in self.children:
                    child.supervise()
        finally:
            self.stop()
            log.info("dicomrouter stopped")
