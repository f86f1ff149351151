"""Authentication, roles, probes and the security CLI commands."""

from __future__ import annotations

import base64
import socket
import time
from pathlib import Path

import pytest
import yaml
from sqlalchemy import Engine, text
from sqlalchemy.exc import DatabaseError
from typer.testing import CliRunner

from dicomrouter.cli.main import app as cli
from dicomrouter.config import ConfigError, parse_config
from dicomrouter.security import (
    hash_password,
    hash_token,
    verify_password,
    verify_token,
)
from dicomrouter.store import audit, create_index_engine, heartbeat
from dicomrouter.store.schema import SCHEMA_VERSION
from tests.support.api import PASSWORD, api_env


def test_password_and_token_hashes_verify_only_the_right_secret() -> None:
    stored = hash_password("s3cret")
    assert stored.startswith("scrypt$") and "s3cret" not in stored
    assert verify_password("s3cret", stored)
    assert not verify_password("S3cret", stored)
    assert not verify_password("s3cret", "garbage")
    token_hash = hash_token("drt_abc")
    assert verify_token("drt_abc", token_hash) and not verify_token("drt_abd", token_hash)


def test_plain_passwords_in_the_config_are_refused_with_the_key_path() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"auth": {"users": {"bob": {"password_hash": "hunter2"}}}}, environ={})
    assert "auth.users.bob.password_hash" in str(info.value)
    with pytest.raises(ConfigError) as info:
        parse_config(
            {"auth": {"tokens": {"ci": {"token_hash": "abc", "role": "admin"}}}}, environ={}
        )
    assert "auth.tokens.ci.token_hash" in str(info.value)
    with pytest.raises(ConfigError) as info:
        parse_config(
            {"auth": {"users": {"bob": {"password_hash": hash_password("x"), "role": "root"}}}},
            environ={},
        )
    assert "auth.users.bob.role" in str(info.value)


def test_no_credentials_is_401_and_a_small_role_is_403(tmp_path: Path) -> None:
    env = api_env(tmp_path)
    response = env.anonymous.get("/api/v1/me")
    assert response.status_code == 401
    # Bearer only: a Basic challenge makes browsers prompt, then send the password
    # along with cross-site requests too.
    assert response.headers["www-authenticate"] == 'Bearer realm="dicomrouter"'
    assert env.viewer.get("/api/v1/me").json() == {
        "name": "viewer-token",
        "role": "viewer",
        "kind": "token",
    }
    bad = env.anonymous.get("/api/v1/me", headers={"Authorization": "Bearer drt_nope"})
    assert bad.status_code == 401


def test_basic_auth_and_session_login(tmp_path: Path) -> None:
    env = api_env(tmp_path)
    basic = base64.b64encode(f"operator:{PASSWORD}".encode()).decode()
    me = env.anonymous.get("/api/v1/me", headers={"Authorization": f"Basic {basic}"})
    assert me.json()["role"] == "operator"
    assert (
        env.anonymous.post("/api/v1/login", json={"username": "admin", "password": "x"}).status_code
        == 401
    )
    login = env.anonymous.post("/api/v1/login", json={"username": "admin", "password": PASSWORD})
    assert login.status_code == 200
    assert "samesite=strict" in login.headers["set-cookie"].lower()
    assert env.anonymous.get("/api/v1/me").json()["name"] == "admin"  # the cookie
    env.anonymous.post("/api/v1/logout")
    assert env.anonymous.get("/api/v1/me").status_code == 401


def test_a_removed_user_loses_their_session_at_once(tmp_path: Path) -> None:
    env = api_env(tmp_path)
    env.anonymous.post("/api/v1/login", json={"username": "viewer", "password": PASSWORD})
    assert env.anonymous.get("/api/v1/me").status_code == 200
    data = env.ctx.config.model_dump(mode="json")
    del data["auth"]["users"]["viewer"]
    env.ctx.config = parse_config(data, environ={})
    assert env.anonymous.get("/api/v1/me").status_code == 401


def test_failed_logins_are_audited(tmp_path: Path) -> None:
    env = api_env(tmp_path)
    env.anonymous.post("/api/v1/login", json={"username": "mallory", "password": "guess"})
    env.anonymous.get("/api/v1/me", headers={"Authorization": "Bearer drt_forged"})
    total, entries = audit.query(env.engine, action="auth.login", outcome="denied")
    assert total == 2
    assert {e["actor"] for e in entries} == {"mallory", "token"}


