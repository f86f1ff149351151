"""Security review fixes: CSRF and DNS rebinding, login throttling, the session
key, input that used to give 500, and a walk over every route's access check."""

from __future__ import annotations

import base64
import logging
import os
import re
import stat
import threading
import time
from pathlib import Path
from typing import Any

import fastapi.routing
import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from starlette.routing import BaseRoute

from dicomrouter.api.app import MIN_SECRET_LENGTH, session_secret
from dicomrouter.api.csrf import is_local_host, same_origin
from dicomrouter.edge import auth
from dicomrouter.edge.auth import LoginThrottle
from dicomrouter.store import audit
from tests.support.api import PASSWORD, ApiEnv, api_env

TOO_BIG = "99999999999999999999"  # beyond a signed 64-bit integer


# -- input errors ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", f"/api/v1/jobs/{TOO_BIG}"),
        ("POST", f"/api/v1/jobs/{TOO_BIG}/retry"),
        ("POST", f"/api/v1/jobs/{TOO_BIG}/cancel"),
        ("PUT", f"/api/v1/jobs/{TOO_BIG}/priority"),
        ("GET", f"/api/v1/config/versions/{TOO_BIG}"),
        ("GET", f"/api/v1/config/versions/1/diff/{TOO_BIG}"),
        ("POST", f"/api/v1/config/versions/{TOO_BIG}/rollback"),
        ("GET", f"/jobs/{TOO_BIG}"),
        ("POST", f"/jobs/{TOO_BIG}/retry"),
        ("GET", f"/config/versions/{TOO_BIG}"),
        ("POST", f"/config/versions/{TOO_BIG}/rollback"),
        ("GET", "/api/v1/jobs/0"),
        ("GET", "/api/v1/jobs?since=nan"),
        ("GET", "/api/v1/jobs?until=inf"),
        ("GET", "/api/v1/jobs?since=-Infinity"),
        ("GET", "/api/v1/jobs?since=1e999"),
        ("GET", "/api/v1/audit?since=nan"),
    ],
)
def test_out_of_range_ids_and_non_finite_times_are_422(
    tmp_path: Path, method: str, path: str
) -> None:
    env = api_env(tmp_path)
    body = {"priority": 1} if path.endswith("/priority") else None
    response = env.admin.request(method, path, json=body)
    assert response.status_code == 422, response.text


def test_a_non_finite_time_in_a_bulk_filter_is_422(tmp_path: Path) -> None:
    env = api_env(tmp_path)
    for body in ('{"since": NaN}', '{"until": "inf"}', '{"since": Infinity}'):
        response = env.operator.post(
            "/api/v1/jobs/retry", content=body, headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 422, (body, response.text)


def test_the_largest_id_is_a_plain_404(tmp_path: Path) -> None:
    env = api_env(tmp_path)
    assert env.viewer.get(f"/api/v1/jobs/{2**63 - 1}").status_code == 404
    assert env.viewer.get(f"/api/v1/config/versions/{2**63 - 1}").status_code == 404


# -- CSRF ---------------------------------------------------------------------------------
def basic(user: str, password: str = PASSWORD) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.mark.parametrize(
    "headers",
    [
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},  # a sibling host is another origin too
        {"Origin": "http://evil.example"},
        {"Origin": "null"},
        {"Origin": "http://testserver:8080"},
        {"Origin": "http://testserver.evil.example"},
        {"Sec-Fetch-Site": "same-origin", "Origin": "http://evil.example"},
    ],
)
def test_cross_site_unsafe_requests_are_refused_even_with_basic_credentials(
    tmp_path: Path, headers: dict[str, str]
) -> None:
    env = api_env(tmp_path)
    # What a browser with cached Basic credentials sends for a form on evil.example.
    for method, path in [
        ("POST", "/api/v1/jobs/retry"),
        ("PUT", "/api/v1/jobs/1/priority"),
        ("PATCH", "/api/v1/jobs/1"),
        ("DELETE", "/api/v1/jobs/1"),
        ("POST", "/api/v1/login"),
        ("POST", "/jobs/bulk"),
    ]:
        response = env.anonymous.request(method, path, headers={**headers, **basic("admin")})
        assert response.status_code == 403, (method, path, response.text)
        assert "cross-" in response.json()["detail"]
    assert audit.query(env.engine)[0] == 0  # refused before anything ran


