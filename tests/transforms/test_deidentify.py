"""The deidentify step on synthetic objects: the basic profile, each option's effect
(what it changes and only that), consistency of pseudonyms across objects, studies
and restarts, the burned-in refusal, and what the step records."""

from __future__ import annotations

import copy
import warnings
from datetime import date, timedelta
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import UID

from dicomrouter.config.transforms import DEIDENTIFY_OPTIONS
from dicomrouter.transforms.annex_e import ActionTable, option_action
from dicomrouter.transforms.base import ObjectContext, TransformRefused, TransformUnavailable
from dicomrouter.transforms.deidentify import Deidentify
from dicomrouter.transforms.pseudonyms import PatientKey, Pseudonymizer
from tests.transforms.deid_fixtures import (
    CT,
    ENVIRON,
    ROOT,
    SECRET,
    SECRET_ENV,
    image,
    report,
    run,
    step,
)

MARKS = {
    0x00120062,  # Patient Identity Removed
    0x00120063,  # De-identification Method
    0x00120064,  # De-identification Method Code Sequence
    0x00280303,  # Longitudinal Temporal Information Modified
}


def _da(text: str) -> date:
    return date(int(text[:4]), int(text[4:6]), int(text[6:8]))


def _values(ds: Dataset) -> dict[int, Any]:
    return {int(el.tag): el.value for el in ds}


# -- the basic profile -------------------------------------------------------------


def test_basic_profile_on_an_image() -> None:
    original = image()
    ds = run(copy.deepcopy(original))
    pid = Pseudonymizer(SECRET.encode()).patient_id(PatientKey("PID-4711"))
    assert ds.PatientID == pid and str(ds.PatientName) == pid
    # Z: empty; X: gone; D: a dummy.
    assert ds.PatientBirthDate == "" and ds.AccessionNumber == "" and ds.StudyID == ""
    assert ds.StudyDate == "" and ds.PatientSex == ""
    for keyword in (
        "OtherPatientIDs",
        "PatientAddress",
        "PatientAge",
        "PatientWeight",
        "EthnicGroup",
        "StudyDescription",
        "SeriesDescription",
        "ImageComments",
        "AdditionalPatientHistory",
        "InstitutionAddress",
        "InstitutionalDepartmentName",
        "IssuerOfPatientID",
    ):
        assert keyword not in ds, keyword
    assert ds.InstitutionName == "ANONYMIZED" and ds.DeviceSerialNumber == "ANONYMIZED"
    assert ds.AcquisitionDateTime == "19000101000000"
    # Kept: what the table does not list.
    assert ds.Manufacturer == "ACME Medical" and ds.Modality == "CT"
    assert ds.SOPClassUID == CT and ds.file_meta.MediaStorageSOPClassUID == CT
    # UIDs: replaced, valid, and the file meta follows the SOP Instance UID.
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        uid = ds[keyword].value
        assert uid != original[keyword].value and uid.startswith("2.25.")
        assert UID(uid).is_valid
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert "SourceApplicationEntityTitle" not in ds.file_meta
    # Private attributes and overlays: gone (Overlay Data is X, the plane goes whole).
    assert not any(el.tag.is_private for el in ds.iterall())
    assert not any(el.tag.group == 0x6000 for el in ds)
    assert "RequestAttributesSequence" not in ds  # X


def test_what_the_step_records() -> None:
    ds = run(image())
    assert ds.PatientIdentityRemoved == "YES"
    assert ds.LongitudinalTemporalInformationModified == "REMOVED"
    assert ds.DeidentificationMethod == "Basic Application Confidentiality Profile"
    codes = [(c.CodeValue, c.CodingSchemeDesignator) for c in ds.DeidentificationMethodCodeSequence]
    assert codes == [("113100", "DCM")]

    everything = [o for o in DEIDENTIFY_OPTIONS if o != "retain_longitudinal_full_dates"]
    ds = run(image(), *everything)
    values = {c.CodeValue for c in ds.DeidentificationMethodCodeSequence}
    assert values == {
        "113100",
        "113111",
        "113110",
        "113109",
        "113112",
        "113108",
        "113107",
        "113105",
        "113104",
        "113103",
    }
    assert all(len(m) <= 64 for m in ds.DeidentificationMethod)
    assert ds.LongitudinalTemporalInformationModified == "MODIFIED"
    ds = run(image(), "retain_longitudinal_full_dates")
    assert {c.CodeValue for c in ds.DeidentificationMethodCodeSequence} == {"113100", "113106"}
    assert ds.LongitudinalTemporalInformationModified == "UNMODIFIED"


