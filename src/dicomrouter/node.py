"""Run a router node: the receiver in this process; dispatch and HTTP in child processes.

Separate processes because pynetdicom is pure Python and both receiving and sending
are CPU-bound on the GIL (field notes: parallel associations in one process gave no
gain, separate processes do); the HTTP service is kept out of the receiver's GIL
for the same reason. They share nothing but the index and the files, which is also
what makes a crash of any one harmless: the index is the truth. This process
supervises the children and restarts one that dies.

SIGHUP (``kill -HUP``, or ``PUT /api/v1/config`` through the HTTP process) reloads
the configuration file. This process validates it (an invalid file is refused with
its errors and changes nothing), records it as a version if it is new, applies it to
the receiver and forwards SIGHUP to the children, which load that newest recorded
version: what they run is always what this process validated.
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
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from types import FrameType
from typing import Any

from dicomrouter.config import ConfigError, RouterConfig
from dicomrouter.control import audit, versions
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
        # A refused connection is logged by pynetdicom as two ERROR lines, on every
        # retry and every C-ECHO probe of a destination that is down; the dispatcher
        # already reports it once, with the destination's name.
        logging.getLogger("pynetdicom.transport").setLevel(logging.CRITICAL)
    if level != "DEBUG":
        # pynetdicom's default handlers format every PDU and DIMSE message for the
        # log even when nothing is logged: about 10% of the receive path's CPU.
        from pynetdicom import _config

        _config.LOG_HANDLER_LEVEL = "none"


def _die_with_parent() -> None:
    """Linux: if the parent is killed (even with SIGKILL), take this process down too.

    The death signal only covers a parent that dies after ``prctl``; a spawned child
    takes a second or so to get here, so a parent already gone by then (we were
    re-parented) means exit now, or an orphan would keep our ports and jobs."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:
        os._exit(1)


def _dispatch_main(
    config: RouterConfig, config_path: Path | None, ready: Callable[[], None]
) -> None:
    _die_with_parent()
    configure_logging(config.log_level)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    reload = threading.Event()
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, lambda signum, frame: reload.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    # Not durable_commits: see create_index_engine; nothing here is a promise made to
    # a sender, and the receiver's write lock is the one that must stay free.
    engine = create_index_engine(config.database_url, create=False, durable_commits=False)
    store = ObjectStore(config.storage.path)
    dispatcher = Dispatcher(config, engine, store)
    dispatcher.start()
    ready()
    while not stop.wait(0.2):
        if reload.is_set() and config_path is not None:
            reload.clear()
            loaded = versions.load_newest(engine, config_path, dispatcher.config)
            if loaded is not None:
                logging.getLogger().setLevel(loaded[1].log_level)
                dispatcher.apply(loaded[1])
                log.info("dispatch runs on configuration version %d", loaded[0].id)
    dispatcher.stop()
    logging.shutdown()
    # pynetdicom's DUL threads are not daemons: one blocked on a hung peer would keep
    # the process alive until its timeout. Everything that matters is in the index.
    os._exit(0)


def _http_main(config: RouterConfig, config_path: Path | None, ready: Callable[[], None]) -> None:
    _die_with_parent()
    configure_logging(config.log_level)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until serve_http handles it
    from dicomrouter.api.server import serve_http

    serve_http(config, config_path, on_ready=ready)
    logging.shutdown()
    os._exit(0)