@pytest.mark.parametrize(
    "headers",
    [
        {},  # curl, scripts
        {"Sec-Fetch-Site": "same-origin", "Origin": "http://testserver"},
        {"Sec-Fetch-Site": "none"},  # typed into the address bar
        {"Origin": "http://testserver"},  # a browser without Fetch Metadata
        {"Origin": "http://TESTSERVER:80"},
        {"Origin": "https://testserver"},  # TLS ended by a proxy in front
    ],
)
def test_same_origin_and_header_less_requests_pass(tmp_path: Path, headers: dict[str, str]) -> None:
    env = api_env(tmp_path)
    response = env.anonymous.post(
        "/api/v1/login", json={"username": "viewer", "password": PASSWORD}, headers=headers
    )
    assert response.status_code == 200, response.text


def test_safe_methods_are_not_checked(tmp_path: Path) -> None:
    env = api_env(tmp_path)
    response = env.viewer.get("/api/v1/me", headers={"Sec-Fetch-Site": "cross-site"})
    assert response.status_code == 200


def test_origin_comparison() -> None:
    assert same_origin("http://router:8080", "http", "router:8080")
    assert same_origin("http://[::1]:8080", "http", "[::1]:8080")
    assert same_origin("https://router", "https", "router:443")
    assert not same_origin("http://router", "https", "router")  # no downgrade
    assert not same_origin("http://router:8081", "http", "router:8080")
    assert not same_origin("http://user@router:8080", "http", "router:8080")
    assert not same_origin("http://router:8080", "http", "")
    assert not same_origin("garbage", "http", "router")


# -- Basic is accepted, never offered ------------------------------------------------------
def test_a_401_offers_bearer_only_so_browsers_never_prompt_for_basic(tmp_path: Path) -> None:
    env = api_env(tmp_path)
    for path in ["/api/v1/me", "/api/v1/jobs", "/api/v1/config"]:
        response = env.anonymous.get(path)
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == 'Bearer realm="dicomrouter"'
    failed = env.anonymous.get("/api/v1/me", headers=basic("admin", "wrong"))
    assert "basic" not in failed.headers["www-authenticate"].lower()
    assert env.anonymous.get("/api/v1/me", headers=basic("admin")).json()["role"] == "admin"


# -- DNS rebinding with auth disabled --------------------------------------------------------
def open_env(tmp_path: Path) -> ApiEnv:
    return api_env(tmp_path, {"auth": {"enabled": False}})


@pytest.mark.parametrize("host", ["evil.example", "router.hospital.local", "localhost.evil"])
def test_without_auth_only_ip_or_localhost_host_names_are_served(tmp_path: Path, host: str) -> None:
    env = open_env(tmp_path)
    client = TestClient(env.anonymous.app, base_url=f"http://{host}:8080")
    for method, path in [("GET", "/api/v1/me"), ("GET", "/"), ("POST", "/api/v1/jobs/retry")]:
        response = client.request(method, path, json={"all": True})
        assert response.status_code == 403, (method, path)
        assert "DNS rebinding" in response.json()["detail"]


@pytest.mark.parametrize("host", ["127.0.0.1:8080", "localhost:8080", "[::1]:8080", "10.1.2.3"])
def test_without_auth_ip_and_localhost_work(tmp_path: Path, host: str) -> None:
    env = open_env(tmp_path)
    client = TestClient(env.anonymous.app, base_url=f"http://{host}")
    assert client.get("/api/v1/me").json()["role"] == "admin"


