"""One acceptor handing accepted connections to worker processes over Unix sockets.

The alternative to ``SO_REUSEPORT`` for several receive processes: one process
accepts on every port and passes each connection's descriptor (``SCM_RIGHTS``,
:func:`socket.send_fds`) to the workers in turn; a worker serves it as if it had
accepted it (:meth:`.Server.serve`). Connections are spread evenly whatever their
addresses hash to, and a worker that dies loses no connection still waiting in a
backlog of its own.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Sequence

log = logging.getLogger("dicomrouter.dicomnet")

PLAIN, SECURE = b"P", b"T"


class Acceptor:
    """Accepts on ``listeners`` (socket, secure) and sends each connection to the
    next of ``channels()`` (the acceptor ends of the workers' socket pairs)."""

    def __init__(
        self,
        listeners: Sequence[tuple[socket.socket, bool]],
        channels: Callable[[], list[socket.socket]],
    ):
        self.listeners = listeners
        self.channels = channels
        self._stopping = threading.Event()
        self._next = 0
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._loop, args=(sock, secure), daemon=True)
            for sock, secure in listeners
        ]

    def start(self) -> None:
        for sock, _ in self.listeners:
            sock.settimeout(0.5)
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stopping.set()
        for thread in self._threads:
            thread.join(5)

    def _loop(self, listener: socket.socket, secure: bool) -> None:
        tag = SECURE if secure else PLAIN
        while not self._stopping.is_set():
            try:
                sock, address = listener.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                if self._stopping.is_set():
                    return
                log.warning("accepting a DICOM connection failed: %s", exc)
                self._stopping.wait(0.1)
                continue
            message = tag + f"{address[0]} {address[1]}".encode()
            try:
                self._hand(sock, message)
            finally:
                sock.close()  # the worker holds its own copy

    def _hand(self, sock: socket.socket, message: bytes) -> None:
        channels = self.channels()
        for _ in range(len(channels)):
            with self._lock:
                channel = channels[self._next % len(channels)]
                self._next += 1
            try:
                socket.send_fds(channel, [message], [sock.fileno()])
                return
            except OSError:  # that worker is gone (restarting): the next one
                continue
        log.error("no receive process to hand a DICOM connection to; closed")


def receive(
    channel: socket.socket,
    serve: Callable[[socket.socket, tuple[str, int], bool], None],
    housekeeping: Callable[[], None],
    stopping: threading.Event,
) -> None:
    """The worker's loop: serve each connection handed over ``channel``."""
    channel.settimeout(0.5)
    while not stopping.is_set():
        housekeeping()
        try:
            message, fds, _flags, _address = socket.recv_fds(channel, 256, 1)
        except TimeoutError:
            continue
        except OSError:
            if stopping.is_set():
                return
            raise
        if not message:  # the acceptor is gone
            return
        for fd in fds:
            sock = socket.socket(fileno=fd)
            host, port = message[1:].decode().split(" ")
            serve(sock, (host, int(port)), message[:1] == SECURE)
