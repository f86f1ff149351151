"""Configuration versions: validation, apply, diff, rollback (control/versions.py), and
the /api/v1/config endpoints with their roles."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml

from dicomrouter.config import ConfigError
from dicomrouter.control import versions
from dicomrouter.control.errors import Conflict, NotFound
from dicomrouter.security import Principal, Role
from dicomrouter.store import audit, create_index_engine
from tests.support.api import ApiEnv, api_env, auth_section

YAML = {"Content-Type": "application/yaml"}


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
    assert any(e.startswith("routes[0] (x).to[0]: unknown destination") for e in info.value.errors)
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
    validate = "/api/v1/config/validate"
    assert env.viewer.post(validate, content=text, headers=YAML).status_code == 403
    assert env.operator.post(validate, content=text, headers=YAML).status_code == 200
    for method, url in [
        ("PUT", "/api/v1/config"),
        ("POST", "/api/v1/config/import"),
        ("POST", "/api/v1/config/versions/1/rollback"),
    ]:
        assert env.operator.request(method, url, content=text, headers=YAML).status_code == 403
        assert env.anonymous.request(method, url, content=text, headers=YAML).status_code == 401
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
        "/api/v1/config/validate", content="routes: [{name: r, to: [x]}]\n", headers=YAML
    ).json()
    assert not report["valid"] and "unknown destination" in report["errors"][0]
    assert "scrypt$" not in report["diff"]  # the active text, redacted for an operator


def test_api_put_without_a_file_is_409(tmp_path: Path) -> None:
    env = api_env(tmp_path)
    response = env.admin.put("/api/v1/config", content="{}", headers=YAML)
    assert response.status_code == 409 and "dicomrouter init" in response.json()["detail"]
    assert env.viewer.get("/api/v1/config").json()["path"] is None


# -- redaction (security review: secrets must not reach viewers) -------------------------
HOOK_SECRETS = ("Bearer s3cr3t", "k3y-v4lue")
DB_PASSWORD = "pg-s3cret"
COMMENT_SECRET = "hunter2"


def _secret_text(tmp_path: Path, route_enabled: bool = True) -> str:
    """A valid configuration whose secrets are written in every way the old text regex
    missed: a quoted key, an anchor, a folded block scalar, a tag; plus webhook headers,
    a database password and a comment."""
    auth = auth_section()
    pw = auth["users"]["admin"]["password_hash"]
    tokens = {name: t["token_hash"] for name, t in auth["tokens"].items()}
    return f"""# paging password is {COMMENT_SECRET}
storage: {{path: {tmp_path / "data"}}}
database: postgresql://router:{DB_PASSWORD}@db.example/router
destinations:
  pacs: {{ae_title: PACS, host: 127.0.0.1, port: 11113}}
routes:
  - {{name: all, to: [pacs], enabled: {str(route_enabled).lower()}}}
auth:
  users:
    "viewer": {{"password_hash": "{pw}", role: viewer}}
    operator:
      password_hash: &shared {pw}
      role: operator
    admin:
      password_hash: >-
        {pw}
      role: admin
    tagged:
      password_hash: !!str {pw}
  tokens:
    viewer-token: {{"token_hash": '{tokens["viewer-token"]}', role: viewer}}
    operator-token: {{token_hash: !!str {tokens["operator-token"]}, role: operator}}
    admin-token:
      token_hash: |-
        {tokens["admin-token"]}
      role: admin
alerts:
  webhooks:
    ops:
      url: https://hooks.example/alert
      headers:
        "Authorization": {HOOK_SECRETS[0]}
        X-Api-Key: !!str {HOOK_SECRETS[1]}
