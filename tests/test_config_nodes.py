"""Configuration across nodes: two router processes on one PostgreSQL index (each
with its own storage folder and ports, which is enough here). A version applied
through node A's API runs on node B within seconds (NOTIFY, or B's polling), and
B's file follows it; B restarted with the file it was started with (an older
version) runs the newest version and does not revert A."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.support.api import TOKENS, auth_section
from tests.support.dcmtk import HOST
from tests.support.router import RouterProcess, wait_until


def _client(router: RouterProcess) -> httpx.Client:
    client = httpx.Client(
        base_url=f"http://{HOST}:{router.config['http']['port']}",
        headers={"Authorization": f"Bearer {TOKENS['admin']}"},
        timeout=30,
    )

    def up() -> bool:
        try:
            return client.get("/healthz").status_code == 200
        except httpx.TransportError:
            return False

    wait_until(up, 60, message=f"HTTP service of {router.workdir.name}")
    return client


def test_a_version_applied_on_one_node_runs_on_the_other_and_a_restart_does_not_revert_it(
    tmp_path: Path, postgres_url: str, dcmtk: None
) -> None:
    config: dict[str, Any] = {
        "database": postgres_url,
        "destinations": {"pacs": {"ae_title": "PACS", "host": HOST, "port": 104}},
        "routes": [{"name": "to-pacs", "to": ["pacs"]}],
        "auth": auth_section(),
        "http": {"bind": HOST},
    }
    a = RouterProcess(tmp_path / "a", config)
    b = RouterProcess(tmp_path / "b", config)
    b_started_with = b.config_path.read_text()
    with a, b:
        client_a, client_b = _client(a), _client(b)
        # B's file (its own ports) was a new text: recorded when B started, and A
        # runs it too; both files now hold it.
        started = client_b.get("/api/v1/config").json()["version"]["id"]
        wait_until(
            lambda: f"configuration version {started} was recorded" in a.log(), 30, message="A"
        )

        new = yaml.safe_load(client_a.get("/api/v1/config").json()["yaml"])
        new["destinations"]["extra"] = {"ae_title": "EXTRA", "host": HOST, "port": 105}
        new["routes"].append({"name": "to-extra", "to": ["extra"]})
        applied = client_a.put(
            "/api/v1/config",
            content=yaml.safe_dump(new, sort_keys=False),
            headers={"Content-Type": "application/yaml"},
        )
        assert applied.status_code == 200, applied.text
        version = applied.json()["version"]
        assert version > started

        # B runs it within seconds: its processes load it, its file holds it.
        for process in ("dispatch", "HTTP service"):
            wait_until(
                lambda p=process: f"{p} runs on configuration version {version}" in b.log(),
                15,
                message=f"B's {process} on version {version}",
            )
        shown = client_b.get("/api/v1/config").json()
        assert "extra" in yaml.safe_load(shown["yaml"])["destinations"]
        assert shown["version"]["id"] == version

        # B stops, its file goes back to what it was started with, B starts again.
        client_b.close()
        assert b.stop() == 0  # a clean stop, listener and all
        b.config_path.write_text(b_started_with)
        b.start()
        client_b = _client(b)
        assert f"holds configuration version {started}, older than the newest" in b.log()
        assert client_a.get("/api/v1/config").json()["version"]["id"] == version  # no revert
        shown = client_b.get("/api/v1/config").json()
        assert shown["version"]["id"] == version
        assert "extra" in yaml.safe_load(shown["yaml"])["destinations"]
        assert "extra" in yaml.safe_load(b.config_path.read_text())["destinations"]
        listed = client_a.get("/api/v1/config/versions").json()["versions"]
        assert [v["id"] for v in listed][0] == version
        client_a.close()
        client_b.close()
