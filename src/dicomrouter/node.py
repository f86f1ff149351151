"""Run a router node: the receiver in this process (and, with ``dicom.processes`` N above
1, in N - 1 processes forked from it, on the same ports); dispatch and HTTP in child
processes.

Separate processes because receiving and sending are both CPU-bound Python on the
GIL: parallel associations in one process gave no gain, separate processes do
(docs/benchmarks.md); the HTTP service is kept out of the receiver's GIL for the same
reason. They share nothing but the index and the files, which is also what makes a
crash of any one harmless: the index is the truth. This process supervises the
children and restarts one that dies.

SIGHUP (``kill -HUP``, or ``PUT /api/v1/config`` through the HTTP process) reloads
the configuration file. This process validates it (an invalid file is refused with
its errors and changes nothing), records it as a version if it is new, applies it to
the receiver and forwards SIGHUP to the children, which load that newest recorded
version: what they run is always what this process validated.

Several nodes on one index: a version recorded on any node reaches this one within
seconds. This process hears it announced (PostgreSQL ``NOTIFY``, ``store/listen.py``)
and polls the newest version's id every ``VERSION_POLL`` s besides; a newer one is
run here (:meth:`converge_on_newest`) and written to this node's file. At start-up
and on SIGHUP the file is recorded only if its text was never recorded: an older
version in the file (a node started with the file it had before another node
changed the configuration) is not news, and the node runs the newest version
(see ``control/versions.py``). ``config_version`` is the version this node runs.
"""

from __future__ import annotations

import gc
import logging
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from dicomrouter.children import ROLES, ChildProcess, ForkTarget
from dicomrouter.config import ConfigError, RouterConfig
from dicomrouter.control import versions
from dicomrouter.observe.logs import configure_logging
from dicomrouter.observe.metrics import enable_multiprocess
from dicomrouter.receive import Receiver
from dicomrouter.receivers import ReceiverEngines, make_receiver, serve_receiver
from dicomrouter.store import ObjectStore, audit, create_index_engine
from dicomrouter.store.heartbeat import HeartbeatThread, receiver_roles
from dicomrouter.store.listen import Listener

log = logging.getLogger("dicomrouter")

_SWEEP_EVERY = 60.0
#: Seconds between two looks at the newest configuration version (besides NOTIFY).
VERSION_POLL = 5.0


