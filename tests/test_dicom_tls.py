"""DICOM over TLS, with dcmtk's own TLS support as the peer on both sides.

- ``storescu +tls`` → the router's ``dicom.tls`` listener → a ``storescp +tls`` that
  requires our client certificate (mutual TLS both ways), byte for byte;
- ``echoscu +tls``; a plain client against the TLS port fails cleanly and the
  listener goes on serving; a client certificate from an untrusted CA, or none when
  one is required, is refused at the handshake;
- a destination whose certificate we do not trust, or that names another host, is
  not sent to (``verify_hostname: false`` accepts the second);
- ``dicom.port: null`` leaves only the TLS listener, and SIGHUP serves a renewed
  certificate.
"""

from __future__ import annotations

import shutil
import signal
import socket
import ssl
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from dicomrouter.config import parse_config
from dicomrouter.destinations import DestinationUnavailable, DicomSender
from dicomrouter.receive import Receiver
from dicomrouter.store import InstanceIndex, ObjectStore, create_index_engine
from dicomrouter.tls import client_context
from tests.support import require_peers
from tests.support.dcmtk import HOST, StoreSCP, dcmtk_env, dcmtk_tool, free_port, sop_uids
from tests.support.pki import Pki, make_pki
from tests.support.router import AE_TITLE, RouterProcess, all_settled, storescu, wait_until
from tests.support.synth import make_small_study

pytestmark = pytest.mark.interop


def tls_options(pki: Pki, certificate: Path, key: Path, ca: Path | None = None) -> list[str]:
    """dcmtk's TLS options: our key and certificate, the CA we trust."""
    return ["+tls", str(key), str(certificate), "+cf", str(ca or pki.ca_cert)]


def echoscu(port: int, options: Sequence[str] = (), aet: str = AE_TITLE) -> bool:
    result = subprocess.run(
        [dcmtk_tool("echoscu"), "-to", "5", "-aec", aet, *options, HOST, str(port)],
        capture_output=True,
        env=dcmtk_env(),
        timeout=30,
    )
    return result.returncode == 0


class TlsStoreSCP(StoreSCP):
    """``storescp +tls``: it requires the client's certificate (dcmtk's default)."""

    def __init__(self, port: int, outdir: Path, pki: Pki, certificate: Path, key: Path):
        super().__init__(port, "TLSSCP", outdir, extra_args=tls_options(pki, certificate, key))
        self.pki = pki

    def answers(self) -> bool:
        options = tls_options(self.pki, self.pki.client_cert, self.pki.client_key)
        return echoscu(self.port, options, self.aet)


def tls_destination(pki: Pki, port: int, **tls: Any) -> dict[str, Any]:
    settings = {
        "ca_certificates": str(pki.ca_cert),
        "certificate": str(pki.client_cert),
        "private_key": str(pki.client_key),
        **tls,
    }
    return {"ae_title": "TLSSCP", "host": HOST, "port": port, "tls": settings}


def router_tls(pki: Pki, port: int, require: bool = True) -> dict[str, Any]:
    return {
        "port": port,
        "certificate": str(pki.server_cert),
        "private_key": str(pki.server_key),
        "ca_certificates": str(pki.ca_cert),
        "require_client_certificate": require,
    }


def test_storescu_tls_to_router_to_storescp_tls(tmp_path: Path, pki: Pki) -> None:
    require_peers()
    sources = make_small_study(tmp_path / "src", 3)
    tls_port, pacs_port = free_port(), free_port()
    config = {
        "dicom": {"tls": router_tls(pki, tls_port)},
        "destinations": {"pacs": tls_destination(pki, pacs_port)},
        "routes": [{"name": "all", "to": ["pacs"]}],
    }
    with (
        TlsStoreSCP(pacs_port, tmp_path / "pacs", pki, pki.server_cert, pki.server_key) as pacs,
        RouterProcess(tmp_path / "router", config) as router,
    ):
        client = tls_options(pki, pki.client_cert, pki.client_key)
        sent = storescu(sources, tls_port, extra=client)
        assert sent.returncode == 0, sent.stderr
        wait_until(lambda: pacs.received_sops() == sop_uids(sources), 60, 0.2, "delivery")
        jobs = router.wait_jobs(lambda jobs: bool(jobs) and all_settled(jobs), 30)
        assert {job["state"] for job in jobs} == {"completed"}
    received = {str(dcmread(p).SOPInstanceUID): dcmread(p) for p in pacs.received_files()}
    for source in sources:
        original = dcmread(source)
        forwarded = received[str(original.SOPInstanceUID)]
        assert forwarded == original  # every element, pixel data included
    assert "(TLS)" in router.log()  # the start-up line names the TLS listener
    assert "association from STORESCU (127.0.0.1, TLS) released: 3 stored" in router.log()


