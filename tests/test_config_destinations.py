"""``destinations.<name>``: a union of kinds told apart by ``type`` (``dicom`` when
absent), with errors that name the key path, and the registry of senders."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dicomrouter.config import (
    DESTINATION_KINDS,
    BaseDestinationConfig,
    ConfigError,
    DicomDestinationConfig,
    FolderDestinationConfig,
    S3DestinationConfig,
    load_config_text,
)
from dicomrouter.config.models import DEFAULT_FOLDER_LAYOUT
from dicomrouter.destinations import Sender, SenderOptions, create_sender, kinds
from dicomrouter.destinations.dicom import DicomSender
from dicomrouter.destinations.folder import FolderSender
from dicomrouter.destinations.s3 import S3Sender
from dicomrouter.units import parse_size


def load(text: str):  # type: ignore[no-untyped-def]
    return load_config_text(text, "t.yaml", Path("."))


def errors(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load(text)
    return [str(e) for e in caught.value.errors]


def test_a_destination_without_type_is_dicom_as_before() -> None:
    config = load("destinations: {pacs: {ae_title: PACS, host: 10.0.0.5, port: 104}}")
    dest = config.destinations["pacs"]
    assert isinstance(dest, DicomDestinationConfig)
    assert dest.type == "dicom" and dest.workers == 1 and dest.address == "PACS@10.0.0.5:104"
    explicit = load("destinations: {pacs: {type: dicom, ae_title: PACS, host: h, port: 1}}")
    assert isinstance(explicit.destinations["pacs"], DicomDestinationConfig)


def test_a_folder_destination_and_its_defaults(tmp_path: Path) -> None:
    config = load(
        f"destinations: {{out: {{type: folder, path: {tmp_path}, max_workers: 3, "
        "send_window: '19:00-07:00', retry: {max_attempts: 2}, sop_classes: "
        "{include: [CTImageStorage]}}}"
    )
    dest = config.destinations["out"]
    assert isinstance(dest, FolderDestinationConfig)
    assert dest.layout == DEFAULT_FOLDER_LAYOUT and dest.on_exists == "overwrite"
    assert dest.workers == 3 and dest.address == str(tmp_path)
    assert dest.retry.max_attempts == 2 and dest.send_window is not None
    assert config.certificate_files() == {}
    assert not config.is_self(dest)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("{x: {host: h, port: 104}}", "destinations.x.ae_title: required key is missing"),
        (
            "{x: {type: ftp, host: h}}",
            "destinations.x.type: unknown destination type 'ftp'; known: dicom, folder, "
            "dicomweb, s3, group",
        ),
        ("{x: {type: s3}}", "destinations.x.bucket: required key is missing"),
        ("{x: {type: s3, bucket: b, prefix: '../up'}}", "destinations.x.prefix: prefix '../up'"),
        ("{x: {type: s3, bucket: b, prefix: /abs}}", "must not start with '/'"),
        (
            "{x: {type: s3, bucket: b, layout: '{PatientID}/../x'}}",
            "destinations.x.layout: layout '{PatientID}/../x': '.' and '..' are not folder",
        ),
        (
            "{x: {type: s3, bucket: b, multipart_chunk_size: 1MB}}",
            "destinations.x.multipart_chunk_size: 1048576 bytes: S3 parts are 5MB to 5GB",
        ),
        ("{x: {type: s3, bucket: b, multipart_threshold: 8 bananas}}", "invalid size"),
        (
            "{x: {type: s3, bucket: b, access_key_id_env: KEY}}",
            "destinations.x.secret_access_key_env: access_key_id_env and secret_access_key_env",
        ),
        (
            "{x: {type: s3, bucket: b, access_key_id_env: A, secret_access_key_env: 'a-b'}}",
            "destinations.x.secret_access_key_env: 'a-b' is not an environment variable name",
        ),
        (
            "{x: {type: s3, bucket: b, session_token_env: '1X'}}",
            "destinations.x.session_token_env: '1X' is not an environment variable name",
        ),
        (
            "{x: {type: dicomweb, url: 'http://h/x', auth: {type: basic, username: u, "
            "password_env: 'P W'}}}",
            "destinations.x.auth.password_env: 'P W' is not an environment variable name",
        ),
        (
            "{x: {type: s3, bucket: b, kms_key_id: k}}",
            "destinations.x.kms_key_id: needs server_side_encryption: aws:kms",
        ),
        (
            "{x: {type: s3, bucket: b, server_side_encryption: aes}}",
            "destinations.x.server_side_encryption: Input should be 'AES256' or 'aws:kms'",
        ),
        ("{x: {type: s3, bucket: b, on_exists: version}}", "destinations.x.on_exists"),
        ("{x: {type: s3, bucket: b, endpoint_url: minio:9000}}", "expected http://host"),
        ("{x: []}", "destinations.x: a destination is a mapping of its keys"),
        ("{x: {type: folder}}", "destinations.x.path: required key is missing"),
        (
            "{x: {type: folder, path: /tmp, layot: a}}",
            "destinations.x.layot: unknown key; did you mean 'layout'?",
        ),
        (
            "{x: {ae_title: A, host: h, port: 1, max_asociations: 2}}",
            "destinations.x.max_asociations: unknown key; did you mean 'max_associations'?",
        ),
        ("{x: {type: folder, path: /tmp, ae_title: A}}", "destinations.x.ae_title: unknown key"),
        (
            "{x: {type: folder, path: /tmp, on_exists: append}}",
            "destinations.x.on_exists: Input should be 'overwrite', 'skip' or 'version'",
        ),
        (
            "{x: {type: folder, path: /tmp, layout: '{Foo}/x.dcm'}}",
            "destinations.x.layout: layout '{Foo}/x.dcm': {Foo} is not a DICOM keyword",
        ),
        (
            "{x: {type: folder, path: /tmp, layout: '{PatientID}/../x'}}",
            "destinations.x.layout: layout '{PatientID}/../x': '.' and '..' are not folder",
        ),
        (
            "{x: {type: folder, path: /tmp, layout: '/abs/{PatientID}'}}",
            "must be relative to path",
        ),
        (
            "{x: {type: folder, path: /tmp, layout: '{CallingAETitle}/x'}}",
            "{CallingAETitle} is not a DICOM keyword",
        ),
        (
            "{x: {type: folder, path: /tmp, transfer_syntax: jpeg2000}}",
            "destinations.x.transfer_syntax: 'jpeg2000' is lossy",
        ),
    ],
)
def test_errors_name_the_key(text: str, expected: str) -> None:
    found = errors(f"destinations: {text}")
    assert any(expected in e for e in found), found


def test_an_s3_destination_and_its_defaults() -> None:
    config = load(
        "destinations: {arc: {type: s3, bucket: dicom-archive, prefix: incoming/, "
        "endpoint_url: 'http://minio:9000', multipart_chunk_size: 8MB, "
        "multipart_threshold: 64 MiB, storage_class: STANDARD_IA, "
        "server_side_encryption: aws:kms, kms_key_id: alias/dicom}}"
    )
    dest = config.destinations["arc"]
    assert isinstance(dest, S3DestinationConfig)
    assert dest.prefix == "incoming" and dest.layout == DEFAULT_FOLDER_LAYOUT
    assert (dest.multipart_chunk_size, dest.multipart_threshold) == (8 << 20, 64 << 20)
    assert dest.on_exists == "overwrite" and dest.checksum == "sha256"
    assert dest.workers == 4 and dest.address == "s3://dicom-archive/incoming/ at http://minio:9000"


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("5MB", 5 << 20),
        ("5 MiB", 5 << 20),
        ("512k", 512 << 10),
        ("1.5GB", 3 << 29),
        (6000000, 6000000),
    ],
)
def test_sizes_are_powers_of_1024(text: object, size: int) -> None:
    assert parse_size(text) == size


def test_layout_takes_tags_and_format_specs() -> None:
    config = load(
        "destinations: {x: {type: folder, path: /tmp, layout: "
        "'{PatientID}/{StudyDate}_{0008,0050}/{SeriesNumber:03d}_{Modality}/{SOPInstanceUID}.dcm'"
        "}}"
    )
    assert config.destinations["x"].type == "folder"


def test_routes_to_a_folder_destination_are_checked_like_any_other(tmp_path: Path) -> None:
    found = errors(
        f"destinations: {{out: {{type: folder, path: {tmp_path}}}}}\n"
        "routes: [{name: r, to: [out, nowhere]}]"
    )
    assert any("nowhere" in e for e in found), found


def test_every_kind_has_a_sender(tmp_path: Path) -> None:
    # A group sends nothing itself (its members do): every other kind has a sender.
    assert set(kinds()) == set(DESTINATION_KINDS) - {"group"}
    dicom = create_sender(
        DicomDestinationConfig(ae_title="PACS", host="h", port=104), SenderOptions("ME", 2.0)
    )
    assert isinstance(dicom, DicomSender) and isinstance(dicom, Sender)
    assert dicom.calling_ae == "ME" and dicom.keep_alive == 2.0
    own = create_sender(
        DicomDestinationConfig(ae_title="P", host="h", port=1, calling_ae_title="X")
    )
    assert isinstance(own, DicomSender) and own.calling_ae == "X"
    folder = create_sender(FolderDestinationConfig(type="folder", path=tmp_path))
    assert isinstance(folder, FolderSender) and isinstance(folder, Sender)
    bucket = create_sender(S3DestinationConfig(type="s3", bucket="b"))
    assert isinstance(bucket, S3Sender) and isinstance(bucket, Sender)


def test_an_unknown_kind_has_no_sender() -> None:
    class Odd(BaseDestinationConfig):
        type: str = "odd"

    with pytest.raises(ValueError, match="no sender for destination type 'odd'"):
        create_sender(Odd())


def test_the_registry_loads_a_kind_only_when_used() -> None:
    code = (
        "import sys, dicomrouter.destinations as d, dicomrouter.control.destinations\n"
        "assert 'dicomrouter.destinations.dicom' not in sys.modules\n"
        "assert 'dicomrouter.destinations.folder' not in sys.modules\n"
        "from dicomrouter.config import FolderDestinationConfig\n"
        "d.create_sender(FolderDestinationConfig(type='folder', path='/tmp'))\n"
        "assert 'dicomrouter.destinations.folder' in sys.modules\n"
        "assert 'dicomrouter.destinations.dicom' not in sys.modules\n"
        "assert 'dicomrouter.destinations.s3' not in sys.modules and 'boto3' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
