"""The S3 sender (``type: s3``) against a local S3 server (moto's server mode):
keys from the layout, bytes, metadata, multipart uploads, checksums that catch a
damaged body, storage class and encryption, ``on_exists``, and the split between a
store that refuses us (pause), one that is down (unavailable) and one instance that
cannot be named (failed)."""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from dicomrouter.config import S3DestinationConfig
from dicomrouter.destinations import (
    DestinationUnavailable,
    InstanceResult,
    Outcome,
    OutgoingInstance,
    PreparedFile,
    Sender,
    create_sender,
)
from dicomrouter.destinations.layout import MAX_COMPONENT_BYTES
from dicomrouter.destinations.s3 import S3Sender
from tests.support.outgoing import outgoing, retag
from tests.support.s3 import KEY_ID, SECRET, CorruptingProxy, MotoS3, MotoS3Process
from tests.support.synth import make_study

MB = 1 << 20


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoS3]:
    server = MotoS3().start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """The standard chain finds these (no ~/.aws is read)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")


@pytest.fixture
def bucket(moto: MotoS3) -> str:
    return moto.bucket()


@pytest.fixture
def study(tmp_path: Path) -> list[Path]:
    return make_study(tmp_path / "in", 4, series_count=2, patient_id="PAT1")


def s3(url: str, bucket: str, **extra: Any) -> S3Sender:
    config = S3DestinationConfig(
        type="s3", bucket=bucket, endpoint_url=url, region="us-east-1", **extra
    )
    sender = create_sender(config)
    assert isinstance(sender, S3Sender)
    return sender


def keys(moto: MotoS3, bucket: str) -> list[str]:
    listing = moto.client().list_objects_v2(Bucket=bucket)
    return sorted(item["Key"] for item in listing.get("Contents", []))


def body(moto: MotoS3, bucket: str, key: str) -> bytes:
    return bytes(moto.client().get_object(Bucket=bucket, Key=key)["Body"].read())


def big_file(path: Path, size: int) -> Path:
    """A Part-10 file of ``size`` bytes (a study's file padded with random pixels)."""
    ds = dcmread(make_study(path.parent / "big-in", 1)[0])
    extra = size - len(Path(ds.filename).read_bytes())
    ds.PixelData = ds.PixelData + os.urandom(extra - extra % 2)
    ds.save_as(path, enforce_file_format=True)
    return path


# -- keys, bytes, metadata -------------------------------------------------------------


def test_every_instance_arrives_byte_for_byte_at_its_key(
    moto: MotoS3, bucket: str, study: list[Path]
) -> None:
    sender = s3(moto.url, bucket, prefix="incoming/dicom/")
    assert isinstance(sender, Sender)
    seen: list[InstanceResult] = []
    results = sender.send(outgoing(study), on_result=seen.append)
    assert [r.outcome for r in results] == [Outcome.SUCCESS] * 4, results
    assert seen == results
    expected = []
    for path, result in zip(study, results, strict=True):
        ds = dcmread(path, stop_before_pixels=True)
        key = (
            f"incoming/dicom/PAT1/{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/"
            f"{ds.SOPInstanceUID}.dcm"
        )
        expected.append(key)
        assert body(moto, bucket, key) == path.read_bytes()
        assert result.message == f"uploaded to {key}"
        head = moto.client().head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
        assert head["ContentType"] == "application/dicom"
        assert head["Metadata"] == {
            "sop-class-uid": ds.SOPClassUID,
            "sop-instance-uid": ds.SOPInstanceUID,
            "study-instance-uid": ds.StudyInstanceUID,
            "series-instance-uid": ds.SeriesInstanceUID,
            "transfer-syntax-uid": ds.file_meta.TransferSyntaxUID,
        }
        digest = hashlib.sha256(path.read_bytes()).digest()
        assert head["ChecksumSHA256"] == base64.b64encode(digest).decode()
        assert head["ETag"].strip('"') == hashlib.md5(path.read_bytes()).hexdigest()
    assert keys(moto, bucket) == sorted(expected)
    sender.probe()
    sender.close()


@pytest.mark.filterwarnings("ignore:The value length")
def test_a_hostile_value_never_leaves_the_prefix(tmp_path: Path, moto: MotoS3, bucket: str) -> None:
    files = make_study(tmp_path / "in", 5)
    hostile = ["../../etc", "/abs/olute", "..", "a\x00b", "x" * 300]
    for path, value in zip(files, hostile, strict=True):
        retag(path, PatientID=value)
    sender = s3(moto.url, bucket, prefix="safe", layout="{PatientID}/{PatientID}.dcm")
    results = sender.send(outgoing(files))
    assert [r.outcome for r in results] == [Outcome.SUCCESS] * 5, results
    found = keys(moto, bucket)
    assert len(found) == 5
    for key in found:
        first, *names = key.split("/")
        assert first == "safe" and len(names) == 2, key
        for name in names:
            assert name not in ("", ".", "..") and "\x00" not in name and "\\" not in name
            assert len(name.encode()) <= MAX_COMPONENT_BYTES


def test_a_value_that_does_not_fit_its_format_fails_that_instance(
    moto: MotoS3, bucket: str, study: list[Path]
) -> None:
    results = s3(moto.url, bucket, layout="{PatientID:03d}/{SOPInstanceUID}.dcm").send(
        outgoing(study[:2])
    )
    assert [r.outcome for r in results] == [Outcome.PERMANENT] * 2
    assert "cannot name the object" in results[0].message
    assert keys(moto, bucket) == []


def test_should_stop_leaves_the_rest_unreported(
    moto: MotoS3, bucket: str, study: list[Path]
) -> None:
    calls = iter([False, False, True])
    results = s3(moto.url, bucket).send(outgoing(study), should_stop=lambda: next(calls))
    assert [r.key for r in results] == [0, 1]
    assert len(keys(moto, bucket)) == 2


def test_a_transformed_copy_is_uploaded_and_deleted(
    tmp_path: Path, moto: MotoS3, bucket: str, study: list[Path]
) -> None:
    copy = tmp_path / "copy.dcm"
    retag(Path(study[0]), InstitutionName="Original")
    copy.write_bytes(retag(study[0], InstitutionName="Copy").read_bytes())
    original = outgoing(study[:1])[0]

    def prepare() -> PreparedFile:
        return PreparedFile(
            copy, original.sop_instance_uid, original.transfer_syntax_uid, "mark v1"
        )

    inst = OutgoingInstance(
        original.key,
        original.path,
        original.sop_class_uid,
        original.sop_instance_uid,
        original.transfer_syntax_uid,
        prepare=prepare,
    )
    (result,) = s3(moto.url, bucket, layout="{InstitutionName}/x.dcm").send([inst])
    assert result.outcome is Outcome.SUCCESS and result.sent_as == "mark v1"
    assert keys(moto, bucket) == ["Copy/x.dcm"]
    assert not copy.exists()


def test_transfer_syntax_is_honoured(moto: MotoS3, bucket: str, study: list[Path]) -> None:
    (result,) = s3(moto.url, bucket, transfer_syntax="rle", layout="{SOPInstanceUID}.dcm").send(
        outgoing(study[:1])
    )
    assert result.outcome is Outcome.SUCCESS
    assert result.sent_transfer_syntax_uid == "1.2.840.10008.1.2.5"
    (key,) = keys(moto, bucket)
    got = dcmread(__import__("io").BytesIO(body(moto, bucket, key)))
    assert got.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.5"
    head = moto.client().head_object(Bucket=bucket, Key=key)
    assert head["Metadata"]["transfer-syntax-uid"] == "1.2.840.10008.1.2.5"


# -- multipart ---------------------------------------------------------------------------


_UPLOAD_MEASURED = """
import sys, tracemalloc
from pydicom import dcmread
from dicomrouter.config import S3DestinationConfig
from dicomrouter.destinations import OutgoingInstance
from dicomrouter.destinations.s3 import S3Sender
url, bucket, path = sys.argv[1:]
ds = dcmread(path, stop_before_pixels=True)
inst = OutgoingInstance(1, path, ds.SOPClassUID, ds.SOPInstanceUID, ds.file_meta.TransferSyntaxUID)
sender = S3Sender(S3DestinationConfig(
    type="s3", bucket=bucket, endpoint_url=url, region="us-east-1", layout="{SOPInstanceUID}.dcm",
    multipart_threshold="5MB", multipart_chunk_size="5MB"))
sender.probe()  # the client (and its service model) is made before measuring
tracemalloc.start()
(result,) = sender.send([inst])
print(result.outcome, tracemalloc.get_traced_memory()[1])
"""


def test_a_large_object_goes_up_in_parts_with_flat_memory(
    tmp_path: Path, moto: MotoS3, bucket: str
) -> None:
    path = big_file(tmp_path / "big.dcm", 20 * MB + 12345)
    # Measured in a process of its own: this one also holds the server's copy.
    run = subprocess.run(
        [sys.executable, "-c", _UPLOAD_MEASURED, moto.url, bucket, str(path)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    outcome, peak = run.stdout.split()
    assert outcome == "success", run.stderr
    # One part (and the request made of it) at a time, never the 20 MB object.
    assert int(peak) < 12 * MB, peak
    (key,) = keys(moto, bucket)
    data = path.read_bytes()
    assert body(moto, bucket, key) == data
    parts = [data[i : i + 5 * MB] for i in range(0, len(data), 5 * MB)]
    assert len(parts) == 5
    head = moto.client().head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
    md5s = b"".join(hashlib.md5(p).digest() for p in parts)
    assert head["ETag"].strip('"') == f"{hashlib.md5(md5s).hexdigest()}-5"
    shas = b"".join(hashlib.sha256(p).digest() for p in parts)
    assert head["ChecksumSHA256"].split("-")[0] == base64.b64encode(
        hashlib.sha256(shas).digest()
    ).decode() or head["ChecksumSHA256"] == base64.b64encode(hashlib.sha256(data).digest())
    assert head["ContentType"] == "application/dicom"
    for number, part in enumerate(parts, start=1):
        got = moto.client().head_object(Bucket=bucket, Key=key, PartNumber=number)
        assert got["ContentLength"] == len(part)


# -- integrity ---------------------------------------------------------------------------


def test_a_damaged_body_is_caught_and_uploaded_again(
    moto: MotoS3, bucket: str, study: list[Path]
) -> None:
    proxy = CorruptingProxy(moto.port, corrupt=1)
    try:
        sender = s3(proxy.url, bucket, layout="{SOPInstanceUID}.dcm")
        first = sender.send(outgoing(study[:2]))
        assert proxy.corrupted == 1
        assert [r.outcome for r in first] == [Outcome.TRANSIENT, Outcome.SUCCESS], first
        assert "the store holds other bytes than sent" in first[0].message
        # The damaged object was deleted: nothing wrong is left to be kept.
        uid = dcmread(study[0], stop_before_pixels=True).SOPInstanceUID
        assert f"{uid}.dcm" not in keys(moto, bucket)
        (again,) = sender.send(outgoing(study[:1]))
        assert again.outcome is Outcome.SUCCESS
        assert body(moto, bucket, f"{uid}.dcm") == study[0].read_bytes()
    finally:
        proxy.close()


def test_a_damaged_part_aborts_the_upload_and_it_goes_again(
    tmp_path: Path, moto: MotoS3, bucket: str
) -> None:
    path = big_file(tmp_path / "big.dcm", 11 * MB)
    proxy = CorruptingProxy(moto.port, corrupt=1)
    try:
        sender = s3(
            proxy.url,
            bucket,
            layout="big.dcm",
            multipart_threshold="5MB",
            multipart_chunk_size="5MB",
        )
        (first,) = sender.send(outgoing([path]))
        assert first.outcome is Outcome.TRANSIENT and "part 1" in first.message, first
        assert keys(moto, bucket) == []
        assert moto.client().list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
        (again,) = sender.send(outgoing([path]))
        assert again.outcome is Outcome.SUCCESS
        assert body(moto, bucket, "big.dcm") == path.read_bytes()
    finally:
        proxy.close()


# -- options -----------------------------------------------------------------------------


def test_storage_class_and_encryption_are_asked_for(
    moto: MotoS3, bucket: str, study: list[Path]
) -> None:
    sender = s3(
        moto.url,
        bucket,
        layout="a/{SOPInstanceUID}.dcm",
        storage_class="STANDARD_IA",
        server_side_encryption="AES256",
    )
    assert sender.send(outgoing(study[:1]))[0].outcome is Outcome.SUCCESS
    kms = s3(
        moto.url,
        bucket,
        layout="b/{SOPInstanceUID}.dcm",
        server_side_encryption="aws:kms",
        kms_key_id="alias/dicom",
        checksum="md5",
    )
    assert kms.send(outgoing(study[1:2]))[0].outcome is Outcome.SUCCESS
    a, b = keys(moto, bucket)
    head = moto.client().head_object(Bucket=bucket, Key=a)
    assert head["StorageClass"] == "STANDARD_IA" and head["ServerSideEncryption"] == "AES256"
    head = moto.client().head_object(Bucket=bucket, Key=b, ChecksumMode="ENABLED")
    assert head["ServerSideEncryption"] == "aws:kms" and head["SSEKMSKeyId"].endswith("dicom")
    assert "StorageClass" not in head  # STANDARD
    assert "ChecksumSHA256" not in head  # checksum: md5 sends Content-MD5 only


def test_on_exists_skip_keeps_the_object_there(
    moto: MotoS3, bucket: str, study: list[Path]
) -> None:
    layout = {"layout": "{PatientID}.dcm"}  # four instances, one key
    results = s3(moto.url, bucket, on_exists="skip", **layout).send(outgoing(study))
    assert [r.outcome for r in results] == [Outcome.SUCCESS] * 4
    assert results[0].message == "uploaded to PAT1.dcm"
    assert all("kept the object already at PAT1.dcm" in r.message for r in results[1:])
    assert body(moto, bucket, "PAT1.dcm") == study[0].read_bytes()
    s3(moto.url, bucket, **layout).send(outgoing(study[3:]))  # overwrite, the default
    assert body(moto, bucket, "PAT1.dcm") == study[3].read_bytes()


# -- a store that refuses us, or is down -------------------------------------------------


def test_a_missing_bucket_pauses_with_the_reason(moto: MotoS3, study: list[Path]) -> None:
    sender = s3(moto.url, "no-such-bucket-here")
    with pytest.raises(DestinationUnavailable) as caught:
        sender.send(outgoing(study))
    assert caught.value.pause
    assert "NoSuchBucket" in str(caught.value) and "no-such-bucket-here" in str(caught.value)
    with pytest.raises(DestinationUnavailable) as probed:
        sender.probe()
    assert probed.value.pause and "no-such-bucket-here" in str(probed.value)


def test_unknown_credentials_pause_with_the_reason(study: list[Path]) -> None:
    with MotoS3Process({"INITIAL_NO_AUTH_ACTION_COUNT": "0"}) as server:
        sender = s3(server.url, "some-bucket")
        with pytest.raises(DestinationUnavailable) as caught:
            sender.send(outgoing(study[:1]))
        assert caught.value.pause and "InvalidAccessKeyId" in str(caught.value)
        with pytest.raises(DestinationUnavailable) as probed:
            sender.probe()
        assert probed.value.pause and "403" in str(probed.value)


def test_a_clock_off_the_stores_pauses_naming_the_clock(study: list[Path]) -> None:
    """S3 answers RequestTimeTooSkewed with 403: no retry passes until the clock is
    fixed, so the destination is paused and the reason says what to fix."""
    error = (
        b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>RequestTimeTooSkewed</Code>'
        b"<Message>The difference between the request time and the current time is too "
        b"large.</Message><MaxAllowedSkewMilliseconds>900000</MaxAllowedSkewMilliseconds>"
        b"</Error>"
    )

    class Skewed(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_PUT(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(403)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(error)))
            self.end_headers()
            self.wfile.write(error)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Skewed)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        with pytest.raises(DestinationUnavailable) as caught:
            s3(url, "archive", addressing_style="path").send(outgoing(study[:1]))
    finally:
        server.shutdown()
        server.server_close()
    assert caught.value.pause
    assert "RequestTimeTooSkewed" in str(caught.value) and "clock" in str(caught.value)


def test_credentials_from_named_variables(
    moto: MotoS3, bucket: str, study: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    named = {"access_key_id_env": "ARCHIVE_KEY", "secret_access_key_env": "ARCHIVE_SECRET"}
    with pytest.raises(DestinationUnavailable) as caught:
        s3(moto.url, bucket, **named).send(outgoing(study[:1]))
    assert caught.value.pause and "ARCHIVE_KEY is not set" in str(caught.value)
    monkeypatch.setenv("ARCHIVE_KEY", "k")
    monkeypatch.setenv("ARCHIVE_SECRET", "s")
    assert s3(moto.url, bucket, **named).send(outgoing(study[:1]))[0].outcome is Outcome.SUCCESS


def test_a_store_that_is_down_is_unavailable_then_takes_everything(
    tmp_path: Path, study: list[Path]
) -> None:
    server = MotoS3().start()
    bucket = server.bucket()
    server.stop()
    sender = s3(server.url, bucket, connect_timeout="2s")
    with pytest.raises(DestinationUnavailable) as caught:
        sender.send(outgoing(study))
    assert not caught.value.pause
    with pytest.raises(DestinationUnavailable):
        sender.probe()
    server.start()  # same port, same buckets
    try:
        sender.probe()
        results = sender.send(outgoing(study))
        assert [r.outcome for r in results] == [Outcome.SUCCESS] * 4
        assert len(keys(server, bucket)) == 4
    finally:
        server.stop()


def test_a_store_lost_part_way_leaves_the_rest_transient(study: list[Path]) -> None:
    server = MotoS3().start()
    bucket = server.bucket()
    sender = s3(server.url, bucket, connect_timeout="2s")

    def stop_after_first(result: InstanceResult) -> None:
        server.stop()

    try:
        results = sender.send(outgoing(study), on_result=stop_after_first)
    finally:
        server.stop()
    assert [r.outcome for r in results] == [Outcome.SUCCESS] + [Outcome.TRANSIENT] * 3
    assert str(server.port) in results[1].message