@pytest.fixture
def tls_receiver(tmp_path: Path, pki: Pki):  # type: ignore[no-untyped-def]
    """A receiver with a plain and a TLS listener that requires client certificates."""
    data: dict[str, Any] = {
        "storage": {"path": str(tmp_path / "data")},
        "dicom": {"port": free_port(), "bind": HOST, "tls": router_tls(pki, free_port())},
    }
    config = parse_config(data, environ={})
    store = ObjectStore(config.storage.path, config.node.name)
    store.prepare()
    receiver = Receiver(config, store, InstanceIndex(create_index_engine(config.database_url)))
    receiver.start()
    try:
        yield receiver, config
    finally:
        receiver.stop()


def test_tls_port_refuses_plain_untrusted_and_anonymous_clients(
    tls_receiver, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:  # type: ignore[no-untyped-def]
    require_peers()
    receiver, config = tls_receiver
    tls_port = config.dicom.tls.port
    trusted = tls_options(pki, pki.client_cert, pki.client_key)
    assert echoscu(tls_port, trusted)
    assert echoscu(config.dicom.port)  # the plain listener beside it
    assert not echoscu(tls_port)  # plain DICOM to the TLS port
    rogue = tls_options(pki, pki.rogue_cert, pki.rogue_key)
    assert not echoscu(tls_port, rogue)  # a certificate from a CA we do not trust
    assert not echoscu(tls_port, ["+tla", "+cf", str(pki.ca_cert)])  # no certificate
    assert not echoscu(config.dicom.port, trusted)  # TLS to the plain port
    assert echoscu(tls_port, trusted)  # and the listener still serves
    assert "TLS handshake failed" in caplog.text
    health = receiver.health()
    assert health[0] and "(TLS)" in health[1]


def test_destinations_verify_the_peer_certificate_and_its_name(tmp_path: Path, pki: Pki) -> None:
    require_peers()
    port = free_port()
    other, other_key = pki.issue("elsewhere", names=("pacs.example",), addresses=())
    with TlsStoreSCP(port, tmp_path / "pacs", pki, other, other_key):
        untrusted = parse_config(
            {"destinations": {"p": tls_destination(pki, port, ca_certificates=str(pki.rogue_ca))}},
            environ={},
        ).destinations["p"]
        with pytest.raises(
            DestinationUnavailable,
            match="TLSSCP.*TLS handshake failed: certificate verify failed: self-signed",
        ):
            DicomSender(untrusted, "ROUTER").echo()
        named = parse_config(
            {"destinations": {"p": tls_destination(pki, port)}}, environ={}
        ).destinations["p"]
        with pytest.raises(
            DestinationUnavailable,
            match="TLS handshake failed: certificate verify failed: "
            ".*(IP address|[Hh]ostname) mismatch",
        ):
            DicomSender(named, "ROUTER").echo()
        unnamed = parse_config(
            {"destinations": {"p": tls_destination(pki, port, verify_hostname=False)}},
            environ={},
        ).destinations["p"]
        DicomSender(unnamed, "ROUTER").echo()  # signed by our CA is enough now
        ca_copy = tmp_path / "ca-copy.crt"
        shutil.copyfile(pki.ca_cert, ca_copy)
        renewing = parse_config(
            {"destinations": {"p": tls_destination(pki, port, ca_certificates=str(ca_copy))}},
            environ={},
        ).destinations["p"]
        ca_copy.write_text("")  # a renewal caught half-way: waited out, like an outage
        with pytest.raises(DestinationUnavailable, match="TLS files of TLSSCP") as info:
            DicomSender(renewing, "ROUTER").echo()
        assert info.value.transient


def served_certificate(port: int, pki: Pki) -> bytes:
    context = client_context(pki.ca_cert, pki.client_cert, pki.client_key)
    with (
        socket.create_connection((HOST, port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as conn,
    ):
        der = conn.getpeercert(binary_form=True)
    assert der is not None
    return der


def test_tls_only_listener_serves_a_renewed_certificate_after_sighup(tmp_path: Path) -> None:
    require_peers()
    pki = make_pki(tmp_path / "pki")  # its server certificate is replaced below
    tls_port = free_port()
    config = {"dicom": {"port": None, "tls": router_tls(pki, tls_port, require=False)}}
    trusted = tls_options(pki, pki.client_cert, pki.client_key)
    with RouterProcess(
        tmp_path / "router", config, answers=lambda: echoscu(tls_port, trusted)
    ) as router:
        assert f"listening for DICOM as DICOMROUTER on 0.0.0.0:{tls_port} (TLS)\n" in router.log()
        first = served_certificate(tls_port, pki)
        assert first == ssl.PEM_cert_to_DER_cert(pki.server_cert.read_text())
        renewed, renewed_key = pki.issue("renewed", directory=tmp_path)
        shutil.copyfile(renewed, pki.server_cert)
        shutil.copyfile(renewed_key, pki.server_key)
        assert router.process is not None
        router.process.send_signal(signal.SIGHUP)
        expected = ssl.PEM_cert_to_DER_cert(renewed.read_text())
        wait_until(lambda: served_certificate(tls_port, pki) == expected, 15, 0.2, "renewal")
        assert echoscu(tls_port, trusted)