def test_with_auth_any_host_name_is_served(tmp_path: Path) -> None:
    env = api_env(tmp_path)
    client = TestClient(env.anonymous.app, base_url="http://router.hospital.local")
    assert client.get("/api/v1/me", headers=basic("viewer")).status_code == 200


def test_local_host_names() -> None:
    assert is_local_host("localhost") and is_local_host("LOCALHOST:80")
    assert is_local_host("192.168.1.5:8000") and is_local_host("[fe80::1]:80")
    assert not is_local_host("evil.example") and not is_local_host("127.0.0.1.nip.io")


# -- throttling ---------------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def scrypts(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Counts the password hashes computed (the expensive part of a login)."""
    calls: list[str] = []
    real = auth.verify_password

    def counting(password: str, stored: str) -> bool:
        calls.append(password)
        return real(password, stored)

    monkeypatch.setattr(auth, "verify_password", counting)
    return calls


def throttled_env(tmp_path: Path) -> tuple[ApiEnv, Clock]:
    env = api_env(tmp_path)
    clock = Clock()
    env.anonymous.app.state.login_throttle = LoginThrottle(clock=clock)  # type: ignore[attr-defined]
    return env, clock


def bad_login(client: TestClient, user: str = "admin") -> Any:
    return client.post("/api/v1/login", json={"username": user, "password": "guess"})


def test_five_failures_lock_the_address_out_without_scrypt_or_audit_rows(
    tmp_path: Path, scrypts: list[str]
) -> None:
    env, _ = throttled_env(tmp_path)
    for _ in range(5):
        assert bad_login(env.anonymous).status_code == 401
    assert len(scrypts) == 5
    rows_before = audit.query(env.engine)[0]
    assert rows_before == 6  # five failures, one lockout
    total, lockouts = audit.query(env.engine, action="auth.lockout")
    assert total == 1 and lockouts[0]["source"] == "testclient"
    for attempt in [
        lambda: bad_login(env.anonymous),
        lambda: env.anonymous.post(
            "/api/v1/login", json={"username": "admin", "password": PASSWORD}
        ),
        lambda: env.anonymous.get("/api/v1/me", headers=basic("admin", "guess")),
        lambda: env.anonymous.get("/api/v1/me", headers={"Authorization": "Bearer drt_x"}),
    ]:
        response = attempt()
        assert response.status_code == 429, response.text
        assert 0 < int(response.headers["retry-after"]) <= 60
    assert len(scrypts) == 5  # no hash computed while locked out
    assert audit.query(env.engine)[0] == rows_before  # and nothing written
    # Valid tokens are cheap to check: scripts behind the same address keep working.
    assert env.viewer.get("/api/v1/me").status_code == 200


def test_the_lockout_doubles_per_further_failure_up_to_15_minutes(tmp_path: Path) -> None:
    env, clock = throttled_env(tmp_path)
    for _ in range(5):
        bad_login(env.anonymous)
    delays = []
    for _ in range(6):
        retry_after = int(bad_login(env.anonymous).headers["retry-after"])
        clock.now += retry_after  # wait it out, then fail once more
        assert bad_login(env.anonymous).status_code == 401
        delays.append(retry_after)
    assert delays == [60, 120, 240, 480, 900, 900]
    assert audit.query(env.engine, action="auth.lockout")[0] == 7  # one per lockout
    # Once the lockout is over, the right password works, but does not end the
    # address's streak (a valid account must not reset the guessing at others):
    clock.now += 900
    ok = env.anonymous.post("/api/v1/login", json={"username": "admin", "password": PASSWORD})
    assert ok.status_code == 200
    assert bad_login(env.anonymous).status_code == 401
    assert int(bad_login(env.anonymous).headers["retry-after"]) == 900
    # Only 5 minutes of calm after a lockout end the streak.
    clock.now += 900 + 300
    for _ in range(4):
        assert bad_login(env.anonymous).status_code == 401


