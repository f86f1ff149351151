"""Routing loops refused at configuration time, whatever the spelling of our address.

A destination at our DICOM port on this machine is the router itself: every
spelling of a local address a connect would accept (inet_aton numeric forms, case,
a trailing dot, IPv6 loopback and IPv4-mapped forms, our own names) must be refused
by validation and reported by ``dicomrouter check``; other ports, other machines and
other AE titles (when we check the called AE) are not loops.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from dicomrouter.config import ConfigError, hosts, parse_config
from dicomrouter.config.lint import lint

PORT = 11112

# Every spelling named in the issue, plus the IPv6 forms it asks for.
LOOP_SPELLINGS = [
    "127.1",
    "LOCALHOST",
    "localhost.",
    "0",
    "2130706433",
    "0x7f000001",
    "127.000.000.001",
    "[::1]",
    "::1",
    "::ffff:127.0.0.1",
    "127.0.0.1.",
    "127.45.6.7",  # the whole of 127.0.0.0/8
    "0.0.0.0",
    "0x7f.1",
    "017700000001",  # octal
    "Localhost.Localdomain",
    "router.localhost",
    "[::ffff:7f00:1]",
]


def _config(host: str, dest: dict | None = None, dicom: dict | None = None) -> dict:
    return {
        "ae_title": "ROUTER",
        "dicom": {"port": PORT, **(dicom or {})},
        "destinations": {"me": {"ae_title": "ROUTER", "host": host, "port": PORT, **(dest or {})}},
        "routes": [{"name": "all", "to": ["me"]}],
    }


def _loop_error(data: dict) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(data, environ={})
    (error,) = info.value.errors
    return error


@pytest.mark.parametrize("host", LOOP_SPELLINGS)
def test_every_spelling_of_this_machine_at_our_port_is_a_loop(host: str) -> None:
    error = _loop_error(_config(host))
    assert "destinations.me: routing loop" in error
    assert host in error


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.1", "127.0.0.1"),
        ("0", "0.0.0.0"),
        ("2130706433", "127.0.0.1"),
        ("0x7f000001", "127.0.0.1"),
        ("127.000.000.001", "127.0.0.1"),
        ("010.0.0.1", "8.0.0.1"),  # a leading 0 is octal, as inet_aton reads it
        ("10.1.65535", "10.1.255.255"),
        ("[::1]", "::1"),
        ("256.1", None),
        ("1.2.3.4.5", None),
        ("127.0.0.1 x", None),  # glibc's inet_aton would stop at the space
        ("08", None),
        ("pacs.example.org", None),
    ],
)
def test_addresses_are_read_as_a_connect_reads_them(host: str, expected: str | None) -> None:
    address = hosts.literal_address(host)
    assert (None if address is None else str(hosts.unmapped(address))) == expected


def _own_non_loopback_address() -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("192.0.2.1", 9))  # no packet sent: picks the outgoing interface
        address = str(probe.getsockname()[0])
    if address.startswith("127."):
        pytest.fail("this machine has no non-loopback IPv4 address to test with")
    return address


def test_our_host_name_and_interface_addresses_in_any_spelling_are_loops() -> None:
    name = socket.gethostname()
    for host in (name, name.upper(), name + ".", _own_non_loopback_address()):
        assert "routing loop" in _loop_error(_config(host)), host
    number = int.from_bytes(socket.inet_aton(_own_non_loopback_address()), "big")
    assert "routing loop" in _loop_error(_config(str(number)))


def test_a_name_that_resolves_to_this_machine_is_a_loop(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    real = socket.getaddrinfo

    def fake(host: str, *args, **kwargs):  # type: ignore[no-untyped-def]
        if host == "router-alias.example.org":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.1.1", 0))]
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    monkeypatch.setattr(hosts, "_resolver", hosts._Resolver())
    assert "routing loop" in _loop_error(_config("ROUTER-ALIAS.example.org."))


def test_a_name_that_does_not_answer_never_holds_validation_up(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A lookup that hangs is abandoned after RESOLVE_TIMEOUT: the configuration
    loads (the answer is unknown, not "ours") and ``check`` says it could not tell.
    Had validation waited for the answer, the name would resolve to 127.0.0.1 and
    be refused as a loop."""
    answer = threading.Event()
    real = socket.getaddrinfo

    def hanging(host: str, *args, **kwargs):  # type: ignore[no-untyped-def]
        if host == "slow-dns.example.org":
            answer.wait(60)
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 0))]
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", hanging)
    monkeypatch.setattr(hosts, "_resolver", hosts._Resolver())
    monkeypatch.setattr(hosts, "RESOLVE_TIMEOUT", 0.2)
    try:
        config = parse_config(_config("slow-dns.example.org"), environ={})
        findings = [str(f) for f in lint(config)]
        assert any("did not resolve within 0.2s" in f for f in findings), findings
        # Asked again while the first lookup still hangs: no second thread.
        threads = [t for t in threading.enumerate() if t.name == "resolve-slow-dns.example.org"]
        assert len(threads) == 1
    finally:
        answer.set()


@pytest.mark.parametrize(
    "dest",
    [
        {"port": PORT + 1},  # another port of this machine
        {"host": "192.0.2.77"},  # another machine (TEST-NET-1)
        {"ae_title": "OTHER"},  # we refuse that called AE: not us
    ],
)
def test_other_ports_machines_and_called_ae_titles_are_not_loops(dest: dict) -> None:
    parse_config(_config("127.1", dest=dest), environ={})  # loads


def test_without_the_called_ae_check_another_ae_title_at_our_port_is_a_loop() -> None:
    data = _config("0x7f000001", dest={"ae_title": "OTHER"}, dicom={"require_called_ae": False})
    assert "routing loop" in _loop_error(data)


@pytest.mark.parametrize("host", ["127.1", "LOCALHOST", "[::1]", "2130706433"])
def test_check_refuses_the_loop(tmp_path: Path, host: str) -> None:
    path = tmp_path / "dicomrouter.yaml"
    path.write_text(yaml.safe_dump(_config(host)))
    result = subprocess.run(
        [sys.executable, "-m", "dicomrouter", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "destinations.me: routing loop" in result.stdout + result.stderr
    assert host in result.stdout + result.stderr
