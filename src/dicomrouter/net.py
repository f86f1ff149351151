"""Socket tuning shared by the receiver and the senders.

pynetdicom never sets ``TCP_NODELAY``; with Nagle's algorithm on, every small
request/response pair on an association stalls ~40 ms. We set it on every socket
we accept and every socket we open (see shared field notes).
"""

from __future__ import annotations

import socket

from pynetdicom.transport import AssociationServer, AssociationSocket

_installed = False


def _nodelay(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass


def install_tcp_nodelay() -> None:
    """Patch pynetdicom so every association socket has TCP_NODELAY. Idempotent."""
    global _installed
    if _installed:
        return
    original_create = AssociationSocket._create_socket
    original_accept = AssociationServer.get_request

    def create_socket(self, address):  # type: ignore[no-untyped-def]
        sock = original_create(self, address)
        _nodelay(sock)
        return sock

    def get_request(self):  # type: ignore[no-untyped-def]
        client, address = original_accept(self)
        _nodelay(client)
        return client, address

    AssociationSocket._create_socket = create_socket  # type: ignore[method-assign]
    AssociationServer.get_request = get_request  # type: ignore[method-assign]
    _installed = True


#: pynetdicom's reactors sleep 1 ms whenever they find nothing to do. A 512x512 image
#: arrives as dozens of PDUs, and each gap can cost a whole sleep: measured on
#: loopback, receiving 300 x 525 KB took 2.2-2.7 s with 1 ms and 1.6-1.9 s with
#: 0.1 ms. 0.2 ms keeps most of that gain; an idle association then costs about 2-3%
#: of a core for its polling threads, which we accept for a router.
REACTOR_DELAY = 0.0002

_low_latency = False


def install_low_latency_reactors(delay: float = REACTOR_DELAY) -> None:
    """Shorten pynetdicom's idle sleeps (DUL and association reactors). Idempotent."""
    global _low_latency
    if _low_latency:
        return
    import time as _time

    from pynetdicom import association, dul

    original_init = dul.DULServiceProvider.__init__

    def init(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        original_init(self, *args, **kwargs)
        self._run_loop_delay = delay

    class _FastSleep:
        """``time`` for pynetdicom.association: its reactor's 1 ms sleep becomes
        ``delay``; every other use of ``time`` is unchanged."""

        def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
            return getattr(_time, name)

        @staticmethod
        def sleep(seconds: float) -> None:
            _time.sleep(delay if seconds == 0.001 else seconds)

    dul.DULServiceProvider.__init__ = init  # type: ignore[method-assign]
    association.time = _FastSleep()  # type: ignore[assignment]
    _low_latency = True


_validation_off = False


def install_no_value_validation() -> None:
    """Stop pydicom checking every element value it reads or writes. Idempotent.

    pydicom's default for both reading and writing is ``WARN``: each value is
    matched against its VR's length and character rules and a bad one only emits
    a warning, so nothing is ever refused because of it. On our hot paths that is
    pure cost: pynetdicom decodes every command set, builds a file meta and encodes
    every response through pydicom (about 150 us of CPU per small instance on the
    receive path, measured). What we must refuse we check ourselves: UIDs that
    become paths are validated by :func:`dicomrouter.store.uids.validate_uid`, and
    pynetdicom still validates the UIDs of the DIMSE primitives on its own.
    """
    global _validation_off
    if _validation_off:
        return
    from pydicom import config as pydicom_config

    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    pydicom_config.settings.writing_validation_mode = pydicom_config.IGNORE
    _validation_off = True
