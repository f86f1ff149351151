"""The DICOMweb sender (``type: dicomweb``, STOW-RS) against a small real HTTP server
(tests/support/stow_server.py): the multipart body byte for byte, requests split by
``max_instances`` and ``max_bytes``, the Store Instances Response in JSON and XML,
each HTTP status class, credentials, timeouts, flat memory on a large instance."""

from __future__ import annotations

import base64
import io
import socket
import threading
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.uid import RLELossless

from dicomrouter import tls
from dicomrouter.config import ConfigError, load_config_text
from dicomrouter.config.lint import lint
from dicomrouter.config.models import DicomwebDestinationConfig
from dicomrouter.destinations import (
    DestinationUnavailable,
    InstanceResult,
    Outcome,
    OutgoingInstance,
    PreparedFile,
    Sender,
    SenderOptions,
    create_sender,
)
from dicomrouter.destinations.dicomweb import DicomwebSender
from dicomrouter.destinations.stow import MultipartBody, Part, parse_response
from dicomrouter.transforms import TransformRefused
from tests.support.dcmtk import free_port
from tests.support.outgoing import outgoing
from tests.support.stow_server import Received, stow_json, stow_server, stow_xml
from tests.support.synth import make_study

JSON = "application/dicom+json"
XML = "application/dicom+xml"


def sender(url: str, environ: dict[str, str] | None = None, **extra: Any) -> DicomwebSender:
    config = DicomwebDestinationConfig(type="dicomweb", url=url, **extra)
    return DicomwebSender(config, "ai", environ=environ or {})


def by_key(results: list[InstanceResult]) -> dict[int, InstanceResult]:
    return {r.key: r for r in results}


@pytest.fixture
def study(tmp_path: Path) -> list[Path]:
    return make_study(tmp_path / "in", 10, series_count=2)


# -- the request body ---------------------------------------------------------------


def test_the_body_is_multipart_related_with_each_file_byte_for_byte(study: list[Path]) -> None:
    with stow_server() as server:
        reported: list[InstanceResult] = []
        results = sender(server.url).send(outgoing(study[:5]), on_result=reported.append)
    assert [r.outcome for r in results] == [Outcome.SUCCESS] * 5 and reported == results
    [post] = server.posts
    assert post.path == "/dicom-web/studies"
    content_type = post.headers["Content-Type"]
    assert content_type.startswith('multipart/related; type="application/dicom"; boundary=')
    assert "Transfer-Encoding" not in post.headers
    assert int(post.headers["Content-Length"]) == post.length
    assert "application/dicom+json" in post.headers["Accept"]
    assert post.part_types == ["application/dicom"] * 5
    assert post.parts == [path.read_bytes() for path in study[:5]]


def test_the_body_length_is_known_before_it_is_sent(tmp_path: Path) -> None:
    files = [tmp_path / "a", tmp_path / "b"]
    files[0].write_bytes(b"\r\n--x\r\n" * 3)
    files[1].write_bytes(b"")
    body = MultipartBody([Part(files[0]), Part(files[1]), Part(b"in memory")])
    assert len(body) == len(b"".join(body)) == len(b"".join(body))  # can be sent again


def test_requests_hold_at_most_max_instances(study: list[Path]) -> None:
    with stow_server() as server:
        results = sender(server.url, max_instances=3).send(outgoing(study))
    assert [len(p.parts) for p in server.posts] == [3, 3, 3, 1]
    assert [p for post in server.posts for p in post.parts] == [f.read_bytes() for f in study]
    assert all(r.outcome is Outcome.SUCCESS for r in results) and len(results) == 10


def test_requests_hold_at_most_max_bytes_and_a_larger_instance_goes_alone(
    study: list[Path], tmp_path: Path
) -> None:
    size = study[0].stat().st_size
    big = make_study(tmp_path / "big", 1, rows=256, cols=256)[0]
    assert big.stat().st_size > 3 * size
    files = [*study[:3], big, *study[3:5]]
    with stow_server() as server:
        results = sender(server.url, max_bytes=int(2.5 * size)).send(outgoing(files))
    assert [len(p.parts) for p in server.posts] == [2, 1, 1, 2]
    assert server.posts[2].parts == [big.read_bytes()]
    assert all(r.outcome is Outcome.SUCCESS for r in results) and len(results) == 6


