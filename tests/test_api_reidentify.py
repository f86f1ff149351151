"""``GET /api/v1/pseudonyms/{pseudonym}``: admin only (403 below, audited as denied),
404 for an unknown pseudonym, 503 without the key; the CLI reads the same."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dicomrouter.cli.main import app as cli
from dicomrouter.store import audit
from dicomrouter.store import pseudonyms as rows
from dicomrouter.transforms.mapping import MappingKey
from dicomrouter.transforms.pseudonyms import PatientKey
from tests.support.api import ApiEnv, api_env

KEY = "a mapping key for the API tests, 32+ characters"
PSEUDONYM = "RESEARCH-ABCDEFGHIJKLMNOP"


def seeded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ApiEnv:
    monkeypatch.setenv("REID_KEY", KEY)
    monkeypatch.setenv("DEID_SECRET", "the pseudonym secret, whatever it is")
    env = api_env(
        tmp_path,
        {
            "transforms": {
                "research": [
                    {
                        "deidentify": {
                            "secret_env": "DEID_SECRET",
                            "mapping": {"key_env": "REID_KEY"},
                        }
                    }
                ]
            }
        },
    )
    patient = PatientKey(patient_id="MRN-4711", issuer="GH", name="Doe^Jane")
    original = {"PatientID": "MRN-4711", "IssuerOfPatientID": "GH", "PatientName": "Doe^Jane"}
    record = MappingKey(KEY.encode()).seal(
        "research", "patient", patient.material(), PSEUDONYM, original
    )
    rows.record(env.engine, [asdict(record)])
    return env


def test_only_an_admin_reidentifies_and_every_attempt_is_audited(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = seeded(tmp_path, monkeypatch)
    assert env.anonymous.get(f"/api/v1/pseudonyms/{PSEUDONYM}").status_code == 401
    for role in ("viewer", "operator"):
        response = env.client(role).get(f"/api/v1/pseudonyms/{PSEUDONYM}")
        assert response.status_code == 403, response.text
        assert "MRN-4711" not in response.text
        assert env.client(role).get("/api/v1/pseudonyms?original=MRN-4711").status_code == 403
    response = env.admin.get(f"/api/v1/pseudonyms/{PSEUDONYM}")
    assert response.status_code == 200, response.text
    (entry,) = response.json()["entries"]
    assert entry["kind"] == "patient" and entry["original"]["PatientID"] == "MRN-4711"
    by_original = env.admin.get(
        "/api/v1/pseudonyms", params={"original": "MRN-4711", "issuer": "GH"}
    )
    assert by_original.json()["entries"][0]["pseudonym"] == PSEUDONYM
    assert env.admin.get("/api/v1/pseudonyms/UNKNOWN").status_code == 404
    _, entries = audit.query(env.engine, action="pseudonym.reidentify")
    outcomes = [(e["actor"], e["outcome"]) for e in reversed(entries)]
    assert outcomes == [
        ("viewer-token", "denied"),
        ("viewer-token", "denied"),
        ("operator-token", "denied"),
        ("operator-token", "denied"),
        ("admin-token", "ok"),
        ("admin-token", "ok"),
        ("admin-token", "ok"),
    ]
    assert entries[2]["target"] == PSEUDONYM and entries[2]["detail"]["results"] == 1
    assert all("MRN-4711" not in str(e) and "Doe" not in str(e) for e in entries)


def test_without_the_key_the_answer_is_503_and_says_which_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = seeded(tmp_path, monkeypatch)
    monkeypatch.delenv("REID_KEY")
    response = env.admin.get(f"/api/v1/pseudonyms/{PSEUDONYM}")
    assert response.status_code == 503 and "REID_KEY" in response.json()["detail"]


def test_the_cli_reidentifies_as_the_local_user(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = seeded(tmp_path, monkeypatch)
    config = tmp_path / "dicomrouter.yaml"
    config.write_text(
        "storage: {path: " + str(env.config.storage.path) + "}\n"
        "transforms:\n  research:\n    - deidentify: {secret_env: DEID_SECRET, "
        "mapping: {key_env: REID_KEY}}\n"
    )
    result = CliRunner().invoke(cli, ["reidentify", PSEUDONYM, "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert "MRN-4711" in result.output and "patient" in result.output
    missing = CliRunner().invoke(cli, ["reidentify", "NOPE", "--config", str(config)])
    assert missing.exit_code == 1 and "no re-identification mapping" in missing.output
    _, entries = audit.query(env.engine, action="pseudonym.reidentify")
    assert {e["source"] for e in entries} == {"cli"}
