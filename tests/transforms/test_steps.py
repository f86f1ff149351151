"""Each step on an in-memory data set: what it changes, what it refuses."""

from __future__ import annotations

import os
import time
from datetime import datetime
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from dicomrouter.transforms import ObjectContext, PipelineError, TransformRefused
from dicomrouter.transforms.base import TransformUnavailable
from dicomrouter.transforms.pseudonyms import PatientKey, Pseudonymizer
from tests.transforms.helpers import ct, pipeline, run

CONTEXT = ObjectContext(
    calling_ae="MODALITY1",
    called_ae="ROUTER",
    source_address="10.0.0.5",
    received_at=datetime(2024, 5, 6, 7, 8, 9),
)


# -- set ---------------------------------------------------------------------------------


def test_set_literal_keyword_and_tag() -> None:
    ds = run([{"set": {"InstitutionName": "General Hospital", "0010,0021": "GH"}}], ct())
    assert ds.InstitutionName == "General Hospital"
    assert ds.IssuerOfPatientID == "GH"
    assert ds["IssuerOfPatientID"].VR == "LO"


def test_set_templates_read_pseudo_keys_tags_and_format_specs() -> None:
    steps = [
        {
            "set": {
                "StationName": "{CallingAETitle}",
                "StudyID": "{SeriesNumber:03d}",
                "InstitutionalDepartmentName": "{CalledAETitle}/{SourceAddress} {{x}}",
                "StudyDescription": "{ReceivedAt:%Y%m%d} {0008,0060} {PatientID}",
                "SeriesDescription": "[{StudyComments}]",
            }
        }
    ]
    ds = run(steps, ct(), CONTEXT)
    assert ds.StationName == "MODALITY1"
    assert ds.StudyID == "007"
    assert ds.InstitutionalDepartmentName == "ROUTER/10.0.0.5 {x}"
    assert ds.StudyDescription == "20240506 CT P001"
    assert ds.SeriesDescription == "[]"  # an absent element renders empty


def test_set_templates_see_values_before_the_step() -> None:
    ds = run([{"set": {"OtherPatientIDs": "{PatientID}", "PatientID": "NEW"}}], ct())
    assert (ds.OtherPatientIDs, ds.PatientID) == ("P001", "NEW")


def test_set_numbers_lists_and_empty() -> None:
    values = {"Rows": 12, "ImageType": ["DERIVED", "SECONDARY"], "PatientName": None}
    ds = run([{"set": values}], ct())
    assert ds.Rows == 12 and ds["Rows"].VR == "US"
    assert list(ds.ImageType) == ["DERIVED", "SECONDARY"]
    assert "PatientName" in ds and ds["PatientName"].is_empty


def test_set_literal_too_long_fails_at_compile_time() -> None:
    with pytest.raises(PipelineError) as info:
        pipeline([{"set": {"StationName": "X" * 17}}])
    where, message = info.value.problems[0]
    assert where == "transforms.p[0].set.StationName"
    assert "17 characters" in message and "16" in message


def test_set_template_too_long_is_refused_at_run_time() -> None:
    step = pipeline([{"set": {"StationName": "{InstitutionName}"}}])
    ds = ct()
    ds.InstitutionName = "A name much longer than sixteen"
    with pytest.raises(TransformRefused, match=r"transforms.p\[0\].set.*SH"):
        step.apply(ds, CONTEXT)


def test_set_format_spec_that_does_not_fit_is_refused() -> None:
    with pytest.raises(TransformRefused, match="PatientID:03d"):
        run([{"set": {"StudyID": "{PatientID:03d}"}}], ct())


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ({"InstitutonName": "x"}, "did you mean 'InstitutionName'"),
        ({"StationName": "{Nope}"}, "unknown DICOM keyword 'Nope'"),
        ({"StationName": "{PatientID!r}"}, "conversions"),
        ({"StationName": "{"}, "braces"),
        ({"Rows": "many"}, "not a number"),
    ],
)
def test_set_configuration_errors(value: dict[str, str], fragment: str) -> None:
    with pytest.raises(PipelineError, match=fragment):
        pipeline([{"set": value}])


# -- remove ------------------------------------------------------------------------------


