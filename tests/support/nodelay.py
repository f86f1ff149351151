"""``TCP_NODELAY`` for pynetdicom peers in tests.

pynetdicom never sets it; without it a request/response pair on loopback stalls
~40 ms (Nagle's algorithm: docs/benchmarks.md), and a test peer built on pynetdicom
would be too slow to stand for a real modality or PACS.
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
