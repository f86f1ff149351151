"""The node's child processes, dispatch, HTTP and the receive processes forked from
the node (``dicom.processes`` > 1): starting and supervising them, and
their entry point (``python -m dicomrouter.children ROLE READY_FD PARENT_PID``).

Why ``subprocess`` and not ``multiprocessing``: its "spawn" start method always
starts a resource-tracker process too, a whole interpreter (15 MB of RSS) that we
have no use for, and its child unpickles a function of ``dicomrouter.node``, so
every child imported the receiver and everything it needs. Here each child imports
what its role needs and nothing else. The configuration reaches the child pickled on
its stdin (our own code on both ends); readiness comes back as one byte on a pipe.
The receive processes and the HTTP service are the exception: they need what the
node imported (the index layer, the models; numpy excluded in all of them), so they
are forked from it (``os.fork``, :class:`Forked`) and share those pages. Dispatch
is not: it may decode pixel data, and pydicom decides at import whether numpy is
there.

Pixel libraries stay out of the processes that never decode pixel data (the node,
which receives, and the HTTP service): see :func:`exclude_pixel_libraries`.
"""

from __future__ import annotations

import ctypes
import logging
import os
import pickle
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from dicomrouter.observe.logs import configure_logging

if TYPE_CHECKING:
    from dicomrouter.config import RouterConfig

log = logging.getLogger("dicomrouter")

_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15
_START_TIMEOUT = 60.0


def exclude_pixel_libraries() -> None:
    """Make ``import numpy`` fail in this process, for processes that never touch
    pixel data. pydicom imports numpy (and numpy OpenBLAS) whenever it is installed,
    about 14 MB of RSS per process, although parsing headers and routing never use
    it; pydicom works without it. Only the dispatch process, which decompresses for
    destinations that refuse a compressed syntax, keeps it. Call before pydicom is
    imported; a no-op if numpy is already loaded."""
    sys.modules.setdefault("numpy", None)  # type: ignore[arg-type]


class Forked:
    """A child made with ``os.fork``, with the part of ``subprocess.Popen``'s interface
    :class:`ChildProcess` uses."""

    def __init__(self, pid: int):
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(str(self.pid), timeout or 0.0)
            time.sleep(0.05)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signum)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


ForkTarget = Callable[[Callable[[], None]], None]
"""What a forked child runs, given the function that says it is ready."""


class ChildProcess:
    """A supervised child process: started with a readiness handshake, restarted
    with backoff when it dies (up to every 5 min for one that keeps dying)."""

    def __init__(self, name: str, args: tuple[Any, ...], fork: ForkTarget | None = None):
        """``fork``: make the child with ``os.fork`` and run this in it (``args`` unused):
        a receive process shares the pages of the modules this process imported,
        instead of importing its own copy (docs/benchmarks.md: 50 MB less PSS each)."""
        self.name, self.args = name, args
        self.fork = fork
        self.process: subprocess.Popen[bytes] | Forked | None = None
        self._restart_delay, self._last_restart, self._next_restart = 1.0, 0.0, 0.0
        self._terminated: subprocess.Popen[bytes] | Forked | None = None  # the one sent SIGTERM

    def start(self) -> None:
        if self.fork is not None:
            self._start_forked(self.fork)
            return
        ready_r, ready_w = os.pipe()
        command = [sys.executable, "-m", "dicomrouter.children", self.name]
        command += [str(ready_w), str(os.getpid())]
        # Blocked signals are inherited: the child starts immune to SIGHUP until it
        # can handle it (a reload during its start-up must not kill it).
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
        try:
            self.process = subprocess.Popen(command, stdin=subprocess.PIPE, pass_fds=(ready_w,))
        except BaseException:
            os.close(ready_r)
            raise
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
            os.close(ready_w)  # the child holds its own copy
        try:
            assert isinstance(self.process, subprocess.Popen) and self.process.stdin is not None
            try:
                self.process.stdin.write(pickle.dumps(self.args))
                self.process.stdin.close()
            except BrokenPipeError:
                pass  # it died at once: reported below
            self._wait_ready(ready_r)
        finally:
            os.close(ready_r)
        log.info("%s process started (pid %s)", self.name, self.process.pid)

    def _start_forked(self, target: ForkTarget) -> None:
        """Fork and run ``target`` in the child, which ends with it. The child keeps
        only the forking thread; it must not touch what this process's other threads
        hold (its engines, its receiver): ``target`` makes its own."""
        ready_r, ready_w = os.pipe()
        parent = os.getpid()
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
        try:
            pid = os.fork()
            if pid == 0:  # the child: never returns
                code = 1
                try:
                    os.close(ready_r)
                    signal.signal(signal.SIGHUP, signal.SIG_IGN)
                    signal.signal(signal.SIGINT, signal.SIG_IGN)
                    signal.signal(signal.SIGTERM, signal.SIG_DFL)
                    signal.pthread_sigmask(signal.SIG_SETMASK, previous)
                    _die_with_parent(parent)
                    _name_process(self.name)

                    def ready() -> None:
                        os.write(ready_w, b"1")
                        os.close(ready_w)

                    target(ready)
                    code = 0
                except BaseException:
                    log.exception("%s process failed", self.name)
                finally:
                    logging.shutdown()
                    os._exit(code)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        os.close(ready_w)
        self.process = Forked(pid)
        try:
            self._wait_ready(ready_r)
        finally:
            os.close(ready_r)
        log.info("%s process started (pid %s)", self.name, pid)

    def _wait_ready(self, ready: int) -> None:
        assert self.process is not None
        deadline = time.monotonic() + _START_TIMEOUT
        poller = select.poll()  # not select(): a busy node may hold descriptors > 1024
        poller.register(ready, select.POLLIN)
        while True:
            if poller.poll(200):
                if os.read(ready, 1):
                    return
                # It closed its end without a word: it is exiting.
                self._reap(5)
                raise RuntimeError(
                    f"{self.name} process exited during start-up ({self.process.returncode})"
                )
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.name} process exited during start-up ({self.process.returncode})"
                )
            if time.monotonic() > deadline:
                self.process.kill()
                self._reap(5)
                raise RuntimeError(f"{self.name} process did not start within {_START_TIMEOUT:g} s")

    def _reap(self, timeout: float) -> None:
        assert self.process is not None
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            pass

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, signum: int) -> None:
        if self.process is not None and self.alive():
            self.process.send_signal(signum)

    def terminate(self) -> None:
        """SIGTERM, once: finish what is in hand, release jobs (:meth:`stop` waits).
        Sent to every child before waiting for any, so their clean stops overlap."""
        if self.process is not None and self.alive() and self.process is not self._terminated:
            self._terminated = self.process
            self.process.terminate()

    def stop(self, timeout: float = 30.0) -> None:
        if self.process is not None and self.alive():
            self.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self._reap(5)

    def supervise(self) -> None:
        """Restart the child if it died. The index holds the work, so a new dispatch
        process resumes it (reclaiming its leases); receiving goes on regardless."""
        if self.process is None or self.alive():
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
            self.process.returncode,
        )
        try:
            self.start()
        except RuntimeError as exc:
            log.error("%s", exc)


