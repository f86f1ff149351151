"""Re-identification end to end: a real router process de-identifies a study on its
way to dcmtk's storescp, recording the mapping; ``dicomrouter reidentify`` then turns
the pseudonymous Patient ID the PACS received back into the original."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from pydicom import dcmread

from tests.support.dcmtk import HOST, StoreSCP
from tests.support.router import RouterProcess, all_settled
from tests.support.synth import make_study

pytestmark = pytest.mark.interop

ENV = {
    "DEID_SECRET": "a test secret, long enough to key an HMAC",
    "REID_KEY": "the re-identification key of the e2e test",
}


def test_a_deidentified_study_is_reidentified_by_its_pseudonymous_patient_id(
    tmp_path: Path, pacs: StoreSCP, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = make_study(tmp_path / "in", 3, patient_id="MRN-E2E-0042", patient_name="Roe^Richard")
    original_study = str(dcmread(files[0]).StudyInstanceUID)
    config = {
        "transforms": {
            "research": [
                {
                    "deidentify": {
                        "secret_env": "DEID_SECRET",
                        "options": ["retain_longitudinal_modified_dates"],
                        "mapping": {"key_env": "REID_KEY"},
                    }
                }
            ]
        },
        "destinations": {"pacs": {"ae_title": pacs.aet, "host": HOST, "port": pacs.port}},
        "routes": [{"name": "all", "to": ["pacs"], "transform": "research"}],
    }
    with RouterProcess(tmp_path / "router", config, env=ENV) as router:
        assert router.send(files).returncode == 0
        jobs = router.wait_jobs(lambda j: len(j) == 3 and all_settled(j), 60, "settled")
        assert {j["state"] for j in jobs} == {"completed"}, jobs
        received = [dcmread(path) for path in pacs.received_files()]
        assert len(received) == 3
        pseudonym = str(received[0].PatientID)
        assert pseudonym != "MRN-E2E-0042" and {str(r.PatientID) for r in received} == {pseudonym}
        # The CLI reads the key from its own environment, as an admin would run it.
        monkeypatch.setenv("REID_KEY", ENV["REID_KEY"])
        args = ("reidentify", pseudonym, "--config", str(router.config_path), "--json")
        result = json.loads(router.cli(*args, check=True).stdout)
        by_kind = {e["kind"]: e for e in result["entries"]}
        assert by_kind["patient"]["original"]["PatientID"] == "MRN-E2E-0042"
        assert by_kind["patient"]["original"]["PatientName"] == "Roe^Richard"
        assert "days" in by_kind["date_offset"]["original"]
        study = router.cli(
            "reidentify",
            str(received[0].StudyInstanceUID),
            "--config",
            str(router.config_path),
            "--json",
            check=True,
        )
        assert json.loads(study.stdout)["entries"][0]["original"]["uid"] == original_study
        unknown = router.cli("reidentify", "UNKNOWN", "--config", str(router.config_path))
        assert unknown.returncode == 1 and "no re-identification mapping" in unknown.stderr
    with sqlite3.connect(router.storage / "index.sqlite") as conn:
        stored = conn.execute("SELECT * FROM pseudonym_map").fetchall()
    assert len(stored) == 7  # patient, date offset, study, series, 3 instances
    assert not [row for row in stored if "MRN-E2E-0042" in repr(row) or "Roe" in repr(row)]
