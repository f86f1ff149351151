"""check's findings about pipelines."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dicomrouter.config import RouterConfig
from dicomrouter.transforms.lint import lint_pipelines

DEST = {"ae_title": "PACS", "host": "192.0.2.10", "port": 104}


def findings(transforms: dict[str, Any], environ: dict[str, str] | None = None, **dest: Any):
    config = RouterConfig.model_validate(
        {
            "destinations": {"pacs": {**DEST, **dest}},
            "routes": [{"name": "all", "to": ["pacs"], "transform": "used"}],
            "transforms": {"used": [{"remove": ["OperatorsName"]}], **transforms},
        }
    )
    return {(f.severity, f.where): f.message for f in lint_pipelines(config, environ or {})}


def test_a_clean_used_pipeline_has_no_findings() -> None:
    assert findings({}) == {}


def test_unknown_keywords_are_errors_with_a_suggestion_and_key_path() -> None:
    found = findings(
        {"used": [{"set": {"InstitutonName": "x"}}, {"copy": {"StudyID": "Acession"}}]}
    )
    assert (
        "did you mean 'InstitutionName'"
        in found[("error", "transforms.used[0].set.InstitutonName")]
    )
    assert ("error", "transforms.used[1].copy.Acession") in found


def test_replace_on_binary_vr_is_an_error_and_empty_only_pattern_a_warning() -> None:
    found = findings(
        {
            "used": [
                {"replace": {"Rows": {"pattern": "1"}}},
                {"replace": {"AccessionNumber": {"pattern": "^$|^"}}},
                {"replace": {"PatientID": {"pattern": "^", "with": "GH-"}}},  # a prefix: fine
            ]
        }
    )
    assert "not text" in found[("error", "transforms.used[0].replace.Rows")]
    assert (
        "changes nothing"
        in found[("warning", "transforms.used[1].replace.AccessionNumber.pattern")]
    )
    assert not [k for k in found if "used[2]" in k[1]]


def test_map_tables_missing_or_malformed_are_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\na,c\n", encoding="utf-8")
    good = tmp_path / "good.csv"
    good.write_text("original,new\na,b\n", encoding="utf-8")
    found = findings(
        {
            "used": [
                {"map": {"PatientID": {"file": str(tmp_path / "none.csv")}}},
                {"map": {"PatientID": {"file": str(bad)}}},
                {"map": {"PatientID": {"file": str(good)}}},
            ]
        }
    )
    assert "no such file" in found[("error", "transforms.used[0].map.PatientID.file")]
    assert "listed twice" in found[("error", "transforms.used[1].map.PatientID.file")]
    assert len(found) == 2


def test_unset_secret_is_a_warning_naming_the_variable() -> None:
    steps = {"used": [{"shift_dates": {"secret_env": "SHIFT_KEY"}}]}
    found = findings(steps)
    message = found[("warning", "transforms.used[0].shift_dates.secret_env")]
    assert "SHIFT_KEY is not set" in message
    assert findings(steps, {"SHIFT_KEY": "x"}) == {}


def test_deidentify_without_a_secret_is_flagged() -> None:
    found = findings({"used": [{"deidentify": {"secret_env": "DEID"}}]})
    assert ("warning", "transforms.used[0].deidentify.secret_env") in found


def test_unused_pipeline_is_a_warning_and_a_destination_counts_as_a_user() -> None:
    assert (
        "not used"
        in findings({"spare": [{"remove": ["PatientName"]}]})[("warning", "transforms.spare")]
    )
    assert findings({"spare": [{"remove": ["PatientName"]}]}, transform="spare") == {}