def test_the_two_date_options_exclude_each_other() -> None:
    with pytest.raises(ValueError, match="exclude each other"):
        step("retain_longitudinal_full_dates", "retain_longitudinal_modified_dates")


@pytest.mark.parametrize("environ", [{}, {SECRET_ENV: ""}], ids=["missing", "empty"])
def test_without_the_secret_the_pipeline_waits(environ: dict[str, str]) -> None:
    deid = step(environ=environ)
    assert SECRET_ENV in (deid.secret_problem() or "")
    ds = image()
    before = copy.deepcopy(ds)
    with pytest.raises(TransformUnavailable, match=SECRET_ENV):
        deid.apply(ds, ObjectContext())
    assert ds == before  # nothing half done
    assert step().secret_problem() is None


# -- each option: what it changes, and only that ---------------------------------------


#: option -> (keyword, expected value after the step: True = the original's value).
EFFECTS: dict[str, list[tuple[str, Any]]] = {
    "retain_uids": [("StudyInstanceUID", True), ("SOPInstanceUID", True)],
    "retain_device_identity": [("DeviceSerialNumber", True), ("StationName", True)],
    "retain_institution_identity": [("InstitutionName", True), ("InstitutionAddress", True)],
    "retain_patient_characteristics": [
        ("PatientSex", True),
        ("PatientAge", True),
        ("PatientWeight", True),
        ("EthnicGroup", True),
    ],
    "retain_longitudinal_full_dates": [
        ("StudyDate", True),
        ("AcquisitionDateTime", True),
        ("StudyTime", True),
    ],
    "retain_longitudinal_modified_dates": [("StudyTime", True), ("AcquisitionTime", True)],
    "clean_descriptors": [
        ("StudyDescription", "CT head for after fall"),
        ("SeriesDescription", "Axial 5mm"),
        ("ProtocolName", "Head routine"),
        ("ImageComments", "reviewed by Dr"),
        ("AdditionalPatientHistory", "Fell at home, says"),
    ],
    "clean_graphics": [(0x60003000, True), (0x60004000, "Overlay for")],
    "retain_safe_private": [(0x00091010, True), (0x00091011, True)],
    "clean_structured_content": [],  # on an SR, below
}


def _changed(a: Dataset, b: Dataset) -> set[int]:
    va, vb = _values(a), _values(b)
    return {tag for tag in va.keys() | vb.keys() if va.get(tag) != vb.get(tag)}


@pytest.mark.parametrize("option", DEIDENTIFY_OPTIONS)
def test_each_option_changes_what_it_should_and_only_that(option: str) -> None:
    original = image(references=ROOT + "1.1.0")
    basic = run(copy.deepcopy(original))
    with_option = run(copy.deepcopy(original), option)
    for key, expected in EFFECTS[option]:
        assert key in with_option, (option, key)
        want = original[key].value if expected is True else expected
        assert with_option[key].value == want, (option, key)
    # Only the option's column of Table E.1-1 (and what the step records) differs,
    # plus the attributes each option reaches by its nature: every UID, every date,
    # a kept private block or overlay, a cleaned sequence or text.
    allowed = set(MARKS) | {t for t in _values(original) if option_action(option, t)}
    extra: dict[str, set[int]] = {
        "retain_uids": {el.tag for el in original if el.VR in ("UI", "SQ")},
        "retain_longitudinal_modified_dates": {el.tag for el in original if el.VR in ("DA", "DT")},
        "retain_safe_private": {0x00090010, 0x00091010, 0x00091011},
        "clean_graphics": {t for t in _values(original) if t >> 16 == 0x6000},
    }
    allowed |= extra.get(option, set())
    assert _changed(basic, with_option) - allowed == set(), option
    assert "ACME PHI" not in str(with_option)  # the undeclared private block still goes


