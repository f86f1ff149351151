"""``/api/v1/config/validate`` and ``PUT /api/v1/config`` on the first-hour mistakes:
a configuration that locks every user out, duplicate keys, misspelt keys."""

from __future__ import annotations

from pathlib import Path

from dicomrouter.security import hash_token
from tests.support.api import TOKENS, api_env

YAML = {"Content-Type": "application/yaml"}
VALIDATE = "/api/v1/config/validate"


def _no_admin_env(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A node whose running configuration has no admin (as after an install with a
    viewer and an operator token only): lockout() refuses nothing there."""
    auth = {
        "tokens": {
            f"{role}-token": {"token_hash": hash_token(TOKENS[role]), "role": role}
            for role in ("viewer", "operator")
        }
    }
    return api_env(tmp_path, {"auth": auth})


def _tokens_yaml(role: str) -> str:
    token_hash = hash_token("x" * 32)
    return f"auth:\n  tokens:\n    t: {{token_hash: '{token_hash}', role: {role}}}\n"


def test_validate_warns_when_the_candidate_locks_out_every_user(tmp_path: Path) -> None:
    env = _no_admin_env(tmp_path)
    nobody = env.operator.post(VALIDATE, content="ae_title: NEW\n", headers=YAML)
    assert nobody.status_code == 200, nobody.text
    report = nobody.json()
    assert report["valid"] is True and report["errors"] == []
    assert report["warnings"][0].startswith(
        "warning: auth: this configuration would lock out every user"
    )
    viewers = _tokens_yaml("viewer")
    no_admin = env.operator.post(VALIDATE, content=viewers, headers=YAML).json()
    assert no_admin["valid"] is True
    assert any("no user or token has role admin" in w for w in no_admin["warnings"])
    assert not any("lock out every user" in w for w in no_admin["warnings"])
    # Turning authentication off, or naming an admin, warns of nothing.
    for fine in (
        "auth: {enabled: false}\n",
        _tokens_yaml("admin"),
    ):
        warnings = env.operator.post(VALIDATE, content=fine, headers=YAML).json()["warnings"]
        assert not any(w.startswith("warning: auth:") for w in warnings), warnings


def test_where_an_admin_runs_a_lockout_is_an_error_not_just_a_warning(tmp_path: Path) -> None:
    env = api_env(tmp_path)  # the running configuration has admins
    report = env.operator.post(VALIDATE, content="ae_title: NEW\n", headers=YAML).json()
    assert report["valid"] is False
    assert any("leaves no admin" in error for error in report["errors"])
    assert not any(w.startswith("warning: auth:") for w in report["warnings"])


def test_duplicate_and_misspelt_keys_are_reported_by_validate_and_put(tmp_path: Path) -> None:
    env = api_env(tmp_path)
    path = tmp_path / "dicomrouter.yaml"
    path.write_text("ae_title: KEPT\n")
    env.ctx.config_path = path
    twice = "ae_title: A\ndicom:\n  port: 104\nae_title: B\n"
    report = env.operator.post(VALIDATE, content=twice, headers=YAML).json()
    assert report["valid"] is False
    assert report["errors"] == [
        "ae_title: duplicate key 'ae_title' at line 4 (first at line 1); "
        "YAML would keep only the last"
    ]
    put = env.admin.put("/api/v1/config", content=twice, headers=YAML)
    assert put.status_code == 422
    assert "duplicate key 'ae_title' at line 4" in put.json()["detail"]["errors"][0]
    assert path.read_text() == "ae_title: KEPT\n"
    typo = env.operator.post(VALIDATE, content="dicom: {max_assocations: 4}\n", headers=YAML)
    assert typo.json()["errors"] == [
        "dicom.max_assocations: unknown key; did you mean 'max_associations'?"
    ]
