"""The dashboard in-process: pages per role, login, actions, charts.

The index is filled through the real pipeline code (tests/support/seed.py), so the
pages show what a running router would show.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient

from dicomrouter.control.jobs import JobFilter, job_detail, search_jobs
from dicomrouter.store import audit
from tests.support.api import PASSWORD, ApiEnv, api_env
from tests.support.seed import Seeder

CONFIG: dict[str, Any] = {
    "destinations": {
        "pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": 1},
        "archive": {"ae_title": "ARCH", "host": "127.0.0.1", "port": 2},
    },
    "routes": [
        {"name": "ct-to-pacs", "trigger": "study", "when": {"Modality": "CT"}, "to": ["pacs"]},
        {"name": "all-to-archive", "trigger": "study", "to": ["archive"]},
    ],
}
PAGES = ["/", "/destinations", "/destinations/pacs", "/jobs", "/studies", "/routes"]
ACTION_MARKERS = ('action="/destinations/pacs/pause"', "/retry", 'action="/jobs/bulk"')


@pytest.fixture
def seeded(tmp_path: Path) -> tuple[ApiEnv, dict[str, Any]]:
    """Two studies: one delivered everywhere, one whose PACS delivery failed for good."""
    env = api_env(tmp_path, CONFIG)
    seed = Seeder(env, tmp_path / "in")
    files = seed.receive_study(2, modality="CT")
    seed.plan()
    seed.deliver("pacs")
    seed.deliver("archive")
    seed.receive_study(3, modality="CT", calling_ae="CT2")
    seed.plan()
    failed = seed.deliver("pacs", fail=True)
    return env, {"failed_job": failed[0], "files": files}


def login(client: TestClient, user: str) -> None:
    response = client.post(
        "/login", data={"username": user, "password": PASSWORD}, follow_redirects=False
    )
    assert response.status_code == 303, response.text


def test_logged_out_pages_redirect_to_login_and_back(tmp_path: Path) -> None:
    env = api_env(tmp_path, CONFIG)
    for page in [*PAGES, "/config", "/audit", "/jobs/1"]:
        response = env.anonymous.get(page, follow_redirects=False)
        assert response.status_code == 303, page
        assert response.headers["location"].startswith("/login?next=")
    htmx = env.anonymous.get("/jobs", headers={"HX-Request": "true"}, follow_redirects=False)
    assert htmx.headers["hx-redirect"] == "/login?next=/jobs"
    # After logging in, the browser comes back to the page it asked for.
    form = {"username": "viewer", "password": PASSWORD, "next": "/jobs?state=failed"}
    response = env.anonymous.post("/login", data=form, follow_redirects=False)
    assert response.headers["location"] == "/jobs?state=failed"
    assert env.anonymous.get("/jobs").status_code == 200
    # Never to another site.
    evil = {**form, "next": "//evil.example/"}
    assert (
        env.anonymous.post("/login", data=evil, follow_redirects=False).headers["location"] == "/"
    )


def test_a_wrong_password_is_refused_and_audited_and_logout_ends_the_session(
    tmp_path: Path,
) -> None:
    env = api_env(tmp_path, CONFIG)
    bad = env.anonymous.post("/login", data={"username": "admin", "password": "nope"})
    assert bad.status_code == 401 and "Wrong user name or password" in bad.text
    total, entries = audit.query(env.engine, action="auth.login", outcome="denied")
    assert total == 1 and entries[0]["actor"] == "admin"
    login(env.anonymous, "operator")
    page = env.anonymous.get("/")
    assert page.status_code == 200 and "operator" in page.text and "Log out" in page.text
    env.anonymous.post("/logout", follow_redirects=False)
    assert env.anonymous.get("/", follow_redirects=False).status_code == 303


def test_the_login_form_locks_out_an_address_after_five_failures(tmp_path: Path) -> None:
    env = api_env(tmp_path, CONFIG)
    form = {"username": "admin", "password": "nope"}
    for _ in range(5):
        assert env.anonymous.post("/login", data=form).status_code == 401
    locked = env.anonymous.post("/login", data={**form, "password": PASSWORD})
    assert locked.status_code == 429 and "try again in" in locked.text
    assert 0 < int(locked.headers["retry-after"]) <= 60
    assert env.anonymous.get("/", follow_redirects=False).status_code == 303  # no session
    assert audit.query(env.engine, action="auth.lockout")[0] == 1
    # The form and the API share the count (one address, one budget).
    api = env.anonymous.post("/api/v1/login", json={"username": "admin", "password": PASSWORD})
    assert api.status_code == 429


def test_a_cross_site_form_post_is_refused(seeded: tuple[ApiEnv, dict[str, Any]]) -> None:
    env, data = seeded
    job = data["failed_job"]
    # A page on another site posting a form to the dashboard, with the browser adding
    # cached credentials: refused before anything runs.
    for headers in ({"Origin": "http://evil.example"}, {"Sec-Fetch-Site": "cross-site"}):
        response = env.operator.post(f"/jobs/{job}/retry", headers=headers)
        assert response.status_code == 403
    assert audit.query(env.engine, action="job.retry")[0] == 0
    same = {"Origin": "http://testserver", "Sec-Fetch-Site": "same-origin"}
    assert env.operator.post(f"/jobs/{job}/retry", headers=same).status_code == 200


@pytest.mark.parametrize("role", ["viewer", "operator", "admin"])
def test_every_page_renders_for_every_role(
    seeded: tuple[ApiEnv, dict[str, Any]], role: str
) -> None:
    env, facts = seeded
    client = env.client(role)
    study = job_detail(env.engine, facts["failed_job"])
    assert study is not None
    pages = [
        *PAGES,
        f"/jobs/{facts['failed_job']}",
        f"/studies/{study['study_instance_uid']}",
        "/routes/ct-to-pacs",
        "/config",
    ]
    for page in pages:
        response = client.get(page)
        assert response.status_code == 200, (page, response.text[:500])
        assert "<nav>" in response.text and f"<b>{role}</b>" in response.text
    audit_page = client.get("/audit")
    assert audit_page.status_code == (200 if role == "admin" else 403)
    nav = re.search(r"<nav>(.*?)</nav>", client.get("/").text, re.S)
    assert nav is not None
    assert ('href="/audit"' in nav.group(1)) == (role == "admin")


def test_a_viewer_sees_no_action_buttons_and_cannot_act(
    seeded: tuple[ApiEnv, dict[str, Any]],
) -> None:
    env, facts = seeded
    job = facts["failed_job"]
    for page in ["/destinations", "/destinations/pacs", "/jobs", f"/jobs/{job}"]:
        viewer_html = env.viewer.get(page).text
        operator_html = env.operator.get(page).text
        assert "<button" not in viewer_html.split("<main", 1)[1].replace(
            '<button type="submit" class="primary">Filter</button>', ""
        ), page
        assert any(marker in operator_html for marker in ACTION_MARKERS), page
    posts = [
        f"/jobs/{job}/retry",
        f"/jobs/{job}/cancel",
        f"/jobs/{job}/priority",
        "/jobs/bulk",
        "/destinations/pacs/pause",
        "/destinations/pacs/resume",
        "/destinations/pacs/echo",
        "/config/apply",
        "/config/preview",
        "/config/versions/1/rollback",
    ]
    for path in posts:
        response = env.viewer.post(path, data={"value": "5", "candidate": "x"})
        assert response.status_code == 403, path
    assert job_detail(env.engine, job)["state"] == "failed"  # type: ignore[index]
    assert audit.query(env.engine, action="job.")[0] == 0
    # An operator may act, but not change the configuration.
    assert env.operator.post("/config/apply", data={"candidate": "x"}).status_code == 403


def test_retry_one_job_from_the_jobs_page_is_audited(
    seeded: tuple[ApiEnv, dict[str, Any]],
) -> None:
    env, facts = seeded
    job = facts["failed_job"]
    listing = env.operator.get("/jobs?state=failed&destination=pacs")
    assert f'data-job="{job}"' in listing.text and "refused" in listing.text
    response = env.operator.post(
        f"/jobs/{job}/retry", headers={"Referer": "http://testserver/jobs?state=failed"}
    )
    assert response.status_code == 200  # followed the redirect back to the list
    assert str(response.url).endswith("/jobs?state=failed")
    assert f"job {job} queued again" in response.text
    assert job_detail(env.engine, job)["state"] == "pending"  # type: ignore[index]
    total, entries = audit.query(env.engine, action="job.retry")
    assert total == 1 and entries[0]["actor"] == "operator-token"
    # Retrying again is a conflict, shown as a message rather than an error page.
    again = env.operator.post(f"/jobs/{job}/cancel")
    assert again.status_code == 200 and f"job {job} canceled" in again.text
    conflict = env.operator.post(f"/jobs/{job}/cancel")
    assert "nothing to cancel" in conflict.text and 'class="flash error"' in conflict.text


def test_bulk_actions_on_a_selection_and_on_the_filter(
    seeded: tuple[ApiEnv, dict[str, Any]],
) -> None:
    env, facts = seeded
    job = facts["failed_job"]
    selected = env.operator.post(
        "/jobs/bulk", data={"action": "retry", "scope": "selected", "ids": [str(job)]}
    )
    assert "retry: 1 of 1 selected job(s) changed" in selected.text
    by_filter = env.operator.post(
        "/jobs/bulk",
        data={"action": "cancel", "scope": "filter", "destination": "pacs", "state": "pending"},
    )
    assert "cancel: 1 job(s) matching the filter changed" in by_filter.text
    assert job_detail(env.engine, job)["state"] == "canceled"  # type: ignore[index]
    nothing = env.operator.post("/jobs/bulk", data={"action": "retry", "scope": "selected"})
    assert "select at least one job" in nothing.text
    assert audit.query(env.engine, action="job.bulk_cancel")[0] == 1


def test_the_job_detail_shows_instances_attempts_and_errors(
    seeded: tuple[ApiEnv, dict[str, Any]],
) -> None:
    env, facts = seeded
    html = env.viewer.get(f"/jobs/{facts['failed_job']}").text
    assert html.count('class="mono small"') >= 3  # the three instances
    assert "0xC000" in html and "refused: cannot understand" in html
    assert '<span class="badge failed">failed</span>' in html


def test_pause_and_resume_a_destination(seeded: tuple[ApiEnv, dict[str, Any]]) -> None:
    env, _ = seeded
    paused = env.operator.post("/destinations/pacs/pause")
    assert "pacs paused" in paused.text
    assert 'action="/destinations/pacs/resume"' in paused.text
    again = env.operator.post("/destinations/pacs/pause")
    assert "already paused" in again.text
    resumed = env.operator.post("/destinations/pacs/resume")
    assert "pacs resumed" in resumed.text
    actions = [e["action"] for e in audit.query(env.engine, action="destination.")[1]]
    assert actions == ["destination.resume", "destination.pause"]
    echo = env.operator.post("/destinations/pacs/echo")  # port 1: nobody answers
    assert "did not answer C-ECHO" in echo.text


def test_a_folder_destination_is_tested_with_a_write_not_a_c_echo(tmp_path: Path) -> None:
    gone = tmp_path / "share-that-is-not-mounted"
    env = api_env(tmp_path, {"destinations": {"share": {"type": "folder", "path": str(gone)}}})
    page = env.operator.get("/destinations/share").text
    assert ">Test</button>" in page and "(a test write)" in page
    assert ">Echo</button>" not in page
    tested = env.operator.post("/destinations/share/echo")
    assert "share did not answer a test write" in tested.text
    assert "C-ECHO" not in tested.text


def test_the_overview_charts_are_svg_with_the_data(
    seeded: tuple[ApiEnv, dict[str, Any]],
) -> None:
    env, _ = seeded
    html = env.viewer.get("/").text
    assert 'hx-trigger="every 5s"' in html
    received = re.search(r'data-series="received" data-values="([^"]*)"', html)
    delivered = re.search(r'data-series="delivered" data-values="([^"]*)"', html)
    failed = re.search(r'data-series="failed" data-values="([^"]*)"', html)
    assert received and delivered and failed
    assert sum(map(float, received.group(1).split(","))) == 5
    assert sum(map(float, delivered.group(1).split(","))) == 2 + 2  # study 1 to both
    assert sum(map(float, failed.group(1).split(","))) == 3
    # Queue depth: archive has the second study pending; pacs has one failed job.
    bars = dict(
        ((label, segment), float(value))
        for label, segment, value in re.findall(
            r'data-label="([^"]+)" data-segment="([^"]+)" data-value="([^"]+)"', html
        )
    )
    assert bars[("archive", "pending")] == 1 and bars[("pacs", "failed")] == 1
    assert bars[("pacs", "rate")] == pytest.approx(0.6)  # 3 failed of 5 in the last hour
    gauge = re.search(r'class="chart gauge"[^>]*data-used="([\d.]+)"', html)
    assert gauge and 0 < float(gauge.group(1)) < 1
    assert "destination pacs has 1 failed job(s)" in html


def test_studies_search_and_trace(seeded: tuple[ApiEnv, dict[str, Any]]) -> None:
    env, facts = seeded
    html = env.viewer.get("/studies?calling_ae=CT2").text
    assert "1 study." in html
    uid = job_detail(env.engine, facts["failed_job"])["study_instance_uid"]  # type: ignore[index]
    trace = env.viewer.get(f"/studies/{uid}").text
    for kind in ("received", "matched", "queued", "attempt", "failed"):
        assert f'class="ev {kind}"' in trace, kind
    assert env.viewer.get("/studies/1.2.3.404").status_code == 404


def test_routes_show_rules_counters_and_test_dropped_files(
    seeded: tuple[ApiEnv, dict[str, Any]],
) -> None:
    env, facts = seeded
    html = env.viewer.get("/routes").text
    assert "ct-to-pacs" in html and "CT" in html
    file: Path = facts["files"][0]
    # The tester reads uploads and costs CPU: operators only, like the API.
    assert "Rule tester" not in html
    denied = env.viewer.post("/routes/test", files=[("files", ("x.dcm", b"x", "x"))])
    assert denied.status_code == 403
    with file.open("rb") as handle:
        tested = env.operator.post(
            "/routes/test", files=[("files", (file.name, handle, "application/dicom"))]
        )
    assert tested.status_code == 200
    rows = re.findall(r'<tr class="match"><td>[^<]*</td><td>([^<]+)</td>', tested.text)
    assert rows == ["ct-to-pacs", "all-to-archive"]
    junk = env.operator.post("/routes/test", files=[("files", ("x.txt", b"hello", "text/plain"))])
    assert "not a readable DICOM file" in junk.text
    candidate = yaml.safe_dump({"name": "mr", "when": {"Modality": "MR"}, "to": ["pacs"]})
    backtest = env.operator.post("/routes/backtest", data={"candidate": candidate, "days": "1"})
    assert "0 of 2 studies" in backtest.text
    too_far = env.operator.post("/routes/backtest", data={"candidate": candidate, "days": "5000"})
    assert "days: must be more than 0 and at most 366" in too_far.text
    assert env.viewer.post("/routes/backtest", data={"candidate": candidate}).status_code == 403
    actions = [e["action"] for e in audit.query(env.engine, action="route.")[1]]
    assert actions.count("route.test") == 2 and actions.count("route.backtest") == 1


def test_config_validate_preview_apply_and_rollback(tmp_path: Path) -> None:
    env = api_env(tmp_path, CONFIG)
    path = tmp_path / "dicomrouter.yaml"
    original = yaml.safe_dump(env.config.model_dump(mode="json"), sort_keys=False)
    path.write_text(original)
    env.ctx.config_path = path
    # Viewers see the configuration with hashes redacted, and no editor.
    viewer = env.viewer.get("/config").text
    assert "&lt;redacted&gt;" in viewer and "scrypt$" not in viewer and "<textarea" not in viewer
    assert "<textarea" in env.admin.get("/config").text
    invalid = env.admin.post("/config/preview", data={"candidate": "dicom: {port: 0}\n"})
    assert "Invalid" in invalid.text and "dicom.port" in invalid.text
    assert 'action="/config/apply"' not in invalid.text
    changed = original.replace("port: 1\n", "port: 11\n", 1)
    preview = env.admin.post("/config/preview", data={"candidate": changed, "comment": "move"})
    assert '<span class="add">+    port: 11</span>' in preview.text
    assert 'action="/config/apply"' in preview.text
    applied = env.admin.post("/config/apply", data={"candidate": changed, "comment": "move"})
    assert applied.status_code == 200 and "applied" in applied.text
    assert env.ctx.config.destinations["pacs"].port == 11 and path.read_text() == changed
    refused = env.admin.post("/config/apply", data={"candidate": "dicom: {port: 0}\n"})
    assert refused.status_code == 422 and path.read_text() == changed
    versions_listed = re.findall(r'href="/config/versions/(\d+)"', env.viewer.get("/config").text)
    assert versions_listed, "the applied version is listed"
    first = min(map(int, versions_listed))
    version_page = env.admin.get(f"/config/versions/{first}")
    assert "Roll back to this version" in version_page.text
    assert "Roll back" not in env.operator.get(f"/config/versions/{first}").text
    actions = [e["action"] for e in audit.query(env.engine, action="config.")[1]]
    assert actions[:2] == ["config.apply", "config.apply"]  # the refusal, then the apply


def test_pages_escape_what_they_show(tmp_path: Path) -> None:
    env = api_env(tmp_path, CONFIG)
    audit.record(env.engine, "<script>alert(1)</script>", "job.retry", "<b>x</b>")
    html = env.admin.get("/audit").text
    assert "<script>alert(1)</script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def _config_with_secrets(env: ApiEnv, port: int = 1) -> str:
    """The dashboard's configuration with secrets written the ways a text regex misses
    (quoted key, anchor, block scalar, tag), webhook headers, a database password and
    a comment."""
    from tests.support.api import auth_section

    data = yaml.safe_load(yaml.safe_dump(env.config.model_dump(mode="json"), sort_keys=False))
    data["destinations"]["pacs"]["port"] = port
    for key in ("auth", "alerts", "database"):
        data.pop(key, None)
    pw = auth_section()["users"]["admin"]["password_hash"]
    tokens = {name: t["token_hash"] for name, t in auth_section()["tokens"].items()}
    return (
        "# pager password: hunter2\n"
        + yaml.safe_dump(data, sort_keys=False)
        + f"""database: postgresql://router:pg-s3cret@db/router
