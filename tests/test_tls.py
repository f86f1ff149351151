"""The TLS contexts (dicomrouter.tls): BCP 195 settings, mutual TLS, host name
checks, in-place certificate reload and certificate expiry dates."""

from __future__ import annotations

import datetime as dt
import logging
import shutil
import socket
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from dicomrouter import tls
from tests.support.pki import Pki, make_pki


@dataclass
class Result:
    client_error: BaseException | None
    server_error: BaseException | None
    peer_der: bytes | None = None
    version: str | None = None
    cipher: str | None = None
    client_cert_seen: bool = False

    @property
    def ok(self) -> bool:
        return self.client_error is None and self.server_error is None


def exchange(
    server: ssl.SSLContext, client: ssl.SSLContext, server_hostname: str | None = "localhost"
) -> Result:
    """One connection through real sockets: handshake, then a round trip (with TLS
    1.3 a refused client certificate shows only once data flows)."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    server_error: list[BaseException] = []
    seen: list[bool] = []

    def serve() -> None:
        try:
            conn, _ = listener.accept()
            conn.settimeout(5)
            with server.wrap_socket(conn, server_side=True) as tls_conn:
                seen.append(tls_conn.getpeercert() not in (None, {}))
                tls_conn.sendall(tls_conn.recv(4))
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            server_error.append(exc)
        finally:
            listener.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    result = Result(None, None)
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
            client.wrap_socket(raw, server_hostname=server_hostname) as conn,
        ):
            result.peer_der = conn.getpeercert(binary_form=True)
            result.version = conn.version()
            result.cipher = (conn.cipher() or ("",))[0]
            conn.sendall(b"ping")
            if conn.recv(4) != b"ping":
                raise ConnectionError("no echo")
    except (OSError, ssl.SSLError) as exc:
        result.client_error = exc
    thread.join(5)
    result.server_error = server_error[0] if server_error else None
    result.client_cert_seen = bool(seen and seen[0])
    return result


def test_server_and_client_contexts_connect_with_tls_1_2_or_newer(pki: Pki) -> None:
    result = exchange(
        tls.server_context(pki.server_cert, pki.server_key),
        tls.client_context(pki.ca_cert),
    )
    assert result.ok, result
    assert result.version in ("TLSv1.2", "TLSv1.3")
    assert result.peer_der == ssl.PEM_cert_to_DER_cert(pki.server_cert.read_text())


def test_bcp195_settings() -> None:
    for context in (
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER),
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT),
    ):
        tls._harden(context)
        assert context.minimum_version == ssl.TLSVersion.TLSv1_2
        assert context.options & ssl.OP_NO_COMPRESSION
        assert context.options & ssl.OP_CIPHER_SERVER_PREFERENCE
        for cipher in context.get_ciphers():
            if cipher["protocol"] == "TLSv1.3":
                continue
            assert cipher["aead"], cipher["name"]
            assert cipher["kea"] in ("kx-ecdhe", "kx-dhe"), cipher["name"]
            assert cipher["auth"] != "auth-null", cipher["name"]


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
@pytest.mark.parametrize(
    "version, refused",
    [
        (ssl.TLSVersion.TLSv1, True),
        (ssl.TLSVersion.TLSv1_1, True),
        (ssl.TLSVersion.TLSv1_2, False),  # the same client, allowed TLS 1.2: accepted
    ],
)
def test_old_protocol_versions_are_refused(
    pki: Pki, version: ssl.TLSVersion, refused: bool
) -> None:
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_verify_locations(pki.ca_cert)
    client.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    client.maximum_version = version
    client.set_ciphers("ALL:@SECLEVEL=0")
    result = exchange(tls.server_context(pki.server_cert, pki.server_key), client)
    assert result.ok is not refused, result


def test_a_weak_tls_1_2_suite_is_refused(pki: Pki) -> None:
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_verify_locations(pki.ca_cert)
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    client.set_ciphers("AES128-SHA:AES256-SHA:AES128-GCM-SHA256")  # RSA key exchange
    result = exchange(tls.server_context(pki.server_cert, pki.server_key), client)
    assert result.client_error is not None


def test_mutual_tls_requires_a_certificate_from_the_ca(pki: Pki) -> None:
    server = tls.server_context(
        pki.server_cert, pki.server_key, pki.ca_cert, require_client_certificate=True
    )
    good = exchange(server, tls.client_context(pki.ca_cert, pki.client_cert, pki.client_key))
    assert good.ok and good.client_cert_seen, good
    anonymous = exchange(server, tls.client_context(pki.ca_cert))
    assert not anonymous.ok
    rogue = exchange(server, tls.client_context(pki.ca_cert, pki.rogue_cert, pki.rogue_key))
    assert not rogue.ok


def test_client_certificate_optional_when_only_a_ca_is_given(pki: Pki) -> None:
    server = tls.server_context(pki.server_cert, pki.server_key, pki.ca_cert)
    assert server.verify_mode == ssl.CERT_OPTIONAL
    assert exchange(server, tls.client_context(pki.ca_cert)).ok
    mutual = exchange(server, tls.client_context(pki.ca_cert, pki.client_cert, pki.client_key))
    assert mutual.ok and mutual.client_cert_seen
    rogue = exchange(server, tls.client_context(pki.ca_cert, pki.rogue_cert, pki.rogue_key))
    assert not rogue.ok  # a certificate offered is verified
    assert tls.server_context(pki.server_cert, pki.server_key).verify_mode == ssl.CERT_NONE


def test_require_client_certificate_needs_a_ca(pki: Pki) -> None:
    with pytest.raises(tls.TlsError, match="ca_certificates"):
        tls.server_context(pki.server_cert, pki.server_key, require_client_certificate=True)


def test_client_verifies_the_server_and_its_name(pki: Pki) -> None:
    server = tls.server_context(pki.server_cert, pki.server_key)
    assert exchange(server, tls.client_context(pki.ca_cert), "127.0.0.1").ok
    wrong_name = exchange(server, tls.client_context(pki.ca_cert), "pacs.example.org")
    assert isinstance(wrong_name.client_error, ssl.SSLCertVerificationError)
    unchecked = tls.client_context(pki.ca_cert, verify_hostname=False)
    assert exchange(server, unchecked, "pacs.example.org").ok
    untrusted = exchange(server, tls.client_context(pki.rogue_ca))
    assert isinstance(untrusted.client_error, ssl.SSLCertVerificationError)
    system_store = exchange(server, tls.client_context())  # our test CA is not in it
    assert isinstance(system_store.client_error, ssl.SSLCertVerificationError)


def test_bad_files_raise_tls_error_naming_the_file(pki: Pki, tmp_path: Path) -> None:
    missing = tmp_path / "missing.crt"
    with pytest.raises(tls.TlsError, match="missing.crt"):
        tls.server_context(missing, pki.server_key)
    with pytest.raises(tls.TlsError, match="client.key is not the private key of .*server.crt"):
        tls.server_context(pki.server_cert, pki.client_key)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(tls.TlsError, match="garbage.pem"):
        tls.client_context(garbage)
    with pytest.raises(tls.TlsError, match="both|needs its private key"):
        tls.client_context(pki.ca_cert, certificate=pki.client_cert)


def test_reload_serves_the_new_certificate_on_the_same_context(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pki = make_pki(tmp_path / "pki")
    live_cert, live_key = tmp_path / "live.crt", tmp_path / "live.key"
    shutil.copy(pki.server_cert, live_cert)
    shutil.copy(pki.server_key, live_key)
    holder = tls.ReloadableServerContext(live_cert, live_key, name="HTTPS")
    context = holder.context
    client = tls.client_context(pki.ca_cert)
    before = exchange(context, client)
    assert before.ok and before.peer_der == _der(pki.server_cert)

    new_cert, new_key = pki.issue("renewed", days=30)
    shutil.copy(new_cert, live_cert)
    shutil.copy(new_key, live_key)
    assert holder.reload()
    assert holder.context is context  # the same object: listeners keep their reference
    after = exchange(context, client)
    assert after.ok and after.peer_der == _der(new_cert)

    # A half-done renewal (a certificate without its key): the old one stays.
    other_cert, _ = pki.issue("other", days=30)
    shutil.copy(other_cert, live_cert)
    with caplog.at_level(logging.ERROR, logger="dicomrouter.tls"):
        assert not holder.reload()
    assert "HTTPS certificate not reloaded" in caplog.text
    kept = exchange(context, client)
    assert kept.ok and kept.peer_der == _der(new_cert)
    live_cert.unlink()
    assert not holder.reload()
    assert exchange(context, client).peer_der == _der(new_cert)


def test_reload_keeps_mutual_tls(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    holder = tls.ReloadableServerContext(
        pki.server_cert, pki.server_key, pki.ca_cert, require_client_certificate=True
    )
    assert holder.reload()
    assert holder.context.verify_mode == ssl.CERT_REQUIRED
    mutual = tls.client_context(pki.ca_cert, pki.client_cert, pki.client_key)
    assert exchange(holder.context, mutual).ok
    assert not exchange(holder.context, tls.client_context(pki.ca_cert)).ok


def test_certificate_not_after(pki: Pki, tmp_path: Path) -> None:
    cert, _ = pki.issue("soon", days=3, directory=tmp_path)
    expires = tls.certificate_not_after(cert)
    assert expires.tzinfo is not None
    remaining = expires - dt.datetime.now(dt.UTC)
    assert dt.timedelta(days=2, hours=23) < remaining <= dt.timedelta(days=3)
    # A bundle expires with its first certificate.
    bundle = tmp_path / "bundle.pem"
    bundle.write_text(pki.ca_cert.read_text() + cert.read_text())
    assert tls.certificate_not_after(bundle) == expires
    assert tls.certificate_not_after(pki.ca_cert) > expires
    with pytest.raises(tls.TlsError, match="not a PEM certificate"):
        tls.certificate_not_after(pki.server_key)
    with pytest.raises(tls.TlsError, match="nothing.pem"):
        tls.certificate_not_after(tmp_path / "nothing.pem")


def _der(path: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(path.read_text())
