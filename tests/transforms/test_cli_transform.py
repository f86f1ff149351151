"""test-rule --transform, check, and the API's dry run with a transform."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from pydicom.data import get_testdata_file

from tests.support.api import api_env
from tests.support.cli import run_cli

SOURCE = Path(str(get_testdata_file("JPEG2000.dcm")))
CONFIG = {
    "storage": {"path": "data"},
    "destinations": {"pacs": {"ae_title": "PACS", "host": "192.0.2.10", "port": 104}},
    "routes": [{"name": "all", "to": ["pacs"], "transform": "fix"}],
    "transforms": {
        "fix": [
            {"set": {"InstitutionName": "General Hospital", "StationName": "{CallingAETitle}"}},
            {"remove": ["0009,xx10"]},
        ],
        "strict": [{"set": {"StationName": "{InstitutionName}"}}],
    },
}


def write_config(tmp_path: Path) -> Path:
    path = tmp_path / "dicomrouter.yaml"
    path.write_text(yaml.safe_dump(CONFIG), encoding="utf-8")
    return path


def test_test_rule_transform_prints_the_diff(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    before = SOURCE.read_bytes()
    result = run_cli(
        "test-rule",
        "--config",
        str(config),
        "--calling-ae",
        "MOD1",
        "--transform",
        "fix",
        str(SOURCE),
        env={"COLUMNS": "200"},
    )
    assert result.returncode == 0, result.stderr
    assert "transform fix @ " in result.stdout
    assert "General Hospital" in result.stdout and "MOD1" in result.stdout
    assert "(0009,1010)" in result.stdout and "removed" in result.stdout
    assert SOURCE.read_bytes() == before


def test_test_rule_transform_json_and_refusal(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    result = run_cli(
        "test-rule", "--config", str(config), "--json", "--transform", "strict", str(SOURCE)
    )
    assert result.returncode == 1
    entry = json.loads(result.stdout)["files"][0]
    assert entry["destinations"] == ["pacs"]
    assert entry["transform"]["pipeline"] == "strict"
    assert entry["transform"]["error"].startswith("refused: transforms.strict[0].set")

    ok = run_cli("test-rule", "--config", str(config), "--json", "--transform", "fix", str(SOURCE))
    rows = {row["path"]: row for row in json.loads(ok.stdout)["files"][0]["transform"]["diff"]}
    assert rows["InstitutionName"] == {
        "path": "InstitutionName",
        "tag": "(0008,0080)",
        "vr": "LO",
        "change": "changed",
        "before": "Hospital Name 12345",
        "after": "General Hospital",
    }


def test_test_rule_unknown_transform_fails_clearly(tmp_path: Path) -> None:
    result = run_cli(
        "test-rule", "--config", str(write_config(tmp_path)), "--transform", "nope", str(SOURCE)
    )
    assert result.returncode != 0
    assert "no transform 'nope' (known: fix, strict)" in result.stderr


def test_check_reports_pipeline_findings(tmp_path: Path) -> None:
    data = dict(CONFIG)
    data["transforms"] = {**CONFIG["transforms"], "bad": [{"set": {"StatonName": "x"}}]}
    path = tmp_path / "dicomrouter.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    result = run_cli("check", "--config", str(path), "--json")
    report = json.loads(result.stdout)
    assert result.returncode == 1
    assert {
        "key": "transforms.bad[0].set.StatonName",
        "message": report["errors"][0]["message"],
    } in report["errors"]
    assert "did you mean 'StationName'" in report["errors"][0]["message"]
    assert {w["key"] for w in report["warnings"]} >= {"transforms.bad", "transforms.strict"}


def test_api_rule_tester_returns_the_diff(tmp_path: Path) -> None:
    data = {k: v for k, v in CONFIG.items() if k != "storage"}
    env = api_env(tmp_path, data)
    files = [("files", ("ct.dcm", SOURCE.read_bytes(), "application/dicom"))]
    response = env.operator.post(
        "/api/v1/routes/test", files=files, data={"calling_ae": "MOD1", "transform": "fix"}
    )
    assert response.status_code == 200, response.text
    preview = response.json()["files"][0]["transform"]
    assert preview["pipeline"] == "fix" and len(preview["version"]) == 6
    changed = {row["path"]: row["after"] for row in preview["diff"]}
    assert changed["StationName"] == "MOD1"
    missing = env.operator.post("/api/v1/routes/test", files=files, data={"transform": "nope"})
    assert missing.status_code == 404
    page = env.operator.post("/routes/test", files=files, data={"transform": "fix"})
    assert page.status_code == 200
    assert 'transform <span class="mono">fix @ ' in page.text and "General Hospital" in page.text


def test_only_an_admin_may_preview_a_pipeline_keyed_by_a_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A preview of a keyed pipeline computes the real pseudonyms of whatever is
    uploaded: an operator could test guesses against them. Admins only."""
    monkeypatch.setenv("DEID_TEST_SECRET", "the secret")
    data = {k: v for k, v in CONFIG.items() if k != "storage"}
    data["transforms"] = {
        **data["transforms"],
        "research": [{"deidentify": {"secret_env": "DEID_TEST_SECRET", "allow_burned_in": True}}],
    }
    env = api_env(tmp_path, data)
    files = [("files", ("ct.dcm", SOURCE.read_bytes(), "application/dicom"))]
    form = {"transform": "research"}
    refused = env.operator.post("/api/v1/routes/test", files=files, data=form)
    assert refused.status_code == 403 and "only an admin" in refused.json()["detail"]
    page = env.operator.post("/routes/test", files=files, data=form)
    assert "only an admin" in page.text
    allowed = env.admin.post("/api/v1/routes/test", files=files, data=form)
    assert allowed.status_code == 200, allowed.text
    preview = allowed.json()["files"][0]["transform"]
    assert preview["pipeline"] == "research" and not preview.get("error")
    # A pipeline with no secret in it stays open to operators.
    assert (
        env.operator.post("/api/v1/routes/test", files=files, data={"transform": "fix"}).status_code
        == 200
    )