auth:
  users:
    "viewer": {{"password_hash": "{pw}", role: viewer}}
    operator: {{password_hash: &h {pw}, role: operator}}
    admin:
      password_hash: >-
        {pw}
      role: admin
  tokens:
    viewer-token: {{"token_hash": "{tokens["viewer-token"]}", role: viewer}}
    operator-token: {{token_hash: &t {tokens["operator-token"]}, role: operator}}
    admin-token: {{token_hash: !!str {tokens["admin-token"]}, role: admin}}
alerts:
  webhooks:
    ops:
      url: https://hooks.example/a
      headers: {{Authorization: Bearer s3cr3t}}
"""
    )


CONFIG_SECRETS = ("scrypt$", "sha256$", "hunter2", "pg-s3cret", "s3cr3t")


def test_config_pages_never_show_secrets_to_viewers(tmp_path: Path) -> None:
    from dicomrouter.control import versions

    env = api_env(tmp_path, CONFIG)
    path = tmp_path / "dicomrouter.yaml"
    text = _config_with_secrets(env)
    path.write_text(text)
    env.ctx.config_path = path
    versions.record_version(env.engine, text, author="system", source="startup")
    page = env.viewer.get("/config").text
    assert [s for s in CONFIG_SECRETS if s in page] == []
    assert "ct-to-pacs" in page and "comments" in page  # shown, and told what is left out
    # An admin changes a route port and a webhook header: the viewer's diff on the old
    # version's page shows the port, not the header.
    changed = _config_with_secrets(env, port=11).replace("s3cr3t", "n3w-s3cr3t")
    applied = env.admin.post("/config/apply", data={"candidate": changed})
    assert applied.status_code == 200 and path.read_text() == changed
    old_page = env.viewer.get("/config/versions/1").text
    assert [s for s in CONFIG_SECRETS if s in old_page] == [] and "n3w" not in old_page
    assert '<span class="add">+    port: 11</span>' in old_page
    # Admins see and edit the exact text.
    assert "# pager password: hunter2" in env.admin.get("/config").text
    assert "n3w-s3cr3t" in env.admin.get("/config/versions/1").text


def test_config_dashboard_crlf_text_is_the_same_configuration(tmp_path: Path) -> None:
    from dicomrouter.control import versions

    env = api_env(tmp_path, CONFIG)
    path = tmp_path / "dicomrouter.yaml"
    original = yaml.safe_dump(env.config.model_dump(mode="json"), sort_keys=False)
    path.write_text(original)
    env.ctx.config_path = path
    versions.record_version(env.engine, original, author="system", source="startup")
    crlf = original.replace("\n", "\r\n")  # what a browser sends from a textarea
    preview = env.admin.post("/config/preview", data={"candidate": crlf})
    assert "No change." in preview.text and '<span class="add">' not in preview.text
    applied = env.admin.post("/config/apply", data={"candidate": crlf})
    assert "identical to version 1" in applied.text
    assert versions.list_versions(env.engine)[0] == 1 and b"\r" not in path.read_bytes()
    changed = original.replace("port: 1\n", "port: 11\n", 1).replace("\n", "\r\n")
    env.admin.post("/config/apply", data={"candidate": changed})
    assert versions.list_versions(env.engine)[0] == 2 and b"\r" not in path.read_bytes()
    newest = versions.latest_version(env.engine)
    assert newest is not None and newest.yaml == path.read_text()


def test_a_mistyped_time_is_an_error_never_a_wider_bulk_action(
    seeded: tuple[ApiEnv, dict[str, Any]],
) -> None:
    env, _ = seeded

    def states() -> list[tuple[int, str]]:
        return [(j["id"], j["state"]) for j in search_jobs(env.engine, JobFilter(), 100, 0)[1]]

    before = states()
    response = env.operator.post(
        "/jobs/bulk",
        data={"action": "cancel", "scope": "filter", "state": "pending", "since": "yesterday"},
    )
    assert "ISO 8601" in response.text
    assert states() == before and ("pending" in {s for _, s in before})  # nothing canceled
    assert "ISO 8601" in env.viewer.get("/jobs", params={"since": "yesterday"}).text
    assert "ISO 8601" in env.admin.get("/audit", params={"until": "soon"}).text
    # What the browser's datetime-local field sends still works.
    page = env.viewer.get("/jobs", params={"since": "2000-01-01T08:00"}).text
    assert "ISO 8601" not in page and "job(s)" in page


def test_the_trace_reads_as_sentences_with_links_and_full_uids(
    seeded: tuple[ApiEnv, dict[str, Any]], tmp_path: Path
) -> None:
    env, facts = seeded
    job = facts["failed_job"]
    detail = job_detail(env.engine, job)
    assert detail is not None
    uid = detail["study_instance_uid"]
    html = env.viewer.get(f"/studies/{uid}").text
    # No raw key/value dump; each kind says what happened, with links.
    assert "sop instance uid" not in html and 'class="kv"' not in html
    assert "<b>1 instance</b> of series" in html and "from <b>CT2</b> (10.0.0.9)" in html
    assert 'route <a href="/routes/ct-to-pacs"><b>ct-to-pacs</b></a>' in html
    assert 'matched <b>3 instances</b> — <span class="reason">Modality &#39;CT&#39; equals' in html
    assert f'<a href="/jobs/{job}">job {job}</a> to <a href="/destinations/pacs">' in html
    assert "(study, 3 instances) queued by route" in html
    assert '<span class="badge failed">failed</span>' in html  # the attempt's outcome
    assert "0/3 delivered" in html and "refused: cannot understand" in html
    # UIDs are shortened in the sentence, and kept in full (title, mono line).
    trace = env.viewer.get(f"/api/v1/studies/{uid}/trace").json()
    for event in trace["events"]:
        if event["kind"] == "received":
            assert f"SOP {event['sop_instance_uid']}" in html
            assert f'title="{event["series_instance_uid"]}"' in html

    # A bigger study: consecutive receptions from one series and sender fold into one
    # line, whose SOP Instance UIDs stay listed; a route removed since is flagged.
    seed = Seeder(env, tmp_path / "more")
    seed.receive_study(6, modality="CT")
    seed.plan()
    seed.deliver("pacs")
    newest = env.viewer.get("/api/v1/studies").json()["items"][0]["study_instance_uid"]
    trace = env.viewer.get(f"/api/v1/studies/{newest}/trace").json()
    series = trace["events"][0]["series_instance_uid"]
    html = env.viewer.get(f"/studies/{newest}").text
    assert html.count('class="ev received"') == 1
    assert "<b>6 instances</b> of series" in html and "6 SOP Instance UIDs" in html
    assert f'title="{series}"' in html
    assert all(e["sop_instance_uid"] in html for e in trace["events"] if e["kind"] == "received")
    assert "<b>delivered 6/6</b> to" in html

    changed = {**CONFIG, "routes": [CONFIG["routes"][0]]}
    env2 = api_env(tmp_path, {**changed, "storage": {"path": str(env.config.storage.path)}})
    html = env2.viewer.get(f"/studies/{newest}").text
    assert "no longer in the configuration" in html  # all-to-archive was removed