def _run_child(target: Callable[..., None], signal_ready: Connection, *args: Any) -> None:
    """Child entry point: ``target(*args, ready)`` where ``ready()`` tells the parent.

    The child was started with SIGHUP blocked (see ``_Child.start``): SIGHUP's default
    action kills, and a reload signal arriving while it imports would do just that.
    It is ignored until ``target`` installs its own handler."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})

    def ready() -> None:
        signal_ready.send(True)
        signal_ready.close()

    target(*args, ready)


class _Child:
    """A supervised child process: started with a readiness handshake, restarted with
    backoff when it dies (up to every 5 min for one that keeps dying)."""

    def __init__(self, name: str, target: Any, args: tuple[Any, ...]):
        self.name, self.target, self.args = name, target, args
        self.process: multiprocessing.process.BaseProcess | None = None
        self._restart_delay, self._last_restart, self._next_restart = 1.0, 0.0, 0.0

    def start(self) -> None:
        context = multiprocessing.get_context("spawn")
        # A pipe, not a multiprocessing.Event: an Event is a semaphore, and the first
        # one starts multiprocessing's resource-tracker process (15 MB for nothing).
        ready, signal_ready = context.Pipe(duplex=False)
        self.process = context.Process(
            target=_run_child,
            args=(self.target, signal_ready, *self.args),
            name=self.name,
            daemon=False,
        )
        # Blocked signals are inherited: the child starts immune to SIGHUP until it
        # can handle it (a reload during its start-up must not kill it).
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
        try:
            self.process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        signal_ready.close()  # the child holds its own copy
        try:
            self._wait_ready(ready)
        finally:
            ready.close()
        log.info("%s process started (pid %s)", self.name, self.process.pid)

    def _wait_ready(self, ready: Connection) -> None:
        assert self.process is not None
        deadline = time.monotonic() + 60
        while True:
            if ready.poll(0.2):
                try:
                    ready.recv()
                    return
                except EOFError:  # it closed its end without a word: it is exiting
                    self.process.join(5)
                    raise RuntimeError(
                        f"{self.name} process exited during start-up ({self.process.exitcode})"
                    ) from None
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
        # Versions and audit rows: ordinary transactions that may wait for the lock.
        self.control_engine = create_index_engine(config.database_url, create=False)
        self._record_startup_version()
        self.receiver = Receiver(
            config, self.store, InstanceIndex(self.engine), audit_engine=self.control_engine
        )
        self.children = [_Child("dispatch", _dispatch_main, (config, config_path))]
        if config.http.enabled:
            self.children.append(_Child("http", _http_main, (config, config_path)))

    def _record_startup_version(self) -> None:
        """The file as started is a version, unless it is the newest one already."""
        if self.config_path is None:
            return
        try:
            text = versions.normalize(self.config_path.read_text(encoding="utf-8"))
        except OSError as exc:
            log.warning("cannot record the configuration version: %s", exc)
            return
        version_id, created = versions.record_if_new(
            self.control_engine, text, author=audit.SYSTEM, source="startup"
        )
        if created:
            log.info("configuration recorded as version %d", version_id)

    def reload(self) -> bool:
        """Re-read the configuration file (SIGHUP). An invalid file is logged with its
        errors, audited as a failed reload, and the running configuration stays."""
        path = self.config_path
        if path is None:
            log.warning("SIGHUP ignored: started without a configuration file (--config)")
            return False
        try:
            text = versions.normalize(path.read_text(encoding="utf-8"))
            new = versions.parse_yaml(text, path.parent, str(path))
        except (OSError, ConfigError) as exc:
            errors = exc.errors if isinstance(exc, ConfigError) else [f"cannot read: {exc}"]
            log.error(
                "configuration reload refused, still running the previous version:\n%s",
                "\n".join(f"  - {error}" for error in errors),
            )
            audit.record(
                self.control_engine,
                audit.SYSTEM,
                "config.reload",
                str(path),
                outcome="failed",
                detail={"errors": errors[:50]},
            )
            self.converge_on_newest()
            return False
        version_id, created = versions.record_if_new(
            self.control_engine, text, author=audit.SYSTEM, source="sighup"
        )
        changed = versions.changed_keys(self.config, new)
        restart = versions.restart_required(changed)
        self._install(versions.effective(new, self.config))
        audit.record(
            self.control_engine,
            audit.SYSTEM,
            "config.reload",
            f"version {version_id}",
            detail={
                "version": version_id,
                "created": created,
                "changed": changed[:100],
                "restart_required": restart,
            },
        )
        log.info(
            "configuration version %d loaded: %s",
            version_id,
            ", ".join(changed) or "no changes",
        )
        if restart:
            log.warning("these changes take effect after a restart: %s", ", ".join(restart))
        return True

    def _install(self, config: RouterConfig) -> None:
        """Run on ``config`` here and tell the children, which load the newest
        recorded version (always validated before it was recorded)."""
        assert self.config_path is not None
        self.receiver.apply(config)
        self.config = config
        logging.getLogger().setLevel(config.log_level)
        for child in self.children:
            child.args = (config, self.config_path)  # a restarted child starts on it
            child.signal(signal.SIGHUP)

    def converge_on_newest(self) -> None:
        """After a reload that could not use the file: run on the newest recorded
        version anyway. The HTTP process may have recorded one (PUT /api/v1/config)
        before the file became unreadable or was edited into an invalid state; every
        process must end on the same version, the newest validated one."""
        if self.config_path is None:
            return
        try:
            loaded = versions.load_newest(self.control_engine, self.config_path, self.config)
        except Exception:
            log.exception("cannot load the newest recorded configuration version")
            return
        if loaded is None:
            return
        version, config = loaded
        if versions.changed_keys(self.config, config):
            log.warning("running the newest recorded configuration, version %d", version.id)
        self._install(config)

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
        self.control_engine.dispose()

    def _sweep_aborted_transfers(self) -> None:
        """Remove partial files of transfers aborted mid-instance. A file still being
        received is written to continuously, so one untouched for longer than the
        network timeout belongs to an association that is gone."""
        idle = 2 * max(self.config.dicom.network_timeout, self.config.dicom.dimse_timeout)
        removed = self.store.sweep_tmp(older_than=idle)
        if removed:
            log.info("removed %d partial file(s) of aborted transfers", removed)

    def serve_forever(self) -> None:
        """Run until SIGTERM/SIGINT; a child process that dies is restarted; SIGHUP
        reloads the configuration (in this loop, not in the signal handler)."""
        stop, reload, wake = threading.Event(), threading.Event(), threading.Event()

        def on_signal(signum: int, frame: FrameType | None) -> None:
            log.info("received signal %d: shutting down", signum)
            stop.set()
            wake.set()

        def on_hangup(signum: int, frame: FrameType | None) -> None:
            reload.set()
            wake.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGHUP, on_hangup)
        try:
            self.start()
            log.info("dicomrouter ready")
            last_sweep = time.monotonic()
            while True:
                wake.wait(1.0)
                wake.clear()
                if stop.is_set():
                    break
                if reload.is_set():
                    reload.clear()
                    log.info("SIGHUP: reloading %s", self.config_path)
                    try:
                        self.reload()
                    except Exception:  # e.g. the index locked for a minute: keep serving
                        log.exception("configuration reload failed; converging on the newest")
                        self.converge_on_newest()
                if time.monotonic() - last_sweep >= _SWEEP_EVERY:
                    self._sweep_aborted_transfers()
                    last_sweep = time.monotonic()
                for child in self.children:
                    child.supervise()
        finally:
            self.stop()
            log.info("dicomrouter stopped")
