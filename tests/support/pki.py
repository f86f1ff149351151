"""A throwaway PKI for TLS tests: a CA, certificates it signs, and a rogue CA.

Made with ``cryptography`` in-process (RSA 2048, SHA-256; about a second for the
whole set). Every file is PEM, keys unencrypted (PKCS #8), as dcmtk's ``+tls``
and curl read them.

    pki = make_pki(tmp_path)
    pki.server_cert, pki.server_key     # CN/SAN localhost, SAN 127.0.0.1 and ::1
    pki.client_cert, pki.client_key     # signed by pki.ca_cert (mutual TLS)
    pki.rogue_cert, pki.rogue_key       # signed by pki.rogue_ca: not trusted
    cert, key = pki.issue("soon", days=3)   # e.g. an expiring certificate

The ``pki`` fixture (tests/conftest.py) makes one set per test session; tests that
change files (a reload) make their own with ``make_pki(tmp_path)``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SERVER_NAMES = ("localhost",)
SERVER_ADDRESSES = ("127.0.0.1", "::1")


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "dicomrouter tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _write_key(key: rsa.RSAPrivateKey, path: Path) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    return path


def _write_cert(cert: x509.Certificate, path: Path) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _make_ca(common_name: str, days: int = 3650) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    key = _key()
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _make_leaf(
    ca_cert: x509.Certificate,
    ca_key: rsa.RSAPrivateKey,
    common_name: str,
    *,
    days: float,
    names: tuple[str, ...] = SERVER_NAMES,
    addresses: tuple[str, ...] = SERVER_ADDRESSES,
) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    key = _key()
    now = dt.datetime.now(dt.UTC)
    alt_names: list[x509.GeneralName] = [x509.DNSName(name) for name in names]
    alt_names += [x509.IPAddress(ipaddress.ip_address(a)) for a in addresses]
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if alt_names:
        builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


@dataclass
class Pki:
    """Paths of a test PKI's PEM files (see the module docstring)."""

    dir: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_ca: Path
    rogue_cert: Path
    rogue_key: Path

    def issue(
        self,
        stem: str,
        *,
        days: float = 365,
        names: tuple[str, ...] = SERVER_NAMES,
        addresses: tuple[str, ...] = SERVER_ADDRESSES,
        directory: Path | None = None,
    ) -> tuple[Path, Path]:
        """A new certificate signed by this CA (valid ``days`` from now, SANs as for
        the server), written to ``<stem>.crt`` and ``<stem>.key`` in ``directory``
        (default: the PKI's folder). Returns (certificate, key)."""
        ca_cert = x509.load_pem_x509_certificate(self.ca_cert.read_bytes())
        ca_key = serialization.load_pem_private_key(self.ca_key.read_bytes(), None)
        assert isinstance(ca_key, rsa.RSAPrivateKey)
        cert, key = _make_leaf(ca_cert, ca_key, stem, days=days, names=names, addresses=addresses)
        folder = directory or self.dir
        return _write_cert(cert, folder / f"{stem}.crt"), _write_key(key, folder / f"{stem}.key")


def make_pki(directory: Path) -> Pki:
    """A CA, a server and a client certificate it signs, and a rogue CA with a client
    certificate of its own, as PEM files in ``directory`` (created if needed)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = _make_ca("dicomrouter test CA")
    rogue_ca, rogue_ca_key = _make_ca("rogue CA")
    server_cert, server_key = _make_leaf(ca_cert, ca_key, "localhost", days=365)
    client_cert, client_key = _make_leaf(
        ca_cert, ca_key, "client", days=365, names=(), addresses=()
    )
    rogue_cert, rogue_key = _make_leaf(
        rogue_ca, rogue_ca_key, "rogue", days=365, names=(), addresses=()
    )
    return Pki(
        dir=directory,
        ca_cert=_write_cert(ca_cert, directory / "ca.crt"),
        ca_key=_write_key(ca_key, directory / "ca.key"),
        server_cert=_write_cert(server_cert, directory / "server.crt"),
        server_key=_write_key(server_key, directory / "server.key"),
        client_cert=_write_cert(client_cert, directory / "client.crt"),
        client_key=_write_key(client_key, directory / "client.key"),
        rogue_ca=_write_cert(rogue_ca, directory / "rogue-ca.crt"),
        rogue_cert=_write_cert(rogue_cert, directory / "rogue.crt"),
        rogue_key=_write_key(rogue_key, directory / "rogue.key"),
    )
