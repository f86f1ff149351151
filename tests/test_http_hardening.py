"""HTTP hardening (issue 9): bounded bodies and YAML, proxies, parallel logins,
server-side sessions, security headers, private files, control characters, the CLI
through control/, and no configuration that locks every admin out."""

from __future__ import annotations

import asyncio
import base64
import getpass
import http.client
import json
import logging
import os
import re
import signal
import stat
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import select, update
from typer.testing import CliRunner

from dicomrouter.api.headers import PAGE_POLICY
from dicomrouter.cli.main import app as cli
from dicomrouter.config import ConfigError
from dicomrouter.observe.logs import configure_logging
from dicomrouter.security import hash_password, hash_token
from dicomrouter.store import ObjectStore, audit, create_index_engine
from dicomrouter.store.schema import jobs
from tests.support.api import PASSWORD, TOKENS, ApiEnv, api_env, auth_section
from tests.support.dcmtk import HOST
from tests.support.router import RouterProcess, node_children, wait_until
from tests.support.seed import Seeder

MB = 1024 * 1024


# -- raw ASGI calls: what the application pulls from the connection -----------------------
def asgi_call(
    app: FastAPI,
    method: str,
    path: str,
    headers: dict[str, str],
    chunks: Iterable[bytes],
    client: tuple[str, int] = ("127.0.0.1", 40000),
) -> tuple[int, dict[str, str], bytes, int]:
    """(status, headers, body, bytes of the request body the app read)."""
    pulled = 0
    status = 0
    answer_headers: dict[str, str] = {}
    body = b""
    source: Iterator[bytes] = iter(chunks)

    async def receive() -> dict[str, Any]:
        nonlocal pulled
        chunk = next(source, None)
        if chunk is None:
            return {"type": "http.request", "body": b"", "more_body": False}
        pulled += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": True}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status, body
        if message["type"] == "http.response.start":
            status = message["status"]
            answer_headers.update(
                (k.decode("latin-1"), v.decode("latin-1")) for k, v in message["headers"]
            )
        elif message["type"] == "http.response.body":
            body += message.get("body", b"")

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"testserver")]
        + [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": client,
        "server": ("testserver", 80),
    }
    asyncio.run(app(scope, receive, send))  # type: ignore[arg-type]
    return status, answer_headers, body, pulled


