"""Configuration versions: validation, apply, diff, rollback (control/versions.py), and
the /api/v1/config endpoints with their roles."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest
import yaml

from dicomrouter.config import ConfigError
from dicomrouter.control import audit, versions
from dicomrouter.store import create_index_engine
from tests.support.api import ApiEnv, api_env, auth_section


def _config(tmp_path: Path, **extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "storage": {"path": str(tmp_path / "data")},
        "destinations": {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": 11113}},
        "routes": [{"name": "all", "to": ["pacs"]}],
    }
    data.update(extra)
    return data


def _text(data: dict[str, Any]) -> str:
    return yaml.safe_dump(data, sort_keys=False)


@pytest.fixture
def setup(tmp_path: Path):  # type: ignore[no-untyped-def]
    path = tmp_path / "dicomrouter.yaml"
    text = _text(_config(tmp_path))
    path.write_text(text)
    os.chmod(path, 0o640)
    running = versions.parse_yaml(text, tmp_path, environ={})
    (tmp_path / "data").mkdir()
    engine = create_index_engine(running.database_url)
    versions.record_if_new(engine, text, author="system", source="startup")
    return path, running, engine


def test_a_valid_candidate_is_written_recorded_audited_and_reports_restart_keys(
    setup, tmp_path: Path
) -> None:
    path, running, engine = setup
    new = _config(tmp_path, dicom={"port": 4242, "allowed_callers": ["CT1"]})
    notified: list[bool] = []
    result = versions.apply_yaml(
        engine,
        path,
        _text(new),
        running,
        author="alice",
        address="10.0.0.9",
        comment="lock down",
        notify=lambda: notified.append(True),
        environ={},
    )
    assert result.created and result.version_id == 2 and notified == [True]
    assert result.restart_required == ["dicom.port"]
    assert result.live == ["dicom.allowed_callers"]
    # The effective configuration keeps the bound port until a restart.
    assert result.config.dicom.port == running.dicom.port
    assert result.config.dicom.allowed_callers == ["CT1"]
    assert yaml.safe_load(path.read_text())["dicom"]["port"] == 4242
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    version = versions.get_version(engine, 2)
    assert version is not None and version.author == "alice" and version.comment == "lock down"
    assert version.source == "api" and version.yaml == path.read_text()
    _, entries = audit.query(engine, action="config.apply")
    assert entries[0]["actor"] == "alice" and entries[0]["source"] == "10.0.0.9"
    assert entries[0]["detail"]["changed"] == ["dicom.allowed_callers", "dicom.port"]
    assert entries[0]["detail"]["restart_required"] == ["dicom.port"]


def test_an_invalid_candidate_changes_nothing_and_is_audited_as_failed(setup) -> None:
    path, running, engine = setup
    before = path.read_text()
    with pytest.raises(ConfigError) as info:
        versions.apply_yaml(
            engine,
            path,
            "routes:\n  - {name: x, to: [nowhere]}\n",
            running,
            author="alice",
            environ={},
        )
    assert any(e.startswith("routes[0].to: unknown destination") for e in info.value.errors)
    with pytest.raises(ConfigError) as info:
        versions.apply_yaml(engine, path, "dicom: [unclosed\n", running, author="a", environ={})
    assert "YAML syntax error" in info.value.errors[0]
    assert path.read_text() == before
    assert versions.list_versions(engine)[0] == 1
    _, entries = audit.query(engine, action="config.apply", outcome="failed")
    assert len(entries) == 2 and "errors" in entries[1]["detail"]


def test_the_same_text_again_is_not_a_new_version(setup) -> None:
    path, running, engine = setup
    result = versions.apply_yaml(engine, path, path.read_text(), running, author="a", environ={})
    assert not result.created and result.version_id == 1 and result.changed == []


def test_versions_list_diff_and_rollback(setup, tmp_path: Path) -> None:
    path, running, engine = setup
    second = _config(tmp_path, routes=[{"name": "all", "to": ["pacs"], "enabled": False}])
    applied = versions.apply_yaml(engine, path, _text(second), running, author="bob", environ={})
    running = applied.config
    total, listed = versions.list_versions(engine)
    assert total == 2 and [v.id for v in listed] == [2, 1] and listed[0].yaml is None
    change = versions.diff_versions(engine, 1, 2)
    assert change is not None and "--- version 1" in change and "+  enabled: false" in change
    assert versions.diff_versions(engine, 1, 99) is None
    result = versions.rollback(engine, path, 1, running, author="carol", environ={})
    assert result is not None and result.version_id == 3 and result.changed == ["routes.all"]
    third = versions.get_version(engine, 3)
    assert third is not None and third.source == "rollback" and third.comment.endswith("1")
    first = versions.get_version(engine, 1)
    assert first is not None and third.sha256 == first.sha256
    assert path.read_text() == first.yaml
    assert versions.rollback(engine, path, 42, running, author="carol") is None


def test_validate_gives_errors_lint_warnings_and_diff(setup, tmp_path: Path) -> None:
    path, running, engine = setup
    candidate = _config(tmp_path)
    candidate["destinations"]["spare"] = {"ae_title": "SPARE", "host": "h", "port": 104}
    report = versions.validate(_text(candidate), path.read_text(), tmp_path, running, {})
    assert report.valid and report.errors == []
    assert any("destinations.spare" in w and "not used" in w for w in report.warnings)
    assert "+  spare:" in report.diff and "destinations.spare" in report.changed[0]
    bad = versions.validate("dicom: {port: 0}\n", path.read_text(), tmp_path, running, {})
    assert not bad.valid and bad.errors[0].startswith("dicom.port:")


def test_no_configuration_file_is_refused(setup) -> None:
    _, running, engine = setup
    with pytest.raises(versions.NoConfigFile, match="dicomrouter init"):
        versions.apply_yaml(engine, None, "{}", running, author="a")


def test_changed_keys_name_routes_and_destinations(tmp_path: Path) -> None:
    old = versions.parse_yaml(_text(_config(tmp_path)), tmp_path, environ={})
    data = _config(tmp_path, routes=[{"name": "ct", "to": ["pacs"]}])
    data["destinations"]["pacs"]["port"] = 104
    new = versions.parse_yaml(_text(data), tmp_path, environ={})
    assert versions.changed_keys(old, new) == [
        "destinations.pacs.port",
        "routes.all",
        "routes.ct",
    ]


# -- the API ---------------------------------------------------------------------------
def _env(tmp_path: Path) -> tuple[ApiEnv, Path]:
    data = _config(tmp_path)
    data["auth"] = auth_section()
    env = api_env(tmp_path, data)
    path = tmp_path / "dicomrouter.yaml"
    path.write_text(_text(data))
    env.ctx.config_path = path
    versions.record_if_new(env.engine, path.read_text(), author="system", source="startup")
    return env, path


def test_api_roles(tmp_path: Path) -> None:
    env, path = _env(tmp_path)
    text = path.read_text()
    reads = [
        "/api/v1/config",
        "/api/v1/config/versions",
        "/api/v1/config/versions/1",
        "/api/v1/config/versions/1/diff/1",
    ]
    for url in reads:
        assert env.anonymous.get(url).status_code == 401, url
        assert env.viewer.get(url).status_code == 200, url
    assert env.viewer.get("/api/v1/config/export").status_code == 403
    assert env.operator.get("/api/v1/config/export").status_code == 403
    assert env.viewer.post("/api/v1/config/validate", content=text).status_code == 403
    assert env.operator.post("/api/v1/config/validate", content=text).status_code == 200
    for method, url in [
        ("PUT", "/api/v1/config"),
        ("POST", "/api/v1/config/import"),
        ("POST", "/api/v1/config/versions/1/rollback"),
    ]:
        assert env.operator.request(method, url, content=text).status_code == 403, url
        assert env.anonymous.request(method, url, content=text).status_code == 401, url
    assert versions.list_versions(env.engine)[0] == 1


def test_api_hashes_are_redacted_below_admin(tmp_path: Path) -> None:
    env, path = _env(tmp_path)
    shown = env.viewer.get("/api/v1/config").json()
    assert shown["redacted"] and "scrypt$" not in shown["yaml"]
    assert "password_hash: <redacted>" in shown["yaml"]
    assert shown["version"]["id"] == 1 and shown["path"] == str(path)
    assert "scrypt$" not in env.viewer.get("/api/v1/config/versions/1").json()["yaml"]
    full = env.admin.get("/api/v1/config").json()
    assert not full["redacted"] and full["yaml"] == path.read_text()
    exported = env.admin.get("/api/v1/config/export")
    assert exported.text == path.read_text()
    assert exported.headers["content-type"].startswith("application/yaml")
    assert audit.query(env.engine, action="config.export")[0] == 1


def test_api_put_applies_and_an_invalid_one_is_422(tmp_path: Path) -> None:
    env, path = _env(tmp_path)
    notified: list[bool] = []
    env.ctx.reload_node = lambda: notified.append(True)
    data = yaml.safe_load(path.read_text())
    data["dicom"] = {"allowed_callers": ["CT1"], "port": 2000}
    response = env.admin.put(
        "/api/v1/config",
        content=_text(data),
        headers={"Content-Type": "application/yaml"},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["version"] == 2 and body["restart_required"] == ["dicom.port"]
    assert body["applied_live"] == ["dicom.allowed_callers"] and notified == [True]
    assert env.ctx.config.dicom.allowed_callers == ["CT1"]
    assert env.ctx.config.dicom.port == 11112  # bound at start-up: kept until a restart
    assert env.viewer.get("/api/v1/config").json()["restart_pending"] == ["dicom.port"]

    bad = env.admin.put("/api/v1/config", json={"yaml": "dicom: {port: http}\n", "comment": "oops"})
    assert bad.status_code == 422
    assert bad.json()["detail"]["errors"][0].startswith("dicom.port:")
    assert yaml.safe_load(path.read_text())["dicom"]["port"] == 2000
    assert env.ctx.config.dicom.allowed_callers == ["CT1"] and notified == [True]
    _, entries = audit.query(env.engine, action="config.")
    assert [(e["action"], e["outcome"], e["actor"]) for e in entries[:2]] == [
        ("config.apply", "failed", "admin-token"),
        ("config.apply", "ok", "admin-token"),
    ]


def test_api_import_rollback_validate_and_diff(tmp_path: Path) -> None:
    env, path = _env(tmp_path)
    original = path.read_text()
    data = yaml.safe_load(original)
    data["routes"][0]["enabled"] = False
    imported = env.admin.post(
        "/api/v1/config/import", json={"yaml": _text(data), "comment": "from staging"}
    )
    assert imported.status_code == 200 and imported.json()["changed"] == ["routes.all"]
    assert env.ctx.config.routes[0].enabled is False
    listed = env.viewer.get("/api/v1/config/versions").json()
    assert listed["total"] == 2
    assert [(v["source"], v["comment"]) for v in listed["versions"]][0] == (
        "import",
        "from staging",
    )
    change = env.viewer.get("/api/v1/config/versions/1/diff/2").json()["diff"]
    assert "+  enabled: false" in change
    assert env.viewer.get("/api/v1/config/versions/1/diff/9").status_code == 404
    assert env.viewer.get("/api/v1/config/versions/9").status_code == 404

    rolled = env.admin.post("/api/v1/config/versions/1/rollback")
    assert rolled.status_code == 200 and rolled.json()["version"] == 3
    assert path.read_text() == original and env.ctx.config.routes[0].enabled is True
    assert env.admin.post("/api/v1/config/versions/99/rollback").status_code == 404

    report = env.operator.post(
        "/api/v1/config/validate", content="routes: [{name: r, to: [x]}]\n"
    ).json()
    assert not report["valid"] and "unknown destination" in report["errors"][0]
    assert "scrypt$" not in report["diff"]  # the active text, redacted for an operator


def test_api_put_without_a_file_is_409(tmp_path: Path) -> None:
    env = api_env(tmp_path)
    response = env.admin.put("/api/v1/config", content="{}")
    assert response.status_code == 409 and "dicomrouter init" in response.json()["detail"]
    assert env.viewer.get("/api/v1/config").json()["path"] is None
