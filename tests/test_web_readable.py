"""The dashboard reads as sentences: the audit log's details, the trace of a large
study, the routes page's tester and backtest (issue 11, "The first hour")."""

from __future__ import annotations

import re
from html import unescape
from pathlib import Path
from typing import Any

from dicomrouter.store import audit
from dicomrouter.web.audit_text import describe
from tests.support.api import api_env
from tests.support.seed import Seeder

CONFIG: dict[str, Any] = {
    "destinations": {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": 1}},
    "routes": [{"name": "all", "trigger": "study", "to": ["pacs"]}],
}


def text_of(html: str) -> str:
    return unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", "", html))).strip()


# -- the audit log --------------------------------------------------------------------------
def test_audit_details_are_sentences_not_python() -> None:
    apply = describe(
        "config.apply",
        {
            "version": 3,
            "created": True,
            "changed": ["dicom.port", "routes"],
            "restart_required": ["dicom.port"],
            "lines_added": 2,
            "lines_removed": 1,
            "comment": "new PACS port",
            "sha256": "ab" * 32,
        },
    )
    assert apply[:4] == [
        "Version 3 (new).",
        "Changed: dicom.port, routes.",
        "Needs a restart: dicom.port.",
        "2 lines added, 1 removed.",
    ]
    assert describe("job.retry", {"ids": [7], "requested": 1, "changed": 1}) == [
        "1 of 1 job changed (job 7)."
    ]
    bulk = describe(
        "job.bulk_cancel",
        {"filter": {"state": ["failed"], "destination": "pacs"}, "matched": 2, "changed": 2},
    )
    assert bulk == ["2 jobs matched (state failed; destination pacs), 2 changed."]
    assert describe("destination.echo", {"ok": False, "ms": 2.0, "error": "refused"}) == [
        "No answer: refused."
    ]
    assert describe("route.backtest", {"days": 7.0, "matched_studies": 2, "truncated": False})[
        0
    ] == ("Over the last 7 days, 2 studies would have matched.")
    # Unknown actions and unknown keys: "key: value", values in words.
    assert describe("something.new", {"dry_run": True, "names": ["a", "b"], "gone": None}) == [
        "dry run: yes",
        "names: a, b",
        "gone: none",
    ]
    # A value of an unexpected shape falls back instead of failing the page.
    assert describe("job.retry", {"requested": "many"}) == ["requested: many"]
    assert describe("auth.logout", {}) == []
    for lines in (apply, bulk):
        for line in lines:
            assert not re.search(r"\[|\]|\bTrue\b|\bFalse\b|\bNone\b", line), line


def test_the_audit_page_shows_no_python_lists_or_booleans(tmp_path: Path) -> None:
    env = api_env(tmp_path, CONFIG)
    audit.record(
        env.engine,
        "admin",
        "config.apply",
        "version 2",
        detail={"version": 2, "created": True, "changed": ["dicom.port"], "restart_required": []},
    )
    audit.record(
        env.engine,
        "eve<script>",
        "auth.login",
        outcome="denied",
        detail={"reason": "<b>unknown user</b>", "path": "/login"},
    )
    assert env.admin.post("/api/v1/destinations/pacs/pause").status_code == 200
    page = env.admin.get("/audit")
    assert page.status_code == 200
    assert "<script>" not in page.text and "<b>unknown user</b>" not in page.text
    cells = re.findall(r'<td class="small detail">(.*?)</td>', page.text, re.S)
    shown = text_of(" | ".join(cells))
    assert "Version 2 (new)." in shown and "Changed: dicom.port." in shown
    assert "<b>unknown user</b> (on /login)" in shown
    assert not re.search(r"\[|\]|\bTrue\b|\bFalse\b|\bNone\b|\{", shown), shown


# -- the trace of a big study ---------------------------------------------------------------
def test_the_trace_of_a_1000_instance_study_stays_readable(tmp_path: Path) -> None:
    """Routed instance by instance to two destinations: 2000 jobs. The page shows a
    line per series and destination (expandable to its instances) and a timeline of
    some lines, not thousands."""
    config = {
        "destinations": {
            "pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": 1},
            "archive": {"ae_title": "ARCH", "host": "127.0.0.1", "port": 2},
        },
        "routes": [{"name": "each", "trigger": "instance", "to": ["pacs", "archive"]}],
    }
    env = api_env(tmp_path, config)
    seed = Seeder(env, tmp_path / "in")
    seed.receive_study(1000, modality="CT", series_count=4)
    seed.plan()
    assert len(seed.deliver("pacs", max_jobs=2000)) == 1000
    assert len(seed.deliver("archive", max_jobs=10, fail=True)) == 10  # the rest waits
    uid = env.viewer.get("/api/v1/studies").json()["items"][0]["study_instance_uid"]

    html = env.viewer.get(f"/studies/{uid}").text
    groups = re.findall(r'<details class="delivery-group".*?</details>', html, re.S)
    assert len(groups) == 8  # 4 series x 2 destinations
    summaries = [text_of(g.split("<summary>")[1].split("</summary>")[0]) for g in groups]
    pacs = [s for s in summaries if "→ pacs:" in s]
    assert len(pacs) == 4 and all("250 of 250 instances delivered" in s for s in pacs), pacs
    archive = " ".join(s for s in summaries if "→ archive:" in s)
    assert "10 failed" in archive and "refused: cannot understand" in archive
    assert "0 of 250 instances delivered, 10 failed, 240 waiting" in archive
    # Rows a person scrolls past before opening anything: the timeline's lines.
    assert html.count('<li class="ev') <= 30, html.count('<li class="ev')
    assert "1000 jobs" in text_of(html)  # the timeline says it of the jobs, once
    # Opening a group lists its instances, each with its job and state.
    assert sum(g.count('<tr><td class="mono uid-cell"') for g in groups) == 2000
    trace = env.viewer.get(f"/api/v1/studies/{uid}/trace").json()
    first_job = trace["deliveries"][0]
    assert f'<a href="/jobs/{first_job["job_id"]}">{first_job["job_id"]}</a>' in html


