"""Who is the client: the connection's address, or what a trusted proxy says.

``X-Forwarded-For`` is only a claim; anyone can send it. Uvicorn believes it from
127.0.0.1 by default, which let a local process (or anything relayed through one)
choose the address the login throttle counts and the audit log records. Uvicorn's
own handling is therefore turned off (``server.py``) and this middleware believes
the header only from ``http.trusted_proxies`` (read live from the configuration):
walking the list from the right, the first address that is not a trusted proxy is
the client. ``X-Forwarded-Proto`` is taken from a trusted proxy too.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from functools import lru_cache

from starlette.types import ASGIApp, Receive, Scope, Send

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@lru_cache(maxsize=16)
def _networks(entries: tuple[str, ...]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(entry, strict=False) for entry in entries)


def is_trusted(address: str, trusted: Sequence[str]) -> bool:
    if not trusted:
        return False
    try:
        ip = ipaddress.ip_address(address.strip().strip("[]"))
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in network for network in _networks(tuple(trusted)))


def forwarded_client(peer: str, forwarded_for: str, trusted: Sequence[str]) -> str:
    """The client's address for a connection from ``peer`` carrying ``forwarded_for``
    (the ``X-Forwarded-For`` value, may be empty)."""
    if not forwarded_for or not is_trusted(peer, trusted):
        return peer
    hops = [hop.strip() for hop in forwarded_for.split(",") if hop.strip()]
    for hop in reversed(hops):
        if not is_trusted(hop, trusted):
            return hop[:64]
    return hops[0][:64] if hops else peer


class ProxyHeadersMiddleware:
    def __init__(self, app: ASGIApp, trusted: Callable[[], Sequence[str]]) -> None:
        self.app = app
        #: The *current* ``http.trusted_proxies``.
        self.trusted = trusted

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        trusted = self.trusted()
        client = scope.get("client")
        if scope["type"] == "http" and trusted and client:
            peer = client[0]
            if is_trusted(peer, trusted):
                headers = dict(scope["headers"])
                forwarded = headers.get(b"x-forwarded-for", b"").decode("latin-1")
                proto = headers.get(b"x-forwarded-proto", b"").decode("latin-1").strip()
                scope = dict(scope)
                host = forwarded_client(peer, forwarded, trusted)
                scope["client"] = (host, 0 if host != peer else client[1])
                if proto.lower() in ("http", "https"):
                    scope["scheme"] = proto.lower()
        await self.app(scope, receive, send)