def test_modified_dates_shift_every_date_of_the_patient_by_one_offset() -> None:
    original = image(study_date="20240110")
    ds = run(copy.deepcopy(original), "retain_longitudinal_modified_dates")
    days = Pseudonymizer(SECRET.encode()).date_offset_days(PatientKey("PID-4711"))
    assert _da(ds.StudyDate) == date(2024, 1, 10) + timedelta(days=days)
    for keyword in ("SeriesDate", "AcquisitionDate", "ContentDate", "InstanceCreationDate"):
        assert ds[keyword].value == ds.StudyDate
    assert ds.AcquisitionDateTime == ds.StudyDate + "101700.123+0100"
    assert ds.StudyTime == "101500"
    assert ds.PatientBirthDate == ""  # Z: not a longitudinal date


def test_date_shift_keeps_precision_and_empties_what_it_cannot_read() -> None:
    ds = image()
    ds.AcquisitionDateTime = "2024"
    with warnings.catch_warnings():  # pydicom warns about the invalid values (once)
        warnings.simplefilter("ignore")
        ds.ContentDate = "2024.01.10"  # the old ACR-NEMA form
        ds.InstanceCreationDate = "not a date"
    ds.ImageComments = "born 19610305, 1961-03-05"
    ds = run(ds, "retain_longitudinal_modified_dates", "clean_descriptors")
    assert len(ds.AcquisitionDateTime) == 4 and ds.AcquisitionDateTime <= "2024"
    assert ds.ContentDate == ds.StudyDate
    assert ds.InstanceCreationDate == ""
    assert ds.ImageComments == "born ,"


def test_clean_structured_content_keeps_the_report_cleaned() -> None:
    basic = run(report())
    assert "ContentSequence" not in basic
    assert len(basic.AcquisitionContextSequence) == 0  # X/Z
    ds = run(report(), "clean_structured_content")
    text, person = ds.ContentSequence
    assert text.TextValue == "(): no bleed. Seen at ."
    assert text.ConceptNameCodeSequence[0].CodeValue == "121071"
    assert str(person.PersonName) == "ANONYMOUS"  # Person Name is D wherever it is
    assert ds.AcquisitionContextSequence[0].TextValue == "fell"


def test_retain_safe_private_keeps_only_declared_blocks() -> None:
    ds = run(image(), "retain_safe_private")
    assert ds[0x00090010].value == "ACME SAFE 1.0" and ds[0x00091010].value == "1.25"
    assert 0x00110010 not in ds and 0x00111010 not in ds
    mixed = image()
    mixed.PrivateDataElementCharacteristicsSequence[0].BlockIdentifyingInformationStatus = "MIXED"
    mixed.PrivateDataElementCharacteristicsSequence[0].NonidentifyingPrivateElements = [0x10]
    ds = run(mixed, "retain_safe_private")
    assert 0x00091010 in ds and 0x00091011 not in ds


def test_option_precedence_keep_over_clean() -> None:
    table = ActionTable(["retain_patient_characteristics", "clean_descriptors"])
    assert table.action(0x00102110) == "C"  # Allergies: C under both
    assert ActionTable(["retain_uids", "retain_device_identity"]).action(0x00181002) == "K"
    assert ActionTable([]).action(0x00181002) == "U"


# -- consistency ---------------------------------------------------------------------


def test_references_follow_the_referenced_objects_uids() -> None:
    first = image(sop=ROOT + "1.1.1")
    second = image(sop=ROOT + "1.1.2", references=ROOT + "1.1.1")
    deid = step()
    deid.apply(first, ObjectContext())
    deid.apply(second, ObjectContext())
    assert second.ReferencedImageSequence[0].ReferencedSOPInstanceUID == first.SOPInstanceUID
    assert second.SourceImageSequence[0].ReferencedSOPInstanceUID == first.SOPInstanceUID
    series = second.ReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == first.SeriesInstanceUID
    assert series.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == first.SOPInstanceUID
    assert series.ReferencedInstanceSequence[0].ReferencedSOPClassUID == CT
    assert second.StudyInstanceUID == first.StudyInstanceUID
    assert second.FrameOfReferenceUID == first.FrameOfReferenceUID
    assert second.SOPInstanceUID != first.SOPInstanceUID


