"""The dashboard end to end, in real headless Chromium (Debian's, driven by Playwright).

A real router runs as a process with a destination that is down (nothing listens on
its port). A study is sent with dcmtk storescu. The destination is paused as
unreachable, and after ``give_up_after`` its job is failed for good. In the browser an
operator logs in and finds that failed job on the Jobs page with its error; the
destination comes up (dcmtk storescp on that port) and the probe resumes it, but a
failed job stays failed until the operator clicks Retry; the page (it refreshes
itself) then shows the job completed. The Overview is saved as a screenshot for
people to look at.
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from dicomrouter.security import hash_password
from tests.support import require_peers, skip_or_fail
from tests.support.dcmtk import HOST, StoreSCP, free_port, sop_uids
from tests.support.router import RouterProcess, wait_until
from tests.support.synth import make_study

pytestmark = pytest.mark.interop

CHROMIUM = "/usr/bin/chromium"
PASSWORD = "e2e operator password"


def require_chromium() -> None:
    """Like require_peers: skip locally with the reason, fail in CI."""
    missing = []
    if not Path(CHROMIUM).exists():
        missing.append(f"{CHROMIUM} (apt-get install chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("playwright (pip install -e '.[test]')")
    skip_or_fail(f"{' and '.join(missing)} missing" if missing else "", "the browser test")


def artifacts_dir() -> Path:
    folder = Path(os.environ.get("DICOMROUTER_ARTIFACTS") or "test-artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def router_config(down_port: int) -> dict[str, Any]:
    return {
        "auth": {
            "users": {"alice": {"password_hash": hash_password(PASSWORD), "role": "operator"}}
        },
        "http": {"bind": HOST},
        "destinations": {
            "pacs": {
                "ae_title": "PACS",
                "host": HOST,
                "port": down_port,
                "connect_timeout": "2s",
                "pause_after_failures": 1,
                "probe_interval": "1s",
                "give_up_after": "3s",
            }
        },
        "routes": [{"name": "all", "trigger": "study", "stable_after": "1s", "to": ["pacs"]}],
    }


def destination_state(router: RouterProcess) -> str | None:
    out = router.cli("queue", "list", "--json", "--config", str(router.config_path), check=True)
    for entry in json.loads(out.stdout)["destinations"]:
        if entry["name"] == "pacs":
            return entry["state"]  # type: ignore[no-any-return]
    return None


def http_ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}/healthz", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def test_retry_a_failed_delivery_from_the_browser(tmp_path: Path) -> None:
    require_peers(dcmtk=True)
    require_chromium()
    from playwright.sync_api import expect, sync_playwright

    down_port = free_port()
    files = make_study(tmp_path / "in", 3, prefix="E2E")
    with RouterProcess(tmp_path / "router", router_config(down_port)) as router:
        http_port = int(router.config["http"]["port"])
        base = f"http://{HOST}:{http_port}"
        wait_until(lambda: http_ready(http_port), 30, message="the HTTP service")
        result = router.send(files)
        assert result.returncode == 0, result.stderr
        (job,) = router.wait_jobs(
            lambda js: len(js) == 1 and js[0]["state"] == "failed",
            60,
            message="a delivery to pacs that failed",
        )
        assert job["destination"] == "pacs" and "unreachable" in job["last_error"]

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.set_default_timeout(30_000)
                # Whatever the Content-Security-Policy blocks shows as a console error.
                refused: list[str] = []
                page.on(
                    "console",
                    lambda m: (
                        refused.append(m.text)
                        if m.type == "error" and "Content Security Policy" in m.text
                        else None
                    ),
                )
                # Not logged in: the dashboard sends us to the login page.
                page.goto(f"{base}/jobs")
                expect(page).to_have_url(f"{base}/login?next=/jobs")
                page.get_by_label("User name").fill("alice")
                page.get_by_label("Password").fill(PASSWORD)
                page.get_by_role("button", name="Log in").click()
                expect(page).to_have_url(f"{base}/jobs")

                # Find the failed delivery to pacs, with its error.
                page.get_by_label("Destination").select_option("pacs")
                page.get_by_label("State").select_option("failed")
                page.get_by_role("button", name="Filter").click()
                row = page.locator(f'tr[data-job="{job["id"]}"]')
                expect(row).to_have_attribute("data-destination", "pacs")
                expect(row).to_have_attribute("data-state", "failed")
                expect(row.locator("td.error-text")).to_contain_text("unreachable")
                # "Select all" is a script from /static (no inline handlers allowed).
                page.get_by_label("select all").check()
                expect(row.locator("input.sel")).to_be_checked()
                page.get_by_label("select all").uncheck()
                expect(row.locator("input.sel")).not_to_be_checked()

                with StoreSCP(down_port, "PACS", tmp_path / "pacs", accept="all") as scp:
                    # The probe finds it back; the failed job waits for the operator.
                    wait_until(
                        lambda: destination_state(router) == "ok", 30, message="pacs resumed"
                    )
                    assert [j["state"] for j in router.jobs()] == ["failed"]
                    row.get_by_role("button", name="Retry").click()
                    expect(page.locator(".flash")).to_contain_text(f"job {job['id']} queued again")
                    # Show every state again, to watch it go; the list refreshes
                    # itself every few seconds (htmx).
                    page.get_by_label("State").select_option("")
                    page.get_by_role("button", name="Filter").click()
                    completed = page.locator(f'tr[data-job="{job["id"]}"][data-state="completed"]')
                    expect(completed).to_be_visible(timeout=60_000)
                    expect(completed.locator(".badge")).to_have_text("completed")
                    wait_until(
                        lambda: scp.received_sops() == sop_uids(files),
                        20,
                        message="the study at the destination",
                    )

                page.goto(f"{base}/")
                expect(page.locator("svg.chart.columns")).to_be_visible()
                expect(page.locator('g[data-series="delivered"] rect').first).to_be_visible()
                screenshot = artifacts_dir() / "overview.png"
                page.screenshot(path=str(screenshot), full_page=True)
                assert refused == [], refused

                # Logging out ends the session on the server: the old cookie, put
                # back by hand, no longer opens a page.
                cookies = page.context.cookies()
                page.get_by_role("button", name="Log out").click()
                expect(page).to_have_url(f"{base}/login")
                page.context.add_cookies(cookies)  # type: ignore[arg-type]
                page.goto(f"{base}/jobs")
                expect(page).to_have_url(f"{base}/login?next=/jobs")
            finally:
                browser.close()
    data = screenshot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 20_000, f"a suspiciously small screenshot: {len(data)} bytes"
    shutil.copy(screenshot, tmp_path / "overview.png")
