"""Planning with transforms and priorities: which deliveries, which jobs, which order.

A delivery is one (destination, instance, generation, route pipeline): two routes
that send one instance to one destination through different pipelines make two
deliveries (both copies are what the rules say), through the same pipeline one.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, text

from dicomrouter.queue import JobStore
from dicomrouter.store import create_index_engine
from dicomrouter.store.schema import SCHEMA_VERSION, job_instances
from tests.support.synth import make_study
from tests.test_queue import DEST, Pipeline, route

TRANSFORMS = {
    "research": [{"set": {"InstitutionName": "X"}}],
    "fix": [{"set": {"StationName": "Y"}}],
}


def test_routes_with_different_pipelines_to_one_destination_make_separate_deliveries(
    tmp_path: Path,
) -> None:
    config = {
        "destinations": {"pacs": DEST},
        "transforms": TRANSFORMS,
        "routes": [
            route(name="plain", trigger="study", stable_after="1s"),
            route(name="deid", trigger="study", stable_after="1s", transform="research"),
            route(name="also-deid", trigger="study", stable_after="1s", transform="research"),
        ],
    }
    p = Pipeline(tmp_path, config)
    files = make_study(tmp_path / "in", 3)
    p.receive(files)
    p.plan(later=5)
    found = p.job_list()
    assert sorted((j["transform"], tuple(j["routes"]), j["total"]) for j in found) == [
        ("", ("plain",), 3),
        ("research", ("also-deid", "deid"), 3),
    ]
    with p.engine.connect() as conn:
        rows = conn.execute(select(job_instances.c.transform)).scalars().all()
    assert sorted(rows) == [""] * 3 + ["research"] * 3
    # Planning again (a follow-up) sends nothing twice.
    p.plan(later=10)
    assert len(p.job_list()) == 2


def test_an_urgent_route_is_claimed_before_older_normal_and_low_jobs(tmp_path: Path) -> None:
    config = {
        "destinations": {"pacs": DEST},
        "routes": [
            route(name="low", when={"Modality": "MR"}, priority="low"),
            route(name="normal", when={"Modality": "CT"}),
            route(name="urgent", when={"Modality": "CR"}, priority="urgent"),
        ],
    }
    p = Pipeline(tmp_path, config)
    p.receive(make_study(tmp_path / "mr", 1, modality="MR", prefix="M"))
    p.receive(make_study(tmp_path / "ct", 1, modality="CT", prefix="C"))
    p.receive(make_study(tmp_path / "cr", 1, modality="CR", prefix="R"))
    p.plan()
    by_route = {j["routes"][0]: j for j in p.job_list()}
    assert {name: j["priority"] for name, j in by_route.items()} == {
        "low": -10,
        "normal": 0,
        "urgent": 10,
    }
    order = []
    store = JobStore(p.engine)
    while (claim := store.claim("pacs", "w", 60, max_jobs=1)) is not None:
        order.append(claim.job_ids[0])
        store.finish(claim, p.config.destinations["pacs"], False, 0, "", "completed", 0, 0)
        store.cancel(claim.job_ids)  # out of the way of the next claim
    names = {j["id"]: name for name, j in by_route.items()}
    assert [names[i] for i in order] == ["urgent", "normal", "low"]


def test_a_route_joining_a_waiting_job_raises_its_priority(tmp_path: Path) -> None:
    config = {
        "destinations": {"pacs": DEST},
        "routes": [
            route(name="all", trigger="study", stable_after="1s"),
            route(name="stat", trigger="study", stable_after="2s", priority="urgent"),
        ],
    }
    p = Pipeline(tmp_path, config)
    p.receive(make_study(tmp_path / "in", 2))
    p.plan(later=1.5)  # only "all" is stable: a normal job waits
    (job,) = p.job_list()
    assert job["priority"] == 0
    p.plan(later=5)  # "stat" names the same study: nothing new to send, but urgent now
    assert [(j["id"], j["priority"]) for j in p.job_list()] == [(job["id"], 10)]


@pytest.mark.sqlite_only
def test_an_index_from_schema_6_keeps_its_deliveries_and_takes_pipelines(tmp_path: Path) -> None:
    """Schema 7 rebuilds job_instances (its unique key gains the pipeline): every
    delivery survives, and the same instance may then go out through two pipelines."""
    url = f"sqlite:///{tmp_path / 'index.sqlite'}"
    create_index_engine(url).dispose()
    # The old table, as schema 6 made it (plain sqlite3: rows without their parents).
    with sqlite3.connect(tmp_path / "index.sqlite") as raw:
        conn = _Raw(raw)
        conn.execute(text("DROP TABLE job_instances"))
        conn.execute(
            text(
                "CREATE TABLE job_instances (job_id INTEGER NOT NULL REFERENCES jobs (id), "
                "instance_id INTEGER NOT NULL REFERENCES instances (id), destination "
                "VARCHAR(128) NOT NULL, generation INTEGER NOT NULL, state VARCHAR(16) NOT "
                "NULL, status INTEGER, message TEXT, updated_at FLOAT NOT NULL, PRIMARY KEY "
                "(job_id, instance_id), CONSTRAINT uq_delivery UNIQUE (destination, "
                "instance_id, generation))"
            )
        )
        conn.execute(text("ALTER TABLE jobs DROP COLUMN transform"))
        for job_id in (1, 2, 3, 4):
            conn.execute(
                text(
                    "INSERT INTO jobs (id, destination, level, resource_uid, study_instance_uid,"
                    " routes, state, priority, attempts, connection_failures, next_attempt_at,"
                    f" created_at, updated_at) VALUES ({job_id}, 'pacs', 'study', '1.2', '1.2',"
                    " 'r', 'pending', 0, 0, 0, 0, 0, 0)"
                )
            )
        for instance_id in (7, 8):
            conn.execute(
                text(
                    "INSERT INTO instances (id, sop_instance_uid, sop_class_uid, "
                    "transfer_syntax_uid, study_instance_uid, series_instance_uid, patient_id, "
                    "patient_name, accession_number, study_date, study_description, modality, "
                    "path, size, received_at, calling_ae, called_ae, source_address, "
                    f"generation, routed) VALUES ({instance_id}, '1.{instance_id}', '1.2', "
                    "'1.2.840.10008.1.2.1', '1.2', '1.3', '', '', '', '', '', 'CT', 'p', 1, 0, "
                    "'', '', '', 1, 1)"
                )
            )
        conn.execute(
            text(
                "INSERT INTO job_instances VALUES (1, 7, 'pacs', 1, 'completed', 0, 'ok', 5.0),"
                " (2, 8, 'pacs', 1, 'pending', NULL, NULL, 6.0)"
            )
        )
        conn.execute(text("UPDATE meta_info SET value = '6' WHERE key = 'schema'"))
    upgraded = create_index_engine(url)
    with upgraded.begin() as conn:
        rows = conn.execute(
            text("SELECT job_id, instance_id, state, message, transform FROM job_instances")
        ).all()
        assert sorted(tuple(r) for r in rows) == [
            (1, 7, "completed", "ok", ""),
            (2, 8, "pending", None, ""),
        ]
        # The same delivery through another pipeline is now allowed...
        conn.execute(
            text(
                "INSERT INTO job_instances (job_id, instance_id, destination, generation, "
                "state, updated_at, transform) VALUES (3, 7, 'pacs', 1, 'pending', 7, 'r')"
            )
        )
        version = conn.execute(text("SELECT value FROM meta_info WHERE key='schema'")).scalar()
        jobs_columns = {row[1] for row in conn.execute(text("PRAGMA table_info(jobs)"))}
        indexes = {row[1] for row in conn.execute(text("PRAGMA index_list(job_instances)"))}
    assert version == str(SCHEMA_VERSION) and "transform" in jobs_columns
    assert {"ix_job_instances_state", "ix_job_instances_instance"} <= indexes
    # ...and through the same one it is still refused.
    with upgraded.begin() as conn:
        try:
            conn.execute(
                text(
                    "INSERT INTO job_instances (job_id, instance_id, destination, generation, "
                    "state, updated_at, transform) VALUES (4, 7, 'pacs', 1, 'pending', 7, 'r')"
                )
            )
        except Exception as exc:
            assert "UNIQUE" in str(exc)
        else:
            raise AssertionError("a duplicate delivery was accepted")


class _Raw:
    """``conn.execute(text(...))`` on a plain sqlite3 connection."""

    def __init__(self, raw: sqlite3.Connection) -> None:
        self.raw = raw

    def execute(self, statement: Any) -> None:
        self.raw.execute(str(statement))


def test_the_item_limit_cuts_the_least_urgent_jobs_not_the_urgent_one(tmp_path: Path) -> None:
    config = {
        "destinations": {"pacs": DEST},
        "routes": [
            route(name="normal", when={"Modality": "CT"}),
            route(name="urgent", when={"Modality": "CR"}, priority="urgent"),
        ],
    }
    p = Pipeline(tmp_path, config)
    p.receive(make_study(tmp_path / "ct", 4, modality="CT", prefix="C"))
    p.receive(make_study(tmp_path / "cr", 1, modality="CR", prefix="R"))
    p.plan()
    urgent = next(j["id"] for j in p.job_list() if j["routes"] == ["urgent"])
    claim = JobStore(p.engine).claim("pacs", "w", 60, max_items=2)
    assert claim is not None
    assert claim.items[0].job_id == urgent and urgent in claim.job_ids
