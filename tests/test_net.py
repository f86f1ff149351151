"""pynetdicom/pydicom tuning in dicomrouter.net: cheaper, never more permissive."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
from pydicom import config as pydicom_config
from pydicom.data import get_testdata_file

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