"""


def _secrets() -> list[str]:
    auth = auth_section()
    hashes = [auth["users"]["admin"]["password_hash"]]
    hashes += [t["token_hash"] for t in auth["tokens"].values()]
    return [*hashes, "scrypt$", "sha256$", *HOOK_SECRETS, DB_PASSWORD, COMMENT_SECRET]


def _leaks(text: str) -> list[str]:
    return [secret for secret in _secrets() if secret in text]


def test_redacted_yaml_masks_secrets_however_they_are_written(tmp_path: Path) -> None:
    text = _secret_text(tmp_path)
    versions.parse_yaml(text, tmp_path, environ={})  # a valid configuration
    shown = versions.redacted_yaml(text)
    assert _leaks(shown) == []
    data = yaml.safe_load(shown)
    users, tokens = data["auth"]["users"], data["auth"]["tokens"]
    assert {u["password_hash"] for u in users.values()} == {"<redacted>"}
    assert {t["token_hash"] for t in tokens.values()} == {"<redacted>"}
    assert data["alerts"]["webhooks"]["ops"]["headers"] == {
        "Authorization": "<redacted>",
        "X-Api-Key": "<redacted>",
    }
    assert data["alerts"]["webhooks"]["ops"]["url"] == "https://hooks.example/alert"
    assert data["database"] == "postgresql://router:***@db.example/router"
    assert data["routes"][0]["name"] == "all" and users["viewer"]["role"] == "viewer"


def test_redacted_yaml_masks_aliases_and_odd_shapes_and_hides_what_does_not_parse() -> None:
    # A secret reused elsewhere through an alias is masked there too.
    aliased = "auth: {users: {a: {password_hash: &h scrypt$X}}}\nroutes: [{name: *h}]\n"
    assert "scrypt$X" not in versions.redacted_yaml(aliased)
    # Malformed shapes (a hand-edited file): hash keys anywhere, headers not a mapping,
    # a database value that is not a URL.
    odd = (
        "auth: {users: [{password_hash: scrypt$Y}]}\n"
        "alerts: {webhooks: {w: {url: 'https://h', headers: [Bearer tok3n]}}}\n"
        "database: {url: 'postgresql://u:pw9@h/db'}\n"
    )
    shown = versions.redacted_yaml(odd)
    assert "scrypt$Y" not in shown and "tok3n" not in shown and "pw9" not in shown
    # A database URL without a password is shown as it is.
    assert "sqlite:////srv/index.sqlite" in versions.redacted_yaml(
        "database: sqlite:////srv/index.sqlite\n"
    )
    # Text that does not parse (or is not a mapping) is not shown at all.
    for broken in ["auth: {users: {a: {password_hash: scrypt$Z\n", "- password_hash scrypt$Z\n"]:
        shown = versions.redacted_yaml(broken)
        assert shown == versions.UNPARSEABLE and "scrypt$Z" not in shown
    assert versions.redacted_yaml("") == ""


def test_redacted_diffs_compare_the_redacted_dumps(tmp_path: Path) -> None:
    old = _secret_text(tmp_path)
    new = _secret_text(tmp_path, route_enabled=False).replace("s3cr3t", "n3w-s3cr3t")
    change = versions.diff(old, new, redacted=True)
    assert "+  enabled: false" in change and _leaks(change) == [] and "n3w" not in change
    assert "n3w-s3cr3t" in versions.diff(old, new)  # admins: the exact texts


def _secret_env(tmp_path: Path) -> tuple[ApiEnv, Path, str]:
    env, path = _env(tmp_path)
    text = _secret_text(tmp_path)
    path.write_text(text)
    versions.record_version(env.engine, text, author="system", source="startup")
    return env, path, text


def test_api_viewers_never_see_secrets_admins_see_the_exact_text(tmp_path: Path) -> None:
    env, path, text = _secret_env(tmp_path)
    newest = versions.latest_version(env.engine, with_yaml=False)
    assert newest is not None
    v1 = newest.id
    shown = env.viewer.get("/api/v1/config")
    assert _leaks(shown.text) == [] and shown.json()["redacted"]
    assert "comments" in shown.json()["redaction"]
    assert yaml.safe_load(shown.json()["yaml"])["routes"][0]["name"] == "all"
    assert _leaks(env.viewer.get(f"/api/v1/config/versions/{v1}").text) == []
    # A new version changing a secret and a route: the diff shows only the route.
    changed = _secret_text(tmp_path, route_enabled=False).replace("s3cr3t", "n3w-s3cr3t")
    put = env.admin.put("/api/v1/config", content=changed, headers=YAML)
    assert put.status_code == 200, put.text
    v2 = put.json()["version"]
    change = env.viewer.get(f"/api/v1/config/versions/{v1}/diff/{v2}")
    assert _leaks(change.text) == [] and "n3w" not in change.text
    assert "+  enabled: false" in change.json()["diff"] and change.json()["redacted"]
    assert _leaks(env.viewer.get(f"/api/v1/config/versions/{v2}").text) == []
    # Validation output for an operator: the diff against the active text is redacted.
    report = env.operator.post("/api/v1/config/validate", content=text, headers=YAML)
    assert report.json()["valid"] and report.json()["diff"]
    assert _leaks(report.text) == [] and "n3w" not in report.text
    # Admins: the exact texts, comments included.
    full = env.admin.get("/api/v1/config").json()
    assert full["yaml"] == changed and not full["redacted"] and "redaction" not in full
    assert env.admin.get(f"/api/v1/config/versions/{v1}").json()["yaml"] == text
    admin_diff = env.admin.get(f"/api/v1/config/versions/{v1}/diff/{v2}").json()["diff"]
    assert "n3w-s3cr3t" in admin_diff


def test_api_a_file_that_does_not_parse_is_not_shown_to_viewers(tmp_path: Path) -> None:
    env, path = _env(tmp_path)
    broken = path.read_text() + "extra: [unclosed\n"
    path.write_text(broken)
    shown = env.viewer.get("/api/v1/config").json()
    assert shown["yaml"] == versions.UNPARSEABLE and "scrypt$" not in str(shown)
    assert env.admin.get("/api/v1/config").json()["yaml"] == broken


# -- line ends --------------------------------------------------------------------------
def test_crlf_text_is_the_same_configuration(setup, tmp_path: Path) -> None:
    path, running, engine = setup
    text = path.read_text()
    crlf = text.replace("\n", "\r\n")
    check = versions.validate(crlf, text, tmp_path, running, {})
    assert check.valid and check.diff == "" and check.changed == []
    result = versions.apply_yaml(engine, path, crlf, running, author="a", environ={})
    assert not result.created and result.version_id == 1 and result.diff == ""
    assert b"\r" not in path.read_bytes()
    # A changed candidate with \r\n (or old Mac \r) line ends: stored with \n.
    changed = text.replace("port: 11113", "port: 11114").replace("\n", "\r")
    result = versions.apply_yaml(engine, path, changed, running, author="a", environ={})
    assert result.created and result.changed == ["destinations.pacs.port"]
    stored = versions.get_version(engine, result.version_id)
    assert stored is not None and stored.yaml is not None and "\r" not in stored.yaml
    assert b"\r" not in path.read_bytes()
    edits = [line for line in result.diff.splitlines()[2:] if line[:1] in "+-"]
    assert edits == ["-    port: 11113", "+    port: 11114"]


def test_api_crlf_body_is_no_new_version(tmp_path: Path) -> None:
    env, path = _env(tmp_path)
    crlf = path.read_text().replace("\n", "\r\n")
    response = env.admin.put("/api/v1/config", content=crlf, headers=YAML)
    assert response.status_code == 200 and response.json()["created"] is False
    assert b"\r" not in path.read_bytes() and versions.list_versions(env.engine)[0] == 1


# -- one critical section ---------------------------------------------------------------
class _Probe:
    """A runtime whose configuration records whether the apply lock was held."""

    def __init__(self, config: Any, engine: Any, path: Path) -> None:
        self._config, self.engine, self.config_path = config, engine, path
        self.reload_node = None
        self.seen: list[tuple[str, bool]] = []

    @property
    def config(self) -> Any:
        self.seen.append(("read", versions._apply_lock.locked()))
        return self._config

    @config.setter
    def config(self, value: Any) -> None:
        self.seen.append(("write", versions._apply_lock.locked()))
        self._config = value


def test_apply_config_reads_and_replaces_the_running_config_under_the_lock(
    setup, tmp_path: Path
) -> None:
    path, running, engine = setup
    probe = _Probe(running, engine, path)
    admin = Principal("admin", Role.admin, "user")
    new = _text(_config(tmp_path, routes=[{"name": "all", "to": ["pacs"], "enabled": False}]))
    result = versions.apply_config(probe, new, admin, "10.0.0.1")
    assert result.changed == ["routes.all"] and probe._config.routes[0].enabled is False
    assert probe.seen == [("read", True), ("write", True)]
    probe.seen.clear()
    rolled = versions.rollback_config(probe, 1, admin, "10.0.0.1")
    assert rolled.changed == ["routes.all"] and probe.seen == [("read", True), ("write", True)]
    with pytest.raises(NotFound):
        versions.rollback_config(probe, 99, admin, "")
    with pytest.raises(versions.InvalidConfig) as info:
        versions.apply_config(probe, "dicom: {port: 0}\n", admin, "")
    assert info.value.errors[0].startswith("dicom.port:")
    probe.config_path = None
    with pytest.raises(Conflict, match="dicomrouter init"):
        versions.apply_config(probe, new, admin, "")


def test_api_concurrent_puts_leave_the_process_on_the_newest_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PUT A pauses after recording its version; PUT B runs meanwhile. The process must
    end on B, like the file and the newest version (it ended on A before the fix)."""
    env, path = _env(tmp_path)
    data = yaml.safe_load(path.read_text())
    texts = {}
    for name, enabled in (("A", False), ("B", True)):
        data["routes"][0]["enabled"] = enabled
        data["routes"][0]["name"] = f"route-{name}"
        texts[name] = _text(data)
    b_done = threading.Event()
    in_a = threading.Event()
    compare = versions.changed_keys

    def slow_for_a(old: Any, new: Any) -> list[str]:
        if new.routes[0].name == "route-A":
            in_a.set()
            b_done.wait(timeout=1.0)  # only long enough for B when nothing blocks it
        return compare(old, new)

    monkeypatch.setattr(versions, "changed_keys", slow_for_a)
    answers: dict[str, int] = {}

    def put(name: str) -> None:
        response = env.admin.put("/api/v1/config", content=texts[name], headers=YAML)
        answers[name] = response.status_code
        if name == "B":
            b_done.set()

    first = threading.Thread(target=put, args=("A",))
    first.start()
    assert in_a.wait(timeout=10)
    second = threading.Thread(target=put, args=("B",))
    second.start()
    first.join(timeout=20)
    second.join(timeout=20)
    assert answers == {"A": 200, "B": 200}
    newest = versions.latest_version(env.engine)
    assert newest is not None and newest.yaml == path.read_text() == texts["B"]
    assert env.ctx.config.routes[0].name == "route-B"


