"""S3 destinations end to end: a real router process receiving from dcmtk's storescu
and uploading to a local S3 server (moto's server mode, started by these tests),
judged by the objects the server holds and by what the router's own history says."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from tests.support import require_peers
from tests.support.router import RouterProcess, all_settled, wait_until
from tests.support.s3 import MotoS3, MotoS3Process
from tests.support.synth import make_study
from tests.test_destination_s3 import MB, big_file, retag

pytestmark = pytest.mark.interop


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoS3]:
    server = MotoS3().start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def _peers(monkeypatch: pytest.MonkeyPatch) -> None:
    require_peers()
    for name, value in MotoS3().env().items():  # for the CLI's echo, run from here
        monkeypatch.setenv(name, value)


def by_uid(files: list[Path]) -> dict[str, Path]:
    return {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in files}


def held(server: MotoS3, bucket: str) -> dict[str, bytes]:
    """Key -> bytes of every object in ``bucket``: what the store really holds."""
    client = server.client()
    listing = client.list_objects_v2(Bucket=bucket).get("Contents", [])
    return {
        item["Key"]: client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
        for item in listing
    }


def data_set(raw: bytes) -> bytes:
    """A Part-10 file's bytes after its File Meta (the router writes its own)."""
    assert raw[128:132] == b"DICM" and raw[132:136] == b"\x02\x00\x00\x00"
    return raw[144 + struct.unpack("<I", raw[140:144])[0] :]


def destinations(router: RouterProcess) -> dict[str, dict[str, Any]]:
    out = router.cli("queue", "list", "--config", str(router.config_path), "--json", check=True)
    return {d["name"]: d for d in json.loads(out.stdout)["destinations"]}


def s3_destination(url: str, bucket: str, **extra: Any) -> dict[str, Any]:
    return {
        "type": "s3",
        "bucket": bucket,
        "endpoint_url": url,
        "region": "us-east-1",
        "addressing_style": "path",
        "pause_after_failures": 1,
        "probe_interval": "500ms",
        "retry": {"initial_delay": "1s", "max_delay": "2s"},
        **extra,
    }


@pytest.mark.filterwarnings("ignore:The value length")
def test_every_instance_arrives_byte_for_byte_under_the_prefix(
    tmp_path: Path, moto: MotoS3
) -> None:
    bucket = moto.bucket()
    files = make_study(tmp_path / "in", 5, series_count=2)
    files.append(big_file(tmp_path / "in" / "big.dcm", 20 * MB))  # multipart
    for path in files:  # a hostile patient ID: it must stay under the prefix
        retag(path, PatientID="../../etc/passwd")
    config = {
        "destinations": {
            "archive": s3_destination(
                moto.url,
                bucket,
                prefix="dicom",
                multipart_threshold="5MB",
                multipart_chunk_size="5MB",
                storage_class="STANDARD_IA",
                server_side_encryption="AES256",
            )
        },
        "routes": [{"name": "all", "to": ["archive"]}],
    }
    with RouterProcess(tmp_path / "router", config, env=moto.env()) as router:
        assert router.send(files).returncode == 0
        jobs = router.wait_jobs(
            lambda js: all_settled(js) and sum(j["delivered"] for j in js) == 6, 120
        )
        assert {j["state"] for j in jobs} == {"completed"}
        probe = router.cli("echo", "archive", "--config", str(router.config_path))
        assert probe.returncode == 0, probe.stdout + probe.stderr
        stored = by_uid(sorted((router.storage / "objects").rglob("*.dcm")))
    got = held(moto, bucket)
    assert len(got) == 6
    for uid, path in by_uid(files).items():
        ds = dcmread(path, stop_before_pixels=True)
        key = f"dicom/_._.._etc_passwd/{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{uid}.dcm"
        # The stored object, byte for byte; the data set as storescu sent it.
        assert got[key] == stored[uid].read_bytes()
        assert data_set(got[key]) == data_set(path.read_bytes())
        head = moto.client().head_object(Bucket=bucket, Key=key)
        assert head["StorageClass"] == "STANDARD_IA" and head["ServerSideEncryption"] == "AES256"
        assert head["Metadata"]["sop-instance-uid"] == uid
    big = next(k for k, v in got.items() if len(v) > 5 * MB)
    parts = -(-len(got[big]) // (5 * MB))
    assert parts >= 4
    assert moto.client().head_object(Bucket=bucket, Key=big)["ETag"].endswith(f'-{parts}"')


def test_a_store_down_then_back_gets_everything(tmp_path: Path) -> None:
    server = MotoS3().start()
    bucket = server.bucket()
    first = make_study(tmp_path / "a", 3, patient_id="A")
    second = make_study(tmp_path / "b", 4, patient_id="B")
    config = {
        "destinations": {"archive": s3_destination(server.url, bucket, connect_timeout="1s")},
        "routes": [{"name": "all", "to": ["archive"]}],
    }
    try:
        with RouterProcess(tmp_path / "router", config, env=server.env()) as router:
            router.send(first)
            router.wait_jobs(lambda js: sum(j["delivered"] for j in js) == 3, 60)
            server.stop()
            router.send(second)
            wait_until(
                lambda: destinations(router)["archive"]["state"] == "probing", 60, message="pause"
            )
            assert sum(j["delivered"] for j in router.jobs()) == 3
            server.start()  # the same port, the same buckets
            jobs = router.wait_jobs(
                lambda js: all_settled(js) and sum(j["delivered"] for j in js) == 7, 60
            )
            assert {j["state"] for j in jobs} == {"completed"}
            assert any(j["connection_failures"] >= 1 for j in jobs)
        got = held(server, bucket)
    finally:
        server.stop()
    sent = by_uid(first + second)
    assert {key.rsplit("/", 1)[1][: -len(".dcm")] for key in got} == set(sent)
    for key, raw in got.items():
        uid = key.rsplit("/", 1)[1][: -len(".dcm")]
        assert data_set(raw) == data_set(sent[uid].read_bytes())


def test_a_store_that_refuses_us_pauses_with_the_reason(tmp_path: Path, moto: MotoS3) -> None:
    files = make_study(tmp_path / "in", 2)
    with MotoS3Process({"INITIAL_NO_AUTH_ACTION_COUNT": "0"}) as checking:
        config = {
            "destinations": {
                "later": s3_destination(moto.url, "bucket-made-later"),
                "locked": s3_destination(checking.url, "some-bucket"),
            },
            "routes": [{"name": "all", "to": ["later", "locked"]}],
        }
        with RouterProcess(tmp_path / "router", config, env=moto.env()) as router:
            router.send(files)

            def paused() -> dict[str, dict[str, Any]] | None:
                found = destinations(router)
                both = all(found[n]["state"] == "probing" for n in ("later", "locked"))
                return found if both else None

            found = wait_until(paused, 60, message="both destinations paused")
            assert "NoSuchBucket" in found["later"]["last_error"]
            assert "bucket-made-later" in found["later"]["last_error"]
            assert "InvalidAccessKeyId" in found["locked"]["last_error"] or (
                "403" in found["locked"]["last_error"]
            )
            # Paused at once: no delivery attempt used, nothing failed.
            assert all(j["attempts"] == 0 and j["state"] != "failed" for j in router.jobs())
            moto.client().create_bucket(Bucket="bucket-made-later")
            router.wait_jobs(
                lambda js: sum(j["delivered"] for j in js if j["destination"] == "later") == 2,
                60,
            )
            assert destinations(router)["locked"]["state"] == "probing"
    assert len(held(moto, "bucket-made-later")) == 2
