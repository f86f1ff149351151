"""The rules engine: compiling ``when:`` mappings, evaluating them, explaining and linting."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from pydicom import Dataset
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

from dicomrouter.config import ConfigError, parse_config
from dicomrouter.rules import (
    Condition,
    InstanceFacts,
    RuleError,
    compile_condition,
    never_matches,
)

# A Monday and the following days (2024-01-01 was a Monday).
MONDAY = datetime(2024, 1, 1)


def make_dataset(**elements: Any) -> Dataset:
    dataset = Dataset()
    for keyword, value in elements.items():
        setattr(dataset, keyword, value)
    return dataset


def facts(**kwargs: Any) -> InstanceFacts:
    """Facts from DICOM keywords (CamelCase) and InstanceFacts fields (snake_case)."""
    elements = {k: v for k, v in kwargs.items() if k[0].isupper()}
    extra = {k: v for k, v in kwargs.items() if not k[0].isupper()}
    return InstanceFacts(make_dataset(**elements), **extra)


def matches(spec: dict[str, Any], **kwargs: Any) -> bool:
    return compile_condition(spec).evaluate(facts(**kwargs))


def rule_error(spec: Any) -> RuleError:
    with pytest.raises(RuleError) as info:
        compile_condition(spec)
    return info.value


# --- no condition -------------------------------------------------------------------


@pytest.mark.parametrize("spec", [None, {}])
def test_no_condition_always_matches(spec: Any) -> None:
    cond = compile_condition(spec)
    assert isinstance(cond, Condition)
    assert cond.evaluate(facts())
    assert cond.describe() == "always"
    assert cond.keywords() == set()
    assert never_matches(cond) is None


# --- equals, wildcards, padding -----------------------------------------------------


def test_scalar_means_equals() -> None:
    assert matches({"Modality": "CT"}, Modality="CT")
    assert not matches({"Modality": "CT"}, Modality="MR")
    assert matches({"Modality": {"equals": "CT"}}, Modality="CT")
    assert not matches({"Modality": {"equals": "CT"}}, Modality="CTX")


def test_equals_is_case_sensitive() -> None:
    assert not matches({"Modality": "ct"}, Modality="CT")
    assert not matches({"CallingAETitle": "ct1"}, calling_ae="CT1")


def test_padding_is_stripped() -> None:
    assert matches({"StudyDescription": "HEAD"}, StudyDescription="HEAD ")
    assert matches({"StudyDescription": "HEAD"}, StudyDescription="HEAD\0")
    assert matches({"PatientID": "123"}, PatientID=" 123 ")  # LO: leading spaces too
    assert matches({"CallingAETitle": "CT1"}, calling_ae="  CT1  ")


def test_number_scalar_on_text_element_is_compared_as_text() -> None:
    assert matches({"PatientID": 12345}, PatientID="12345")
    assert not matches({"PatientID": 12345}, PatientID="012345")


@pytest.mark.parametrize(
    ("pattern", "value", "expected"),
    [
        ("CT*", "CT HEAD", True),
        ("CT*", "CT", True),
        ("*HEAD*", "CT HEAD W/O", True),
        ("*HEAD*", "CT CHEST", False),
        ("C?", "CT", True),
        ("C?", "C", False),
        ("C?", "CTA", False),
        ("ct*", "CT HEAD", False),
        ("a.b*", "axb", False),  # regex metacharacters are literal
    ],
)
def test_dicom_wildcards(pattern: str, value: str, expected: bool) -> None:
    assert matches({"StudyDescription": pattern}, StudyDescription=value) is expected
    assert matches({"StudyDescription": {"equals": pattern}}, StudyDescription=value) is expected


def test_person_name_compared_as_string() -> None:
    assert matches({"PatientName": "Doe^John"}, PatientName="Doe^John")
    assert matches({"PatientName": "Doe^*"}, PatientName="Doe^Jane")
    assert matches({"PatientName": {"startswith": "Doe^"}}, PatientName="Doe^John")


# --- in -----------------------------------------------------------------------------


def test_list_means_in() -> None:
    assert matches({"Modality": ["CT", "MR"]}, Modality="MR")
    assert not matches({"Modality": ["CT", "MR"]}, Modality="US")
    assert matches({"Modality": {"in": ["CT", "MR"]}}, Modality="CT")


def test_in_with_wildcards() -> None:
    spec = {"StationName": {"in": ["CT*", "MRI-?"]}}
    assert matches(spec, StationName="CTSCAN1")
    assert matches(spec, StationName="MRI-2")
    assert not matches(spec, StationName="MRI-22")


def test_in_on_numbers() -> None:
    assert matches({"Rows": [256, 512]}, Rows=512)
    assert matches({"SeriesNumber": [1, "2"]}, SeriesNumber="2")
    assert not matches({"Rows": [256, 512]}, Rows=1024)


# --- contains, startswith, regex ----------------------------------------------------


def test_contains() -> None:
    assert matches({"StudyDescription": {"contains": "HEAD"}}, StudyDescription="CT HEAD W/O")
    assert not matches({"StudyDescription": {"contains": "HEAD"}}, StudyDescription="MR BRAIN")
    assert not matches({"StudyDescription": {"contains": "head"}}, StudyDescription="CT HEAD")


def test_startswith() -> None:
    assert matches({"StudyDescription": {"startswith": "CT "}}, StudyDescription="CT HEAD")
    assert not matches({"StudyDescription": {"startswith": "HEAD"}}, StudyDescription="CT HEAD")


def test_regex_uses_search() -> None:
    assert matches({"StudyDescription": {"regex": "HEAD|BRAIN"}}, StudyDescription="MR BRAIN")
    assert matches({"StudyDescription": {"regex": "(?i)brain"}}, StudyDescription="MR BRAIN")
    assert not matches({"StudyDescription": {"regex": "^BRAIN"}}, StudyDescription="MR BRAIN")


def test_regex_is_compiled_once(monkeypatch: pytest.MonkeyPatch) -> None:
    cond = compile_condition({"StudyDescription": {"regex": "HEAD$"}, "Modality": "C*"})

    def forbidden(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("regex compiled during evaluation")

    monkeypatch.setattr(re, "compile", forbidden)
    monkeypatch.setattr(re, "search", forbidden)
    monkeypatch.setattr(re, "fullmatch", forbidden)
    assert cond.evaluate(facts(StudyDescription="CT HEAD", Modality="CT"))


# --- exists and missing elements ----------------------------------------------------


def test_exists() -> None:
    assert matches({"AccessionNumber": {"exists": True}}, AccessionNumber="A1")
    assert not matches({"AccessionNumber": {"exists": True}}, AccessionNumber="")
    assert not matches({"AccessionNumber": {"exists": True}})
    assert matches({"AccessionNumber": {"exists": False}})
    assert matches({"AccessionNumber": {"exists": False}}, AccessionNumber="  ")
    assert not matches({"AccessionNumber": {"exists": False}}, AccessionNumber="A1")


@pytest.mark.parametrize(
    "spec",
    [
        {"Modality": "CT"},
        {"Modality": "*"},
        {"Modality": {"contains": ""}},
        {"Modality": {"regex": ".*"}},
        {"Modality": {"in": ["CT", "*"]}},
        {"Rows": {"lt": 100000}},
        {"StudyDate": {"ge": "19000101"}},
    ],
)
def test_missing_or_empty_element_matches_no_operator(spec: dict[str, Any]) -> None:
    assert not matches(spec)
    keyword = next(iter(spec))
    empty: Any = "" if keyword != "Rows" else None
    assert not matches(spec, **{keyword: empty})
    assert matches({keyword: {"not": spec[keyword]}})  # `not` negates the whole condition


def test_undecodable_element_counts_as_missing() -> None:
    dataset = Dataset()
    tag = Tag(0x00280010)  # Rows, US, with an odd byte count
    dataset._dict[tag] = RawDataElement(tag, "US", 3, b"\x01\x02\x03", 0, True, True)
    info = InstanceFacts(dataset)
    assert not compile_condition({"Rows": {"gt": 0}}).evaluate(info)
    assert compile_condition({"Rows": {"exists": False}}).evaluate(info)


def test_binary_elements_support_only_exists() -> None:
    assert matches({"PixelData": {"exists": True}}, PixelData=b"\0\1")
    assert matches({"PixelData": {"exists": False}})
    error = rule_error({"PixelData": {"contains": "x"}})
    assert error.path == "PixelData.contains"
    assert "not supported for PixelData" in error.message
    assert "valid: exists, not" in error.message


# --- multi-valued elements ----------------------------------------------------------


def test_multi_value_any_semantics() -> None:
    image_type = ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert matches({"ImageType": "AXIAL"}, ImageType=image_type)
    assert matches({"ImageType": {"contains": "AX"}}, ImageType=image_type)
    assert matches({"ImageType": ["LOCALIZER", "PRIMARY"]}, ImageType=image_type)
    assert not matches({"ImageType": "LOCALIZER"}, ImageType=image_type)
    # two equals on a multi-valued element can both hold (different values)
    assert matches(
        {"all": [{"ImageType": "ORIGINAL"}, {"ImageType": "AXIAL"}]}, ImageType=image_type
    )
    assert matches({"ModalitiesInStudy": {"in": ["PT"]}}, ModalitiesInStudy=["CT", "PT"])


def test_not_on_multi_value_means_no_value_matches() -> None:
    spec = {"ImageType": {"not": {"contains": "LOCALIZER"}}}
    assert matches(spec, ImageType=["ORIGINAL", "PRIMARY", "AXIAL"])
    assert not matches(spec, ImageType=["DERIVED", "SECONDARY", "LOCALIZER"])
    assert matches(spec)  # missing: the inner condition is false


def test_empty_components_of_multi_value_are_ignored() -> None:
    assert matches({"ImageType": {"exists": True}}, ImageType=["", "PRIMARY"])
    assert not matches({"ImageType": "*"}, ImageType=["", ""])


# --- numeric comparisons ------------------------------------------------------------


@pytest.mark.parametrize(
    ("op", "bound", "expected"),
    [
        ("lt", 512, False),
        ("lt", 513, True),
        ("le", 512, True),
        ("le", 511, False),
        ("gt", 511, True),
        ("gt", 512, False),
        ("ge", 512, True),
        ("ge", "512", True),
        ("ge", 513, False),
    ],
)
def test_numeric_comparisons(op: str, bound: Any, expected: bool) -> None:
    assert matches({"Rows": {op: bound}}, Rows=512) is expected


def test_between_numbers_is_inclusive() -> None:
    spec = {"SliceThickness": {"between": [1, 2.5]}}
    assert matches(spec, SliceThickness="1.0")
    assert matches(spec, SliceThickness="2.500")
    assert not matches(spec, SliceThickness="2.51")
    assert matches({"InstanceNumber": {"between": [5, 10]}}, InstanceNumber="007")


def test_numbers_compare_numerically_not_as_text() -> None:
    assert matches({"SeriesNumber": {"gt": 9}}, SeriesNumber="10")
    assert matches({"SliceThickness": 5}, SliceThickness="5.000")
    assert matches({"WindowCenter": {"gt": 100}}, WindowCenter=["40", "400"])  # any value


def test_numeric_string_in_text_element_compares_as_number() -> None:
    assert matches({"AccessionNumber": {"gt": 1000}}, AccessionNumber="1500")
    assert not matches({"AccessionNumber": {"gt": 1000}}, AccessionNumber="999")
    assert not matches({"AccessionNumber": {"gt": 1000}}, AccessionNumber="A1500")


def test_patient_age_is_not_a_number() -> None:
    assert not matches({"PatientAge": {"lt": 50}}, PatientAge="045Y")
    assert not matches({"PatientAge": {"ge": 0}}, PatientAge="045Y")
    assert matches({"PatientAge": {"regex": "^0[0-4]\\dY$"}}, PatientAge="045Y")


# --- dates and times ----------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Invalid value for VR DA")
def test_date_comparisons() -> None:
    assert matches({"StudyDate": {"ge": "20240101"}}, StudyDate="20240101")
    assert matches({"StudyDate": {"ge": 20240101}}, StudyDate="20240315")
    assert not matches({"StudyDate": {"ge": "20240101"}}, StudyDate="20231231")
    assert matches({"StudyDate": {"lt": "2024-01-01"}}, StudyDate="20231231")
    spec = {"StudyDate": {"between": ["20240101", "20240131"]}}
    assert matches(spec, StudyDate="20240131")
    assert not matches(spec, StudyDate="20240201")
    assert not matches(spec, StudyDate="garbage")


def test_date_equality_is_on_parsed_dates() -> None:
    assert matches({"StudyDate": "2024-01-01"}, StudyDate="20240101")
    assert matches({"StudyDate": 20240101}, StudyDate="20240101")
    assert matches({"StudyDate": "2024*"}, StudyDate="20240315")  # wildcard: text match
    assert not matches({"StudyDate": "2023*"}, StudyDate="20240315")


@pytest.mark.filterwarnings("ignore:Invalid value for VR TM")
def test_time_comparisons() -> None:
    spec = {"StudyTime": {"between": ["080000", "180000"]}}
    assert matches(spec, StudyTime="080000")
    assert matches(spec, StudyTime="093000.123456")
    assert matches(spec, StudyTime="1200")  # partial TM
    assert matches(spec, StudyTime="18")
    assert not matches(spec, StudyTime="180000.5")
    assert not matches(spec, StudyTime="0759")
    assert matches({"StudyTime": {"lt": "12:00"}}, StudyTime="11:59:59")  # legacy colons
    assert matches({"StudyTime": "0800"}, StudyTime="080000")


def test_datetime_comparisons() -> None:
    spec = {"AcquisitionDateTime": {"ge": "20240101120000"}}
    assert matches(spec, AcquisitionDateTime="20240101120000.000000")
    assert matches(spec, AcquisitionDateTime="20240102")
    assert not matches(spec, AcquisitionDateTime="20240101115959")
    # the UTC offset is ignored: values compare as written
    assert matches(spec, AcquisitionDateTime="20240101120000+0500")
    iso = {"AcquisitionDateTime": {"lt": "2024-01-01T12:00:00"}}
    assert matches(iso, AcquisitionDateTime="202401011159")


# --- not, composition ---------------------------------------------------------------


def test_not_operator_on_key() -> None:
    assert matches({"Modality": {"not": "CT"}}, Modality="MR")
    assert not matches({"Modality": {"not": "CT"}}, Modality="CT")
    assert matches({"Modality": {"not": {"in": ["CT", "MR"]}}}, Modality="US")
    assert not matches({"Modality": {"not": ["CT", "MR"]}}, Modality="MR")
    assert matches({"Modality": {"not": "CT"}})  # missing: "not CT" holds


def test_several_keys_and_several_operators_are_and() -> None:
    spec = {"Modality": "CT", "StudyDescription": {"startswith": "CT", "contains": "HEAD"}}
    assert matches(spec, Modality="CT", StudyDescription="CT HEAD")
    assert not matches(spec, Modality="CT", StudyDescription="CT CHEST")
    assert not matches(spec, Modality="MR", StudyDescription="CT HEAD")
    assert not matches(spec, Modality="CT", StudyDescription="HEAD CT")


def test_all_any_not_nest() -> None:
    spec = {
        "any": [
            {"Modality": "CT", "BodyPartExamined": "HEAD"},
            {"all": [{"Modality": "MR"}, {"not": {"StudyDescription": {"contains": "KNEE"}}}]},
        ],
        "not": {"CallingAETitle": "TEST"},
    }
    assert matches(spec, Modality="CT", BodyPartExamined="HEAD", calling_ae="CT1")
    assert not matches(spec, Modality="CT", BodyPartExamined="HEAD", calling_ae="TEST")
    assert not matches(spec, Modality="CT", BodyPartExamined="CHEST")
    assert matches(spec, Modality="MR", StudyDescription="MR BRAIN")
    assert not matches(spec, Modality="MR", StudyDescription="MR KNEE")


# --- pseudo-keys --------------------------------------------------------------------


def test_ae_title_pseudo_keys() -> None:
    assert matches({"CallingAETitle": {"in": ["CT1", "CT2"]}}, calling_ae="CT2")
    assert not matches({"CallingAETitle": {"in": ["CT1", "CT2"]}}, calling_ae="MR1")
    assert matches({"CalledAETitle": "ROUTER*"}, called_ae="ROUTER_AI")
    assert not matches({"CalledAETitle": {"exists": True}})


def test_source_address() -> None:
    assert matches({"SourceAddress": "10.1.2.3"}, source_address="10.1.2.3")
    assert not matches({"SourceAddress": "10.1.2.3"}, source_address="10.1.2.4")
    assert matches({"SourceAddress": "10.0.0.0/8"}, source_address="10.1.2.3")
    spec = {"SourceAddress": {"in": ["192.168.1.0/24", "10.9.9.9", "fd00::/8"]}}
    assert matches(spec, source_address="192.168.1.77")
    assert matches(spec, source_address="10.9.9.9")
    assert matches(spec, source_address="fd00::1")
    assert matches(spec, source_address="::ffff:192.168.1.5")  # IPv4-mapped
    assert not matches(spec, source_address="192.168.2.1")
    assert not matches(spec, source_address="")
    assert not matches(spec, source_address="not-an-ip")
    assert matches({"SourceAddress": {"not": "10.0.0.0/8"}}, source_address="172.16.0.1")


def test_received_at_weekday_window() -> None:
    spec = {"ReceivedAt": "Mon-Fri 08:00-18:00"}
    assert matches(spec, received_at=MONDAY.replace(hour=8))
    assert matches(spec, received_at=MONDAY.replace(hour=17, minute=59))
    assert not matches(spec, received_at=MONDAY.replace(hour=18))
    assert not matches(spec, received_at=MONDAY.replace(hour=7, minute=59))
    assert not matches(spec, received_at=(MONDAY + timedelta(days=5)).replace(hour=10))  # Sat
    assert not matches(spec)  # unknown reception time


def test_received_at_between_crossing_midnight() -> None:
    spec = {"ReceivedAt": {"between": ["19:00", "07:00"]}}
    assert matches(spec, received_at=MONDAY.replace(hour=23))
    assert matches(spec, received_at=MONDAY.replace(hour=19))
    assert matches(spec, received_at=MONDAY.replace(hour=6, minute=59))
    assert not matches(spec, received_at=MONDAY.replace(hour=7))
    assert not matches(spec, received_at=MONDAY.replace(hour=12))


def test_received_at_in_list_and_not() -> None:
    spec = {"ReceivedAt": {"in": ["Sat-Sun 00:00-24:00", "Mon-Fri 19:00-07:00"]}}
    assert matches(spec, received_at=(MONDAY + timedelta(days=6)).replace(hour=12))  # Sunday
    assert matches(spec, received_at=(MONDAY + timedelta(days=1)).replace(hour=2))  # Tue night
    assert not matches(spec, received_at=MONDAY.replace(hour=12))
    assert matches({"ReceivedAt": {"not": "08:00-18:00"}}, received_at=MONDAY.replace(hour=20))


def test_received_at_aware_datetime_uses_local_time() -> None:
    moment = datetime(2024, 1, 3, 12, 0, tzinfo=UTC)
    local = moment.astimezone()
    window = f"{local.hour:02d}:00-{(local.hour + 1) % 24:02d}:00"
    assert matches({"ReceivedAt": window}, received_at=moment)
    other = moment.astimezone(timezone(timedelta(hours=5)))  # same instant, another zone
    assert matches({"ReceivedAt": window}, received_at=other)


# --- the route snippet from the product issue ---------------------------------------

ROUTE_WHEN = {
    "Modality": "CT",
    "StudyDescription": {"contains": "HEAD"},
    "CallingAETitle": {"in": ["CT1", "CT2"]},
}


def _config(when: Any) -> Any:
    return parse_config(
        {
            "destinations": {"r": {"ae_title": "R", "host": "127.0.0.1", "port": 4243}},
            "routes": [{"name": "x", "trigger": "study", "when": when, "to": ["r"]}],
        }
    )


def test_config_snippet_compiles_and_matches() -> None:
    config = _config(ROUTE_WHEN)
    cond = compile_condition(config.routes[0].when)
    dataset = make_dataset(Modality="CT", StudyDescription="CT HEAD W/O")
    assert cond.evaluate(InstanceFacts(dataset, calling_ae="CT1"))
    assert not cond.evaluate(InstanceFacts(dataset, calling_ae="MR1"))
    assert never_matches(cond) is None
    assert cond.keywords() == {"Modality", "StudyDescription"}


def test_config_reports_rule_errors_with_key_path() -> None:
    with pytest.raises(ConfigError) as info:
        _config({"all": [{"Modality": "CT"}, {"Modaltiy": "CT"}]})
    assert info.value.errors == [
        "routes[0] (x).when.all[1].Modaltiy: unknown DICOM keyword 'Modaltiy' "
        "(did you mean 'Modality'?)"
    ]


# --- describe / explain / keywords --------------------------------------------------


def test_describe() -> None:
    assert compile_condition(ROUTE_WHEN).describe() == (
        "Modality = CT and StudyDescription contains 'HEAD' and CallingAETitle in [CT1, CT2]"
    )
    spec = {
        "any": [
            {"Modality": "CT", "Rows": {"ge": 512}},
            {"StudyTime": {"between": ["080000", "180000"]}},
        ],
        "not": {"StudyDescription": {"regex": "^TEST"}},
        "PatientName": "O'Brien*",
    }
    assert compile_condition(spec).describe() == (
        "((Modality = CT and Rows >= 512) or StudyTime between 080000 and 180000) "
        "and not StudyDescription matches /^TEST/ and PatientName = 'O'Brien*'"
    )
    assert compile_condition({"Modality": {"not": ["CT", "MR"]}}).describe() == (
        "not Modality in [CT, MR]"
    )
    assert compile_condition({"AccessionNumber": {"exists": False}}).describe() == (
        "AccessionNumber does not exist"
    )
    assert compile_condition({"SourceAddress": ["10.0.0.0/8", "1.2.3.4"]}).describe() == (
        "SourceAddress in [10.0.0.0/8, 1.2.3.4]"
    )
    assert compile_condition({"ReceivedAt": {"between": ["19:00", "07:00"]}}).describe() == (
        "ReceivedAt within '19:00-07:00'"
    )
    assert compile_condition({"not": {"Modality": "CT", "Rows": 1}}).describe() == (
        "not (Modality = CT and Rows = 1)"
    )


def test_explain() -> None:
    cond = compile_condition({"Modality": "CT", "StudyDescription": {"contains": "HEAD"}})
    info = facts(Modality="CT", StudyDescription="MR BRAIN")
    assert not cond.evaluate(info)
    assert cond.explain(info) == (
        "Modality 'CT' equals 'CT'; StudyDescription 'MR BRAIN' does not contain 'HEAD'"
    )
    assert cond.explain(facts(StudyDescription="CT HEAD")) == (
        "Modality is missing; StudyDescription 'CT HEAD' contains 'HEAD'"
    )


def test_explain_details() -> None:
    multi = facts(ImageType=["ORIGINAL", "PRIMARY"], Rows=512, calling_ae="MR1")
    assert compile_condition({"ImageType": {"contains": "LOCAL"}}).explain(multi) == (
        "ImageType 'ORIGINAL\\PRIMARY' does not contain 'LOCAL'"
    )
    assert compile_condition({"Rows": {"ge": 256}}).explain(multi) == "Rows 512 is >= 256"
    assert compile_condition({"Rows": {"exists": False}}).explain(multi) == (
        "Rows is present (512)"
    )
    any_cond = compile_condition({"any": [{"CallingAETitle": "CT1"}, {"Rows": 256}]})
    assert any_cond.explain(multi) == (
        "none of: CallingAETitle 'MR1' does not equal 'CT1' or Rows 512 does not equal 256"
    )
    assert compile_condition({"any": [{"Modality": "CT"}, {"Rows": 512}]}).explain(multi) == (
        "Rows 512 equals 512"
    )
    assert compile_condition({"Modality": {"not": "CT"}}).explain(facts(Modality="MR")) == (
        "Modality 'MR' does not equal 'CT'"
    )
    night = facts(received_at=MONDAY.replace(hour=21, minute=5), source_address="10.0.0.9")
    assert compile_condition({"ReceivedAt": "08:00-18:00"}).explain(night) == (
        "ReceivedAt Mon 2024-01-01 21:05 is outside '08:00-18:00'"
    )
    assert compile_condition({"SourceAddress": "10.0.0.0/8"}).explain(night) == (
        "SourceAddress '10.0.0.9' is in 10.0.0.0/8"
    )


def test_keywords_exclude_pseudo_keys() -> None:
    cond = compile_condition(
        {
            "all": [{"Modality": "CT"}, {"not": {"SeriesDescription": {"exists": True}}}],
            "any": [{"StudyDate": {"ge": "20240101"}}, {"CallingAETitle": "X"}],
            "SourceAddress": "10.0.0.0/8",
            "ReceivedAt": "08:00-18:00",
        }
    )
    assert cond.keywords() == {"Modality", "SeriesDescription", "StudyDate"}


# --- errors -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "path", "message"),
    [
        (["Modality"], "", "expected a mapping of keywords to conditions, got a list"),
        (
            {"Modaltiy": "CT"},
            "Modaltiy",
            "unknown DICOM keyword 'Modaltiy' (did you mean 'Modality'?)",
        ),
        (
            {"modality": "CT"},
            "modality",
            "unknown DICOM keyword 'modality' (did you mean 'Modality'?)",
        ),
        ({"NoSuchThingAtAll": 1}, "NoSuchThingAtAll", "unknown DICOM keyword 'NoSuchThingAtAll'"),
        ({1: "CT"}, "1", "keys must be DICOM keywords, got 1"),
        (
            {"ReferencedSeriesSequence": {"exists": True}},
            "ReferencedSeriesSequence",
            "ReferencedSeriesSequence is a sequence (SQ): matching inside sequences is not "
            "supported",
        ),
        (
            {"StudyDescription": {"contians": "HEAD"}},
            "StudyDescription.contians",
            "unknown operator 'contians' (did you mean 'contains'?); valid: equals, in, "
            "contains, startswith, regex, exists, lt, le, gt, ge, between, not",
        ),
        (
            {"all": [{"Modality": "CT"}, {"Modality": {"equal": "CT"}}]},
            "all[1].Modality.equal",
            "unknown operator 'equal' (did you mean 'equals'?); valid: equals, in, contains, "
            "startswith, regex, exists, lt, le, gt, ge, between, not",
        ),
        (
            {"StudyDescription": {"contains": [1, 2]}},
            "StudyDescription.contains",
            "'contains' needs a string, got a list of 2 items",
        ),
        (
            {"Modality": {"startswith": None}},
            "Modality.startswith",
            "'startswith' needs a string, got nothing",
        ),
        ({"Modality": {"regex": "(CT"}}, "Modality.regex", "invalid regular expression '(CT'"),
        (
            {"Modality": {"regex": ["CT"]}},
            "Modality.regex",
            "'regex' needs a string, got a list of 1 item",
        ),
        ({"Modality": {"in": "CT"}}, "Modality.in", "'in' needs a list, got 'CT'"),
        (
            {"Modality": {"in": ["CT", ["MR"]]}},
            "Modality.in[1]",
            "expected a single value, got a list of 1 item",
        ),
        (
            {"Modality": {"equals": ["CT"]}},
            "Modality.equals",
            "'equals' takes one value, got a list of 1 item; use 'in' for a list",
        ),
        (
            {"Modality": {"exists": "yes"}},
            "Modality.exists",
            "'exists' needs true or false, got 'yes'",
        ),
        (
            {"Modality": None},
            "Modality",
            "expected a value for Modality, got nothing; use 'exists' to test presence",
        ),
        (
            {"Modality": True},
            "Modality",
            "expected a value for Modality, got true (a boolean) (quote it in YAML)",
        ),
        (
            {"Modality": ""},
            "Modality",
            "an empty value never matches; use 'exists: false' for empty",
        ),
        ({"Modality": {}}, "Modality", "no operator given; valid: equals, in, contains"),
        (
            {"Rows": {"between": [1]}},
            "Rows.between",
            "'between' needs a list [low, high], got a list of 1 item",
        ),
        ({"Rows": {"between": 5}}, "Rows.between", "'between' needs a list [low, high], got 5"),
        (
            {"Rows": {"between": [1, "x"]}},
            "Rows.between[1]",
            "'between' needs a number for Rows (VR US), got 'x'",
        ),
        ({"Rows": "abc"}, "Rows", "expected a number for Rows (VR US), got 'abc'"),
        (
            {"Rows": {"in": [1, "many"]}},
            "Rows.in[1]",
            "expected a number for Rows (VR US), got 'many'",
        ),
        (
            {"Rows": {"lt": True}},
            "Rows.lt",
            "'lt' needs a number for Rows (VR US), got true (a boolean)",
        ),
        (
            {"PatientAge": {"lt": "050Y"}},
            "PatientAge.lt",
            "'lt' compares numbers, dates and times: '050Y' is not a number and PatientAge "
            "(VR AS) is not a date or time",
        ),
        (
            {"StudyDate": {"ge": "2024-13-01"}},
            "StudyDate.ge",
            "'ge' needs a date such as '20240131' for StudyDate (VR DA), got '2024-13-01'",
        ),
        (
            {"StudyTime": {"ge": 4096}},
            "StudyTime.ge",
            "'ge' needs a time such as '083000' for StudyTime (VR TM), got 4096 (quote it in "
            "YAML: YAML drops leading zeros)",
        ),
        ({"StudyDate": "yesterday"}, "StudyDate", "expected a date such as '20240131'"),
        (
            {"AcquisitionDateTime": {"le": "soon"}},
            "AcquisitionDateTime.le",
            "'le' needs a datetime",
        ),
        ({"all": []}, "all", "'all' needs at least one condition"),
        ({"any": []}, "any", "'any' needs at least one condition"),
        ({"any": {"Modality": "CT"}}, "any", "'any' needs a list of conditions, got a mapping"),
        ({"all": ["CT"]}, "all[0]", "expected a mapping of conditions, got 'CT'"),
        ({"any": [{}]}, "any[0]", "empty condition"),
        ({"not": {}}, "not", "empty condition"),
        ({"not": "CT"}, "not", "expected a mapping of conditions, got 'CT'"),
        (
            {"SourceAddress": "10.0.0.0/33"},
            "SourceAddress",
            "invalid IP address or CIDR network '10.0.0.0/33'",
        ),
        (
            {"SourceAddress": {"in": ["10.0.0.1", "pacs.local"]}},
            "SourceAddress.in[1]",
            "invalid IP address or CIDR network 'pacs.local'",
        ),
        (
            {"SourceAddress": {"contains": "10."}},
            "SourceAddress.contains",
            "operator 'contains' is not supported for SourceAddress (IP address); "
            "valid: equals, in, exists, not",
        ),
        ({"ReceivedAt": "25:00-07:00"}, "ReceivedAt", "invalid time of day '25:00'"),
        ({"ReceivedAt": "Mon-Fry 08:00-18:00"}, "ReceivedAt", "invalid weekday in 'Mon-Fry'"),
        ({"ReceivedAt": "08:00-08:00"}, "ReceivedAt", "time window '08:00-08:00' is empty"),
        (
            {"ReceivedAt": {"between": [1140, "07:00"]}},
            "ReceivedAt.between[0]",
            "expected a time such as '19:00', got 1140 (quote times in YAML",
        ),
        (
            {"ReceivedAt": {"between": ["19:00"]}},
            "ReceivedAt.between",
            "'between' needs a list [start, end]",
        ),
        (
            {"ReceivedAt": {"in": ["08:00-18:00", "soon"]}},
            "ReceivedAt.in[1]",
            "invalid time window 'soon'",
        ),
        (
            {"ReceivedAt": {"gt": "08:00"}},
            "ReceivedAt.gt",
            "operator 'gt' is not supported for ReceivedAt",
        ),
        (
            {"Modality": {"not": {"contians": "C"}}},
            "Modality.not.contians",
            "unknown operator 'contians'",
        ),
        (
            {"not": {"any": [{"Modality": {"in": [None]}}]}},
            "not.any[0].Modality.in[0]",
            "expected a value for Modality, got nothing",
        ),
    ],
)
def test_errors(spec: Any, path: str, message: str | None) -> None:
    error = rule_error(spec)
    assert error.path == path
    if message is not None:
        assert error.message.startswith(message), error.message
    assert str(error) == (f"{path}: {error.message}" if path else error.message)


def test_unknown_keyword_without_close_match_has_no_suggestion() -> None:
    assert "did you mean" not in rule_error({"Qwertyuiop": 1}).message


# --- never_matches ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        ({"Modality": {"in": []}}, "Modality: 'in' list is empty"),
        ({"SourceAddress": {"in": []}}, "SourceAddress: 'in' list is empty"),
        ({"ReceivedAt": {"in": []}}, "ReceivedAt: 'in' list is empty"),
        (
            {"StudyDate": {"between": ["20250101", "20240101"]}},
            "StudyDate: 'between' lower bound '20250101' is above upper bound '20240101'",
        ),
        (
            {"Rows": {"between": [512, 256]}},
            "Rows: 'between' lower bound 512 is above upper bound 256",
        ),
        (
            {"Modality": "CT", "all": [{"Modality": "MR"}]},
            "Modality has a single value: 'Modality = CT' and 'Modality = MR' cannot all hold",
        ),
        (
            {"Modality": {"equals": "CT", "in": ["MR", "US"]}},
            "Modality has a single value: 'Modality = CT' and 'Modality in [MR, US]' cannot "
            "all hold",
        ),
        (
            {"Rows": 512, "all": [{"Rows": "256"}]},
            "Rows has a single value: 'Rows = 512' and 'Rows = 256' cannot all hold",
        ),
        (
            {"Modality": {"exists": False, "equals": "CT"}},
            "Modality: 'exists: false' cannot hold together with 'Modality = CT' (a missing "
            "element matches nothing)",
        ),
        (
            {"SliceThickness": {"gt": 10, "lt": 5}},
            "SliceThickness has a single value: 'SliceThickness > 10' and 'SliceThickness < 5' "
            "cannot all hold",
        ),
        (
            {"StudyDate": {"ge": "20240101"}, "all": [{"StudyDate": {"le": "20231231"}}]},
            "StudyDate has a single value: 'StudyDate >= 20240101' and 'StudyDate <= 20231231' "
            "cannot all hold",
        ),
        (
            {"SeriesNumber": {"gt": 3, "le": 3}},
            "SeriesNumber has a single value: 'SeriesNumber > 3' and 'SeriesNumber <= 3' "
            "cannot all hold",
        ),
        (
            {"Rows": {"between": [1, 256]}, "all": [{"Rows": {"ge": 512}}]},
            "Rows has a single value: 'Rows between 1 and 256' and 'Rows >= 512' cannot all hold",
        ),
        (
            {"AccessionNumber": {"exists": False}, "all": [{"AccessionNumber": {"exists": True}}]},
            "AccessionNumber: 'exists: false' cannot hold together with 'AccessionNumber exists' "
            "(a missing element matches nothing)",
        ),
        (
            {"all": [{"Modality": "CT"}, {"Rows": {"in": []}}]},
            "Rows: 'in' list is empty",
        ),
        (
            {"any": [{"Modality": {"in": []}}, {"Rows": {"between": [2, 1]}}]},
            "no alternative of 'any' can match: Modality: 'in' list is empty; Rows: 'between' "
            "lower bound 2 is above upper bound 1",
        ),
        (
            {"not": {"Modality": {"not": {"in": []}}}},
            "'not' of a condition that always matches (not Modality in [])",
        ),
        (
            {"not": {"any": [{"Modality": "CT"}, {"not": {"Modality": "CT"}}]}},
            "'not' of a condition that always matches (Modality = CT or not Modality = CT)",
        ),
        (
            {"not": {"any": [{"Rows": {"exists": True}}, {"Rows": {"exists": False}}]}},
            "'not' of a condition that always matches (Rows exists or Rows does not exist)",
        ),
        (
            {"Modality": "CT", "not": {"Modality": "CT"}},
            "'Modality = CT' and 'not Modality = CT' cannot both hold",
        ),
    ],
)
def test_never_matches(spec: dict[str, Any], reason: str) -> None:
    assert never_matches(compile_condition(spec)) == reason


@pytest.mark.parametrize(
    "spec",
    [
        {"Modality": "CT"},
        {"Modality": "CT", "all": [{"Modality": "CT*"}]},  # wildcards are not literals
        {"ImageType": "ORIGINAL", "all": [{"ImageType": "AXIAL"}]},  # multi-valued element
        {"Modality": {"in": ["CT", "MR"]}, "all": [{"Modality": ["MR", "US"]}]},
        {"any": [{"Modality": {"in": []}}, {"Modality": "CT"}]},
        {"Modality": {"not": {"in": []}}},
        {"StudyDate": {"between": ["20240101", "20240101"]}},
        {"Modality": {"exists": False}, "Rows": 1},
        {"not": {"Modality": "CT"}},
        {"Modality": {"exists": False}, "all": [{"Modality": {"exists": False}}]},
        {"SeriesNumber": {"ge": 3, "le": 3}},  # exactly 3
        {"SliceThickness": {"gt": 1, "lt": 5}, "all": [{"SliceThickness": {"between": [2, 9]}}]},
        {"any": [{"Rows": {"gt": 10}}, {"Rows": {"lt": 5}}]},  # either side: fine
    ],
)
def test_never_matches_accepts_satisfiable_rules(spec: dict[str, Any]) -> None:
    assert never_matches(compile_condition(spec)) is None