# --------------------------------------------------------------------------- child side


def _name_process(name: str) -> None:
    """Linux: a forked child's name in ``ps``, ``top`` and ``/proc/PID/comm`` (its
    command line stays the node's)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_NAME, name.encode()[:15])
    except OSError:
        pass


def _die_with_parent(parent: int) -> None:
    """Linux: if the parent is killed (even with SIGKILL), take this process down too.

    The death signal only covers a parent that dies after ``prctl``; a child takes a
    second or so to get here, so a parent already gone by then (we were re-parented)
    means exit now, or an orphan would keep our ports and jobs."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass
    if os.getppid() != parent:
        os._exit(1)


def _dispatch_main(
    config: RouterConfig, config_path: Path | None, ready: Callable[[], None]
) -> None:
    configure_logging(config.log_level, "dispatch")
    # Imported here: each child loads only what its role needs (module docstring).
    from dicomrouter.control import versions
    from dicomrouter.dispatch import Dispatcher
    from dicomrouter.store import ObjectStore, create_index_engine
    from dicomrouter.store.heartbeat import DISPATCH, HeartbeatThread

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    reload = threading.Event()
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, lambda signum, frame: reload.set())
    # Not durable_commits: see create_index_engine; nothing here is a promise made to
    # a sender, and the receiver's write lock is the one that must stay free.
    engine = create_index_engine(config.database_url, create=False, durable_commits=False)
    store = ObjectStore(config.storage.path, config.node.name)
    dispatcher = Dispatcher(config, engine, store)
    # The node recorded the configuration it started us on before starting us.
    newest = versions.latest_version(engine, with_yaml=False) if config_path else None
    dispatcher.config_version = None if newest is None else newest.id
    dispatcher.start()
    heartbeat = HeartbeatThread(
        engine,
        config.node.name,
        DISPATCH,
        dispatcher.health,
        config_version=lambda: dispatcher.config_version,
    )
    heartbeat.start()
    ready()
    while not stop.wait(0.2):
        if reload.is_set() and config_path is not None:
            reload.clear()
            loaded = versions.load_newest(engine, config_path, dispatcher.config)
            if loaded is not None:
                logging.getLogger().setLevel(loaded[1].log_level)
                dispatcher.apply(loaded[1], loaded[0].id)
                log.info("dispatch runs on configuration version %d", loaded[0].id)
    heartbeat.stop()
    dispatcher.stop()
    logging.shutdown()
    # Do not wait for a worker still blocked on a hung peer (stop() abandoned it):
    # everything that matters is in the index.
    os._exit(0)


def _http_main(config: RouterConfig, config_path: Path | None, ready: Callable[[], None]) -> None:
    configure_logging(config.log_level, "http")
    # Imported here: each child loads only what its role needs (module docstring).
    from dicomrouter.api.server import serve_http

    serve_http(config, config_path, on_ready=ready)
    logging.shutdown()
    os._exit(0)


ROLES: dict[str, Callable[[RouterConfig, Path | None, Callable[[], None]], None]] = {
    "dispatch": _dispatch_main,
    "http": _http_main,
}


def main(argv: list[str]) -> None:
    """Child entry point: ``ROLE READY_FD PARENT_PID``, the pickled ``(config,
    config_path)`` on stdin. The child was started with SIGHUP blocked (see
    :meth:`ChildProcess.start`): SIGHUP's default action kills, and a reload arriving
    while it imports would do just that. It is ignored until the role installs its
    own handler; SIGINT is ignored for good (the parent decides when we stop)."""
    role, ready_fd, parent = argv[0], int(argv[1]), int(argv[2])
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
    _die_with_parent(parent)
    if role == "http":
        exclude_pixel_libraries()  # before the configuration (and pydicom) is loaded
    config, config_path = pickle.load(sys.stdin.buffer)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)

    def ready() -> None:
        os.write(ready_fd, b"1")
        os.close(ready_fd)

    ROLES[role](config, config_path, ready)


if __name__ == "__main__":
    main(sys.argv[1:])
