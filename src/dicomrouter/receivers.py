"""The receiver as the node wires it, and a receive process of its own.

The node process always receives (:func:`make_receiver`). With ``dicom.processes``
N above 1, ``receiver-2``..``receiver-N`` are forked from it and run
:func:`serve_receiver`, binding the same ports with ``SO_REUSEPORT``: the kernel
spreads new connections over them, each runs its associations on its own GIL, and
the node supervises them like its other children (one that dies is restarted; the
others keep the port served meanwhile). Why ``SO_REUSEPORT`` rather than one
acceptor handing sockets over, and why forked: docs/benchmarks.md ("Several
receive processes").
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from sqlalchemy import Engine

from dicomrouter.config import RouterConfig
from dicomrouter.control import versions
from dicomrouter.queue import commitment
from dicomrouter.receive import Receiver
from dicomrouter.store import InstanceIndex, ObjectStore, create_index_engine
from dicomrouter.store.heartbeat import HeartbeatThread

log = logging.getLogger("dicomrouter")


class ReceiverEngines:
    """The receiver's index connections: ``index`` for its rows (no busy timeout: it
    retries a locked index itself, with sub-millisecond sleeps), ``control`` for
    audit rows, versions and commitment reports (ordinary waits), ``beats`` for its
    heartbeat (no fsync: a heartbeat is no promise)."""

    def __init__(self, url: str):
        self.index = create_index_engine(url, create=False, busy_timeout_ms=0)
        self.control = create_index_engine(url, create=False)
        self.beats = create_index_engine(url, create=False, durable_commits=False)

    def dispose(self) -> None:
        for engine in (self.index, self.control, self.beats):
            engine.dispose()


def make_receiver(
    config: RouterConfig,
    store: ObjectStore,
    engines: ReceiverEngines,
    processes: int = 1,
) -> Receiver:
    """The receiver, answering storage commitment reports from ``engines.control``."""
    control: Engine = engines.control
    receiver: Receiver

    def on_event_report(request):  # type: ignore[no-untyped-def]
        policies = commitment.policies(receiver.config.destinations)
        return commitment.serve_report(control, request, policies)

    receiver = Receiver(
        config,
        store,
        InstanceIndex(engines.index),
        audit_engine=control,
        on_event_report=on_event_report,
        processes=processes,
    )
    return receiver


def serve_receiver(
    config: RouterConfig,
    config_path: Path | None,
    role: str,
    on_ready: Callable[[], None],
    config_version: int | None = None,
) -> None:
    """Run receive process ``role`` until SIGTERM; SIGHUP applies the newest recorded
    configuration version (the node validated it before recording it).
    ``config_version``: the version ``config`` is, for the heartbeat."""
    stop, reload = threading.Event(), threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, lambda signum, frame: reload.set())
    engines = ReceiverEngines(config.database_url)
    store = ObjectStore(config.storage.path, config.node.name)
    receiver = make_receiver(config, store, engines, config.dicom.process_count)
    receiver.start()
    running = [config_version]
    heartbeat = HeartbeatThread(
        engines.beats,
        config.node.name,
        role,
        receiver.health,
        config_version=lambda: running[0],
        open_associations=receiver.open_associations,
    )
    heartbeat.start()
    on_ready()
    while not stop.wait(0.2):
        if reload.is_set() and config_path is not None:
            reload.clear()
            loaded = versions.load_newest(engines.control, config_path, receiver.config)
            if loaded is not None:
                logging.getLogger().setLevel(loaded[1].log_level)
                receiver.apply(loaded[1])
                running[0] = loaded[0].id
                log.info("%s runs on configuration version %d", role, loaded[0].id)
    heartbeat.stop()
    receiver.stop()
    engines.dispose()
