"""pynetdicom/pydicom tuning in dicomrouter.net: cheaper, same bytes, never more
permissive."""

from __future__ import annotations

import copy
import warnings
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import config as pydicom_config
from pydicom.data import get_testdata_file
from pydicom.filereader import read_file_meta_info
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID
from pynetdicom import (
    PYNETDICOM_IMPLEMENTATION_UID,
    PYNETDICOM_IMPLEMENTATION_VERSION,
    dimse_messages,
)
from pynetdicom.dsutils import create_file_meta

from dicomrouter import net
from dicomrouter.store import InstanceHeader, InvalidUID, read_header


@pytest.fixture
def no_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    """install_no_value_validation() for one test; pydicom's settings are restored."""
    settings = pydicom_config.settings
    monkeypatch.setattr(settings, "reading_validation_mode", settings.reading_validation_mode)
    monkeypatch.setattr(settings, "writing_validation_mode", settings.writing_validation_mode)
    monkeypatch.setattr(net, "_validation_off", False)
    net.install_no_value_validation()


@pytest.mark.usefixtures("no_validation")
def test_value_validation_off_still_refuses_bad_uids(tmp_path: Path) -> None:
    assert pydicom_config.settings.reading_validation_mode == pydicom_config.IGNORE
    assert pydicom_config.settings.writing_validation_mode == pydicom_config.IGNORE
    source = read_header(get_testdata_file("CT_small.dcm"))
    for keyword in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        dataset = copy.deepcopy(source)
        dataset[keyword].value = "1.2.3/../../etc"
        path = tmp_path / f"{keyword}.dcm"
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # pydicom no longer even warns
            dataset.save_as(path, enforce_file_format=True)
            header = read_header(path, identity_only=True)
        with pytest.raises(InvalidUID, match=keyword):
            InstanceHeader.from_dataset(header)


_UIDS = [
    ("1.2.840.10008.5.1.4.1.1.2", "1.2.3", "1.2.840.10008.1.2.1"),  # odd, even, odd
    ("1.2", "1.23", "1.2.840.10008.1.2"),
    ("1.2.840.10008.5.1.4.1.1.7", "9" * 64, "1.2.840.10008.1.2.4.50"),
    ("1.2.3.4", "1.2.3.4.5", "1.2.840.10008.1.2.2"),
]


@pytest.mark.parametrize(("sop_class", "sop_instance", "syntax"), _UIDS)
@pytest.mark.parametrize(
    ("implementation_uid", "version"),
    [
        (PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION),
        ("1.2.3.44", "ODD"),
    ],
)
def test_encode_file_meta_matches_pydicom(
    sop_class: str, sop_instance: str, syntax: str, implementation_uid: str, version: str
) -> None:
    expected = BytesIO()
    write_file_meta_info(
        expected,
        create_file_meta(
            sop_class_uid=UID(sop_class),
            sop_instance_uid=UID(sop_instance),
            transfer_syntax=UID(syntax),
            implementation_uid=UID(implementation_uid),
            implementation_version=version,
        ),
    )
    encoded = net.encode_file_meta(sop_class, sop_instance, syntax, implementation_uid, version)
    assert encoded == expected.getvalue()


@pytest.fixture
def fast_file_meta(monkeypatch: pytest.MonkeyPatch) -> None:
    """install_fast_file_meta() for one test; pynetdicom's functions are restored."""
    for name in ("create_file_meta", "write_file_meta_info"):
        monkeypatch.setattr(dimse_messages, name, getattr(dimse_messages, name))
    monkeypatch.setattr(net, "_fast_file_meta", False)
    net.install_fast_file_meta()


@pytest.mark.usefixtures("fast_file_meta")
def test_received_file_meta_is_what_pydicom_writes(tmp_path: Path) -> None:
    """Through the patched names pynetdicom's DIMSE decoder calls: same bytes, and a
    file that pydicom reads back with the same File Meta."""
    sop_class, sop_instance, syntax = _UIDS[0]
    patched = BytesIO()
    dimse_messages.write_file_meta_info(
        patched,
        dimse_messages.create_file_meta(
            sop_class_uid=UID(sop_class),
            sop_instance_uid=UID(sop_instance),
            transfer_syntax=UID(syntax),
        ),
    )
    expected = BytesIO()
    write_file_meta_info(
        expected,
        create_file_meta(
            sop_class_uid=UID(sop_class),
            sop_instance_uid=UID(sop_instance),
            transfer_syntax=UID(syntax),
        ),
    )
    assert patched.getvalue() == expected.getvalue()
    path = tmp_path / "x.dcm"
    path.write_bytes(b"\0" * 128 + b"DICM" + patched.getvalue())
    meta = read_file_meta_info(path)
    assert meta.MediaStorageSOPInstanceUID == sop_instance
    assert meta.TransferSyntaxUID == syntax


@pytest.mark.usefixtures("fast_file_meta")
def test_empty_uid_in_file_meta_is_still_refused_by_pydicom() -> None:
    """pynetdicom relies on pydicom refusing an empty required element; so do we."""
    meta = dimse_messages.create_file_meta(
        sop_class_uid=UID(""),
        sop_instance_uid=UID("1.2.3"),
        transfer_syntax=UID("1.2.840.10008.1.2"),
    )
    with pytest.raises(AttributeError, match="Media Storage SOP Class UID"):
        dimse_messages.write_file_meta_info(BytesIO(), meta)
