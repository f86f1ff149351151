"""What a person meets in the first hour (issue 11): the CLI at 80 columns, one
vocabulary and one set of field names across the CLI, the API and the dashboard,
both retry counts, refusals that say why, and a log line per refused C-STORE."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from dicomrouter.config import parse_config
from dicomrouter.destinations import DicomSender, OutgoingInstance
from dicomrouter.dispatch.health import DestinationHealth
from dicomrouter.receive import Receiver
from dicomrouter.store import (
    InstanceHeader,
    InstanceIndex,
    ObjectStore,
    create_index_engine,
    read_header,
)
from tests.support.api import ApiEnv, api_env
from tests.support.cli import run_cli
from tests.support.dcmtk import HOST, StoreSCP, free_port
from tests.support.seed import Seeder
from tests.support.synth import make_study

DESTINATIONS = {
    "pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": 1, "pause_after_failures": 1},
    "archive-with-a-long-name": {"ae_title": "ARCH", "host": "127.0.0.1", "port": 2},
}


def cli(*args: str, columns: int = 80) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, env={"COLUMNS": str(columns)})


@pytest.fixture
def site(tmp_path: Path) -> tuple[ApiEnv, Path, Seeder]:
    """pacs is unreachable (probing) with jobs that failed to connect; the archive
    delivered one study and has another pending. Returns the API env, a config file
    for the CLI on the same index, and the seeder."""
    config = {
        "storage": {"path": str(tmp_path / "data")},
        "destinations": DESTINATIONS,
        "routes": [{"name": "all", "to": list(DESTINATIONS)}],
    }
    env = api_env(tmp_path, config)
    seed = Seeder(env, tmp_path / "in")
    seed.receive_study(3)
    seed.plan()
    seed.unreachable("pacs")
    DestinationHealth("pacs", env.config.destinations["pacs"], env.engine).record_unreachable(
        "connection refused"
    )
    seed.deliver("archive-with-a-long-name")
    seed.receive_study(2)
    seed.plan()
    path = tmp_path / "router.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return env, path, seed


def _lines_fit(text: str, width: int = 80) -> None:
    assert "…" not in text, text  # nothing cut: headers, states, names
    assert max(len(line) for line in text.splitlines()) <= width, text


def test_queue_list_fits_80_columns_with_full_states_and_the_api_vocabulary(
    site: tuple[ApiEnv, Path, Seeder],
) -> None:
    env, config, _ = site
    result = cli("queue", "list", "-c", str(config))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    _lines_fit(out)
    for word in ("scheduled", "pending", "completed", "probing", "delivery", "attempts"):
        assert word in out, word
    assert "connection" in out and "failures" in out
    assert "do not use up retry.max_attempts" in " ".join(out.split())
    # pacs is unreachable: "probing", as the API and the dashboard say it.
    row = next(line.split() for line in out.splitlines() if line.split()[:1] == ["pacs"])
    assert row[1] == "probing"
    states = {d["name"]: d["state"] for d in env.viewer.get("/api/v1/destinations").json()}
    assert states["pacs"] == "probing"
    assert '<span class="badge probing">probing</span>' in env.viewer.get("/destinations").text


def test_cli_json_has_the_api_field_names(site: tuple[ApiEnv, Path, Seeder]) -> None:
    env, config, _ = site
    listed = json.loads(cli("queue", "list", "-c", str(config), "--json").stdout)
    api_jobs = env.viewer.get("/api/v1/jobs").json()
    api_dests = env.viewer.get("/api/v1/destinations").json()
    assert listed["total"] == api_jobs["total"]
    assert set(listed["jobs"][0]) == set(api_jobs["items"][0])
    assert {"total", "delivered", "connection_failures"} <= set(listed["jobs"][0])
    assert set(listed["destinations"][0]) == set(api_dests[0])
    assert [d["state"] for d in listed["destinations"]] == [d["state"] for d in api_dests]
    job_id = listed["jobs"][-1]["id"]
    shown = json.loads(cli("queue", "show", str(job_id), "-c", str(config), "--json").stdout)
    api_job = env.viewer.get(f"/api/v1/jobs/{job_id}").json()
    assert set(shown) == set(api_job) and {"total", "delivered"} <= set(shown)
    assert set(shown["attempts"][0]) == set(api_job["attempts"][0])


def test_cli_test_rule_json_has_the_api_field_names(
    site: tuple[ApiEnv, Path, Seeder], tmp_path: Path
) -> None:
    env, config, _ = site
    (file,) = make_study(tmp_path / "probe", 1)
    result = cli("test-rule", str(file), "-c", str(config), "--json")
    assert result.returncode == 0, result.stderr
    ours = json.loads(result.stdout)
    with file.open("rb") as handle:
        theirs = env.operator.post(
            "/api/v1/routes/test", files={"files": (file.name, handle, "application/dicom")}
        ).json()
    assert set(ours) == set(theirs) == {"files"}
    assert set(ours["files"][0]) == set(theirs["files"][0])
    assert set(ours["files"][0]["routes"][0]) == set(theirs["files"][0]["routes"][0])
    assert ours["files"][0]["routes"][0]["destinations"] == list(DESTINATIONS)


def test_queue_show_names_both_counts_and_fits_80_columns(
    site: tuple[ApiEnv, Path, Seeder],
) -> None:
    env, config, _ = site
    items = env.viewer.get("/api/v1/jobs?destination=pacs&state=pending").json()["items"]
    first = min(j["id"] for j in items)
    result = cli("queue", "show", str(first), "-c", str(config))
    assert result.returncode == 0, result.stderr
    _lines_fit(result.stdout)
    assert re.search(r"delivery attempts:\s+0 of 20 \(retry.max_attempts\)", result.stdout)
    assert re.search(r"connection failures:\s+1 \(do not use up", result.stdout)
    assert "{'id'" not in result.stdout  # no raw list of attempt dicts
    assert "unavailable" in result.stdout and "connection refused" in result.stdout


def test_retry_and_cancel_say_why_nothing_changed(site: tuple[ApiEnv, Path, Seeder]) -> None:
    env, config, _ = site
    done = env.viewer.get("/api/v1/jobs?state=completed").json()["items"][0]["id"]
    one = cli("queue", "retry", str(done), "-c", str(config))
    assert one.returncode == 1 and f"job {done} is completed: nothing to retry" in one.stderr
    api = env.operator.post(f"/api/v1/jobs/{done}/retry")
    assert api.status_code == 409 and api.json()["detail"] in one.stderr.replace("\n", " ")
    missing = cli("queue", "cancel", "99999", "-c", str(config))
    assert missing.returncode == 1 and "no job 99999" in missing.stderr
    several = cli("queue", "cancel", str(done), "99999", "-c", str(config))
    assert several.returncode == 1
    assert "cancel: 0 of 2 job(s) changed" in several.stdout
    assert f"not changed: job {done} is completed: nothing to cancel" in several.stdout
    assert "not changed: no job 99999" in several.stdout


def test_the_dashboard_shows_both_counts_and_old_errors_as_history(
    site: tuple[ApiEnv, Path, Seeder],
) -> None:
    env, _, seed = site
    items = env.viewer.get("/api/v1/jobs?destination=pacs&state=pending").json()["items"]
    job = min(items, key=lambda j: j["id"])
    html = env.viewer.get(f"/jobs/{job['id']}").text
    assert "Delivery attempts</dt><dd>0 of 20" in html
    assert re.search(r"Connection failures</dt><dd[^>]*>1 ", html)
    assert "{&#39;id&#39;" not in html and "{'id'" not in html  # not the raw list
    assert '<span class="badge unavailable">unavailable</span>' in html
    # An error, then a delivery: the error is history, with its time, in grey.
    DestinationHealth("pacs", env.config.destinations["pacs"], env.engine).record_success()
    time.sleep(0.01)
    assert seed.deliver("pacs")
    (pacs,) = [d for d in env.viewer.get("/api/v1/destinations").json() if d["name"] == "pacs"]
    assert pacs["state"] == "ok" and pacs["last_error_current"] is False
    page = env.viewer.get("/destinations").text
    assert re.search(r'class="muted history"[^>]*>[^<]* ago, delivered since: connection', page)


def test_a_down_destination_has_no_failure_rate_anywhere(
    site: tuple[ApiEnv, Path, Seeder],
) -> None:
    env, _, _ = site
    (pacs,) = [d for d in env.viewer.get("/api/v1/destinations").json() if d["name"] == "pacs"]
    assert pacs["failure_rate"] is None  # nothing sent: unknown, not 0 %
    overview = env.viewer.get("/").text
    failure = overview[overview.index("Failure rate (last hour)") :]
    pacs_row = failure[failure.index(">pacs</text>") :]
    assert pacs_row.index('data-total="">—</text>') < pacs_row.index("</text>", 14) + 40
    assert "—" in env.viewer.get("/destinations").text


def test_oldest_pending_skips_jobs_waiting_for_their_send_window(tmp_path: Path) -> None:
    closed = "00:00-00:01" if time.localtime().tm_hour >= 1 else "12:00-12:01"
    dest = {"ae_title": "PACS", "host": "127.0.0.1", "port": 1, "send_window": closed}
    env = api_env(
        tmp_path, {"destinations": {"pacs": dest}, "routes": [{"name": "all", "to": ["pacs"]}]}
    )
    seed = Seeder(env, tmp_path / "in")
    seed.receive_study(1)
    seed.plan()
    (pacs,) = env.viewer.get("/api/v1/destinations").json()
    assert pacs["queue"]["scheduled"] == 1
    assert pacs["oldest_pending_age_s"] is None  # the same as /metrics and queue_stale
    metrics = env.viewer.get("/metrics").text
    assert 'dicomrouter_queue_oldest_pending_age_seconds{destination="pacs"} 0.0' in metrics


@pytest.mark.interop
def test_echo_a_configured_destination_by_name(tmp_path: Path, pacs: StoreSCP) -> None:
    config = tmp_path / "router.yaml"
    data = {
        "storage": {"path": str(tmp_path / "data")},
        "destinations": {
            "pacs": {"ae_title": "PACS", "host": HOST, "port": pacs.port},
            "gone": {"ae_title": "GONE", "host": HOST, "port": free_port(), "connect_timeout": 2},
        },
    }
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    ok = cli("echo", "pacs", "-c", str(config))
    assert ok.returncode == 0, ok.stderr
    assert f"C-ECHO to pacs (PACS@{HOST}:{pacs.port}) succeeded" in ok.stdout
    down = cli("echo", "gone", "-c", str(config))
    assert down.returncode == 1 and "C-ECHO to gone (GONE@" in down.stderr
    assert "failed" in down.stderr
    unknown = cli("echo", "nowhere", "-c", str(config))
    assert unknown.returncode == 1
    assert "no destination 'nowhere' in the configuration (known: pacs, gone)" in unknown.stderr
    # With the router's index there, the echo is audited like the API's.
    settings = parse_config(data, environ={})
    ObjectStore(settings.storage.path, settings.node.name).prepare()
    create_index_engine(settings.database_url).dispose()
    assert cli("echo", "pacs", "-c", str(config)).returncode == 0
    from dicomrouter.store import audit

    engine = create_index_engine(settings.database_url)
    _, entries = audit.query(engine, action="destination.echo")
    assert [(e["target"], e["source"], e["outcome"]) for e in entries] == [("pacs", "cli", "ok")]


def test_every_refused_c_store_is_logged_with_status_and_reason(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = {
        "storage": {"path": str(tmp_path / "data"), "min_free_space": 2**60},
        "dicom": {"port": free_port(), "bind": HOST},
    }
    config = parse_config(data, environ={})
    store = ObjectStore(config.storage.path, config.node.name)
    store.prepare()
    receiver = Receiver(config, store, InstanceIndex(create_index_engine(config.database_url)))
    files = make_study(tmp_path / "in", 3)
    batch = []
    for index, file in enumerate(files):
        header = InstanceHeader.from_dataset(read_header(file))
        batch.append(
            OutgoingInstance(
                index,
                file,
                header.sop_class_uid,
                header.sop_instance_uid,
                header.transfer_syntax_uid,
            )
        )
    dest = parse_config(
        {
            "destinations": {
                "r": {"ae_title": config.ae_title, "host": HOST, "port": config.dicom.port}
            }
        },
        environ={},
    ).destinations["r"]
    receiver.start()
    try:
        with caplog.at_level(logging.INFO, logger="dicomrouter"):
            sender = DicomSender(dest, "MODALITY")
            try:
                sender.send(batch)
            finally:
                sender.close()
            deadline = time.time() + 10
            while "3 refused" not in caplog.text and time.time() < deadline:
                time.sleep(0.05)
    finally:
        receiver.stop()
    refused = [r for r in caplog.records if r.getMessage().startswith("refused C-STORE")]
    assert len(refused) == 3 and all(r.levelno == logging.WARNING for r in refused)
    message = refused[0].getMessage()
    assert "\n" not in message
    assert f"from MODALITY ({HOST})" in message
    assert "0xA700" in message and "storage is full" in message
    assert {batch[i].sop_instance_uid for i in range(3)} == {
        r.getMessage().split()[3] for r in refused
    }
    assert "0 stored, 3 refused" in caplog.text