# -- the response --------------------------------------------------------------------


@pytest.mark.parametrize(("media", "build"), [(JSON, stow_json), (XML, stow_xml)])
def test_each_instance_gets_the_state_the_response_gives_it(
    study: list[Path], media: str, build: Any
) -> None:
    batch = outgoing(study[:6])
    uids = [inst.sop_instance_uid for inst in batch]

    def respond(request: Received) -> tuple[int, str, bytes]:
        body = build(
            stored=uids[:2],
            warnings={uids[1]: 0xB000},
            failed=[(uids[2], 0xA700), (uids[3], 0xC000), (uids[4], 0x0122)],
        )
        return 202, media, body

    with stow_server(respond) as server:
        results = by_key(sender(server.url).send(batch))
    assert results[0].outcome is Outcome.SUCCESS
    assert results[1].outcome is Outcome.WARNING and results[1].status == 0xB000
    assert results[2].outcome is Outcome.TRANSIENT and results[2].status == 0xA700
    assert results[3].outcome is Outcome.PERMANENT and results[3].status == 0xC000
    assert results[4].outcome is Outcome.PERMANENT and "0x0122" in results[4].message
    # Named nowhere: sent again rather than assumed stored.
    assert results[5].outcome is Outcome.TRANSIENT
    assert "not named in the server's response" in results[5].message


def test_a_bare_200_says_every_instance_was_stored(study: list[Path]) -> None:
    with stow_server(lambda request: (200, "text/plain", b"")) as server:
        results = sender(server.url).send(outgoing(study[:3]))
    assert [r.outcome for r in results] == [Outcome.SUCCESS] * 3


@pytest.mark.parametrize("reason", [0x0000, 0xB000, None])
def test_an_instance_in_the_failed_sop_sequence_is_never_delivered(
    study: list[Path], reason: int | None
) -> None:
    """A Failure Reason of 0x0000 or 0xBxxx is the server's mistake, not a store."""
    batch = outgoing(study[:2])
    uids = [inst.sop_instance_uid for inst in batch]
    answer = stow_json(stored=[uids[0]], failed=[(uids[1], reason)])
    with stow_server(lambda request: (202, JSON, answer)) as server:
        results = by_key(sender(server.url).send(batch))
    assert results[0].outcome is Outcome.SUCCESS
    assert results[1].outcome is Outcome.PERMANENT and results[1].status == reason
    assert "not stored" in results[1].message or "refused" in results[1].message


@pytest.mark.parametrize("reason", [0xA700, 0xA7FF, 0x0213])
def test_out_of_resources_in_the_failed_sop_sequence_is_transient(
    study: list[Path], reason: int
) -> None:
    batch = outgoing(study[:1])
    answer = stow_json(failed=[(batch[0].sop_instance_uid, reason)])
    with stow_server(lambda request: (202, JSON, answer)) as server:
        [result] = sender(server.url).send(batch)
    assert result.outcome is Outcome.TRANSIENT and result.status == reason


@pytest.mark.parametrize(
    ("media", "body"),
    [
        ("text/html", b"<html><body>Please sign in</body></html>"),
        (JSON, b'{"status": "ok"}'),
        (XML, b"<html><body>Please sign in</body></html>"),
    ],
)
def test_a_200_that_is_not_a_store_response_is_not_trusted(
    study: list[Path], media: str, body: bytes
) -> None:
    """A proxy's sign-in page answers 200 too: its instances are sent again."""
    with stow_server(lambda request: (200, media, body)) as server:
        results = sender(server.url).send(outgoing(study[:2]))
    assert [r.outcome for r in results] == [Outcome.TRANSIENT] * 2
    assert "but not a Store Instances Response" in results[0].message
    assert body.decode()[:20] in results[0].message


def test_a_200_whose_response_names_nothing_says_every_instance_was_stored(
    study: list[Path],
) -> None:
    with stow_server(lambda request: (200, JSON, b"[{}]")) as server:
        results = sender(server.url).send(outgoing(study[:2]))
    assert [r.outcome for r in results] == [Outcome.SUCCESS] * 2