# -- the routes page ------------------------------------------------------------------------
def test_the_routes_testers_count_instances_keep_7_and_take_a_calling_ae(tmp_path: Path) -> None:
    config = {
        **CONFIG,
        "routes": [
            {
                "name": "from-ct1",
                "trigger": "study",
                "when": {"CallingAETitle": "CT1"},
                "to": ["pacs"],
            }
        ],
    }
    env = api_env(tmp_path, config)
    seed = Seeder(env, tmp_path / "in")
    files = seed.receive_study(4, modality="CT")
    seed.receive_study(2, modality="MR")
    seed.receive_study(3, modality="CT")

    # "2 of 3 studies (9 instances)": the instances the studies hold, not the number
    # of headers read (a matched study's other instances are skipped).
    rule = "name: candidate\ntrigger: study\nwhen:\n  Modality: CT\nto: [pacs]\n"
    page = env.operator.post("/routes/backtest", data={"candidate": rule, "days": "7"})
    assert page.status_code == 200
    assert "2 of 3 studies (9 instances) matched" in text_of(page.text)
    # 7 days stays 7 when the form comes back, not 7.0.
    assert 'name="days" value="7"' in page.text
    page = env.operator.post("/routes/backtest", data={"candidate": rule, "days": "0.5"})
    assert 'name="days" value="0.5"' in page.text

    # The file tester pretends a calling AE, which conditions on the sender see.
    def tested(calling_ae: str) -> str:
        with open(files[0], "rb") as handle:
            response = env.operator.post(
                "/routes/test",
                data={"calling_ae": calling_ae},
                files={"files": ("one.dcm", handle, "application/dicom")},
            )
        assert response.status_code == 200
        return response.text

    html = tested("CT1")
    assert 'name="calling_ae" value="CT1"' in html
    row = re.search(r'<tr class="(match|nomatch)"><td>one.dcm</td><td>from-ct1</td>', html)
    assert row is not None and row.group(1) == "match", html
    html = tested("")
    row = re.search(r'<tr class="(match|nomatch)"><td>one.dcm</td><td>from-ct1</td>', html)
    assert row is not None and row.group(1) == "nomatch"