class Node:
    def __init__(self, config: RouterConfig, config_path: Path | None = None):
        self.config = config
        self.config_path = config_path
        #: The configuration version this node runs (None: started without a file),
        #: reported in its heartbeat; set wherever a version is recorded or loaded.
        self.config_version: int | None = None
        self.store = ObjectStore(config.storage.path, config.node.name)
        self.store.prepare()
        self.store.lock()
        # Before any child starts: they inherit the variable that turns it on. Per
        # node: emptying it at start must not take another node's counters.
        enable_multiprocess(self.store.root / ".metrics" / config.node.name)
        create_index_engine(config.database_url).dispose()  # create, check or upgrade
        self.engines = ReceiverEngines(config.database_url)
        # Versions and audit rows: ordinary transactions that may wait for the lock.
        self.control_engine = self.engines.control
        self._record_startup_version()
        config = self.config  # the newest version, if the file was an older one
        self.processes = config.dicom.process_count
        # This process receives, and with dicom.processes N > 1 so do N - 1 children
        # forked from it (start()), all on the same ports (SO_REUSEPORT).
        self.receiver = make_receiver(config, self.store, self.engines, self.processes)
        self.heartbeat: HeartbeatThread | None = None
        self.listener: Listener | None = None
        self._wake = threading.Event()
        self._newer = threading.Event()  # a version was announced (or may have been)
        self._version_polled = time.monotonic()
        self.children = [ChildProcess("dispatch", (config, config_path))]
        if config.http.enabled:
            # Forked too: it imports what the node has (the index layer, the models)
            # and shares those pages; numpy is excluded in both (children.py).
            self.children.append(ChildProcess("http", (), fork=self._run_forked("http")))

    def _record_startup_version(self) -> None:
        """The file as started is a version, unless it is the newest one already, or
        an older one (then this node starts on the newest, and writes it to the file)."""
        if self.config_path is None:
            return
        try:
            text = versions.normalize(self.config_path.read_text(encoding="utf-8"))
        except OSError as exc:
            log.warning("cannot record the configuration version: %s", exc)
            return
        older = self._file_is_history(text)
        if older is not None:
            loaded = versions.load_newest(self.control_engine, self.config_path, self.config)
            if loaded is None:  # logged; the file runs, as the version it is
                self.config_version = older.id
                return
            version, self.config = loaded
            versions.write_newest(
                self.control_engine, self.config_path, version, self.config.node.name
            )
            self.config_version = version.id
            return
        version_id, created = versions.record_if_new(
            self.control_engine, text, author=audit.SYSTEM, source="startup"
        )
        self.config_version = version_id
        if created:
            log.info("configuration recorded as version %d", version_id)

    def _file_is_history(self, text: str) -> versions.Version | None:
        """The older recorded version the file holds (logged), not to be recorded
        again; None when the file's text is new or the newest."""
        older = versions.file_is_history(self.control_engine, text)
        if older is not None:
            log.warning(
                "%s holds configuration version %d, older than the newest recorded one "
                "(another node, or the API, changed it since): running the newest version "
                "and writing it to the file, not recording the old one again (to go back "
                "to it, roll back to version %d)",
                self.config_path,
                older.id,
                older.id,
            )
        return older

    def reload(self) -> bool:
        """Re-read the configuration file (SIGHUP). An invalid file is logged with its
        errors, audited as a failed reload, and the running configuration stays."""
        path = self.config_path
        if path is None:
            log.warning("SIGHUP ignored: started without a configuration file (--config)")
            return False
        try:
            text = versions.normalize(path.read_text(encoding="utf-8"))
            if self._file_is_history(text) is not None:
                self.converge_on_newest()
                return True
            new = versions.parse_yaml(text, path.parent, str(path))
            refusal = versions.lockout(new, self.config)
            if refusal is not None:
                raise ConfigError(str(path), [refusal])
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
        self.config_version = version_id
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
        if version.id != self.config_version or versions.changed_keys(self.config, config):
            log.warning("running the newest recorded configuration, version %d", version.id)
        # Written before the children are told: their answers show the file.
        versions.write_newest(self.control_engine, self.config_path, version, config.node.name)
        self._install(config)
        self.config_version = version.id

    def _announced(self, payload: str | None) -> None:
        """A version was recorded somewhere (or the listener reconnected): look."""
        self._newer.set()
        self._wake.set()

    def _follow_versions(self) -> None:
        """Run the newest version when another node (or this node's API) recorded one
        this node does not run yet: when announced, and every ``VERSION_POLL`` s."""
        if self.config_path is None:
            return
        if not self._newer.is_set() and time.monotonic() - self._version_polled < VERSION_POLL:
            return
        self._newer.clear()
        self._version_polled = time.monotonic()
        try:
            newest = versions.newest_id(self.control_engine)
        except Exception as exc:
            log.warning("cannot read the newest configuration version: %s", exc)
            return
        if newest is not None and newest != self.config_version:
            log.info("configuration version %d was recorded: running it", newest)
            self.converge_on_newest()

    def start(self) -> None:
        """Listen first (a port in use fails fast, with nothing else started), then
        start the child processes."""
        swept = self.store.sweep_tmp()
        if swept:
            log.info("removed %d partial file(s) left by interrupted transfers", swept)
        self.receiver.start()
        roles = receiver_roles(self.processes)
        # Without the fsync: a heartbeat is no promise, and the write lock it takes
        # every few seconds is the one each C-STORE needs.
        self.heartbeat = HeartbeatThread(
            self.engines.beats,
            self.config.node.name,
            roles[0],
            self.receiver.health,
            config_version=lambda: self.config_version,
            open_associations=self.receiver.open_associations,
        )
        self.heartbeat.start()
        if len(roles) > 1:
            self.config = self._on_bound_ports(self.receiver)
            forked = [ChildProcess(role, (), fork=self._run_forked(role)) for role in roles[1:]]
            self.children = forked + self.children  # receive first
            for child in self.children:
                if child.fork is None:
                    child.args = (self.config, self.config_path)
        gc.freeze()  # what is imported now stays shared with the forked children
        try:
            for child in self.children:
                child.start()
        except BaseException:
            self.stop()
            raise
        # After the forks: no child inherits the listening connection.
        if Listener.needed(self.control_engine) and self.config_path is not None:
            self.listener = Listener(self.control_engine, versions.CHANNEL, self._announced)
            self.listener.start()

    def _on_bound_ports(self, receiver: Receiver) -> RouterConfig:
        """The configuration with the ports the receiver is bound to (``port: 0``
        becomes the one it got): the port every receive process binds."""
        config = self.config.model_copy(deep=True)
        for listener in receiver.listeners:
            port = listener.address[1]
            if listener.tls is not None and config.dicom.tls is not None:
                config.dicom.tls.port = port
            else:
                config.dicom.port = port
        return config

    def _run_forked(self, role: str) -> ForkTarget:
        """What child ``role`` runs once forked, on the newest configuration this
        process runs: a receive process (a receiver of its own on the same ports),
        or the HTTP service."""

        def run(ready: Callable[[], None]) -> None:
            for listener in self.receiver.listeners:  # ours: a receive process binds its own
                listener.sock.close()
            if role == "http":
                ROLES["http"](self.config, self.config_path, ready)
                return
            configure_logging(self.config.log_level, role)
            serve_receiver(
                self.config,
                self.config_path,
                role,
                on_ready=ready,
                config_version=self.config_version,
            )

        return run

    def stop(self) -> None:
        if self.listener is not None:
            self.listener.stop()
        if self.heartbeat is not None:
            self.heartbeat.stop()
        for child in self.children:  # all at once: the stops overlap (TimeoutStopSec)
            child.terminate()
        self.receiver.stop()
        for child in self.children:
            child.stop()
        self.engines.dispose()

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
        stop, reload, wake = threading.Event(), threading.Event(), self._wake

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
                self._follow_versions()
                if time.monotonic() - last_sweep >= _SWEEP_EVERY:
                    self._sweep_aborted_transfers()
                    last_sweep = time.monotonic()
                for child in self.children:
                    child.supervise()
        finally:
            self.stop()
            log.info("dicomrouter stopped")
