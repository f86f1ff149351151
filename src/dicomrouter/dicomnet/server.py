"""The acceptor's listening side: accept loops, admission, the cap on connections
still negotiating, ARTIM, and reports of refusals.

One thread per association (:class:`~.acceptor.AcceptorAssociation`) reads its
socket directly and streams each data set into the handler's sink. Why not
pynetdicom's ``AE.start_server``: it runs every association through a DUL thread
and a reactor thread that poll each other, and receiving one small instance cost
1.0-1.5 ms of CPU there alone, more than the durable write (docs/benchmarks.md).

A server may listen on several ports, each plain or TLS; they share the limits.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from .acceptor import AcceptorAssociation
from .handler import AcceptorSettings, ServiceHandler
from .negotiation import Capabilities, Identity

log = logging.getLogger("dicomrouter.dicomnet")

#: Connections still negotiating, per allowed association (see _room_to_negotiate).
PENDING_PER_ASSOCIATION = 4
#: Refusals of one kind from one address are logged and reported once per this many
#: seconds (the first at once, then a count): a flood costs a few lines, not one each.
REFUSAL_REPORT_INTERVAL = 60.0


@dataclass(frozen=True)
class Listener:
    """A bound port; ``tls`` set for a TLS port."""

    sock: socket.socket
    tls: ssl.SSLContext | None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.sock.getsockname()[:2]
        return str(host), int(port)


@dataclass
class _Connection:
    """A connection being served: its thread and socket; ``established`` once its
    association was accepted (only those count toward ``max_associations``)."""

    thread: threading.Thread
    sock: socket.socket
    started: float
    host: str = ""
    established: bool = False
    _cut: bool = False

    def cut(self) -> bool:
        """Shut the socket down (its thread's ``recv`` then ends); True the first time."""
        if self._cut:
            return False
        self._cut = True
        try:
            # The plain socket's shutdown, also for a TLS socket: SSLSocket.shutdown
            # would first drop its SSL object under the thread still using it.
            socket.socket.shutdown(self.sock, socket.SHUT_RDWR)
        except (OSError, ValueError):
            pass
        return True


class Server:
    """Listens on one or more TCP ports and runs one thread per association."""

    def __init__(
        self,
        settings: Callable[[], AcceptorSettings],
        handler: ServiceHandler,
        supported: Mapping[str, Sequence[str]],
        identity: Identity,
        roles: Mapping[str, tuple[bool, bool]] | None = None,
    ):
        self.settings = settings
        self.handler = handler
        self.capabilities = Capabilities(supported, roles)
        self.identity = identity
        self.listeners: list[Listener] = []
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._active: dict[int, _Connection] = {}
        self._next_id = 0
        self._refusals = RefusalReport(handler)

    @property
    def address(self) -> tuple[str, int]:
        """The first listener's address."""
        return self.listeners[0].address

    def listen(
        self, bind: str, port: int, tls: ssl.SSLContext | None = None, reuse_port: bool = False
    ) -> Listener:
        """Bind a port (0: any free one) and start its accept loop. ``reuse_port``:
        share the port with other processes (``SO_REUSEPORT``; the kernel spreads
        new connections over every listening socket bound to it)."""
        family = socket.AF_INET6 if ":" in bind else socket.AF_INET
        sock = socket.create_server((bind, port), family=family, backlog=64, reuse_port=reuse_port)
        sock.settimeout(0.5)
        listener = Listener(sock, tls)
        self.listeners.append(listener)
        name = "dicom-accept-tls" if tls is not None else "dicom-accept"
        thread = threading.Thread(
            target=self._accept_loop, args=(listener,), name=name, daemon=True
        )
        self._threads.append(thread)
        thread.start()
        return listener

    @property
    def open_associations(self) -> int:
        """Associations established now (not connections still negotiating)."""
        with self._lock:
            return sum(1 for c in self._active.values() if c.established)

    @property
    def listening(self) -> bool:
        """Every accept loop runs (readiness)."""
        if not self._threads or self._stopping.is_set():
            return False
        return all(thread.is_alive() for thread in self._threads)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop listening and cut open associations (an object in progress is
        discarded: its sender got no response and will send it again)."""
        self._stopping.set()
        for thread in self._threads:
            thread.join(timeout)
        for listener in self.listeners:
            listener.sock.close()
        with self._lock:
            active = list(self._active.values())
        for connection in active:
            connection.cut()
        for connection in active:
            connection.thread.join(timeout)

    # -- admission ---------------------------------------------------------------------
    def _admit(self, key: int, limit: int, per_host: int) -> str | None:
        """Count connection ``key`` as an established association, unless ``limit``
        associations already are, or ``per_host`` from its source address (atomic:
        two negotiations cannot both take the last slot). Returns the setting that
        refused it, or None. Connections still negotiating do not count: an idle TCP
        connection must not cost a modality its association."""
        with self._lock:
            connection = self._active.get(key)
            if connection is None:
                return "dicom.max_associations"
            established = [c for c in self._active.values() if c.established]
            if len(established) >= limit:
                return "dicom.max_associations"
            if sum(1 for c in established if c.host == connection.host) >= per_host:
                return "dicom.max_associations_per_host"
            connection.established = True
            return None

    def _replace_socket(self, key: int, sock: socket.socket) -> None:
        """After a TLS handshake: cut() must shut the TLS socket down."""
        with self._lock:
            connection = self._active.get(key)
            if connection is not None:
                connection.sock = sock

    def _accept_loop(self, listener: Listener) -> None:
        while not self._stopping.is_set():
            self._enforce_artim()
            self._refusals.flush()
            try:
                sock, address = listener.sock.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                if self._stopping.is_set():
                    return
                # e.g. EMFILE: out of file descriptors. Do not spin on it.
                log.warning("accepting a DICOM connection failed: %s", exc)
                self._stopping.wait(0.1)
                continue
            host, port = str(address[0]), int(address[1])
            try:
                allowed = self.handler.allow_connection(host)
            except Exception:
                log.exception("connection check failed for %s", host)
                allowed = False
            if not allowed or not self._room_to_negotiate(host):
                sock.close()
                continue
            key = 0
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                with self._lock:
                    self._next_id += 1
                    key = self._next_id
                    association = AcceptorAssociation(self, sock, host, port, key, listener.tls)
                    thread = threading.Thread(
                        target=association.run, name=f"assoc-{host}:{port}", daemon=True
                    )
                    self._active[key] = _Connection(thread, sock, time.monotonic(), host)
                thread.start()
            except Exception as exc:  # e.g. "can't start new thread": keep accepting
                log.error("cannot serve a DICOM connection from %s: %s", host, exc)
                self._finished(key)
                sock.close()
                self._stopping.wait(0.1)

    def _room_to_negotiate(self, host: str) -> bool:
        """Whether a new connection from ``host`` may wait to associate. At most
        ``PENDING_PER_ASSOCIATION * max_associations`` connections may be negotiating
        at once, on top of the established associations, and at most
        ``max_associations_per_host`` from one source address: a flood of idle
        connections costs neither unbounded threads nor the modalities their
        association slots, and one address cannot take every waiting place from
        the others (each is cut after ``acse_timeout`` anyway)."""
        settings = self.settings()
        limit = PENDING_PER_ASSOCIATION * settings.max_associations
        with self._lock:
            negotiating = [c for c in self._active.values() if not c.established]
            from_host = sum(1 for c in negotiating if c.host == host)
        # The reasons name the limit, not the count of the moment: they key the
        # refusal report, which must stay one entry per address and kind.
        if from_host >= settings.max_associations_per_host:
            self._refusals.refused(
                host,
                f"{settings.max_associations_per_host} connections from this address are "
                "already waiting to associate (dicom.max_associations_per_host)",
            )
            return False
        if len(negotiating) >= limit:
            self._refusals.refused(
                host,
                f"{limit} connections are already waiting to associate "
                f"({PENDING_PER_ASSOCIATION} x dicom.max_associations)",
            )
            return False
        return True

    def _enforce_artim(self) -> None:
        """Cut connections that have not completed association negotiation within
        ``acse_timeout`` (ARTIM). The socket's own timeout bounds each wait for
        bytes; this bounds the whole request, which a peer trickling one byte at a
        time would otherwise stretch forever. Checked every accept-loop turn (0.5 s)."""
        limit = self.settings().acse_timeout
        if not limit:
            return
        cutoff = time.monotonic() - limit
        with self._lock:  # as _admit does: an association accepted meanwhile is not cut
            cut = sum(
                c.cut() for c in self._active.values() if not c.established and c.started < cutoff
            )
        if cut:
            log.warning(
                "closed %d DICOM connection(s): no association within %gs (acse_timeout)",
                cut,
                limit,
            )

    def _finished(self, key: int) -> None:
        with self._lock:
            self._active.pop(key, None)


@dataclass
class _Refusals:
    """Refusals of one kind from one address not reported yet, and the last report."""

    audit: bool
    count: int = 0
    reported: float | None = None


class RefusalReport:
    """Logs (and, for connections closed unread, reports to the handler) the
    refusals of one kind from one address once per ``REFUSAL_REPORT_INTERVAL``: the
    first at once, later ones as a count. Thread-safe; ``flush`` reports counts
    left over once their interval has passed (called by the accept loops)."""

    def __init__(self, handler: ServiceHandler) -> None:
        self.handler = handler
        self._lock = threading.Lock()
        self._pending: dict[tuple[str, str], _Refusals] = {}

    def refused(self, address: str, reason: str, audit: bool = True) -> None:
        now = time.monotonic()
        with self._lock:
            entry = self._pending.setdefault((address, reason), _Refusals(audit))
            entry.count += 1
            if entry.reported is not None and now - entry.reported < REFUSAL_REPORT_INTERVAL:
                return
            first, count = entry.reported is None, entry.count
            entry.count, entry.reported = 0, now
        self._report(address, reason, count, audit, first)

    def flush(self) -> None:
        now = time.monotonic()
        due: list[tuple[str, str, _Refusals, int]] = []
        with self._lock:
            for key, entry in list(self._pending.items()):
                if entry.reported is not None and now - entry.reported < REFUSAL_REPORT_INTERVAL:
                    continue
                if entry.count:
                    due.append((*key, entry, entry.count))
                    entry.count, entry.reported = 0, now
                else:  # quiet for a whole interval: the next refusal is reported at once
                    del self._pending[key]
        for address, reason, entry, count in due:
            self._report(address, reason, count, entry.audit, False)

    def _report(self, address: str, reason: str, count: int, audit: bool, first: bool) -> None:
        if first:
            log.warning(
                "refused a DICOM connection from %s: %s (more refusals like it are "
                "counted and logged every %gs)",
                address,
                reason,
                REFUSAL_REPORT_INTERVAL,
            )
        else:
            log.warning(
                "refused %d more DICOM connection(s) from %s in the last %gs: %s",
                count,
                address,
                REFUSAL_REPORT_INTERVAL,
                reason,
            )
        if audit:
            try:
                self.handler.on_refused(address, reason, count)
            except Exception:
                log.exception("recording refused connections from %s failed", address)