def private_ds() -> Dataset:
    ds = ct()
    ds.add_new(0x00090010, "LO", "ACME 1.1")
    ds.add_new(0x00090011, "LO", "OTHER")
    ds.add_new(0x00091010, "LO", "acme ten")
    ds.add_new(0x00091011, "LO", "acme eleven")
    ds.add_new(0x00091110, "LO", "other ten")
    return ds


def test_remove_keywords_tags_and_private_in_any_block() -> None:
    ds = run([{"remove": ["PatientName", "0008,0080", "0009,xx10"]}], private_ds())
    assert "PatientName" not in ds and "InstitutionName" not in ds
    assert 0x00091010 not in ds and 0x00091110 not in ds
    assert ds[0x00091011].value == "acme eleven"


def test_remove_private_by_creator_only_touches_that_block() -> None:
    ds = run([{"remove": [{"creator": "OTHER", "tag": "0009,xx10"}]}], private_ds())
    assert 0x00091110 not in ds
    assert ds[0x00091010].value == "acme ten"


def test_remove_rejects_even_group_private_syntax() -> None:
    with pytest.raises(PipelineError, match="odd group"):
        pipeline([{"remove": ["0008,xx10"]}])


# -- remove_private ----------------------------------------------------------------------


def test_remove_private_keeps_kept_creators_and_cleans_sequences() -> None:
    ds = private_ds()
    item = Dataset()
    item.add_new(0x00110010, "LO", "NESTED")
    item.add_new(0x00111001, "LO", "secret")
    item.CodeValue = "1"
    ds.ReferencedSeriesSequence = Sequence([item])
    run([{"remove_private": {"keep_creators": ["ACME 1.1"]}}], ds)
    assert ds[0x00090010].value == "ACME 1.1"
    assert ds[0x00091010].value == "acme ten"
    assert 0x00090011 not in ds and 0x00091110 not in ds
    nested = ds.ReferencedSeriesSequence[0]
    assert 0x00111001 not in nested and 0x00110010 not in nested and nested.CodeValue == "1"


def test_remove_private_bare_removes_everything_private() -> None:
    ds = run([{"remove_private": True}], private_ds())
    assert not [e for e in ds if e.tag.is_private]


# -- copy --------------------------------------------------------------------------------


def test_copy_target_from_source() -> None:
    ds = run([{"copy": {"StudyID": "AccessionNumber", "OtherPatientIDs": "StudyComments"}}], ct())
    assert ds.StudyID == "000123"
    assert "OtherPatientIDs" not in ds  # absent source: target unchanged


def test_copy_refuses_value_too_long_for_target() -> None:
    ds = ct()
    ds.InstitutionName = "Much longer than sixteen characters"
    with pytest.raises(TransformRefused, match="16"):
        run([{"copy": {"StationName": "InstitutionName"}}], ds)


# -- replace -----------------------------------------------------------------------------


def test_replace_each_value_of_a_multivalued_element() -> None:
    ds = ct()
    ds.OtherPatientIDs = ["00123", "0045"]
    steps = [
        {"replace": {"AccessionNumber": {"pattern": "^0+", "with": ""}}},
        {"replace": {"OtherPatientIDs": {"pattern": "^0+(\\d+)", "with": "GH-\\1"}}},
    ]
    run(steps, ds)
    assert ds.AccessionNumber == "123"
    assert list(ds.OtherPatientIDs) == ["GH-123", "GH-45"]


def test_replace_on_a_non_text_vr_is_a_configuration_error() -> None:
    with pytest.raises(PipelineError, match="VR US, which is not text"):
        pipeline([{"replace": {"Rows": {"pattern": "1", "with": "2"}}}])


# -- map ---------------------------------------------------------------------------------


def write_csv(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("missing", "expected"),
    [("keep", "P001"), ("remove", None), ("UNKNOWN", "UNKNOWN")],
)
def test_map_missing_policies(tmp_path: Path, missing: str, expected: str | None) -> None:
    table = write_csv(tmp_path / "ids.csv", "original,new\nX1,Y1\n")
    ds = run([{"map": {"PatientID": {"file": str(table), "missing": missing}}}], ct())
    assert ds.get("PatientID") == expected


def test_map_hit_and_fail(tmp_path: Path) -> None:
    table = write_csv(tmp_path / "ids.csv", "P001,GH001\n\n")
    ds = run([{"map": {"PatientID": {"file": str(table), "missing": "fail"}}}], ct())
    assert ds.PatientID == "GH001"
    other = ct()
    other.PatientID = "P999"
    with pytest.raises(TransformRefused, match="'P999' is not in"):
        run([{"map": {"PatientID": {"file": str(table), "missing": "fail"}}}], other)