def test_uris_and_person_names_the_table_does_not_list_do_not_leak() -> None:
    """A key object's RetrieveURL carries the host and the original UIDs; a person
    name the table does not list yet is still a person's name."""
    ds = image(sop=ROOT + "1.1.9")
    study = str(ds.StudyInstanceUID)
    item = Dataset()
    item.SeriesInstanceUID = ds.SeriesInstanceUID
    item.RetrieveURL = f"https://pacs.hospital.example/wado/studies/{study}"
    ds.ReferencedSeriesSequence = [item]
    ds.RetrieveURL = f"https://pacs.hospital.example/wado/studies/{study}"
    ds.ReviewerName = "Reviewer^Ann"  # listed in Table E.1-1
    ds.SecondaryReviewerName = "Secondary^Reviewer"  # not listed
    ds.EvaluatorName = "Evaluator^Eve"  # not listed
    step().apply(ds, ObjectContext())
    text = str(ds)
    assert "pacs.hospital.example" not in text and study not in text
    assert "RetrieveURL" not in ds and "RetrieveURL" not in ds.ReferencedSeriesSequence[0]
    for name in ("Secondary^Reviewer", "Reviewer^Ann", "Evaluator^Eve"):
        assert name not in text


def test_two_studies_of_one_patient_thirty_days_apart() -> None:
    options = ("retain_longitudinal_modified_dates",)
    a = run(image(study=ROOT + "1", series=ROOT + "1.1", study_date="20240110"), *options)
    # "Another day, after a restart": a new step instance, same secret.
    b_original = image(
        study=ROOT + "2", series=ROOT + "2.1", sop=ROOT + "2.1.1", study_date="20240209"
    )
    b = run(copy.deepcopy(b_original), *options)
    assert a.PatientID == b.PatientID and str(a.PatientName) == str(b.PatientName)
    assert _da(b.StudyDate) - _da(a.StudyDate) == timedelta(days=30)
    assert a.StudyInstanceUID != b.StudyInstanceUID
    assert b.StudyInstanceUID == Pseudonymizer(SECRET.encode()).uid(ROOT + "2")
    again = run(copy.deepcopy(b_original), *options)
    assert again == b
    # Another patient gets another pseudonym; the same ID under another issuer too.
    assert run(image(patient_id="PID-9999")).PatientID != a.PatientID
    assert run(image(issuer="OTHER-HOSPITAL")).PatientID != run(image()).PatientID


def test_same_secret_same_output_other_secret_other_output() -> None:
    one = run(image(references=ROOT + "1.1.0"))
    two = Deidentify(step().config, dict(ENVIRON))
    restarted = image(references=ROOT + "1.1.0")
    two.apply(restarted, ObjectContext())
    assert restarted == one
    other = image(references=ROOT + "1.1.0")
    step(environ={SECRET_ENV: "another secret"}).apply(other, ObjectContext())
    assert other.PatientID != one.PatientID
    assert other.SOPInstanceUID != one.SOPInstanceUID
    assert other.SourceImageSequence[0].ReferencedSOPInstanceUID != (
        one.SourceImageSequence[0].ReferencedSOPInstanceUID
    )


def test_prefix_is_applied() -> None:
    assert run(image(), patient_id_prefix="RSRCH-").PatientID.startswith("RSRCH-")


# -- burned-in identity ---------------------------------------------------------------

SC = "1.2.840.10008.5.1.4.1.1.7"
US = "1.2.840.10008.5.1.4.1.1.6.1"


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"burned_in": "YES"}, "BurnedInAnnotation is YES"),
        ({"sop_class": SC, "modality": "OT", "burned_in": None}, "Secondary Capture"),
        ({"sop_class": US, "modality": "US", "burned_in": None}, "Ultrasound Image"),
        ({"modality": "XC", "burned_in": None}, "Modality XC"),
        ({"modality": "US", "burned_in": ""}, "Modality US"),
    ],
)
def test_pixels_that_may_show_identity_are_refused(kwargs: dict[str, Any], reason: str) -> None:
    ds = image(**kwargs)
    before = copy.deepcopy(ds)
    with pytest.raises(TransformRefused, match=reason) as refused:
        run(ds)
    assert "set allow_burned_in: true on the step" in str(refused.value)
    assert ds == before
    assert run(image(**kwargs), allow_burned_in=True).PatientIdentityRemoved == "YES"


def test_an_explicit_no_is_trusted() -> None:
    assert run(image(sop_class=SC, modality="OT", burned_in="NO")).PatientIdentityRemoved
    assert run(image(burned_in=None)).PatientIdentityRemoved == "YES"  # a CT
