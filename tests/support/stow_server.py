"""A small STOW-RS server for the DICOMweb sender's unit tests: a real HTTP server
on a free local port (so the sender's real client, streaming and ``Content-Length``
are exercised), answering each request as the test says.

Each request is recorded (:class:`Received`): headers, the parts of its
``multipart/related`` body parsed back with the standard library's MIME parser,
their SOP Instance UIDs, and the body's length and SHA-256. ``keep_body=False`` reads
the body in blocks and keeps only its length and hash (a 200 MB request stays out of
memory). Response bodies are built with :func:`stow_json` and :func:`stow_xml`.
"""

from __future__ import annotations

import email.parser
import email.policy
import hashlib
import io
import json
import ssl
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from pydicom import dcmread


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    length: int = 0
    sha256: str = ""
    parts: list[bytes] = field(default_factory=list)
    part_types: list[str] = field(default_factory=list)

    @property
    def uids(self) -> list[str]:
        return [str(dcmread(io.BytesIO(part)).SOPInstanceUID) for part in self.parts]


#: (status, content type, body) for a request.
Answer = tuple[int, str, bytes]
Responder = Callable[[Received], Answer]


def stow_json(
    stored: list[str] = (),  # type: ignore[assignment]
    failed: list[tuple[str, int | None]] = (),  # type: ignore[assignment]
    warnings: dict[str, int] | None = None,
) -> bytes:
    """A Store Instances Response (PS3.18 Table 10.5.3-1) in the DICOM JSON model."""
    warnings = warnings or {}

    def item(uid: str, reason_tag: str, reason: int | None) -> dict[str, object]:
        out: dict[str, object] = {
            "00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.2"]},
            "00081155": {"vr": "UI", "Value": [uid]},
        }
        if reason is not None:
            out[reason_tag] = {"vr": "US", "Value": [reason]}
        return out

    data: dict[str, object] = {"00081190": {"vr": "UR", "Value": ["http://x/studies/1"]}}
    if stored:
        data["00081199"] = {
            "vr": "SQ",
            "Value": [item(uid, "00081196", warnings.get(uid)) for uid in stored],
        }
    if failed:
        data["00081198"] = {
            "vr": "SQ",
            "Value": [item(uid, "00081197", reason) for uid, reason in failed],
        }
    return json.dumps([data]).encode()


def stow_xml(
    stored: list[str] = (),  # type: ignore[assignment]
    failed: list[tuple[str, int | None]] = (),  # type: ignore[assignment]
    warnings: dict[str, int] | None = None,
) -> bytes:
    """The same response in the Native DICOM Model (``application/dicom+xml``), with
    its namespace (PS3.19 A.1), as Orthanc writes it."""
    warnings = warnings or {}

    def item(number: int, uid: str, tag: str, keyword: str, reason: int | None) -> str:
        text = (
            f'<Item number="{number}"><DicomAttribute tag="00081155" vr="UI" '
            f'keyword="ReferencedSOPInstanceUID"><Value number="1">{uid}</Value>'
            "</DicomAttribute>"
        )
        if reason is not None:
            text += (
                f'<DicomAttribute tag="{tag}" vr="US" keyword="{keyword}">'
                f'<Value number="1">{reason}</Value></DicomAttribute>'
            )
        return text + "</Item>"

    out = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        '<NativeDicomModel xmlns="http://dicom.nema.org/PS3.19/models/NativeDICOM">',
    ]
    if stored:
        out.append('<DicomAttribute tag="00081199" vr="SQ" keyword="ReferencedSOPSequence">')
        out += [
            item(n, uid, "00081196", "WarningReason", warnings.get(uid))
            for n, uid in enumerate(stored, 1)
        ]
        out.append("</DicomAttribute>")
    if failed:
        out.append('<DicomAttribute tag="00081198" vr="SQ" keyword="FailedSOPSequence">')
        out += [
            item(n, uid, "00081197", "FailureReason", reason)
            for n, (uid, reason) in enumerate(failed, 1)
        ]
        out.append("</DicomAttribute>")
    out.append("</NativeDicomModel>")
    return "".join(out).encode()


def all_stored(request: Received) -> Answer:
    return 200, "application/dicom+json", stow_json(request.uids)


class StowServer:
    """Answers with ``respond`` (default: everything stored); records requests."""

    def __init__(
        self,
        respond: Responder = all_stored,
        keep_body: bool = True,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.respond = respond
        self.keep_body = keep_body
        self.received: list[Received] = []
        self.delay = 0.0
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                request = Received("GET", self.path, dict(self.headers.items()))
                server.received.append(request)
                self._answer(*server.respond(request))

            def do_POST(self) -> None:
                request = Received("POST", self.path, dict(self.headers.items()))
                length = int(self.headers.get("Content-Length") or 0)
                digest = hashlib.sha256()
                body = bytearray()
                left = length
                while left:
                    block = self.rfile.read(min(left, 1 << 20))
                    if not block:
                        break
                    left -= len(block)
                    digest.update(block)
                    if server.keep_body:
                        body += block
                request.length, request.sha256 = length - left, digest.hexdigest()
                if server.keep_body:
                    request.parts, request.part_types = _parse(
                        self.headers.get("Content-Type", ""), bytes(body)
                    )
                server.received.append(request)
                if server.delay:
                    threading.Event().wait(server.delay)
                self._answer(*server.respond(request))

            def _answer(self, status: int, content_type: str, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        scheme = "https" if tls is not None else "http"
        self.url = f"{scheme}://127.0.0.1:{self.port}/dicom-web"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def posts(self) -> list[Received]:
        return [r for r in self.received if r.method == "POST"]

    def start(self) -> StowServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _parse(content_type: str, body: bytes) -> tuple[list[bytes], list[str]]:
    """The parts of a ``multipart/related`` body, by the standard MIME parser."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body
    )
    parts, types = [], []
    for part in message.iter_parts():  # type: ignore[attr-defined]
        payload = part.get_payload(decode=True)
        parts.append(bytes(payload))
        types.append(part.get_content_type())
    return parts, types


@contextmanager
def stow_server(
    respond: Responder = all_stored, keep_body: bool = True, tls: ssl.SSLContext | None = None
) -> Iterator[StowServer]:
    """A started :class:`StowServer` (HTTPS with the server context ``tls``)."""
    server = StowServer(respond, keep_body, tls).start()
    try:
        yield server
    finally:
        server.stop()
