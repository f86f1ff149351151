"""Is a destination's host this machine? Every spelling of an address, and names.

A destination at our own DICOM port is a routing loop however its host is written,
so the check reads a host the way the connecting side does (``getaddrinfo``, which
parses IPv4 with ``inet_aton``): ``127.1``, ``0``, ``2130706433``, ``0x7f000001``
and ``127.000.000.001`` are all an address of this machine, as are ``[::1]`` and
``::ffff:127.0.0.1``, names in any case and with a trailing dot.

Host names are resolved, but with a bound (``RESOLVE_TIMEOUT``): a lookup runs in a
daemon thread and whoever asks waits at most that long, so neither ``dicomrouter
check`` nor a configuration apply can hang on a slow DNS server. Results are kept
for ``CACHE_SECONDS``, and a lookup still running is joined rather than repeated, so
a name that never answers costs one thread, not one per validation.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: Longest wait for one host name lookup during validation or routing (seconds).
RESOLVE_TIMEOUT = 2.0
#: How long a lookup's answer (or failure) is reused (seconds).
CACHE_SECONDS = 60.0

# RFC 6761: ``localhost`` and every name under ``.localhost`` are loopback.
_LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback")


def _inet_aton_part(text: str) -> int | None:
    """One part of an inet_aton address: C ``strtoul`` with base 0 (``0x`` hex,
    a leading ``0`` octal, else decimal)."""
    if not text:
        return None
    try:
        if text[:2].lower() == "0x":
            return int(text[2:], 16) if text[2:] else 0
        if len(text) > 1 and text[0] == "0":
            return int(text[1:], 8)
        return int(text, 10) if text.isdigit() else None
    except ValueError:
        return None


def parse_ipv4(text: str) -> ipaddress.IPv4Address | None:
    """``text`` as inet_aton reads it (1 to 4 parts; the last one fills the
    remaining bytes), or None. Unlike glibc's ``inet_aton`` nothing may follow."""
    parts = text.split(".")
    if not 1 <= len(parts) <= 4:
        return None
    values = [_inet_aton_part(part) for part in parts]
    if any(value is None for value in values):
        return None
    numbers = [int(value or 0) for value in values]
    *leading, last = numbers
    if any(value > 0xFF for value in leading) or last >= 1 << (8 * (4 - len(leading))):
        return None
    number = 0
    for value in leading:
        number = (number << 8) | value
    number = (number << (8 * (4 - len(leading)))) | last
    return ipaddress.IPv4Address(number)


def literal_address(host: str) -> IPAddress | None:
    """The IP address ``host`` spells, in any notation a connect would accept
    (brackets and an IPv6 zone allowed), or None for a name."""
    text = host.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if ":" in text:
        try:
            return ipaddress.IPv6Address(text.split("%", 1)[0])
        except ValueError:
            return None
    return parse_ipv4(text.rstrip(".") if text[:1].isdigit() else text)


def unmapped(address: IPAddress) -> IPAddress:
    """An IPv4 address written as IPv6 (``::ffff:a.b.c.d``, or the old compatible
    form ``::a.b.c.d``) as the IPv4 address it reaches."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        number = int(address)
        if 1 < number < 1 << 32:
            return ipaddress.IPv4Address(number)
    return address


def is_own_address(address: IPAddress) -> bool:
    """A loopback or wildcard address, or one of this machine's interfaces (an
    address it can bind to)."""
    address = unmapped(address)
    if address.is_loopback or address.is_unspecified:
        return True
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.bind((str(address), 0))  # only succeeds for our own addresses
    except OSError:
        return False
    return True


def normal_name(host: str) -> str:
    """A host name as DNS compares it: case-insensitive, the trailing dot implied."""
    return host.strip().rstrip(".").lower()


@dataclass(frozen=True)
class Resolution:
    """The addresses of a name; ``complete`` is False when the lookup did not
    answer in time (the answer is then unknown, not empty)."""

    addresses: frozenset[IPAddress]
    complete: bool = True


class _Resolver:
    """Bounded, cached ``getaddrinfo`` (see the module docstring)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[float, frozenset[IPAddress]]] = {}
        self._running: dict[str, threading.Event] = {}

    def resolve(self, name: str, timeout: float) -> Resolution:
        now = time.monotonic()
        with self._lock:
            cached = self._cache.get(name)
            if cached is not None and now - cached[0] < CACHE_SECONDS:
                return Resolution(cached[1])
            done = self._running.get(name)
            if done is None:
                done = self._running[name] = threading.Event()
                threading.Thread(
                    target=self._lookup, args=(name, done), name=f"resolve-{name}", daemon=True
                ).start()
        if not done.wait(timeout):
            return Resolution(frozenset(), complete=False)
        with self._lock:
            cached = self._cache.get(name)
        return Resolution(cached[1] if cached else frozenset())

    def _lookup(self, name: str, done: threading.Event) -> None:
        found: set[IPAddress] = set()
        try:
            for *_, sockaddr in socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP):
                address = literal_address(str(sockaddr[0]))
                if address is not None:
                    found.add(address)
        except (OSError, UnicodeError):
            pass
        with self._lock:
            self._cache[name] = (time.monotonic(), frozenset(found))
            self._running.pop(name, None)
        done.set()


_resolver = _Resolver()


def resolve(host: str, timeout: float | None = None) -> Resolution:
    """The addresses ``host`` reaches: itself when it is an address, else the
    answer of a bounded lookup."""
    address = literal_address(host)
    if address is not None:
        return Resolution(frozenset({address}))
    name = normal_name(host)
    if not name:
        return Resolution(frozenset())
    return _resolver.resolve(name, RESOLVE_TIMEOUT if timeout is None else timeout)


@dataclass(frozen=True)
class HostCheck:
    """Whether a host is this machine; ``unresolved`` when a name did not answer
    in time, so that the answer ``local=False`` is a guess."""

    local: bool
    unresolved: bool = False


def check_host(host: str, timeout: float | None = None) -> HostCheck:
    """Is ``host`` this machine, whatever its spelling? See the module docstring."""
    address = literal_address(host)
    if address is not None:
        return HostCheck(is_own_address(address))
    name = normal_name(host)
    if name in _LOOPBACK_NAMES or name.endswith(".localhost"):
        return HostCheck(True)
    if name == normal_name(socket.gethostname()):
        return HostCheck(True)
    resolution = resolve(name, timeout)
    if any(is_own_address(found) for found in resolution.addresses):
        return HostCheck(True)
    return HostCheck(False, unresolved=not resolution.complete)


def is_local_host(host: str) -> bool:
    """``host`` names this machine (see :func:`check_host`)."""
    return check_host(host).local


def same_address(address: str, addresses: frozenset[IPAddress]) -> bool:
    """Whether the source ``address`` of a connection is one of ``addresses``
    (an IPv4 peer seen by an IPv6 listener counts as its IPv4 address)."""
    parsed = literal_address(address)
    if parsed is None:
        return False
    return unmapped(parsed) in {unmapped(a) for a in addresses}