@pytest.mark.parametrize(
    ("media", "build", "quote"), [(JSON, stow_json, b'"'), (XML, stow_xml, b"")]
)
def test_one_unreadable_reason_leaves_the_rest_of_the_response_readable(
    study: list[Path], media: str, build: Any, quote: bytes
) -> None:
    """A Failure Reason sent as text ("Processing failure") is shown, the instance
    failed for good; the others keep what the response says of them."""
    batch = outgoing(study[:3])
    uids = [inst.sop_instance_uid for inst in batch]
    answer = build(stored=uids[:2], warnings={uids[1]: 0xB007}, failed=[(uids[2], 0xC000)])
    answer = answer.replace(b"45063", quote + b"Coerced " + quote)
    answer = answer.replace(b"49152", quote + b"Processing failure" + quote)
    with stow_server(lambda request: (200, media, answer)) as server:
        results = by_key(sender(server.url).send(batch))
    assert results[0].outcome is Outcome.SUCCESS
    assert results[1].outcome is Outcome.WARNING and "'Coerced'" in results[1].message
    assert results[2].outcome is Outcome.PERMANENT and results[2].status is None
    assert "failure reason 'Processing failure'" in results[2].message


def test_responses_in_either_encoding_parse_the_same() -> None:
    for media, build in ((JSON, stow_json), (XML, stow_xml)):
        answer = parse_response(
            media, build(stored=["1.2", "1.3"], warnings={"1.3": 45056}, failed=[("1.4", 272)])
        )
        assert answer.readable
        assert answer.stored == {"1.2": None, "1.3": 0xB000}
        assert answer.failed == {"1.4": 0x0110}
    assert not parse_response(JSON, b"<html>oops</html>").readable
    assert not parse_response(JSON, b'{"ok": true}').readable
    assert parse_response(JSON, b"[{}]").readable


# -- HTTP statuses ---------------------------------------------------------------------


def test_409_fails_the_named_instances_for_good(study: list[Path]) -> None:
    batch = outgoing(study[:3])
    uids = [inst.sop_instance_uid for inst in batch]
    answer = stow_json(failed=[(uids[0], 0xC122), (uids[1], None)])
    with stow_server(lambda request: (409, JSON, answer)) as server:
        results = by_key(sender(server.url).send(batch))
    assert [results[k].outcome for k in range(3)] == [Outcome.PERMANENT] * 3
    assert results[0].status == 0xC122 and "HTTP 409" in results[1].message


def test_400_fails_the_request_for_good_and_the_next_request_goes_on(study: list[Path]) -> None:
    calls: list[int] = []

    def respond(request: Received) -> tuple[int, str, bytes]:
        calls.append(1)
        if len(calls) == 1:
            return 400, "text/plain", b"bad multipart"
        return 200, JSON, stow_json(request.uids)

    with stow_server(respond) as server:
        results = by_key(sender(server.url, max_instances=2).send(outgoing(study[:4])))
    assert [results[k].outcome for k in range(4)] == [Outcome.PERMANENT] * 2 + [Outcome.SUCCESS] * 2
    assert "HTTP 400" in results[0].message and "bad multipart" in results[0].message


def test_a_500_retries_that_request_and_the_others_go_on(study: list[Path]) -> None:
    calls: list[int] = []

    def respond(request: Received) -> tuple[int, str, bytes]:
        calls.append(1)
        if len(calls) == 2:
            return 500, "text/plain", b"internal error"
        return 200, JSON, stow_json(request.uids)

    with stow_server(respond) as server:
        results = by_key(sender(server.url, max_instances=2).send(outgoing(study[:6])))
    outcomes = [results[k].outcome for k in range(6)]
    assert outcomes == [Outcome.SUCCESS] * 2 + [Outcome.TRANSIENT] * 2 + [Outcome.SUCCESS] * 2


def test_503_before_anything_is_answered_makes_the_destination_unavailable(
    study: list[Path],
) -> None:
    reported: list[InstanceResult] = []
    with (
        stow_server(lambda request: (503, "text/plain", b"maintenance")) as server,
        pytest.raises(DestinationUnavailable, match="HTTP 503") as caught,
    ):
        sender(server.url).send(outgoing(study[:3]), on_result=reported.append)
    assert not caught.value.pause and reported == []