# -- request media types ----------------------------------------------------------------
def test_api_config_bodies_must_be_yaml_or_json(tmp_path: Path) -> None:
    env, path = _env(tmp_path)
    text = path.read_text()
    refused: list[dict[str, Any]] = [
        {"content": text},  # no Content-Type
        {"content": text, "headers": {"Content-Type": "text/plain"}},
        {"data": {"yaml": text}},  # application/x-www-form-urlencoded
        {"files": {"yaml": ("c.yaml", text.encode())}},  # multipart/form-data
    ]
    for method, url, client in [
        ("PUT", "/api/v1/config", env.admin),
        ("POST", "/api/v1/config/import", env.admin),
        ("POST", "/api/v1/config/validate", env.operator),
    ]:
        for kwargs in refused:
            response = client.request(method, url, **kwargs)
            assert response.status_code == 415, (url, kwargs.keys(), response.text)
        for media in ("application/yaml", "application/x-yaml", "text/yaml; charset=utf-8"):
            response = client.request(method, url, content=text, headers={"Content-Type": media})
            assert response.status_code == 200, (url, media, response.text)
        assert client.request(method, url, json={"yaml": text}).status_code == 200
    assert versions.list_versions(env.engine)[0] == 1  # the same text: no new version


def test_a_file_holding_an_older_version_is_history_and_gets_the_newest(setup) -> None:
    """Several nodes: a node's file is recorded only if its text is new; an older
    version in it is history (it is given the newest), and a text never recorded (an
    edit not applied yet) is neither history nor overwritten."""
    path, running, engine = setup
    first = path.read_text()
    newer = first.replace("port: 11113", "port: 11114")
    second, _ = versions.record_if_new(engine, newer, author="a", source="api")
    older = versions.file_is_history(engine, first)
    assert older is not None and older.id == 1
    assert versions.file_is_history(engine, newer) is None  # the newest: nothing to do
    edit = newer.replace("port: 11114", "port: 11115")
    assert versions.file_is_history(engine, edit) is None  # new: it is recorded
    newest = versions.get_version(engine, second)
    assert newest is not None
    assert versions.write_newest(engine, path, newest)
    assert path.read_text() == newer and stat.S_IMODE(path.stat().st_mode) == 0o640
    path.write_text(edit)
    assert not versions.write_newest(engine, path, newest)  # the edit stays for its author
    assert path.read_text() == edit