def test_map_reloads_a_changed_table_and_waits_for_a_missing_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    table = write_csv(tmp_path / "ids.csv", "P001,A\n")
    step = pipeline([{"map": {"PatientID": {"file": str(table)}}}])
    lookup = step.steps[0].step.items[0][2]  # type: ignore[attr-defined]
    clock = [100.0]
    monkeypatch.setattr(lookup, "_clock", lambda: clock[0])
    ds = ct()
    step.apply(ds, CONTEXT)
    assert ds.PatientID == "A"
    write_csv(table, "P001,BB\n")
    os.utime(table, ns=(time.time_ns(), time.time_ns() + 5_000_000_000))
    ds = ct()
    step.apply(ds, CONTEXT)
    assert ds.PatientID == "A"  # checked at most once a second
    clock[0] += 1.5
    step.apply(ds := ct(), CONTEXT)
    assert ds.PatientID == "BB"
    table.unlink()
    clock[0] += 1.5
    with pytest.raises(TransformUnavailable, match="ids.csv"):
        step.apply(ct(), CONTEXT)


def test_map_malformed_table_makes_the_pipeline_unavailable(tmp_path: Path) -> None:
    table = write_csv(tmp_path / "ids.csv", "P001,A,extra\n")
    with pytest.raises(TransformUnavailable, match="line 1: 3 cell"):
        run([{"map": {"PatientID": {"file": str(table)}}}], ct())


# -- shift_dates -------------------------------------------------------------------------


def dated() -> Dataset:
    ds = ct()
    ds.AcquisitionDateTime = "20240131101500.5+0100"
    ds.OtherPatientIDs = "x"
    item = Dataset()
    item.StudyDate = "20231231"
    ds.ReferencedStudySequence = Sequence([item])
    ds.add_new(0x00181012, "DA", ["20240101", "20240102"])  # DateOfSecondaryCapture
    return ds


def test_shift_dates_fixed_everywhere_nested_and_dt() -> None:
    ds = run([{"shift_dates": {"days": 1}}], dated())
    assert ds.StudyDate == "20240201"
    assert ds.AcquisitionDateTime == "20240201101500.5+0100"
    assert ds.ReferencedStudySequence[0].StudyDate == "20240101"
    assert list(ds[0x00181012].value) == ["20240102", "20240103"]


def test_shift_dates_per_patient_is_keyed_stable_and_nonzero() -> None:
    environ = {"SHIFT_SECRET": "s3cret"}
    steps = [{"shift_dates": {"secret_env": "SHIFT_SECRET", "max_days": 30}}]
    first, second = run(steps, dated(), environ=environ), run(steps, dated(), environ=environ)
    assert first.StudyDate == second.StudyDate != "20240131"
    keyed, other = Pseudonymizer(b"s3cret"), Pseudonymizer(b"other")
    offsets = {keyed.shift_days(PatientKey(f"P{i}"), 30) for i in range(500)}
    assert 0 not in offsets and min(offsets) == -30 and max(offsets) == 30
    assert any(
        other.shift_days(PatientKey(f"P{i}"), 30) != keyed.shift_days(PatientKey(f"P{i}"), 30)
        for i in range(5)
    )
    # The same patient under another issuer is another patient.
    assert len({keyed.shift_days(PatientKey("P1", issuer), 3650) for issuer in "ABC"}) > 1


def test_shift_dates_without_its_secret_is_unavailable() -> None:
    with pytest.raises(TransformUnavailable, match="SHIFT_SECRET"):
        run([{"shift_dates": {"secret_env": "SHIFT_SECRET"}}], dated(), environ={})


def test_shift_dates_refuses_a_value_that_is_not_a_date() -> None:
    ds = ct()
    ds.StudyDate = "2024-1-1"
    with pytest.raises(TransformRefused, match="StudyDate"):
        run([{"shift_dates": {"days": 3}}], ds)


def test_shift_dates_needs_exactly_one_source_of_offset() -> None:
    with pytest.raises(PipelineError, match="either days"):
        pipeline([{"shift_dates": {}}])