def test_503_part_way_keeps_what_was_stored_and_retries_the_rest(study: list[Path]) -> None:
    calls: list[int] = []

    def respond(request: Received) -> tuple[int, str, bytes]:
        calls.append(1)
        if len(calls) == 1:
            return 200, JSON, stow_json(request.uids)
        return 503, "text/plain", b""

    with stow_server(respond) as server:
        results = by_key(sender(server.url, max_instances=2).send(outgoing(study[:6])))
    outcomes = [results[k].outcome for k in range(6)]
    assert outcomes == [Outcome.SUCCESS] * 2 + [Outcome.TRANSIENT] * 4
    assert len(server.posts) == 2  # nothing more was tried once the server said 503


@pytest.mark.parametrize(
    ("status", "words"), [(401, "credentials refused"), (403, "access forbidden")]
)
def test_refused_credentials_pause_the_destination_with_the_reason(
    study: list[Path], status: int, words: str
) -> None:
    with (
        stow_server(lambda request: (status, "text/plain", b"no")) as server,
        pytest.raises(DestinationUnavailable) as caught,
    ):
        sender(server.url).send(outgoing(study[:2]))
    assert caught.value.pause
    assert f"HTTP {status} from {server.url}/studies: {words}" in str(caught.value)
    assert "check destinations.ai.auth" in str(caught.value)


def test_a_url_that_is_not_stow_rs_is_unavailable_with_the_key_to_fix(study: list[Path]) -> None:
    with (
        stow_server(lambda request: (404, "text/plain", b"")) as server,
        pytest.raises(DestinationUnavailable, match=r"destinations\.ai\.url"),
    ):
        sender(server.url).send(outgoing(study[:1]))


def test_a_server_that_is_down_is_unavailable(study: list[Path]) -> None:
    url = f"http://127.0.0.1:{free_port()}/dicom-web"
    with pytest.raises(DestinationUnavailable, match="cannot connect"):
        sender(url).send(outgoing(study[:2]))
    with pytest.raises(DestinationUnavailable, match="cannot connect"):
        sender(url).probe()


def test_a_server_that_accepts_but_never_answers_is_unavailable(study: list[Path]) -> None:
    """Connections are taken (the kernel's backlog) but nothing is ever answered: as a
    refused connection, the destination is paused and probed rather than each job
    using up its attempts."""
    listener = socket.create_server(("127.0.0.1", 0))
    reported: list[InstanceResult] = []
    try:
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/dicom-web"
        with pytest.raises(DestinationUnavailable, match="no answer in time") as caught:
            sender(url, timeout=0.5).send(outgoing(study[:2]), on_result=reported.append)
    finally:
        listener.close()
    assert not caught.value.pause and reported == []


def test_a_timeout_after_a_first_answer_leaves_the_rest_transient(study: list[Path]) -> None:
    calls: list[int] = []

    def respond(request: Received) -> tuple[int, str, bytes]:
        calls.append(1)
        if len(calls) > 1:
            threading.Event().wait(3.0)
        return 200, JSON, stow_json(request.uids)

    with stow_server(respond) as server:
        results = by_key(sender(server.url, timeout=0.5, max_instances=2).send(outgoing(study)))
    outcomes = [results[k].outcome for k in range(len(study))]
    assert outcomes == [Outcome.SUCCESS] * 2 + [Outcome.TRANSIENT] * (len(study) - 2)
    assert "no answer in time" in results[2].message and len(server.posts) == 2


