"""The tag-level diff of dry runs."""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from dicomrouter.transforms import diff_datasets


def item(uid: str) -> Dataset:
    ds = Dataset()
    ds.SeriesInstanceUID = uid
    return ds


def test_rows_for_added_removed_changed_nested_and_binary() -> None:
    before, after = Dataset(), Dataset()
    before.PatientName = after.PatientName = "Doe^John"
    before.InstitutionName, after.InstitutionName = "Old", "New"
    before.OperatorsName = "Op"
    after.StationName = "M1"
    before.ReferencedSeriesSequence = Sequence([item("1.2"), item("1.3")])
    after.ReferencedSeriesSequence = Sequence([item("1.2"), item("9.9"), item("1.4")])
    before.PixelData, after.PixelData = b"\0" * 64, b"\1" * 64
    rows = {row.path: row for row in diff_datasets(before, after)}
    assert set(rows) == {
        "InstitutionName",
        "OperatorsName",
        "StationName",
        "ReferencedSeriesSequence[1].SeriesInstanceUID",
        "ReferencedSeriesSequence[2]",
        "PixelData",
    }
    assert (rows["InstitutionName"].change, rows["InstitutionName"].before) == ("changed", "Old")
    assert rows["OperatorsName"].change == "removed" and rows["OperatorsName"].after is None
    assert rows["StationName"].change == "added" and rows["StationName"].tag == "(0008,1010)"
    nested = rows["ReferencedSeriesSequence[1].SeriesInstanceUID"]
    assert (nested.before, nested.after) == ("1.3", "9.9")
    assert rows["ReferencedSeriesSequence[2]"].change == "added"
    pixels = rows["PixelData"]
    assert pixels.before is not None and pixels.before.startswith("<64 bytes, sha256 ")
    assert pixels.before != pixels.after


def test_equal_datasets_have_no_rows_and_multivalues_compare_by_value() -> None:
    a, b = Dataset(), Dataset()
    a.ImageType = ["ORIGINAL", "PRIMARY"]
    b.ImageType = ["ORIGINAL", "PRIMARY"]
    assert diff_datasets(a, b) == []
    b.ImageType = ["DERIVED", "PRIMARY"]
    (row,) = diff_datasets(a, b)
    assert (row.before, row.after) == ("ORIGINAL\\PRIMARY", "DERIVED\\PRIMARY")