def test_a_version_naming_another_node_is_not_written_into_this_nodes_file(setup) -> None:
    """A version recorded from another node's file names that node (``node.name``):
    written here, it would make this node start under the other's name and take its
    leases. This node's file keeps its own text; a version naming no node, or this
    one, is written."""
    path, running, engine = setup
    first = path.read_text()
    theirs = "node:\n  name: node-a\n" + first.replace("port: 11113", "port: 11114")
    their_id, _ = versions.record_if_new(engine, theirs, author="a", source="api")
    version = versions.get_version(engine, their_id)
    assert version is not None
    assert not versions.write_newest(engine, path, version, "node-b")
    assert path.read_text() == first
    assert versions.write_newest(engine, path, version, "node-a")
    assert path.read_text() == theirs


def test_recording_a_version_is_announced_to_listeners(tmp_path: Path, postgres_url: str) -> None:
    """PostgreSQL: every node hears of a new version at once (NOTIFY at commit)."""
    from dicomrouter.store.listen import Listener
    from tests.support.router import wait_until

    engine = create_index_engine(postgres_url)
    heard: list[str | None] = []
    listener = Listener(engine, versions.CHANNEL, heard.append)
    listener.start()
    try:
        wait_until(lambda: heard == [None], 10, message="listening")  # (re)connected
        first = versions.record_version(engine, "a: 1\n", author="a", source="api")
        second, created = versions.record_if_new(engine, "a: 2\n", author="a", source="api")
        versions.record_if_new(engine, "a: 2\n", author="a", source="api")  # not new: silent
        wait_until(lambda: len(heard) == 3, 10, message="two announcements")
        assert created and heard == [None, str(first), str(second)]
    finally:
        listener.stop()
        engine.dispose()