def test_a_connection_cut_after_the_first_request_retries_the_rest(study: list[Path]) -> None:
    """A server that answers once, then closes every connection it accepts."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    stop = threading.Event()

    def serve() -> None:
        first = True
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                if not first:
                    continue  # closed at once
                first = False
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                head, _, rest = data.partition(b"\r\n\r\n")
                length = int(
                    next(
                        line.split(b":")[1]
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length")
                    )
                )
                while len(rest) < length:
                    rest += conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        results = by_key(
            sender(f"http://127.0.0.1:{port}/x", max_instances=2).send(outgoing(study[:4]))
        )
    finally:
        stop.set()
        listener.close()
    outcomes = [results[k].outcome for k in range(4)]
    assert outcomes == [Outcome.SUCCESS] * 2 + [Outcome.TRANSIENT] * 2


def test_a_request_too_large_for_the_server_is_halved_until_it_fits(
    study: list[Path], tmp_path: Path
) -> None:
    """A server with a body limit (nginx's client_max_body_size) of 2.5 instances:
    413 splits the request, each instance arrives once, a transformed copy lives
    until its last request."""
    limit = int(2.5 * study[0].stat().st_size)

    def respond(request: Received) -> tuple[int, str, bytes]:
        if request.length > limit:
            return 413, "text/html", b"<html>413 Request Entity Too Large</html>"
        return 200, JSON, stow_json(request.uids)

    batch = outgoing(study[:6])
    copy = tmp_path / "copy.dcm"
    copy.write_bytes(study[0].read_bytes())
    first = batch[0]
    batch[0] = OutgoingInstance(
        **{
            **first.__dict__,
            "prepare": lambda: PreparedFile(
                copy, first.sop_instance_uid, first.transfer_syntax_uid, "copy"
            ),
        }
    )
    with stow_server(respond) as server:
        results = by_key(sender(server.url).send(batch))
    assert [results[k].outcome for k in range(6)] == [Outcome.SUCCESS] * 6
    assert [len(p.parts) for p in server.posts] == [6, 3, 1, 2, 3, 1, 2]
    stored = [part for post in server.posts if post.length <= limit for part in post.parts]
    assert stored == [path.read_bytes() for path in study[:6]]
    assert not copy.exists()


def test_one_instance_too_large_for_the_server_fails_naming_the_limits(
    study: list[Path],
) -> None:
    with stow_server(lambda request: (413, "text/html", b"Request Entity Too Large")) as server:
        [result] = sender(server.url).send(outgoing(study[:1]))
    assert result.outcome is Outcome.PERMANENT and len(server.posts) == 1
    assert "HTTP 413" in result.message and "client_max_body_size" in result.message
    assert "destinations.ai.max_bytes" in result.message


# -- credentials -------------------------------------------------------------------------


def test_basic_and_bearer_credentials_come_from_the_environment(study: list[Path]) -> None:
    with stow_server() as server:
        sender(
            server.url,
            environ={"PW": "s3cret"},
            auth={"type": "basic", "username": "router", "password_env": "PW"},
        ).send(outgoing(study[:1]))
        sender(
            server.url, environ={"TOK": "abc.def"}, auth={"type": "bearer", "token_env": "TOK"}
        ).send(outgoing(study[:1]))
    basic, bearer = (post.headers["Authorization"] for post in server.posts)
    assert basic == "Basic " + base64.b64encode(b"router:s3cret").decode()
    assert bearer == "Bearer abc.def"


def test_a_missing_secret_pauses_and_sends_nothing(study: list[Path]) -> None:
    with stow_server() as server:
        unset = sender(server.url, auth={"type": "bearer", "token_env": "NOT_SET_HERE"})
        with pytest.raises(DestinationUnavailable) as caught:
            unset.send(outgoing(study[:1]))
        with pytest.raises(DestinationUnavailable):
            unset.probe()
    assert caught.value.pause and server.received == []
    assert "NOT_SET_HERE (destinations.ai.auth.token_env) is not set" in str(caught.value)


# -- TLS ------------------------------------------------------------------------------------


def test_https_verifies_the_server_against_the_configured_cas(study: list[Path], pki: Any) -> None:
    context = tls.server_context(pki.server_cert, pki.server_key)
    with stow_server(tls=context) as server:
        trusted = sender(server.url, tls={"ca_certificates": pki.ca_cert})
        assert trusted.send(outgoing(study[:1]))[0].outcome is Outcome.SUCCESS
        with pytest.raises(DestinationUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
            sender(server.url, tls={"ca_certificates": pki.rogue_ca}).send(outgoing(study[:1]))
    assert len(server.posts) == 1


def test_verify_false_accepts_any_certificate(study: list[Path], pki: Any) -> None:
    context = tls.server_context(pki.rogue_cert, pki.rogue_key)
    with stow_server(tls=context) as server:
        anyone = sender(server.url, tls={"verify": False})
        assert anyone.send(outgoing(study[:1]))[0].outcome is Outcome.SUCCESS


def test_a_client_certificate_for_mutual_tls(study: list[Path], pki: Any) -> None:
    context = tls.server_context(pki.server_cert, pki.server_key, pki.ca_cert, True)
    with stow_server(tls=context) as server:
        mutual = sender(
            server.url,
            tls={
                "ca_certificates": pki.ca_cert,
                "certificate": pki.client_cert,
                "private_key": pki.client_key,
            },
        )
        assert mutual.send(outgoing(study[:1]))[0].outcome is Outcome.SUCCESS
        anonymous = sender(server.url, tls={"ca_certificates": pki.ca_cert})
        with pytest.raises(DestinationUnavailable, match=r"check destinations\.ai\.tls"):
            anonymous.send(outgoing(study[:1]))
        with pytest.raises(DestinationUnavailable):
            anonymous.probe()
    assert len(server.posts) == 1


# -- probe ---------------------------------------------------------------------------------


def test_the_probe_is_a_qido_search() -> None:
    with stow_server(lambda request: (200, JSON, b"[]")) as server:
        sender(server.url).probe()
    assert [(r.method, r.path) for r in server.received] == [("GET", "/dicom-web/studies?limit=1")]
    with (
        stow_server(lambda request: (401, "text/plain", b"")) as server,
        pytest.raises(DestinationUnavailable, match="credentials refused") as caught,
    ):
        sender(server.url).probe()
    assert caught.value.pause


# -- transforms, stopping, the registry ----------------------------------------------------


def test_transformed_copies_are_sent_and_refused_ones_are_not(
    study: list[Path], tmp_path: Path
) -> None:
    inst, other = outgoing(study[:2])
    copy = tmp_path / "copy.dcm"
    ds = dcmread(study[0])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.5"
    ds.save_as(copy, enforce_file_format=True)

    def refuse() -> PreparedFile:
        raise TransformRefused("not for this destination")

    batch = [
        OutgoingInstance(
            **{
                **inst.__dict__,
                "prepare": lambda: PreparedFile(
                    copy, "1.2.3.4.5", inst.transfer_syntax_uid, "research"
                ),
            }
        ),
        OutgoingInstance(**{**other.__dict__, "prepare": refuse}),
    ]
    sent = copy.read_bytes()
    with stow_server() as server:
        results = by_key(sender(server.url).send(batch))
    assert server.posts[0].parts == [sent]
    assert results[0].outcome is Outcome.SUCCESS and results[0].sent_uid == "1.2.3.4.5"
    assert results[0].sent_as == "research"
    assert results[1].outcome is Outcome.PERMANENT and "not for this destination" in (
        results[1].message
    )
    assert not copy.exists()  # the temporary copy is gone once sent


def test_transfer_syntax_is_honoured_by_transcoding(study: list[Path]) -> None:
    with stow_server() as server:
        results = sender(server.url, transfer_syntax="rle").send(outgoing(study[:2]))
    assert [r.outcome for r in results] == [Outcome.SUCCESS] * 2
    assert results[0].sent_transfer_syntax_uid == RLELossless
    assert results[0].sent_as is not None and "RLE Lossless" in results[0].sent_as
    for part, path in zip(server.posts[0].parts, study[:2], strict=True):
        sent, stored = dcmread(io.BytesIO(part)), dcmread(path)
        assert sent.file_meta.TransferSyntaxUID == RLELossless
        assert sent.SOPInstanceUID == stored.SOPInstanceUID
        assert (sent.pixel_array == stored.pixel_array).all()


def test_should_stop_leaves_the_rest_unsent(study: list[Path]) -> None:
    with stow_server() as server:
        seen: list[InstanceResult] = []
        results = sender(server.url, max_instances=2).send(
            outgoing(study[:6]), on_result=seen.append, should_stop=lambda: len(seen) >= 2
        )
    assert len(server.posts) == 1 and [r.key for r in results] == [0, 1]


def test_the_connection_is_kept_between_batches(study: list[Path]) -> None:
    ports: list[int] = []
    with stow_server() as server:
        original = server.httpd.RequestHandlerClass.handle

        def handle(self: Any) -> None:
            ports.append(self.client_address[1])
            original(self)

        server.httpd.RequestHandlerClass.handle = handle  # type: ignore[method-assign]
        web = sender(server.url)
        web.send(outgoing(study[:1]))
        web.send(outgoing(study[1:2]))
        web.close()
        web.send(outgoing(study[2:3]))
    assert len(server.posts) == 3 and len(set(ports)) == 2


def test_the_registry_makes_a_dicomweb_sender() -> None:
    config = DicomwebDestinationConfig(type="dicomweb", url="http://h/dw")
    made = create_sender(config, SenderOptions(name="ai", keep_alive=3.0))
    assert isinstance(made, DicomwebSender) and isinstance(made, Sender)
    assert made.name == "ai" and made.keep_alive == 3.0


# -- memory -----------------------------------------------------------------------------------


def test_a_200_mb_instance_is_streamed_with_flat_memory(tmp_path: Path) -> None:
    big = tmp_path / "big.dcm"
    with open(big, "wb") as fh:  # sparse: no disk used
        fh.truncate(200 * 1024 * 1024)
    inst = OutgoingInstance(0, big, "1.2.840.10008.5.1.4.1.1.7", "1.2.3", "1.2.840.10008.1.2.1")
    with stow_server(lambda request: (200, JSON, stow_json(["1.2.3"])), keep_body=False) as server:
        tracemalloc.start()
        try:
            results = sender(server.url).send([inst])
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert results[0].outcome is Outcome.SUCCESS
    assert server.posts[0].length > 200 * 1024 * 1024
    assert peak < 16 * 1024 * 1024, f"peak Python allocations {peak / 1e6:.1f} MB"


# -- configuration ------------------------------------------------------------------------------


def _load(text: str):  # type: ignore[no-untyped-def]
    return load_config_text(text, "t.yaml", Path("."))


def test_the_configuration_and_its_defaults() -> None:
    config = _load(
        "destinations: {ai: {type: dicomweb, url: 'https://ai.example.org/dicom-web/', "
        "max_bytes: 64MiB, timeout: 30s, auth: {type: basic, username: r, password_env: PW}}}"
    )
    dest = config.destinations["ai"]
    assert isinstance(dest, DicomwebDestinationConfig)
    assert dest.stow_url == "https://ai.example.org/dicom-web/studies"
    assert dest.max_bytes == 64 * 1024 * 1024 and dest.max_instances == 10
    assert dest.timeout == 30.0 and dest.workers == 1
    assert dest.address == "https://ai.example.org/dicom-web"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("{url: 'ftp://h/x'}", "destinations.ai.url: 'ftp://h/x' is not an http:// or https://"),
        ("{url: 'http://u:pw@h/x'}", "destinations.ai.url: no credentials in the URL"),
        ("{url: 'http://h/x', auth: {type: basic, username: u}}", "auth.password_env: required"),
        ("{url: 'http://h/x', auth: {type: bearer, token_env: 'a-b'}}", "auth.token_env: 'a-b'"),
        ("{url: 'http://h/x', auth: {type: digest}}", "destinations.ai.auth.type: Input should"),
        ("{url: 'http://h/x', tls: {verify: false}}", "destinations.ai.tls: set, but url is not"),
        ("{url: 'http://h/x', max_bytes: 10 apples}", "destinations.ai.max_bytes: invalid size"),
        ("{url: 'http://h/x', max_instances: 0}", "destinations.ai.max_instances"),
        ("{}", "destinations.ai.url: required key is missing"),
    ],
)
def test_errors_name_the_key(text: str, expected: str) -> None:
    body = text[1:-1]
    with pytest.raises(ConfigError) as caught:
        _load(f"destinations: {{ai: {{type: dicomweb{', ' + body if body else ''}}}}}")
    found = [str(e) for e in caught.value.errors]
    assert any(expected in e for e in found), found


def test_check_warns_when_the_secret_is_not_set_here() -> None:
    config = _load(
        "destinations: {ai: {type: dicomweb, url: 'http://h/x', "
        "auth: {type: bearer, token_env: STOW_TOKEN}}}\nroutes: [{name: r, to: [ai]}]"
    )
    missing = [f for f in lint(config, {}) if f.where == "destinations.ai.auth.token_env"]
    assert missing and "STOW_TOKEN is not set here" in missing[0].message
    assert not [f for f in lint(config, {"STOW_TOKEN": "x"}) if "auth" in f.where]
