"""TLS contexts for every listener and connection, with the BCP 195 settings.

A leaf module: it imports nothing from ``dicomrouter`` so that the DICOM listener,
the DICOM sender, the HTTP service and the configuration checks can all build their
contexts here, from file paths, the same way:

- :func:`server_context` for a listener (DICOM in, HTTPS), optionally requiring a
  client certificate signed by ``ca_certificates`` (mutual TLS);
- :func:`client_context` for a connection out (DICOM to a destination), verifying
  the peer against ``ca_certificates`` or the system trust store;
- :class:`ReloadableServerContext`, a server context whose certificate is loaded
  again in place (SIGHUP): handshakes after :meth:`~ReloadableServerContext.reload`
  present the new certificate, connections already open keep theirs, and bad new
  files leave the old certificate in service;
- :func:`certificate_not_after`, the expiry date of a certificate file (for the
  ``certificate_expiry`` alert and the metrics).

BCP 195 (RFC 9325): TLS 1.2 or newer only; TLS 1.2 cipher suites limited to
ephemeral key exchange (forward secrecy) with AEAD ciphers (AES-GCM,
ChaCha20-Poly1305); no compression; the server's cipher order wins. TLS 1.3 suites
are all AEAD with forward secrecy and are left at OpenSSL's defaults.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Union

log = logging.getLogger("dicomrouter.tls")

StrPath = Union[str, "os.PathLike[str]"]  # noqa: UP007 - a runtime alias

#: TLS 1.2 cipher suites allowed (OpenSSL syntax): ECDHE or DHE key exchange with
#: AES-GCM or ChaCha20-Poly1305, never anonymous, unencrypted, MD5, DSS, RC4 or 3DES.
BCP195_CIPHERS = (
    "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL:!MD5:!DSS:!RC4:!3DES:!SHA1"
)
#: The oldest protocol version negotiated.
MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2


class TlsError(Exception):
    """A certificate, key or CA file that cannot be used; the message names the file."""


def _harden(context: ssl.SSLContext) -> ssl.SSLContext:
    context.minimum_version = MINIMUM_VERSION
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    context.options |= ssl.OP_NO_RENEGOTIATION
    context.set_ciphers(BCP195_CIPHERS)
    return context


def _load_chain(context: ssl.SSLContext, certificate: StrPath, private_key: StrPath) -> None:
    try:
        context.load_cert_chain(os.fspath(certificate), os.fspath(private_key))
    except FileNotFoundError as exc:
        raise TlsError(f"{exc.filename or certificate}: no such file") from None
    except PermissionError as exc:
        raise TlsError(f"{exc.filename or certificate}: permission denied") from None
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise TlsError(
                f"{os.fspath(private_key)} is not the private key of {os.fspath(certificate)}"
            ) from None
        raise TlsError(
            f"certificate {os.fspath(certificate)} with key {os.fspath(private_key)}: "
            f"not a PEM certificate and matching unencrypted private key ({exc.reason or exc})"
        ) from None
    except OSError as exc:
        raise TlsError(f"{os.fspath(certificate)}: {exc.strerror or exc}") from None


def _load_cas(context: ssl.SSLContext, ca_certificates: StrPath) -> None:
    try:
        context.load_verify_locations(cafile=os.fspath(ca_certificates))
    except FileNotFoundError:
        raise TlsError(f"{os.fspath(ca_certificates)}: no such file") from None
    except PermissionError:
        raise TlsError(f"{os.fspath(ca_certificates)}: permission denied") from None
    except ssl.SSLError as exc:
        raise TlsError(
            f"{os.fspath(ca_certificates)}: not a PEM certificate bundle ({exc.reason or exc})"
        ) from None
    except OSError as exc:
        raise TlsError(f"{os.fspath(ca_certificates)}: {exc.strerror or exc}") from None


def _server_verify_mode(ca_certificates: StrPath | None, require: bool) -> ssl.VerifyMode:
    if require:
        return ssl.CERT_REQUIRED
    return ssl.CERT_OPTIONAL if ca_certificates is not None else ssl.CERT_NONE


def server_context(
    certificate: StrPath,
    private_key: StrPath,
    ca_certificates: StrPath | None = None,
    require_client_certificate: bool = False,
) -> ssl.SSLContext:
    """A listener's context: present ``certificate`` (PEM, the chain after the leaf)
    with ``private_key`` (PEM, unencrypted). With ``ca_certificates`` (a PEM bundle)
    a client certificate is asked for and verified against it; with
    ``require_client_certificate`` a client without one is refused. Raises
    :class:`TlsError` naming the file that cannot be used."""
    if require_client_certificate and ca_certificates is None:
        raise TlsError("require_client_certificate needs ca_certificates to verify them")
    context = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    _load_chain(context, certificate, private_key)
    if ca_certificates is not None:
        _load_cas(context, ca_certificates)
    context.verify_mode = _server_verify_mode(ca_certificates, require_client_certificate)
    return context


def client_context(
    ca_certificates: StrPath | None = None,
    certificate: StrPath | None = None,
    private_key: StrPath | None = None,
    verify_hostname: bool = True,
) -> ssl.SSLContext:
    """A connection's context: the peer's certificate is always verified, against
    ``ca_certificates`` (a PEM bundle) or, when None, the system trust store; its
    name is checked against the host connected to unless ``verify_hostname`` is
    false (pass that host as ``server_hostname`` when wrapping). ``certificate`` and
    ``private_key`` (both or neither) are presented for mutual TLS."""
    if (certificate is None) != (private_key is None):
        raise TlsError("a client certificate needs its private key, and the key its certificate")
    context = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    context.check_hostname = verify_hostname
    context.verify_mode = ssl.CERT_REQUIRED
    if ca_certificates is not None:
        _load_cas(context, ca_certificates)
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if certificate is not None and private_key is not None:
        _load_chain(context, certificate, private_key)
    return context


class ReloadableServerContext:
    """A :func:`server_context` whose files are read again by :meth:`reload`.

    The same ``ssl.SSLContext`` object stays in service (a listening socket, an
    asyncio server or uvicorn keeps a reference to it): ``reload`` loads the new
    certificate, key and CAs into it, so every handshake after it presents the new
    certificate; connections already established are not touched. The new files
    are first loaded into a scratch context: when they are missing or bad (a key
    that does not match, a half-written file), the error is logged and the context
    keeps serving the old certificate.

    CA certificates are added to the trust store on reload; one removed from the
    bundle stays trusted until a restart."""

    def __init__(
        self,
        certificate: StrPath,
        private_key: StrPath,
        ca_certificates: StrPath | None = None,
        require_client_certificate: bool = False,
        name: str = "TLS",
    ) -> None:
        self.certificate = Path(certificate)
        self.private_key = Path(private_key)
        self.ca_certificates = None if ca_certificates is None else Path(ca_certificates)
        self.require_client_certificate = require_client_certificate
        self.name = name
        self._lock = threading.Lock()
        self.context = server_context(
            self.certificate, self.private_key, self.ca_certificates, require_client_certificate
        )

    def reload(self) -> bool:
        """Load the files again into :attr:`context`. True when the new certificate
        is in service, False (logged as an error) when the old one is kept."""
        with self._lock:
            try:
                # Everything that can fail, on a scratch context first.
                server_context(
                    self.certificate,
                    self.private_key,
                    self.ca_certificates,
                    self.require_client_certificate,
                )
                _load_chain(self.context, self.certificate, self.private_key)
                if self.ca_certificates is not None:
                    _load_cas(self.context, self.ca_certificates)
            except TlsError as exc:
                log.error(
                    "%s certificate not reloaded, the old one stays in use: %s", self.name, exc
                )
                return False
        log.info("%s certificate reloaded from %s", self.name, self.certificate)
        return True


def certificate_not_after(path: StrPath) -> datetime:
    """When the certificate file at ``path`` (PEM) stops being valid, as an aware UTC
    datetime. A file with several certificates (a chain, a CA bundle) expires with
    the first of them to expire. Raises :class:`TlsError` if none can be read."""
    # cryptography, not ssl: python's ssl reads a certificate's dates only from a
    # peer, or through a private helper (ssl._ssl._test_decode_cert).
    from cryptography import x509

    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise TlsError(f"{os.fspath(path)}: {exc.strerror or exc}") from None
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise TlsError(f"{os.fspath(path)}: not a PEM certificate") from None
    return min(cert.not_valid_after_utc for cert in certificates).astimezone(UTC)
