"""The node stops its processes together: every child gets SIGTERM before the node
waits for any, so their clean stops overlap and a stop fits systemd's TimeoutStopSec
(60 s) even when each child takes its full 30 s."""

from __future__ import annotations

import subprocess
import sys
import time

from dicomrouter.children import ChildProcess
from dicomrouter.node import Node


class _Quiet:
    def stop(self) -> None:
        return None

    def dispose(self) -> None:
        return None


def _slow_child(name: str, seconds: float) -> ChildProcess:
    """A child that takes ``seconds`` to finish after SIGTERM, as a busy dispatch does."""
    child = object.__new__(ChildProcess)
    child.name = name
    child._terminated = None
    code = (
        "import signal, sys, time\n"
        f"signal.signal(signal.SIGTERM, lambda *_: (time.sleep({seconds}), sys.exit(0)))\n"
        "time.sleep(60)\n"
    )
    child.process = subprocess.Popen([sys.executable, "-c", code])
    time.sleep(0.3)  # its handler is installed
    return child


def test_children_stop_together() -> None:
    node = object.__new__(Node)
    node.heartbeat = None
    node.listener = None
    node.receiver = _Quiet()  # type: ignore[assignment]
    node.engines = _Quiet()  # type: ignore[assignment]
    node.children = [_slow_child("dispatch", 2.0), _slow_child("http", 2.0)]
    started = time.monotonic()
    node.stop()
    took = time.monotonic() - started
    assert all(
        child.process is not None and child.process.returncode == 0 for child in node.children
    )
    assert took < 3.5, took  # overlapping: about 2 s, not 4 s one after the other