def test_failures_spread_over_more_than_5_minutes_do_not_lock_out(tmp_path: Path) -> None:
    env, clock = throttled_env(tmp_path)
    for _ in range(12):  # 5 failures span 304 s
        assert bad_login(env.anonymous).status_code == 401
        clock.now += 76


@pytest.fixture
def fresh_password_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forget the Basic logins remembered by earlier tests."""
    monkeypatch.setattr(auth, "_passwords", auth._PasswordCache())


def test_a_successful_login_resets_that_users_count(
    tmp_path: Path, fresh_password_cache: None
) -> None:
    env, _ = throttled_env(tmp_path)
    for _ in range(4):
        assert bad_login(env.anonymous, "viewer").status_code == 401
    assert env.anonymous.get("/api/v1/me", headers=basic("viewer")).status_code == 200
    for _ in range(4):
        assert bad_login(env.anonymous, "viewer").status_code == 401
    assert bad_login(env.anonymous, "viewer").status_code == 401  # the fifth since
    assert bad_login(env.anonymous, "viewer").status_code == 429


def test_valid_logins_as_one_user_do_not_reset_the_guesses_at_another(
    tmp_path: Path, scrypts: list[str], fresh_password_cache: None
) -> None:
    """An attacker holding any account (or a colleague behind the same address)
    logs in validly between wrong guesses at admin: the guesses still add up to a
    lockout after 5, whether the valid login is hashed (the first) or cached (the
    later ones), and a cached valid login does not get through the lockout."""
    env, _ = throttled_env(tmp_path)
    statuses = []
    for _ in range(3):
        statuses += [bad_login(env.anonymous, "admin").status_code for _ in range(2)]
        statuses.append(env.anonymous.get("/api/v1/me", headers=basic("viewer")).status_code)
    assert statuses == [401, 401, 200, 401, 401, 200, 401, 429, 429]
    assert scrypts.count(PASSWORD) == 1  # the viewer's second login was cached
    assert bad_login(env.anonymous, "admin").status_code == 429


def test_other_addresses_are_not_locked_out(tmp_path: Path) -> None:
    env, _ = throttled_env(tmp_path)
    for _ in range(6):
        bad_login(env.anonymous)
    assert bad_login(env.anonymous).status_code == 429
    other = TestClient(env.anonymous.app, client=("192.0.2.7", 5000))
    assert bad_login(other).status_code == 401


def test_the_table_of_addresses_is_bounded() -> None:
    clock = Clock()
    throttle = LoginThrottle(capacity=3, clock=clock)
    for address in ["a", "b", "c", "d", "e"]:
        throttle.failure(address)
    assert len(throttle) == 3
    for _ in range(5):
        throttle.failure("f")
    with pytest.raises(auth.TooManyAttempts):
        throttle.check("f")
    throttle.check("a")  # forgotten: free again


def test_an_unknown_user_costs_one_hash_like_a_known_one(
    tmp_path: Path, scrypts: list[str]
) -> None:
    env = api_env(tmp_path)
    assert bad_login(env.anonymous, "nobody").status_code == 401
    assert len(scrypts) == 1
    assert env.anonymous.get("/api/v1/me", headers=basic("nobody", "x")).status_code == 401
    assert len(scrypts) == 2


def test_at_most_two_password_hashes_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = api_env(tmp_path)
    running, peak = 0, 0
    lock = threading.Lock()

    def slow(password: str, stored: str) -> bool:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.05)
        with lock:
            running -= 1
        return False

    monkeypatch.setattr(auth, "verify_password", slow)
    threads = [
        threading.Thread(target=auth.check_login, args=(env.ctx, user, f"guess{i}"))
        for i, user in enumerate(["admin", "viewer", "nobody", "operator"] * 2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert peak == auth.SCRYPT_SLOTS == 2


# -- the session signing key --------------------------------------------------------------
def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_missing_key_is_created_private(tmp_path: Path) -> None:
    secret = session_secret(tmp_path)
    path = tmp_path / ".http_secret"
    assert len(secret) >= MIN_SECRET_LENGTH and path.read_text() == secret
    assert mode(path) == 0o600
    assert session_secret(tmp_path) == secret  # kept across restarts
    assert sorted(os.listdir(tmp_path)) == [".http_secret"]  # no temporary files left


@pytest.mark.parametrize("content", ["", "\n", "short"])
def test_an_empty_or_short_key_is_replaced_with_a_warning(
    tmp_path: Path, content: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / ".http_secret"
    path.write_text(content)
    with caplog.at_level(logging.WARNING, "dicomrouter.http"):
        secret = session_secret(tmp_path)
    assert len(secret) >= MIN_SECRET_LENGTH and path.read_text() == secret
    assert mode(path) == 0o600
    assert "at least 32" in caplog.text
    assert sorted(os.listdir(tmp_path)) == [".http_secret"]


def test_a_key_readable_by_others_is_made_private(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / ".http_secret"
    path.write_text("k" * 40)
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING, "dicomrouter.http"):
        assert session_secret(tmp_path) == "k" * 40
    assert mode(path) == 0o600
    assert "0644" in caplog.text


def test_an_empty_key_file_does_not_sign_sessions(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / ".http_secret").write_text("")
    env = api_env(tmp_path)
    key = (tmp_path / "data" / ".http_secret").read_text()
    assert len(key) >= MIN_SECRET_LENGTH
    login = env.anonymous.post("/api/v1/login", json={"username": "admin", "password": PASSWORD})
    assert login.status_code == 200


# -- every route checks a role --------------------------------------------------------------
#: Open on purpose. Everything else must refuse a caller without credentials.
PUBLIC = {
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("POST", "/api/v1/login"),
    ("POST", "/api/v1/logout"),
    ("GET", "/api/openapi.json"),
    ("GET", "/api/docs"),
    ("GET", "/login"),
    ("POST", "/login"),
    ("POST", "/logout"),
}


def every_route(app: FastAPI) -> list[tuple[str, set[str], BaseRoute]]:
    """(path, methods, route) of every endpoint, routers included into routers too
    (newer FastAPI keeps included routers as one lazy entry of ``app.routes``)."""
    iterate = getattr(fastapi.routing, "iter_route_contexts", None)
    pairs: list[tuple[str | None, BaseRoute]]
    if iterate is None:
        pairs = [(getattr(r, "path", None), r) for r in app.routes]
    else:
        pairs = [(c.path, c.original_route) for c in iterate(app.routes)]
    return [
        (path, set(methods), route)
        for path, route in pairs
        if path and (methods := getattr(route, "methods", None))
    ]


def test_every_route_refuses_a_caller_without_credentials(tmp_path: Path) -> None:
    env = api_env(tmp_path)
    app: FastAPI = env.anonymous.app  # type: ignore[assignment]
    seen = set()
    checked = 0
    for path, methods, route in every_route(app):
        url = re.sub(r"\{[^}]+\}", "1", path)
        for method in sorted(methods - {"HEAD", "OPTIONS"}):
            seen.add((method, path))
            if (method, path) in PUBLIC:
                continue
            response = env.anonymous.request(method, url, follow_redirects=False)
            checked += 1
            where = f"{method} {path}: {response.status_code}"
            if path.startswith("/api/"):
                assert isinstance(route, APIRoute), where
                assert response.status_code == 401, where
                assert response.headers["www-authenticate"] == 'Bearer realm="dicomrouter"'
            elif response.status_code == 303:
                assert response.headers["location"].startswith("/login"), where
            else:
                assert response.status_code in (401, 403), where
    assert seen >= PUBLIC, PUBLIC - seen  # the exceptions above still exist
    assert checked > 50
