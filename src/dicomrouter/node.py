"""Run a router node: the receiver in this process, the dispatcher in a child process.

Two processes because pynetdicom is pure Python and both receiving and sending are
CPU-bound on the GIL (field notes: parallel associations in one process gave no
gain, separate processes do). They share nothing but the index and the files, which
is also what makes a crash of either one harmless: the index is the truth.
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
from types import FrameType

from dicomrouter.config import RouterConfig
from dicomrouter.dispatch import Dispatcher
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


def _dispatch_main(config: RouterConfig, ready: multiprocessing.synchronize.Event) -> None:
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


class Node:
    def __init__(self, config: RouterConfig):
        self.config = config
        self.store = ObjectStore(config.storage.path)
        self.store.prepare()
        self.store.lock()
        create_index_engine(config.database_url).dispose()  # create or check the schema
        # The receiver retries a locked index itself, with sub-millisecond sleeps.
        self.engine = create_index_engine(config.database_url, create=False, busy_timeout_ms=0)
        self.receiver = Receiver(config, self.store, InstanceIndex(self.engine))
        self._dispatch: multiprocessing.process.BaseProcess | None = None
        self._restart_delay, self._last_restart, self._next_restart = 1.0, 0.0, 0.0

    def start(self) -> None:
        """Listen first (a port in use fails fast, with nothing else started), then
        start the dispatch process."""
        swept = self.store.sweep_tmp()
        if swept:
            log.info("removed %d partial file(s) left by interrupted transfers", swept)
        self.receiver.start()
        try:
            self._start_dispatch()
        except BaseException:
            self.receiver.stop()
            raise

    def _start_dispatch(self) -> None:
        context = multiprocessing.get_context("spawn")
        ready = context.Event()
        self._dispatch = context.Process(
            target=_dispatch_main, args=(self.config, ready), name="dispatch", daemon=False
        )
        self._dispatch.start()
        deadline = time.monotonic() + 60
        while not ready.wait(0.2):
            if not self._dispatch.is_alive():
                raise RuntimeError(
                    f"dispatch process exited during start-up ({self._dispatch.exitcode})"
                )
            if time.monotonic() > deadline:
                self._dispatch.kill()
                raise RuntimeError("dispatch process did not start within 60 s")

    def stop(self) -> None:
        self.receiver.stop()
        if self._dispatch is not None and self._dispatch.is_alive():
            self._dispatch.terminate()  # SIGTERM: finish the current instance, release jobs
            self._dispatch.join(30)
            if self._dispatch.is_alive():
                self._dispatch.kill()
        self.engine.dispose()

    def _sweep_aborted_transfers(self) -> None:
        """Remove partial files of transfers aborted mid-instance. A file still being
        received is written to continuously, so one untouched for longer than the
        network timeout belongs to an association that is gone."""
        idle = 2 * max(self.config.dicom.network_timeout, self.config.dicom.dimse_timeout)
        removed = self.store.sweep_tmp(older_than=idle)
        if removed:
            log.info("removed %d partial file(s) of aborted transfers", removed)

    def _supervise_dispatch(self) -> None:
        """Restart a dispatch process that died. Receiving goes on regardless, and the
        index holds the work, so the new process resumes it (reclaiming its leases).
        One that keeps dying is restarted less and less often (up to every 5 min)."""
        if self._dispatch is None or self._dispatch.is_alive():
            return
        now = time.monotonic()
        if now < self._next_restart:
            return
        quick_failure = now - self._last_restart < 60
        self._restart_delay = min(self._restart_delay * 2, 300.0) if quick_failure else 1.0
        self._last_restart, self._next_restart = now, now + self._restart_delay
        log.error(
            "dispatch process exited unexpectedly (%s); restarting it",
            self._dispatch.exitcode,
        )
        try:
            self._start_dispatch()
        except RuntimeError as exc:
            log.error("%s", exc)

    def serve_forever(self) -> None:
        """Run until SIGTERM/SIGINT; a dispatch process that dies is restarted."""
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
                self._supervise_dispatch()
        finally:
            self.stop()
            log.info("dicomrouter stopped")