def megabytes(total: int, chunk: int = 64 * 1024) -> Iterator[bytes]:
    block = b"x" * chunk
    for _ in range(total // chunk):
        yield block


# -- 1. request bodies are bounded before authentication ---------------------------------
def test_an_unauthenticated_100_mb_body_is_refused_unread(tmp_path: Path) -> None:
    env = api_env(tmp_path)
    status, _, body, pulled = asgi_call(
        env.anonymous.app,  # type: ignore[arg-type]
        "POST",
        "/api/v1/jobs/retry",
        {"content-type": "application/json", "content-length": str(100 * MB)},
        megabytes(100 * MB),
    )
    assert status == 413
    assert "http.max_body_size" in json.loads(body)["detail"]
    assert pulled == 0  # refused from Content-Length alone


def test_a_streamed_body_without_length_is_cut_off_at_the_limit(tmp_path: Path) -> None:
    env = api_env(tmp_path)
    status, _, body, pulled = asgi_call(
        env.anonymous.app,  # type: ignore[arg-type]
        "POST",
        "/api/v1/login",
        {"content-type": "application/json", "transfer-encoding": "chunked"},
        megabytes(100 * MB),
    )
    assert status == 413, body
    assert "1048576 bytes" in json.loads(body)["detail"]
    assert pulled <= MB + 64 * 1024  # not one chunk more than the limit


def test_configuration_uploads_have_their_own_bound(tmp_path: Path) -> None:
    env = api_env(tmp_path, {"http": {"max_config_size": 3 * MB}})
    comment = "#" + "x" * (2 * MB) + "\n"  # a big, valid YAML text (one comment)
    yaml_type = {"Content-Type": "application/yaml"}
    under = env.operator.post("/api/v1/config/validate", content=comment, headers=yaml_type)
    assert under.status_code == 200, under.text[:300]
    over = env.operator.post("/api/v1/config/validate", content=comment * 2, headers=yaml_type)
    assert over.status_code == 413
    assert "http.max_config_size" in over.json()["detail"]
    # The same 2 MB as an ordinary JSON body is over http.max_body_size.
    bulk = env.operator.post(
        "/api/v1/jobs/cancel",
        content=json.dumps({"route": "x", "padding": comment}),
        headers={"Content-Type": "application/json"},
    )
    assert bulk.status_code == 413 and "http.max_body_size" in bulk.json()["detail"]


def test_the_http_process_does_not_grow_with_a_100_mb_body(tmp_path: Path) -> None:
    """A real router: 100 MB sent without credentials, streamed, gets 413, and the
    HTTP process's resident memory stays far below what buffering it would take."""
    config = {"auth": auth_section(), "http": {"bind": HOST}}
    with RouterProcess(tmp_path / "router", config) as router:
        port = int(router.config["http"]["port"])
        wait_until(lambda: _http_pid(router) is not None, 30, message="the HTTP process")
        pid = _http_pid(router)
        assert pid is not None
        before = _rss(pid)
        connection = http.client.HTTPConnection(HOST, port, timeout=60)
        connection.putrequest("POST", "/api/v1/jobs/retry")
        connection.putheader("Content-Type", "application/json")
        connection.putheader("Transfer-Encoding", "chunked")
        connection.endheaders()
        block = b"x" * (256 * 1024)
        status = None
        try:
            for _ in range(400):  # 100 MB, unless the server stops us first
                connection.send(b"%x\r\n%s\r\n" % (len(block), block))
        except OSError:
            pass  # the server answered and closed: what we hope for
        response = connection.getresponse()
        status = response.status
        connection.close()
        after = _rss(pid)
    assert status == 413
    assert after - before < 50 * MB, (before, after)


def _http_pid(router: RouterProcess) -> int | None:
    """The node's child serving HTTP (forked from the node, named ``http``)."""
    assert router.process is not None
    return node_children(router.process.pid).get("http")


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


# -- 2. YAML is parsed within limits on size, aliases and nesting -------------------------
def alias_bomb() -> str:
    """Nine levels of nine aliases each: a few hundred bytes, 9**9 values expanded."""
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for previous, name in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"{name}: &{name} [" + ",".join([f"*{previous}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def merge_bomb() -> str:
    """Seven levels of mappings merging nine copies of the one before (``<<``): about
    300 bytes that took the YAML constructor 6 s (flattening copies every merge)."""
    lines = ["a: &a {k0: 0, k1: 1, k2: 2, k3: 3, k4: 4, k5: 5, k6: 6, k7: 7, k8: 8}"]
    for previous, name in zip("abcdef", "bcdefg", strict=True):
        lines.append(f"{name}: &{name} {{<<: [" + ",".join([f"*{previous}"] * 9) + "]}")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("bomb", [alias_bomb, merge_bomb])
def test_an_alias_bomb_is_refused_by_validate_with_422(tmp_path: Path, bomb: Any) -> None:
    env = api_env(tmp_path)
    text = bomb()
    assert len(text) < 600
    response = env.operator.post(
        "/api/v1/config/validate", content=text, headers={"Content-Type": "application/yaml"}
    )
    assert response.status_code == 422, response.text[:300]
    errors = response.json()["detail"]["errors"]
    assert any("expands to more than" in error for error in errors), errors


def test_an_alias_bomb_is_refused_by_apply_and_the_file_is_kept(tmp_path: Path) -> None:
    env = api_env(tmp_path)
    path = tmp_path / "dicomrouter.yaml"
    path.write_text("ae_title: KEPT\n")
    env.ctx.config_path = path
    response = env.admin.put(
        "/api/v1/config", content=merge_bomb(), headers={"Content-Type": "application/yaml"}
    )
    assert response.status_code == 422, response.text[:300]
    errors = response.json()["detail"]["errors"]
    assert any("expands to more than" in error for error in errors), errors
    assert path.read_text() == "ae_title: KEPT\n"


def test_the_dashboard_refuses_a_bomb_as_configuration_or_as_a_rule(tmp_path: Path) -> None:
    env = api_env(tmp_path)
    preview = env.admin.post("/config/preview", data={"candidate": merge_bomb()})
    assert preview.status_code == 422 and "expands to more than" in preview.text
    rule = env.operator.post("/routes/backtest", data={"candidate": merge_bomb(), "days": "1"})
    assert rule.status_code == 200 and "expands to more than" in rule.text


def test_check_refuses_an_alias_bomb_with_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(merge_bomb())
    result = CliRunner().invoke(cli, ["check", "--config", str(path)])
    assert result.exit_code == 2, result.output
    assert "expands to more than" in result.output


CYCLE = """\
destinations:
  pacs: {ae_title: PACS, host: 127.0.0.1, port: 4242}
routes:
  - name: loop
    to: [pacs]
    when: &w {all: [*w]}
"""


def test_an_alias_to_its_own_enclosing_node_is_refused_as_a_cycle() -> None:
    """Without the check, yaml builds a structure that contains itself and later walks
    fail with RecursionError."""
    from dicomrouter.config import YamlLimitError, load_yaml

    with pytest.raises(YamlLimitError, match=r"alias \*w refers to its own enclosing node"):
        load_yaml(CYCLE)
    with pytest.raises(YamlLimitError, match=r"line 1, column 12: alias \*s .* \(a cycle\)"):
        load_yaml("s: &s [1, [*s]]\n")
    # An alias to a collection already closed is no cycle.
    assert load_yaml("a: &a [1]\nb: [*a, *a]\n") == {"a": [1], "b": [[1], [1]]}


def test_a_cycle_is_refused_by_validate_with_422(tmp_path: Path) -> None:
    env = api_env(tmp_path)
    response = env.operator.post(
        "/api/v1/config/validate", content=CYCLE, headers={"Content-Type": "application/yaml"}
    )
    assert response.status_code == 422, response.text[:300]
    errors = response.json()["detail"]["errors"]
    assert any("alias *w refers to its own enclosing node" in error for error in errors), errors


def test_check_refuses_a_cycle_with_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "cycle.yaml"
    path.write_text(CYCLE)
    result = CliRunner().invoke(cli, ["check", "--config", str(path)])
    assert result.exit_code == 2, result.output
    assert "alias *w refers to its own enclosing node (a cycle)" in result.output


def test_deep_nesting_and_huge_texts_are_refused() -> None:
    from dicomrouter.config import load_yaml

    with pytest.raises(ConfigError, match="nests deeper than 64"):
        load_yaml("[" * 65 + "]" * 65)
    with pytest.raises(ConfigError, match="over the limit"):
        load_yaml("#" + "x" * (9 * MB))
    # Anchors and merge keys in a real configuration still work.
    assert load_yaml("d: &d {port: 104}\ne:\n  <<: *d\n  host: x\n") == {
        "d": {"port": 104},
        "e": {"port": 104, "host": "x"},
    }


# -- 3. X-Forwarded-For only from http.trusted_proxies ------------------------------------
def _login(port: int, headers: dict[str, str]) -> int:
    connection = http.client.HTTPConnection(HOST, port, timeout=30)
    body = json.dumps({"username": "admin", "password": "wrong"})
    connection.request(
        "POST", "/api/v1/login", body, {"Content-Type": "application/json", **headers}
    )
    status = connection.getresponse().status
    connection.close()
    return status


def test_a_forged_x_forwarded_for_is_ignored_by_the_throttle_and_the_audit(
    tmp_path: Path,
) -> None:
    """A real router (uvicorn), clients on 127.0.0.1, no trusted proxy: each failed
    login claims another address, yet the sixth is locked out and every audit row
    names 127.0.0.1."""
    config = {"auth": auth_section(), "http": {"bind": HOST}}
    with RouterProcess(tmp_path / "router", config) as router:
        port = int(router.config["http"]["port"])
        statuses = [_login(port, {"X-Forwarded-For": f"203.0.113.{i}"}) for i in range(6)]
        engine = create_index_engine(f"sqlite:///{router.storage / 'index.sqlite'}", create=False)
        _, rows = audit.query(engine, action="auth.login")
    assert statuses == [401] * 5 + [429]
    assert {row["source"] for row in rows} == {HOST}


def test_a_trusted_proxy_names_the_client(tmp_path: Path) -> None:
    env = api_env(tmp_path, {"http": {"trusted_proxies": ["127.0.0.1", "10.0.0.0/8"]}})
    body = json.dumps({"username": "admin", "password": "wrong"}).encode()
    for client, forwarded in [
        (("127.0.0.1", 1), "198.51.100.7"),
        (("127.0.0.1", 2), "198.51.100.8, 10.1.2.3"),  # the rightmost untrusted hop
        (("192.0.2.1", 3), "198.51.100.9"),  # not a trusted proxy: ignored
    ]:
        status, *_ = asgi_call(
            env.anonymous.app,  # type: ignore[arg-type]
            "POST",
            "/api/v1/login",
            {"content-type": "application/json", "x-forwarded-for": forwarded},
            [body],
            client=client,
        )
        assert status == 401
    _, rows = audit.query(env.engine, action="auth.login")
    assert [row["source"] for row in reversed(rows)] == [
        "198.51.100.7",
        "198.51.100.8",
        "192.0.2.1",
    ]


# -- 4. parallel wrong logins are throttled too -------------------------------------------
def test_thirty_parallel_wrong_logins_are_mostly_refused_with_429(tmp_path: Path) -> None:
    env = api_env(tmp_path)
    statuses: list[int] = []
    lock = threading.Lock()
    start = threading.Barrier(30)

    def attempt() -> None:
        start.wait()
        response = env.anonymous.post(
            "/api/v1/login", json={"username": "admin", "password": "guess"}
        )
        with lock:
            statuses.append(response.status_code)

    threads = [threading.Thread(target=attempt) for _ in range(30)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(set(statuses)) == [401, 429]
    assert statuses.count(401) <= 5  # the throttle's limit, however parallel
    assert statuses.count(429) >= 25


def test_parallel_basic_requests_with_a_known_password_are_not_throttled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A script sending many requests at once with the right Basic credentials is
    not mistaken for a guesser: its password was checked once, and is remembered,
    so its requests take no attempt slot (a password check is made slow here, as
    under load, so that the requests overlap)."""
    from dicomrouter.edge import auth

    env = api_env(tmp_path)
    token = base64.b64encode(f"operator:{PASSWORD}".encode()).decode()
    basic = {"Authorization": f"Basic {token}"}
    assert env.anonymous.get("/api/v1/me", headers=basic).status_code == 200
    real = auth.check_login

    def slow(*args: Any) -> Any:
        time.sleep(0.3)
        return real(*args)

    monkeypatch.setattr(auth, "check_login", slow)
    statuses: list[int] = []
    start = threading.Barrier(20)

    def request() -> None:
        start.wait()
        statuses.append(env.anonymous.get("/api/v1/me", headers=basic).status_code)

    threads = [threading.Thread(target=request) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert statuses == [200] * 20


def test_cached_valid_logins_do_not_free_slots_for_guesses_under_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Five wrong guesses are being checked (held in the password check here) when a
    script logs in with a known password, as often as it likes: the sixth guess still
    gets 429, as the cached login took no attempt slot and so frees none."""
    from dicomrouter.edge import auth

    env = api_env(tmp_path)
    token = base64.b64encode(f"viewer:{PASSWORD}".encode()).decode()
    basic = {"Authorization": f"Basic {token}"}
    assert env.anonymous.get("/api/v1/me", headers=basic).status_code == 200
    real = auth.check_login
    arrived = threading.Semaphore(0)
    go = threading.Event()
    held = [0]
    lock = threading.Lock()

    def held_check(*args: Any) -> Any:
        with lock:
            hold = held[0] < 5
            held[0] += 1
        if hold:
            arrived.release()
            go.wait()
        return real(*args)

    monkeypatch.setattr(auth, "check_login", held_check)
    statuses: list[int] = []

    def guess() -> None:
        response = env.anonymous.post(
            "/api/v1/login", json={"username": "admin", "password": "guess"}
        )
        with lock:
            statuses.append(response.status_code)

    threads = [threading.Thread(target=guess) for _ in range(5)]
    for thread in threads:
        thread.start()
    try:
        for _ in range(5):
            arrived.acquire()  # all five admitted and under way
        for _ in range(3):
            assert env.anonymous.get("/api/v1/me", headers=basic).status_code == 200
        sixth = env.anonymous.post("/api/v1/login", json={"username": "admin", "password": "guess"})
    finally:
        go.set()
        for thread in threads:
            thread.join()
    assert sixth.status_code == 429
    assert sorted(statuses) == [401] * 5


# -- 5. sessions end on the server --------------------------------------------------------
def logged_in(env: ApiEnv) -> str:
    """Log in as admin with a password; the session cookie's value."""
    client = env.anonymous
    response = client.post("/api/v1/login", json={"username": "admin", "password": PASSWORD})
    assert response.status_code == 200
    cookie = client.cookies.get("dicomrouter_session")
    assert cookie
    client.cookies.clear()
    return cookie


def browser(env: ApiEnv, cookie: str) -> TestClient:
    """A client that presents ``cookie``, as a browser holding it would."""
    client = TestClient(env.anonymous.app)
    client.cookies.set("dicomrouter_session", cookie)
    return client


def me(env: ApiEnv, cookie: str) -> int:
    return browser(env, cookie).get("/api/v1/me").status_code


def test_an_old_cookie_no_longer_works_after_logout(tmp_path: Path) -> None:
    env = api_env(tmp_path)
    cookie = logged_in(env)
    assert me(env, cookie) == 200
    assert browser(env, cookie).post("/api/v1/logout").status_code == 200
    assert me(env, cookie) == 401  # the copy kept from before the logout
    assert audit.query(env.engine, action="auth.logout")[0] == 1


def test_a_dashboard_logout_ends_the_session_too(tmp_path: Path) -> None:
    env = api_env(tmp_path)
    cookie = logged_in(env)
    assert browser(env, cookie).get("/jobs", follow_redirects=False).status_code == 200
    out = browser(env, cookie).post("/logout", follow_redirects=False)
    assert out.status_code == 303
    again = browser(env, cookie).get("/jobs", follow_redirects=False)
    assert again.status_code == 303 and again.headers["location"].startswith("/login")


def test_a_session_slides_with_activity_and_ends_when_idle(tmp_path: Path) -> None:
    from dicomrouter.store.schema import http_sessions

    env = api_env(tmp_path, {"http": {"session_lifetime": "1h"}})
    cookie = logged_in(env)
    now = time.time()
    with env.engine.begin() as conn:  # last used 10 minutes ago, 50 minutes left
        conn.execute(update(http_sessions).values(last_seen=now - 600, expires_at=now + 3000))
    assert me(env, cookie) == 200
    with env.engine.connect() as conn:
        expires = conn.execute(select(http_sessions.c.expires_at)).scalar_one()
    assert expires >= now + 3600 - 5  # moved to a full hour from this request
    with env.engine.begin() as conn:  # idle for longer than the lifetime
        conn.execute(update(http_sessions).values(expires_at=time.time() - 1))
    assert me(env, cookie) == 401


def test_a_password_change_ends_the_users_sessions(tmp_path: Path) -> None:
    from dicomrouter.config import parse_config
    from dicomrouter.store.schema import http_sessions

    env = api_env(tmp_path)
    cookie = logged_in(env)
    data = env.config.model_dump(mode="json")
    data["auth"]["users"]["admin"]["password_hash"] = hash_password("a new password")
    env.ctx.config = parse_config(data, environ={})
    assert me(env, cookie) == 401
    with env.engine.connect() as conn:
        assert conn.execute(select(http_sessions)).all() == []


# -- 6. security headers on every answer --------------------------------------------------
@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        ("GET", "/login", 200),
        ("GET", "/static/htmx.min.js", 200),
        ("GET", "/api/v1/me", 401),
        ("GET", "/api/v1/no-such-thing", 404),
        ("GET", "/healthz", 200),
        ("POST", "/api/v1/jobs/retry", 413),
        ("POST", "/api/v1/jobs/cancel", 403),
    ],
)
def test_every_answer_carries_the_security_headers(
    tmp_path: Path, method: str, path: str, expected: int
) -> None:
    env = api_env(tmp_path)
    headers = {"Origin": "https://evil.example"} if expected == 403 else {}
    if expected == 413:
        status, answer, *_ = asgi_call(
            env.anonymous.app,  # type: ignore[arg-type]
            method,
            path,
            {"content-type": "application/json", "content-length": str(100 * MB)},
            [],
        )
    else:
        response = env.anonymous.request(method, path, headers=headers, content=b"{}")
        status, answer = response.status_code, dict(response.headers)
    assert status == expected
    policy = answer["content-security-policy"]
    assert "frame-ancestors 'none'" in policy and "script-src 'self'" in policy
    assert "unsafe-inline" not in policy and "unsafe-eval" not in policy
    assert answer["x-frame-options"] == "DENY"
    assert answer["x-content-type-options"] == "nosniff"
    assert answer["referrer-policy"] == "same-origin"


def test_the_openapi_page_is_served_from_this_server_under_the_page_policy(
    tmp_path: Path,
) -> None:
    """Swagger UI is vendored (clinical networks are often offline): the page names
    no other host and gets the dashboard's policy, with no inline script."""
    env = api_env(tmp_path)
    docs = env.anonymous.get("/api/docs")
    assert docs.status_code == 200
    assert not re.search(r"(https?:)?//", docs.text)  # no other host, no CDN
    assert "<script>" not in docs.text
    assert docs.headers["content-security-policy"] == PAGE_POLICY
    for asset in re.findall(r'(?:src|href)="(/static/[^"?]+)', docs.text):
        answer = env.anonymous.get(asset)
        assert answer.status_code == 200, asset
        assert answer.headers["content-security-policy"] == PAGE_POLICY
    assert env.anonymous.get("/api/openapi.json").status_code == 200


def test_dashboard_pages_have_no_inline_script(tmp_path: Path) -> None:
    """What the policy forbids must not be needed: no inline handlers or scripts."""
    env = api_env(tmp_path)
    page = env.operator.get("/jobs")
    assert page.status_code == 200
    html = page.text
    assert 'class="select-all"' in html  # the jobs table, with its select-all box
    assert " onclick=" not in html and " onchange=" not in html
    assert "<script>" not in html and "document.querySelector" not in html


# -- 7. the storage folder, the index and its WAL are private -----------------------------
def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_storage_folders_and_the_index_are_created_private(tmp_path: Path) -> None:
    old = os.umask(0o022)  # the usual umask: would give 0755 folders and 0644 files
    try:
        store = ObjectStore(tmp_path / "data", "test")
        store.prepare()
        engine = create_index_engine(f"sqlite:///{store.root / 'index.sqlite'}")
        audit.record(engine, "someone", "test.write")  # a write, through the WAL
        with engine.connect() as conn:  # open: the WAL and shared-memory files exist
            conn.execute(select(jobs.c.id)).all()
            wal = store.root / "index.sqlite-wal"
            shm = store.root / "index.sqlite-shm"
            assert wal.exists() and shm.exists()
            assert mode(wal) == 0o600 and mode(shm) == 0o600
        assert audit.query(engine)[0] == 1
        assert mode(store.root / "index.sqlite") == 0o600
        for folder in (store.root, store.objects, store.tmp):
            assert mode(folder) == 0o700, folder
        engine.dispose()
    finally:
        os.umask(old)


def test_existing_open_files_and_folders_are_tightened_at_start_up(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "data"
    for folder in (root, root / "objects", root / "tmp"):
        folder.mkdir()
        folder.chmod(0o755)
    index = root / "index.sqlite"
    create_index_engine(f"sqlite:///{index}").dispose()
    for path in (index, root / "index.sqlite-wal", root / "index.sqlite-shm"):
        path.touch()
        path.chmod(0o644)
    with caplog.at_level(logging.WARNING):
        ObjectStore(root, "test").prepare()
        engine = create_index_engine(f"sqlite:///{index}")  # open: SQLite keeps its files
    for folder in (root, root / "objects", root / "tmp"):
        assert mode(folder) == 0o700, folder
    for path in (index, root / "index.sqlite-wal", root / "index.sqlite-shm"):
        assert mode(path) == 0o600, path
    engine.dispose()
    assert "made private" in caplog.text


# -- 8. control characters are escaped in logs and audit rows ---------------------------
def test_a_newline_in_a_logged_value_cannot_forge_a_log_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        configure_logging("INFO", "MainProcess")
        forged = "CT1\n2026-12-06 07:00:00,000 INFO    MainProcess dicomrouter: all is well\x1b[2J"
        logging.getLogger("dicomrouter.receive").warning("association from %s refused", forged)
        err = capsys.readouterr().err
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    lines = [line for line in err.splitlines() if line]
    assert len(lines) == 1, err
    assert "CT1\\n2026-12-06" in lines[0] and "\\x1b[2J" in lines[0]


def test_control_characters_are_escaped_in_audit_rows(tmp_path: Path) -> None:
    env = api_env(tmp_path)
    audit.record(env.engine, "eve\nsystem", "auth.login", "a\rb", source="10.0.0.1\x00")
    (row,) = audit.query(env.engine)[1]
    assert row["actor"] == "eve\\nsystem" and row["target"] == "a\\rb"
    assert row["source"] == "10.0.0.1\\x00"


# -- 8b. control characters in job filters -----------------------------------------------
DEST = {"ae_title": "PACS", "host": "127.0.0.1", "port": 1}
QUEUE = {
    "destinations": {"pacs": DEST},
    "routes": [{"name": "all", "to": ["pacs"], "trigger": "instance"}],
}


def seeded_jobs(tmp_path: Path) -> tuple[ApiEnv, list[int]]:
    env = api_env(tmp_path, QUEUE)
    seed = Seeder(env, tmp_path / "in")
    seed.receive_study(3)
    seed.plan()
    with env.engine.connect() as conn:
        ids = [row.id for row in conn.execute(select(jobs.c.id))]
    assert len(ids) == 3
    return env, ids


def open_jobs(env: ApiEnv) -> int:
    with env.engine.connect() as conn:
        return len(conn.execute(select(jobs.c.id).where(jobs.c.state != "canceled")).all())


@pytest.mark.parametrize("value", ["%00", "all%00", "%0a", "%1b", "%7f"])
def test_control_characters_in_query_filters_are_422(tmp_path: Path, value: str) -> None:
    env, _ = seeded_jobs(tmp_path)
    for path in ("/api/v1/jobs", "/jobs", "/api/v1/audit", "/api/v1/studies"):
        response = env.admin.get(f"{path}?route={value}&state=pending")
        assert response.status_code == 422, (path, response.text)
        assert "route" in response.text


def test_a_bulk_cancel_with_a_nul_filter_cancels_nothing(tmp_path: Path) -> None:
    env, _ = seeded_jobs(tmp_path)
    for body in ({"route": "\u0000"}, {"destination": "pacs\u0000"}, {"study_uid": "1\n2"}):
        response = env.operator.post("/api/v1/jobs/cancel", json=body)
        assert response.status_code == 422, response.text
        assert next(iter(body)) in response.json()["detail"]
    assert open_jobs(env) == 3
    form = env.operator.post(
        "/jobs/bulk",
        data={"route": "\u0000", "scope": "filter", "action": "cancel"},
        follow_redirects=False,
    )
    assert form.status_code in (303, 422)
    assert open_jobs(env) == 3


# -- 9. the CLI acts through control/ and is audited --------------------------------------
def test_cli_queue_cancel_and_retry_are_audited_with_the_local_user(tmp_path: Path) -> None:
    env, ids = seeded_jobs(tmp_path)
    path = tmp_path / "dicomrouter.yaml"
    path.write_text(yaml.safe_dump({**QUEUE, "storage": {"path": str(env.store.root)}}))
    runner = CliRunner()
    cancel = runner.invoke(cli, ["queue", "cancel", str(ids[0]), "--config", str(path)])
    assert cancel.exit_code == 0, cancel.output
    retry = runner.invoke(cli, ["queue", "retry", "--state", "canceled", "--config", str(path)])
    assert retry.exit_code == 0, retry.output
    _, rows = audit.query(env.engine, action="job.")
    assert [(r["action"], r["actor"], r["source"]) for r in reversed(rows)] == [
        ("job.cancel", getpass.getuser(), "cli"),
        ("job.retry", getpass.getuser(), "cli"),
    ]
    assert rows[1]["target"] == f"job {ids[0]}"
    # A job that cannot be canceled says why, as the API does.
    done = runner.invoke(cli, ["queue", "cancel", str(10**6), "--config", str(path)])
    assert done.exit_code == 1 and "no job 1000000" in done.output


# -- 10. no configuration that leaves no admin --------------------------------------------
def viewers_only() -> str:
    auth = {
        "users": {"v": {"password_hash": auth_section()["users"]["viewer"]["password_hash"]}},
        "tokens": {"t": {"token_hash": hash_token(TOKENS["viewer"]), "role": "viewer"}},
    }
    return yaml.safe_dump({"auth": auth})


def test_an_apply_that_leaves_no_admin_is_refused_and_validate_says_so(tmp_path: Path) -> None:
    env = api_env(tmp_path)
    path = tmp_path / "dicomrouter.yaml"
    path.write_text("ae_title: KEPT\n")
    env.ctx.config_path = path
    yaml_type = {"Content-Type": "application/yaml"}
    check = env.operator.post("/api/v1/config/validate", content=viewers_only(), headers=yaml_type)
    assert check.status_code == 200
    assert check.json()["valid"] is False
    assert any("no admin" in error for error in check.json()["errors"])
    applied = env.admin.put("/api/v1/config", content=viewers_only(), headers=yaml_type)
    assert applied.status_code == 422, applied.text
    assert any("no admin" in error for error in applied.json()["detail"]["errors"])
    assert path.read_text() == "ae_title: KEPT\n"
    assert env.admin.get("/api/v1/me").status_code == 200  # still in
    page = env.admin.post("/config/apply", data={"candidate": viewers_only(), "comment": ""})
    assert page.status_code == 422 and "no admin" in page.text
    # Turning authentication off, or keeping an admin token, is fine.
    open_config = yaml.safe_dump({"auth": {"enabled": False}})
    assert env.operator.post(
        "/api/v1/config/validate", content=open_config, headers=yaml_type
    ).json()["valid"]


def test_a_new_installation_without_admin_may_still_be_edited_by_hand() -> None:
    from dicomrouter.config import parse_config
    from dicomrouter.control.versions import lockout

    nobody = parse_config({}, environ={})  # auth on, no users: as after install
    viewer = parse_config(yaml.safe_load(viewers_only()), environ={})
    admin = parse_config({"auth": auth_section()}, environ={})
    assert lockout(viewer, nobody) is None  # nothing is taken away
    assert lockout(viewer, admin) is not None
    assert lockout(admin, viewer) is None


def test_a_sighup_reload_that_leaves_no_admin_is_refused(tmp_path: Path) -> None:
    config = {"auth": auth_section(), "http": {"bind": HOST}}
    with RouterProcess(tmp_path / "router", config) as router:
        port = int(router.config["http"]["port"])
        edited = {**router.config, "auth": yaml.safe_load(viewers_only())["auth"]}
        router.config_path.write_text(yaml.safe_dump(edited, sort_keys=False))
        assert router.process is not None
        router.process.send_signal(signal.SIGHUP)
        engine = create_index_engine(f"sqlite:///{router.storage / 'index.sqlite'}", create=False)

        def reloads() -> list[str]:
            return [row["outcome"] for row in audit.query(engine, action="config.reload")[1]]

        wait_until(reloads, 30, message="the reload audited")
        assert reloads() == ["failed"]
        assert "leaves no admin" in router.log()
        connection = http.client.HTTPConnection(HOST, port, timeout=30)
        connection.request(
            "GET", "/api/v1/me", headers={"Authorization": f"Bearer {TOKENS['admin']}"}
        )
        assert connection.getresponse().status == 200  # the admin token still works
        connection.close()
