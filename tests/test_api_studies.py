"""``/api/v1/studies``: search and the "where did this study go?" trace.

The index is filled by the real receive, plan and settle code (tests/support/history),
so the trace is checked against what the router itself records.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from dicomrouter.config import parse_config
from dicomrouter.control import studies
from tests.support.api import ApiEnv, api_env, auth_section
from tests.support.history import DEST, plan, receive, settle
from tests.support.synth import make_study

CONFIG: dict[str, Any] = {
    "destinations": {"pacs": DEST, "ai": {**DEST, "ae_title": "AI", "port": 4243}},
    "routes": [
        {
            "name": "ct-to-pacs",
            "trigger": "study",
            "when": {"Modality": "CT", "CallingAETitle": "CT1"},
            "to": ["pacs"],
        },
        {"name": "mr-to-ai", "when": {"Modality": "MR"}, "to": ["ai"]},
    ],
}


def two_studies(tmp_path: Path) -> tuple[ApiEnv, str, str]:
    env = api_env(tmp_path, dict(CONFIG))
    ct = make_study(
        tmp_path / "ct",
        3,
        modality="CT",
        patient_id="P1",
        patient_name="DOE^JOHN",
        accession_number="ACC1",
        prefix="C",
    )
    mr = make_study(
        tmp_path / "mr",
        2,
        modality="MR",
        patient_id="P2",
        patient_name="SMITH^ANNA",
        accession_number="ACC2",
        prefix="M",
    )
    receive(env, ct, calling_ae="CT1", address="10.0.0.1")
    receive(env, mr, calling_ae="MR1", address="10.0.0.2")
    plan(env)
    return env, uid_of(ct[0]), uid_of(mr[0])


def uid_of(path: Path) -> str:
    from pydicom import dcmread

    return str(dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def found(env: ApiEnv, **params: Any) -> list[str]:
    response = env.viewer.get("/api/v1/studies", params=params)
    assert response.status_code == 200, response.text
    return [item["study_instance_uid"] for item in response.json()["items"]]


def test_studies_need_a_login(tmp_path: Path) -> None:
    env, ct, _ = two_studies(tmp_path)
    assert env.anonymous.get("/api/v1/studies").status_code == 401
    assert env.anonymous.get(f"/api/v1/studies/{ct}/trace").status_code == 401
    for role in ("viewer", "operator", "admin"):
        assert env.client(role).get("/api/v1/studies").status_code == 200
        assert env.client(role).get(f"/api/v1/studies/{ct}/trace").status_code == 200


def test_search_filters_combine_and_accept_dicom_wildcards(tmp_path: Path) -> None:
    env, ct, mr = two_studies(tmp_path)
    assert found(env) == [mr, ct]  # newest reception first
    assert found(env, patient_name="DOE^*") == [ct]
    assert found(env, patient_name="SMITH^ANN?") == [mr]
    assert found(env, patient_name="SMITH^AN?") == []  # ? is exactly one character
    assert found(env, patient_name="doe^*") == [ct]  # letters in any case, on both databases
    assert found(env, patient_id="P2") == [mr]
    assert found(env, patient_id="P") == []  # no wildcard: exact
    assert found(env, accession_number="ACC1") == [ct]
    assert found(env, modality="mr") == [mr]
    assert found(env, calling_ae="CT1") == [ct]
    assert found(env, calling_ae="CT1", modality="MR") == []
    today = time.strftime("%Y%m%d")
    assert found(env, study_date_from=today, study_date_to=today) == [mr, ct]
    assert found(env, study_date_from="29990101") == []
    assert (
        env.viewer.get("/api/v1/studies", params={"study_date_from": "2024-01-01"}).status_code
        == 422
    )

    page = env.viewer.get("/api/v1/studies", params={"limit": 1, "offset": 1}).json()
    assert (page["total"], page["limit"], page["offset"]) == (2, 1, 1)
    [item] = page["items"]
    assert item["study_instance_uid"] == ct
    assert item["patient_name"] == "DOE^JOHN" and item["accession_number"] == "ACC1"
    assert (item["instances"], item["series"]) == (3, 1)
    assert item["modalities"] == ["CT"] and item["calling_aes"] == ["CT1"]
    assert item["deliveries"] == {"pending": 1}  # one study-level job
    assert item["first_received_at"] <= item["last_received_at"]


def test_trace_of_a_routed_and_delivered_study_reads_in_order(tmp_path: Path) -> None:
    env, ct, _ = two_studies(tmp_path)
    [job_id] = settle(env, "pacs")

    response = env.viewer.get(f"/api/v1/studies/{ct}/trace")
    assert response.status_code == 200
    trace = response.json()
    kinds = [event["kind"] for event in trace["events"]]
    assert kinds == ["received"] * 3 + ["matched", "queued", "attempt", "delivered"]
    times = [event["at"] for event in trace["events"]]
    assert times == sorted(times)

    received = trace["events"][0]
    assert (received["calling_ae"], received["source_address"]) == ("CT1", "10.0.0.1")
    matched = trace["events"][3]
    assert matched["route"] == "ct-to-pacs" and matched["instances"] == 3
    assert matched["route_exists"] is True and matched["matches_now"] is True
    # Why: re-read from a stored header and explained with the route's conditions.
    assert "Modality 'CT' equals 'CT'" in matched["reason"]
    assert "CallingAETitle 'CT1'" in matched["reason"]
    delivered = trace["events"][-1]
    assert (delivered["job_id"], delivered["destination"], delivered["delivered"]) == (
        job_id,
        "pacs",
        3,
    )

    [delivery] = trace["deliveries"]
    assert delivery["state"] == "completed" and delivery["routes"] == ["ct-to-pacs"]
    assert (delivery["instances"], delivery["delivered"], delivery["failed"]) == (3, 3, 0)
    assert [a["outcome"] for a in delivery["attempts"]] == ["completed"]
    assert delivery["created_at"] <= delivery["finished_at"]
    assert trace["study"]["deliveries"] == {"completed": 1}


def test_trace_shows_a_failed_delivery_and_a_route_removed_since(tmp_path: Path) -> None:
    env, _, mr = two_studies(tmp_path)
    settle(env, "ai", ok=False)
    trace = env.viewer.get(f"/api/v1/studies/{mr}/trace").json()
    failed = [e for e in trace["events"] if e["kind"] == "failed"]
    assert len(failed) == 2  # two instance-level jobs, each refused
    assert all("0xC000" in e["message"] for e in failed)
    assert {d["failed"] for d in trace["deliveries"]} == {1}

    # The rule is gone from the live configuration: the trace says so.
    data = {**CONFIG, "routes": CONFIG["routes"][:1]}
    data["storage"] = {"path": str(tmp_path / "data")}
    data["auth"] = auth_section()
    env.ctx.config = parse_config(data, environ={})
    matched = next(
        e
        for e in env.viewer.get(f"/api/v1/studies/{mr}/trace").json()["events"]
        if e["kind"] == "matched"
    )
    assert matched["route_exists"] is False
    assert "no longer in the configuration" in matched["reason"]


def test_a_big_study_is_traced_per_series_and_sender(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(studies, "PER_INSTANCE_EVENTS", 3)
    env = api_env(tmp_path, dict(CONFIG))
    files = make_study(tmp_path / "big", 6, modality="CT", series_count=2)
    receive(env, files[:4], calling_ae="CT1", address="10.0.0.1")
    receive(env, files[4:], calling_ae="CT2", address="10.0.0.7")
    plan(env)
    trace = env.viewer.get(f"/api/v1/studies/{uid_of(files[0])}/trace").json()
    received = [e for e in trace["events"] if e["kind"] == "received"]
    # 3 + 3 instances in two series; series 2 came from two senders.
    assert sorted((e["calling_ae"], e["instances"]) for e in received) == [
        ("CT1", 1),
        ("CT1", 3),
        ("CT2", 2),
    ]
    assert all(e["first_at"] <= e["last_at"] for e in received)
    # Only CT1's instances satisfy the CallingAETitle condition.
    [matched] = [e for e in trace["events"] if e["kind"] == "matched"]
    assert matched["instances"] == 4


def test_unknown_study_is_404(tmp_path: Path) -> None:
    env = api_env(tmp_path, dict(CONFIG))
    response = env.viewer.get("/api/v1/studies/1.2.3.4/trace")
    assert response.status_code == 404
    assert env.viewer.get("/api/v1/studies").json() == {
        "total": 0,
        "limit": 50,
        "offset": 0,
        "items": [],
    }


def test_many_jobs_are_grouped_per_destination_and_kind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(studies, "PER_JOB_EVENTS", 1)
    env, _, mr = two_studies(tmp_path)  # mr-to-ai routes instance by instance: 2 jobs
    settle(env, "ai")
    trace = env.viewer.get(f"/api/v1/studies/{mr}/trace").json()
    assert len(trace["deliveries"]) == 2  # still one entry per job
    grouped = [e for e in trace["events"] if e["kind"] != "received"]
    assert [(e["kind"], e.get("jobs")) for e in grouped] == [
        ("matched", None),
        ("queued", 2),
        ("attempt", 2),
        ("delivered", 2),
    ]
    assert grouped[1]["instances"] == 2 and grouped[-1]["delivered"] == 2
    assert sorted(grouped[-1]["job_ids"]) == sorted(d["job_id"] for d in trace["deliveries"])


def test_newest_first_pages_match_grouping_every_row_with_ties_and_offsets() -> None:
    """The walk behind the unfiltered study list and a route's history: same page as
    ``GROUP BY key ORDER BY max(time) DESC, key`` for every offset, ties included, and
    None (fall back) when its budget runs out before the page is settled."""
    import random

    from sqlalchemy import Column, Float, MetaData, String, Table, create_engine, func, select

    from dicomrouter.control.routes import newest_keys

    metadata = MetaData()
    rows = Table("rows", metadata, Column("at", Float), Column("key", String))
    engine = create_engine("sqlite://")
    metadata.create_all(engine)
    rng = random.Random(7)
    data = [{"at": float(rng.randrange(40)), "key": f"s{rng.randrange(60)}"} for _ in range(400)]
    walk = select(rows.c.at, rows.c.key).order_by(rows.c.at.desc())
    with engine.begin() as conn:
        conn.execute(rows.insert(), data)
        last = func.max(rows.c.at)
        grouped = [
            (row[0], row[1])
            for row in conn.execute(
                select(rows.c.key, last).group_by(rows.c.key).order_by(last.desc(), rows.c.key)
            )
        ]
        for needed in (1, 2, 5, 17, len(grouped), len(grouped) + 3):
            assert newest_keys(conn, walk, needed) == grouped[:needed], needed
        assert newest_keys(conn, walk, 0) == []
        assert newest_keys(conn, walk, len(grouped), budget=50) is None
