"""HTTPS (http.tls), end to end: a real router process serving the dashboard and the
API over TLS, reached with curl --cacert; BCP 195 (no plain HTTP, no TLS 1.1, no
weak suites); a renewed certificate served after SIGHUP, a bad one not."""

from __future__ import annotations

import shutil
import signal
import socket
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicomrouter.config import parse_config
from dicomrouter.tls import client_context
from tests.support.api import PASSWORD, api_env, auth_section
from tests.support.pki import Pki, make_pki
from tests.support.router import RouterProcess, wait_until

pytestmark = pytest.mark.usefixtures("dcmtk")  # RouterProcess waits for a C-ECHO


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["curl", "--silent", "--show-error", "--max-time", "20", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def status_of(url: str, *args: str) -> str:
    result = curl("--output", "/dev/null", "--write-out", "%{http_code}", *args, url)
    assert result.returncode == 0, result.stderr
    return result.stdout


def served_certificate(port: int, ca: Path) -> bytes:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        client_context(ca).wrap_socket(raw, server_hostname="localhost") as conn,
    ):
        der = conn.getpeercert(binary_form=True)
    assert der is not None
    return der


def der(path: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(path.read_text())


@pytest.fixture
def https_router(tmp_path: Path) -> Iterator[tuple[RouterProcess, Pki]]:
    """A router with http.tls on certificate files it owns (tls/ beside its YAML,
    named relative to it), so a test may renew them."""
    pki = make_pki(tmp_path / "pki")
    folder = tmp_path / "router"
    (folder / "tls").mkdir(parents=True)
    shutil.copy(pki.server_cert, folder / "tls" / "server.crt")
    shutil.copy(pki.server_key, folder / "tls" / "server.key")
    config = {
        "http": {"tls": {"certificate": "tls/server.crt", "private_key": "tls/server.key"}},
        "auth": auth_section(),
    }
    with RouterProcess(folder, config) as router:
        yield router, pki


def test_curl_reaches_the_dashboard_and_api_over_https(
    https_router: tuple[RouterProcess, Pki],
) -> None:
    router, pki = https_router
    port = int(router.config["http"]["port"])
    base = f"https://localhost:{port}"
    ca = str(pki.ca_cert)
    assert status_of(f"{base}/healthz", "--cacert", ca) == "200"
    assert status_of(f"{base}/login", "--cacert", ca) == "200"
    assert status_of(f"{base}/api/v1/status", "--cacert", ca, "-u", f"admin:{PASSWORD}") == "200"
    assert status_of(f"https://127.0.0.1:{port}/healthz", "--cacert", ca) == "200"  # IP SAN
    assert f"HTTP service on https://0.0.0.0:{port}/" in router.log()

    # The session cookie is Secure: a browser never sends it over plain HTTP.
    login = curl(
        "--cacert", ca, "--dump-header", "-", "--output", "/dev/null",
        "--json", f'{{"username": "admin", "password": "{PASSWORD}"}}',
        f"{base}/api/v1/login",
    )  # fmt: skip
    assert login.returncode == 0, login.stderr
    cookies = [h for h in login.stdout.splitlines() if h.lower().startswith("set-cookie:")]
    assert cookies and all("secure" in h.lower() for h in cookies), login.stdout
    # A browser's way: log in on the form, then the dashboard with the session cookie.
    jar = str(router.workdir / "cookies.txt")
    form = curl(
        "--cacert", ca, "--cookie-jar", jar, "--output", "/dev/null", "--write-out", "%{http_code}",
        "--data-urlencode", "username=admin", "--data-urlencode", f"password={PASSWORD}",
        f"{base}/login",
    )  # fmt: skip
    assert form.returncode == 0 and form.stdout in ("302", "303"), form
    assert status_of(f"{base}/", "--cacert", ca, "--cookie", jar) == "200"
    assert status_of(f"{base}/", "--cacert", ca) in ("302", "303", "401")  # no cookie

    # Untrusted (curl's system store does not know our CA): refused.
    untrusted = curl("--output", "/dev/null", f"{base}/healthz")
    assert untrusted.returncode == 60, untrusted  # peer certificate cannot be authenticated
    # Plain HTTP to the HTTPS port gets no answer.
    plain = curl("--write-out", "%{http_code}", f"http://localhost:{port}/healthz")
    assert plain.returncode != 0 and plain.stdout in ("", "000"), plain


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1:DeprecationWarning")
def test_only_tls_1_2_and_newer_with_strong_suites(
    https_router: tuple[RouterProcess, Pki],
) -> None:
    router, pki = https_router
    port = int(router.config["http"]["port"])
    url, ca = f"https://localhost:{port}/healthz", str(pki.ca_cert)
    assert status_of(url, "--cacert", ca, "--tlsv1.2", "--tls-max", "1.2") == "200"
    assert status_of(url, "--cacert", ca, "--tlsv1.3") == "200"
    rsa_kx = "AES128-SHA:AES256-GCM-SHA384"
    weak = curl("--cacert", ca, "--tls-max", "1.2", "--ciphers", rsa_kx, url)
    assert weak.returncode == 35, weak  # handshake failure: RSA key exchange is not offered

    # TLS 1.1 from a client that would accept it (curl's own OpenSSL refuses to try).
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.load_verify_locations(pki.ca_cert)
    old.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    old.maximum_version = ssl.TLSVersion.TLSv1_1
    old.set_ciphers("ALL:@SECLEVEL=0")
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        pytest.raises(ssl.SSLError),
    ):
        old.wrap_socket(raw, server_hostname="localhost")


