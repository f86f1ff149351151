"""The dashboard's layout and the API page, in real headless Chromium with no network.

The app runs in this process (uvicorn in a thread) over an index seeded through the
real pipeline code: a study delivered, one refused, one with a thousand instances,
audit records. One browser, one context, whose every request to another origin is
aborted and recorded, as on an offline clinical network.

- Every dashboard page the app declares (GET routes, path parameters filled from the
  seed) is opened at 1280×800 and nothing may be wider than the window.
- ``/api/docs`` renders Swagger UI, operations listed, from this server only.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import uvicorn
import yaml
from fastapi import FastAPI
from fastapi.routing import APIRoute

from dicomrouter.control import versions
from dicomrouter.control.jobs import job_detail
from tests.support.api import TOKENS, ApiEnv, api_env
from tests.support.dcmtk import HOST, free_port
from tests.support.seed import Seeder
from tests.test_api_security import every_route
from tests.test_browser_e2e import CHROMIUM, require_chromium

WIDTH, HEIGHT = 1280, 800
CONFIG: dict[str, Any] = {
    "destinations": {
        "pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": 1},
        "archive-with-a-rather-long-name": {"ae_title": "ARCH", "host": "127.0.0.1", "port": 2},
    },
    "routes": [
        {"name": "ct-to-pacs", "trigger": "study", "when": {"Modality": "CT"}, "to": ["pacs"]},
        {
            "name": "all-to-archive",
            "trigger": "study",
            "to": ["archive-with-a-rather-long-name"],
        },
    ],
}


@dataclass
class Live:
    env: ApiEnv
    base: str
    params: dict[str, str]


def serve(app: FastAPI) -> Iterator[str]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host=HOST, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "the HTTP server did not start"
        time.sleep(0.05)
    try:
        yield f"http://{HOST}:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    tmp_path = tmp_path_factory.mktemp("layout")
    env = api_env(tmp_path, CONFIG)
    seed = Seeder(env, tmp_path / "in")
    seed.receive_study(3, modality="CT")
    seed.plan()
    seed.deliver("pacs")
    seed.deliver("archive-with-a-rather-long-name")
    seed.receive_study(2, modality="CT", calling_ae="CT2", study_description="A" * 64)
    seed.plan()
    (failed,) = seed.deliver("pacs", fail=True)
    study = job_detail(env.engine, failed)
    assert study is not None
    # Something for the audit page: an operator action and an admin one.
    assert env.operator.post(f"/api/v1/jobs/{failed}/retry").status_code == 200
    assert env.admin.post("/api/v1/destinations/pacs/pause").status_code == 200
    version, _ = versions.record_if_new(
        env.engine, yaml.safe_dump(CONFIG), author="admin", source="api", comment="B" * 200
    )
    params = {
        "job_id": str(failed),
        "name": "pacs",
        "route": "ct-to-pacs",
        "uid": study["study_instance_uid"],
        "version_id": str(version),
    }
    for base in serve(env.anonymous.app):  # type: ignore[arg-type]
        yield Live(env, base, params)


@pytest.fixture(scope="module")
def browser_context(live: Live) -> Iterator[tuple[Any, list[str]]]:
    """One context, as the admin (by token, so every page is open), whose requests
    to anywhere but the app are aborted and listed."""
    require_chromium()
    from playwright.sync_api import Route, sync_playwright

    outside: list[str] = []

    def only_the_router(route: Route) -> None:
        if route.request.url.startswith(live.base + "/"):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort("internetdisconnected")

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            context = browser.new_context(
                viewport={"width": WIDTH, "height": HEIGHT},
                extra_http_headers={"Authorization": f"Bearer {TOKENS['admin']}"},
            )
            context.set_default_timeout(20_000)
            context.route("**/*", only_the_router)
            yield context, outside
        finally:
            browser.close()


def test_the_api_docs_render_with_no_network(
    live: Live, browser_context: tuple[Any, list[str]]
) -> None:
    from playwright.sync_api import expect

    context, outside = browser_context
    page = context.new_page()
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"{live.base}/api/docs")
    expect(page.locator(".swagger-ui .info .title")).to_contain_text("dicomrouter")
    operations = page.locator(".swagger-ui .opblock")
    expect(operations.first).to_be_visible()
    assert operations.count() > 30
    jobs = page.locator(".swagger-ui .opblock-summary-path", has_text="/api/v1/jobs")
    expect(jobs.first).to_be_visible()
    page.close()
    assert outside == [], outside
    assert errors == [], errors


#: The widest thing inside the page, as [width, description], or null when nothing
#: is wider than the window.
WIDEST = """() => {
  const limit = window.innerWidth;
  let worst = null;
  for (const el of document.querySelectorAll("body *")) {
    const box = el.getBoundingClientRect();
    if (box.width === 0) continue;
    if (box.right > limit + 1 && (!worst || box.right > worst[0])) {
      worst = [Math.round(box.right), el.tagName.toLowerCase() + "." + el.className + " "
               + (el.textContent || "").trim().slice(0, 60)];
    }
  }
  return {scroll: document.documentElement.scrollWidth, width: limit, worst};
}"""


def dashboard_pages(app: FastAPI, params: dict[str, str]) -> list[str]:
    """Every GET page of the dashboard (not the API, probes or metrics), path
    parameters filled from the seed."""
    pages = []
    for path, methods, route in every_route(app):
        if "GET" not in methods or isinstance(route, APIRoute) and route.include_in_schema:
            continue
        if path.startswith(("/api", "/static", "/metrics", "/healthz", "/readyz")):
            continue
        values = {**params, "name": params["route"]} if path.startswith("/routes/") else params
        pages.append(re.sub(r"\{(\w+)\}", lambda m, v=values: v[m.group(1)], path))
    return sorted(pages)


def test_no_dashboard_page_is_wider_than_the_window(
    live: Live, browser_context: tuple[Any, list[str]]
) -> None:
    context, outside = browser_context
    pages = dashboard_pages(live.env.anonymous.app, live.params)  # type: ignore[arg-type]
    assert {"/", "/audit", "/routes", "/jobs/{}".format(live.params["job_id"])} <= set(pages)
    assert len(pages) >= 12, pages
    page = context.new_page()
    too_wide = {}
    for path in pages:
        response = page.goto(live.base + path)
        assert response is not None and response.status == 200, path
        measured = page.evaluate(WIDEST)
        if measured["scroll"] > WIDTH or measured["worst"]:
            too_wide[path] = measured
    # The routes page after a backtest and a file test: the result tables.
    page.goto(live.base + "/routes")
    page.get_by_role("button", name="What would it match?").click()
    page.wait_for_selector("table.backtest")
    measured = page.evaluate(WIDEST)
    if measured["scroll"] > WIDTH or measured["worst"]:
        too_wide["/routes (backtest)"] = measured
    page.close()
    assert too_wide == {}, "\n".join(f"{k}: {v}" for k, v in too_wide.items())
    assert outside == [], outside