def test_the_audit_log_is_append_only(tmp_path: Path) -> None:
    env = api_env(tmp_path)
    audit.record(env.engine, "admin", "config.apply", "v1")
    with pytest.raises(DatabaseError, match="append-only"), env.engine.begin() as conn:
        conn.execute(text("UPDATE audit_log SET actor = 'someone else'"))
    with pytest.raises(DatabaseError, match="append-only"), env.engine.begin() as conn:
        conn.execute(text("DELETE FROM audit_log"))
    assert audit.query(env.engine)[0] == 1


def _processes_running(engine: Engine) -> None:
    """The receiver's and dispatch process's heartbeats, as a running node writes them."""
    for role in heartbeat.REQUIRED_ROLES:
        heartbeat.beat(engine, socket.gethostname(), role, time.time(), True, "")  # default node


def test_probes_are_open_by_default_and_closed_on_request(tmp_path: Path) -> None:
    env = api_env(tmp_path)
    _processes_running(env.engine)
    assert env.anonymous.get("/healthz").json() == {"status": "ok"}
    ready = env.anonymous.get("/readyz")
    assert ready.status_code == 200
    assert {"index", "storage", "disk"} <= set(ready.json()["checks"])
    closed = api_env(tmp_path / "closed", {"http": {"open_probes": False}})
    _processes_running(closed.engine)
    assert closed.anonymous.get("/healthz").status_code == 401
    assert closed.viewer.get("/readyz").status_code == 200


def test_readyz_fails_below_the_disk_watermark(tmp_path: Path) -> None:
    env = api_env(tmp_path, {"storage": {"path": str(tmp_path / "d"), "min_free_space": 2**62}})
    response = env.anonymous.get("/readyz")
    assert response.status_code == 503
    assert response.json()["checks"]["disk"]["ok"] is False


@pytest.mark.sqlite_only
def test_an_old_index_is_upgraded_in_place(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'index.sqlite'}"
    create_index_engine(url).dispose()
    new_indexes = {
        "ix_instances_received_at",
        "ix_instances_accession",
        "ix_route_matches_route",
        "ix_jobs_state",
        "ix_jobs_created",
        "ix_job_instances_updated",
    }
    with create_index_engine(url, create=False).begin() as conn:  # make it look like v1
        conn.exec_driver_sql("ALTER TABLE destination_state DROP COLUMN admin_paused")
        for name in new_indexes:
            conn.exec_driver_sql(f"DROP INDEX {name}")
        conn.exec_driver_sql("UPDATE meta_info SET value = '1' WHERE key = 'schema'")
    engine = create_index_engine(url)
    with engine.connect() as conn:
        columns = [row[1] for row in conn.exec_driver_sql("PRAGMA table_info(destination_state)")]
        version = conn.exec_driver_sql("SELECT value FROM meta_info WHERE key='schema'").scalar()
        indexes = {
            row[0]
            for row in conn.exec_driver_sql("SELECT name FROM sqlite_master WHERE type='index'")
        }
    assert "admin_paused" in columns and version == str(SCHEMA_VERSION)
    assert new_indexes <= indexes


def test_init_writes_a_config_with_a_working_admin(tmp_path: Path) -> None:
    target = tmp_path / "dicomrouter.yaml"
    result = CliRunner().invoke(cli, ["init", "--config", str(target)])
    assert result.exit_code == 0, result.output
    password = next(
        line.split("password:")[1].split()[0]
        for line in result.output.splitlines()
        if "password:" in line
    )
    document = yaml.safe_load(target.read_text())
    stored = document["auth"]["users"]["admin"]["password_hash"]
    assert verify_password(password, stored) and password not in target.read_text()
    assert target.stat().st_mode & 0o077 == 0  # holds hashes: not world-readable
    parse_config(document, environ={})  # loads as written
    again = CliRunner().invoke(cli, ["init", "--config", str(target)])
    assert again.exit_code != 0 and "exists" in again.output


def test_token_and_hash_password_print_pasteable_snippets() -> None:
    runner = CliRunner()
    result = runner.invoke(cli, ["token", "ci", "--role", "operator"])
    assert result.exit_code == 0, result.output
    # The entry alone, to paste under auth.tokens (see test_cli_auth_entries.py).
    snippet = yaml.safe_load(result.stdout)
    token = result.stderr.split("shown once):")[1].strip()
    assert verify_token(token, snippet["ci"]["token_hash"])
    parse_config({"auth": {"tokens": snippet}}, environ={})
    result = runner.invoke(cli, ["hash-password", "bob", "--password", "pw", "--role", "admin"])
    snippet = yaml.safe_load(result.stdout)
    assert verify_password("pw", snippet["bob"]["password_hash"])
    assert runner.invoke(cli, ["token", "x", "--role", "root"]).exit_code != 0