def test_a_renewed_certificate_is_served_after_sighup(
    https_router: tuple[RouterProcess, Pki],
) -> None:
    router, pki = https_router
    assert router.process is not None
    port = int(router.config["http"]["port"])
    live_cert, live_key = (
        router.workdir / "tls" / "server.crt",
        router.workdir / "tls" / "server.key",
    )
    assert served_certificate(port, pki.ca_cert) == der(pki.server_cert)

    renewed_cert, renewed_key = pki.issue("renewed", days=90)
    shutil.copy(renewed_key, live_key)
    shutil.copy(renewed_cert, live_cert)
    router.process.send_signal(signal.SIGHUP)  # the node forwards it to the HTTP process
    wait_until(
        lambda: served_certificate(port, pki.ca_cert) == der(renewed_cert),
        30,
        message="the renewed certificate to be served",
    )
    assert "HTTPS certificate reloaded" in router.log()
    assert status_of(f"https://localhost:{port}/healthz", "--cacert", str(pki.ca_cert)) == "200"

    # Half a renewal (the new certificate, not its key): the node refuses the reload
    # (the configuration names a key that does not match), the old one stays.
    other_cert, _ = pki.issue("other", days=90)
    shutil.copy(other_cert, live_cert)
    router.process.send_signal(signal.SIGHUP)
    wait_until(
        lambda: f"http.tls: {live_key} is not the private key of {live_cert}" in router.log(),
        30,
        message="the refused reload to be logged",
    )
    assert served_certificate(port, pki.ca_cert) == der(renewed_cert)
    assert status_of(f"https://localhost:{port}/healthz", "--cacert", str(pki.ca_cert)) == "200"


def test_plain_http_cookie_is_not_secure(tmp_path: Path, pki: Pki) -> None:
    """Without http.tls the cookie must stay usable over plain HTTP (no Secure)."""
    env = api_env(tmp_path)
    response = env.anonymous.post("/api/v1/login", json={"username": "admin", "password": PASSWORD})
    assert response.status_code == 200
    assert "secure" not in response.headers["set-cookie"].lower()
    tls = {"certificate": str(pki.server_cert), "private_key": str(pki.server_key)}
    assert parse_config({"http": {"tls": tls}}, environ={}).http.tls is not None
